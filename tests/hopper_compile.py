"""Compile the decode step's kernel launches for an H100 (sm_90) on a machine without a GPU.

Triton's interpreter (the CPU tests) runs a kernel's Python, not the compiler: a kernel that
the compiler refuses, or whose pipeline needs more shared memory than a Hopper SM has, passes
there and fails only on the GPU. Here every kernel is launched as a Mistral-7B decode step (and
a prefill) launches it, on empty CPU tensors of the real shapes; the launches are recorded
instead of run, and each is compiled for sm_90 (with programmatic dependent launch, as an
H100 launches them: server/kernels/launch.py). Prints one JSON line: each kernel variant's shared memory,
its unguarded zeroing stores (`unguarded_zeroing`), its registers a thread and the bytes a
thread spills to local memory (cuobjdump's resource usage of the compiled cubin).

    python tests/hopper_compile.py        (run by tests/test_kernels_compile.py)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions: they are compiled, not interpreted
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import server.kernels.launch  # noqa: E402

server.kernels.launch.PDL, server.kernels.launch.LAUNCH = True, {"launch_pdl": True}  # before the kernels import them

from server.kernels.activation import silu_and_mul  # noqa: E402
from server.kernels.decode_attention import decode_attention  # noqa: E402
from server.kernels.fused_moe import fused_moe  # noqa: E402
from server.kernels.gemv import gemv  # noqa: E402
from server.kernels.int4_gemv import MMA_MAX_ROWS, int4_gemv, mma_config  # noqa: E402
from server.kernels.norm import rmsnorm  # noqa: E402
from server.kernels.prefill_attention import prefill_attention  # noqa: E402
from server.kernels.quant_reference import FP8, Fp8Experts, Int4Experts  # noqa: E402
from server.kernels.quantized_moe import quantized_moe  # noqa: E402
from server.kernels.rotary import rotate_and_store  # noqa: E402
from server.kernels.lora import LoRAUpdate, lora_expand, lora_rows, lora_shrink  # noqa: E402
from server.kernels.sampling import sample_rows  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
launches: list[tuple[JITFunction, tuple, dict]] = []


def record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def compiled(jit: JITFunction, args: tuple, kwargs: dict):
    """Compile one recorded launch for sm_90 as JITFunction.run would: the same binding of the
    arguments, and the same specialization (16-byte aligned pointers and sizes divisible by
    16, which decide whether the pipeline copies through shared memory)."""
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(jit, signature, constexprs, attrs)
    pointers = [kind for kind in signature.values() if isinstance(kind, str) and kind.startswith("*")]
    return triton.compile(source, target=HOPPER, options=options.__dict__), list(constexprs.values()) + pointers


def decode_step_launches() -> None:
    """The launches of a Mistral-7B layer's decode step (1, 2 and 16 sequences, bf16, fp8 and
    4-bit weights, bf16 and fp8 cache), its LM head, a prefill's attention, LoRA updates, the
    sampling of its random rows, and Mixtral-8x7B's experts for each size of tiles (1 to 4,096
    tokens), bf16, 4-bit (group 128: consecutive groups, act-order, a rank's uneven groups) and
    fp8."""
    e = torch.empty
    bf16 = torch.bfloat16
    shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "lm_head": (32768, 4096)}
    for M in (1, 2, 16):
        for name, (N, K) in shapes.items():
            gated = name == "down"
            x = e(M, 2 * K if gated else K, dtype=bf16)
            gemv(x, e(N, K, dtype=bf16), gated=gated)
            gemv(x, e(N, K, dtype=FP8), weight_scale=e(N), gated=gated)
            if name != "lm_head":  # 4-bit, group 128 (the silu of a gated input made before)
                int4 = (e(K // 8, N, dtype=torch.int32), e(K // 128, N, dtype=torch.uint8), e(K // 128, N, dtype=bf16))
                int4_gemv(e(M, K, dtype=bf16), *int4, None, 128)  # the multiply-adds (tiles for CPU tensors)
                if M <= MMA_MAX_ROWS:  # and the mma path, which CUDA tensors take, also leaving deferred sums
                    int4_gemv(e(M, K, dtype=bf16), *int4, None, 128, mma_config(M, N, K, 128))
                    int4_gemv(e(M, K, dtype=bf16), *int4, None, 128, mma_config(M, N, K, 128),
                              sums=e(M, N, dtype=torch.int64))
        for x_dtype in (bf16, torch.int64):  # int64: deferred sums
            rmsnorm(e(M, 4096, dtype=x_dtype), e(4096, dtype=bf16), 1e-5, e(M, 4096, dtype=bf16), dtype=bf16)
            silu_and_mul(e(M, 28672, dtype=x_dtype), bf16)
        positions, slots = torch.zeros(M, dtype=torch.int64), torch.zeros(M, dtype=torch.int64)
        q, k, v = (t.view(M, -1, 128) for t in e(M, 6144, dtype=torch.int64).split([4096, 1024, 1024], dim=-1))
        rotate_and_store(positions, q, k, v, e(4096, 128), e(64, 16, 8, 128, dtype=bf16), e(64, 16, 8, 128, dtype=bf16),
                         slots, q_out=e(M, 32, 128, dtype=bf16))
        q, k, v = e(M, 6144, dtype=bf16).split([4096, 1024, 1024], dim=-1)
        q, k, v = (t.view(M, -1, 128) for t in (q, k, v))
        for cache_dtype in (bf16, FP8):
            caches = e(64, 16, 8, 128, dtype=cache_dtype), e(64, 16, 8, 128, dtype=cache_dtype)
            rotate_and_store(positions, q, k, v, e(4096, 128), *caches, slots)
            tables, lens = torch.zeros(M, 8, dtype=torch.int32), torch.zeros(M, dtype=torch.int32)
            for splits in (32,) if M == 1 else (1, 4):  # one split: no merge, the output written as it is
                decode_attention(q, *caches, tables, lens, 0.088, None, splits)
            if M > 1:  # a mixed step: some sequences through each kernel, indexed
                ids = torch.zeros(M // 2, dtype=torch.int64)
                cu = torch.zeros(M + 1, dtype=torch.int64)
                decode_attention(q, *caches, tables, lens, 0.088, None, 4, out=e(M, 32, 128, dtype=bf16),
                                 seq_ids=ids, cu_query_lens=cu)
                prefill_attention(e(512, 32, 128, dtype=bf16), *caches, tables, cu, lens, 64, 0.088, None,
                                  seq_ids=ids)
            prefill_attention(e(512, 32, 128, dtype=bf16), *caches, tables[:1], torch.zeros(2, dtype=torch.int32),
                              lens[:1], 512, 0.088, None)
    for M in (1, 256, 4096):  # LoRA updates of rank 16: qkv's three pieces (decode steps and a prefill), gate/up
        rows = lora_rows(torch.arange(M) % 8, 8)
        t = lora_shrink(e(M, 4096, dtype=bf16), e(8, 48, 4096, dtype=bf16), rows)
        lora_expand(t, e(8, 6144, 48, dtype=bf16), rows, e(M, 6144, dtype=bf16))
        lora_expand(e(2, M, 32), e(8, 28672, 32, dtype=bf16), rows, e(M, 28672, dtype=bf16))
        t = lora_shrink(e(M, 2 * 14336, dtype=bf16), e(8, 16, 14336, dtype=bf16), rows, gated=True)
        if M == 1:  # and a decode step's products adding the updates in their epilogue, 1 to 16 rows
            for batch in (1, 2, 16):
                order = lora_rows(torch.arange(batch) % 8, 8)
                for name, (N, K) in shapes.items():
                    gated, rank = name == "down", {"qkv": 48, "gate_up": 32}.get(name, 16)
                    update = LoRAUpdate(e(4, batch, rank), e(8, N, rank, dtype=bf16), order, order.order)
                    gemv(e(batch, 2 * K if gated else K, dtype=bf16), e(N, K, dtype=bf16), gated=gated, lora=update)
                    gemv(e(batch, 2 * K if gated else K, dtype=bf16), e(N, K, dtype=FP8), weight_scale=e(N),
                         gated=gated, lora=update)
    for count in (1, 256):  # the sampling step's random rows, with no filter and with all three
        column, ids = e(count), torch.zeros(count, dtype=torch.int64)
        sample_rows(e(count, 32768), ids, column, ids)
        sample_rows(e(count, 32768), ids, column, ids, top_k=ids, top_p=column, min_p=column)
    w13, w2 = e(8, 2 * 14336, 4096, dtype=bf16), e(8, 4096, 14336, dtype=bf16)
    for tokens in (1, 4, 64, 256, 4096):  # the sort runs (on the CPU), the kernels are recorded
        ids = torch.arange(2 * tokens).view(tokens, 2) % 8
        fused_moe(e(tokens, 4096, dtype=bf16), w13, w2, torch.ones(tokens, 2), ids)
    quantized_experts_launches()


def quantized_experts_launches() -> None:
    """Mixtral-8x7B's experts, 4-bit and fp8, at each size of the quantized kernels' tiles (a
    block a pair with K split in four, then sorted by expert: K split in two, then whole)."""
    e = torch.empty
    bf16 = torch.bfloat16

    def int4(K: int, N: int, g_idx: bool = False, perm: bool = False) -> Int4Experts:
        return Int4Experts(e(8, K // 8, N, dtype=torch.int32), e(8, K // 128, N, dtype=torch.uint8),
                           e(8, K // 128, N, dtype=bf16), e(8, K, dtype=torch.int32) if g_idx else None,
                           e(8, K, dtype=torch.int32) if perm else None, 128)

    layouts = {"int4": (int4(4096, 28672), int4(14336, 4096)),
               "fp8": (Fp8Experts(e(8, 28672, 4096, dtype=FP8), e(8, 28672)),
                       Fp8Experts(e(8, 4096, 14336, dtype=FP8), e(8, 4096))),
               "act-order": (int4(4096, 28672, perm=True), int4(14336, 4096, g_idx=True, perm=True))}
    for name, (w13, w2) in layouts.items():
        for tokens in (1, 4096) if name == "act-order" else (1, 16, 256, 4096):
            ids = torch.arange(2 * tokens).view(tokens, 2) % 8
            quantized_moe(e(tokens, 4096, dtype=bf16), w13, w2, torch.ones(tokens, 2), ids)


def unguarded_zeroing(ttgir: str) -> int:
    """Stores of int64 zeros (a reader of deferred sums setting them back: server/kernels/deferred.py)
    with an int64 load before them and no barrier in between. The compiler may map the store to
    other threads than the load, so without a barrier a thread can zero what another has yet to
    read; the interpreter runs a program as whole-tensor steps and never shows it."""
    zeros, count, loaded = set(), 0, False
    for line in ttgir.splitlines():
        if "arith.constant dense<0>" in line and "xi64" in line:
            zeros.add(line.split("=")[0].strip())
        elif "tt.load" in line and "!tt.ptr<i64>" in line:
            loaded = True
        elif "gpu.barrier" in line:
            loaded = False
        elif "tt.store" in line and "!tt.ptr<i64>" in line:
            value = line.split("tt.store")[1].split(",")[1].strip()
            count += loaded and value in zeros
    return count


def registers_and_spills(cubin: bytes) -> tuple[int, int]:
    """Registers a thread and bytes of stack a thread (spilled registers) of a compiled kernel,
    from cuobjdump (Triton's wheel carries it beside ptxas)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2))


def main() -> None:
    JITFunction.run = record
    decode_step_launches()
    report, seen = {}, set()
    for jit, args, kwargs in launches:
        kernel, variant = compiled(jit, args, dict(kwargs))
        key = f"{jit.fn.__name__}({', '.join(str(v) for v in variant)})"
        if key not in seen:
            seen.add(key)
            report[key] = [kernel.metadata.shared, unguarded_zeroing(kernel.asm["ttgir"]),
                           *registers_and_spills(kernel.asm["cubin"])]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
