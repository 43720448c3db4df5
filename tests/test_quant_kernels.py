"""The quantization kernels against their torch references: 4-bit matmul and dequantization,
per-token fp8 quantization, the fp8 matmul, and attention over an fp8 KV cache. On the GPU
over Mistral-7B's shapes; on the CPU, in Triton's interpreter, over small ones.

The interpreter rounds float32 -> e4m3 wrongly where rounding carries into the exponent
(124.3 becomes 64, not 128), which the GPU's conversion does not; so on the CPU the kernels
that write fp8 are given values that e4m3 holds exactly, and the GPU checks the rounding."""
from __future__ import annotations

import pytest
import torch

from server.kernels.attention_reference import decode_attention_reference, prefill_attention_reference
from server.kernels.quant_reference import (FP8, dequantize_int4, fp8_matmul_reference, group_of_each_input,
                                     pack_int4, quantize_fp8_rows)
from server.kernels.reference import store_kv_reference
from test_kernels import CUDA, DEVICE, DTYPES, gpu_only, paged_cache, tol

on_gpu = [gpu_only, pytest.mark.gpu]  # Mistral-7B's shapes: selected by `-m gpu` on the device


def int4_weights(K: int, N: int, group_size: int, act_order: bool, dtype: torch.dtype, seed: int = 0):
    """Random 4-bit weights in our layout, scales in `dtype` -> (qweight, zeros, scales, g_idx
    or None, the float32 weight [N, K] they stand for)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (K // group_size, N), generator=g, dtype=torch.uint8)
    scales = (torch.rand(K // group_size, N, generator=g) * 2 / (8 * K ** 0.5)).to(dtype)  # outputs of about 1
    g_idx = group_of_each_input(K, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)].to(torch.int32)
    weight = dequantize_int4(q, zeros, scales, g_idx)
    return (pack_int4(q, dim=0).to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE),
            g_idx.to(DEVICE) if act_order else None, weight)


INT4_CASES = [(1, 256, 48, 64, False), (5, 128, 64, 32, True), (40, 256, 32, 128, False), (17, 64, 16, 32, True)] + [
    pytest.param(*case, marks=on_gpu) for case in [
        (1, 4096, 6144, 128, False), (1, 4096, 28672, 128, False), (1, 14336, 4096, 128, True),
        (16, 4096, 4096, 128, False), (64, 4096, 28672, 128, True), (256, 14336, 4096, 128, False),
        (200, 3584, 4096, 128, True)]]  # the last: a row-parallel rank's inputs under act-order


@pytest.mark.parametrize("M, K, N, group_size, act_order", INT4_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_matmul_matches_the_dequantized_weight(M, K, N, group_size, act_order, dtype):
    from server.kernels.int4_matmul import int4_matmul

    qweight, zeros, scales, g_idx, weight = int4_weights(K, N, group_size, act_order, dtype)
    x = torch.randn(M, K).to(dtype).to(DEVICE)
    out = int4_matmul(x, qweight, zeros, scales, g_idx, group_size, num_sms=132 if CUDA else 4)
    ref = x.float() @ weight.to(DEVICE).to(dtype).float().t()  # the weight rounded as the kernel rounds it
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("K, N, group_size, act_order", [(256, 48, 64, True), (128, 64, 128, False)] + [
    pytest.param(4096, 14336, 128, True, marks=on_gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_dequantize_gives_the_reference_weight_exactly(K, N, group_size, act_order, dtype):
    from server.kernels.int4_matmul import int4_dequantize

    qweight, zeros, scales, g_idx, weight = int4_weights(K, N, group_size, act_order, dtype, seed=1)
    dense = int4_dequantize(qweight, zeros, scales, g_idx, group_size, dtype)  # [K, N]
    assert torch.equal(dense.cpu(), weight.to(dtype).t())  # float32 products, rounded once


def e4m3_normals(rows: int, width: int, seed: int = 0, exponents=(-3, 5)) -> torch.Tensor:
    """Random normal e4m3 values, sign * (1 + m/8) * 2^e: a power-of-two scale keeps them exact."""
    g = torch.Generator().manual_seed(seed)
    mantissa = 1 + torch.randint(0, 8, (rows, width), generator=g) / 8
    exponent = torch.randint(exponents[0], exponents[1] + 1, (rows, width), generator=g)
    sign = torch.randint(0, 2, (rows, width), generator=g) * 2 - 1
    return sign * mantissa * 2.0 ** exponent


def exactly_representable(rows: int, width: int) -> torch.Tensor:
    """Rows whose per-token scale is a power of two (each reaches +-448 somewhere, times 2^k), so
    that every quotient is an e4m3 value."""
    x = e4m3_normals(rows, width)
    x[:, 0] = 448.0
    return x * 2.0 ** torch.randint(-8, 8, (rows, 1), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rows, width", [(3, 100), (1, 64)] + [pytest.param(256, 14336, marks=on_gpu)])
def test_per_token_fp8_quantization_gives_the_references_bits(rows, width):
    from server.kernels.fp8_quant import quantize_fp8_per_token

    x = (torch.randn(rows, width) * 3 if CUDA else exactly_representable(rows, width)).to(DEVICE)
    x[0, :] = 0.0  # a row of zeros gets the smallest scale, and zeros
    q, scale = quantize_fp8_per_token(x)
    q_ref, scale_ref = quantize_fp8_rows(x)
    assert torch.equal(scale.view(-1), scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("M, K, N", [(1, 4096, 6144), (1, 14336, 4096), (7, 4096, 28672), (256, 4096, 4096),
                                     (4096, 4096, 6144)])
@gpu_only
@pytest.mark.gpu
def test_scaled_mm_with_row_scales_matches_its_emulation(M, K, N):
    """The fp8 layers' GPU path: per-token fp8 activations times per-channel fp8 weights."""
    from server.kernels.fp8_quant import quantize_fp8_per_token

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_rows(torch.randn(N, K, device="cuda") / K ** 0.5)
    x_q, x_scale = quantize_fp8_per_token(x)
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)
    ref = fp8_matmul_reference(x_q, x_scale.view(-1), w_q, w_scale, torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_into_an_fp8_cache_gives_the_references_bits(dtype):
    from server.kernels.cache import store_kv

    values = torch.randn(6, 3 * 2 * 16) * 3 if CUDA else e4m3_normals(6, 3 * 2 * 16)  # x4 and /2 stay normal
    qkv = values.to(dtype).to(DEVICE)
    k, v = qkv[:, 32:64].view(6, 2, 16), qkv[:, 64:].view(6, 2, 16)
    slots = torch.tensor([3, 0, 9, -1, 17, 30], device=DEVICE)
    caches = [torch.zeros(4, 8, 2, 16, dtype=FP8, device=DEVICE) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots, k_scale=0.25, v_scale=2.0)
    store_kv_reference(k, v, caches[2], caches[3], slots, k_scale=0.25, v_scale=2.0)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches[:2], caches[2:]))


def fp8_cache(context_lens, page, kv_heads, head_dim, seed=0):
    k_cache, v_cache, tables = paged_cache(context_lens, page, kv_heads, head_dim, torch.float32, seed)
    return (k_cache * 4).to(FP8), (v_cache * 4).to(FP8), tables


@pytest.mark.parametrize("context_lens, page, heads, kv_heads, head_dim, window, splits", [
    ([5, 17, 33], 16, 4, 2, 16, None, 2), ([40, 3], 16, 4, 1, 32, 8, 1)] + [
    pytest.param([1, 300, 4097], 16, 32, 8, 128, None, 8, marks=on_gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_reads_an_fp8_cache_like_the_reference(context_lens, page, heads, kv_heads, head_dim,
                                                                  window, splits, dtype):
    from server.kernels.decode_attention import decode_attention

    k_cache, v_cache, tables = fp8_cache(context_lens, page, kv_heads, head_dim)
    q = torch.randn(len(context_lens), heads, head_dim).to(dtype).to(DEVICE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    scales = dict(k_scale=0.25, v_scale=0.5)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, head_dim ** -0.5, window, splits, **scales)
    ref = decode_attention_reference(q.float(), k_cache, v_cache, tables.long(), ctx, head_dim ** -0.5, window,
                                     **scales)
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_multiplies_an_fp8_cache_with_half_precision_q_in_fp16(dtype):
    """The half-precision path (the CPU's other tests run float32): e4m3 widened to fp16, q in
    fp16, the scales on the sums; only the output's rounding stands between it and the reference."""
    from server.kernels.decode_attention import decode_attention

    k_cache, v_cache, tables = fp8_cache([5, 17, 40], 16, 2, 32, seed=2)
    q = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    ctx = torch.tensor([5, 17, 40], device=DEVICE)
    scales = dict(k_scale=0.25, v_scale=0.5)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 32 ** -0.5, None, 2, **scales)
    ref = decode_attention_reference(q.float(), k_cache, v_cache, tables.long(), ctx, 32 ** -0.5, None, **scales)
    rounding = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    torch.testing.assert_close(out.float(), ref.float(), atol=2 * rounding * ref.abs().max().item(), rtol=rounding)


@pytest.mark.parametrize("lens, page, heads, kv_heads, head_dim, window", [
    ([(5, 5), (3, 20), (17, 17)], 16, 4, 2, 16, None)] + [
    pytest.param([(128, 128), (37, 600), (1, 4097)], 16, 32, 8, 128, 256, marks=on_gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_reads_an_fp8_cache_like_the_reference(lens, page, heads, kv_heads, head_dim, window,
                                                                   dtype):
    from server.kernels.prefill_attention import prefill_attention

    query_lens, context_lens = [q for q, _ in lens], [c for _, c in lens]
    k_cache, v_cache, tables = fp8_cache(context_lens, page, kv_heads, head_dim, seed=1)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scales = dict(k_scale=0.25, v_scale=0.5)
    out = prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(query_lens), head_dim ** -0.5, window,
                            **scales)
    ref = prefill_attention_reference(q.float(), k_cache, v_cache, tables.long(), query_lens, context_lens,
                                      head_dim ** -0.5, window, **scales)
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, window, splits", [
    ([(1, 20), (6, 6), (1, 45)], 4, 2, 16, None, 2)] + [
    pytest.param([(1, 700), (300, 300), (1, 4097), (37, 600)], 32, 8, 128, 256, 4, marks=on_gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mixed_step_reads_an_fp8_cache_like_the_reference(lens, heads, kv_heads, head_dim, window, splits, dtype):
    """One-token sequences through the decode kernel, the rest through the prefill kernel, as
    the attention layer splits a mixed step, over an e4m3 cache."""
    from server.kernels.decode_attention import decode_attention
    from server.kernels.prefill_attention import prefill_attention

    query_lens, context_lens = [q for q, _ in lens], [c for _, c in lens]
    k_cache, v_cache, tables = fp8_cache(context_lens, 16, kv_heads, head_dim, seed=3)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=DEVICE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    singles = torch.tensor([i for i, n in enumerate(query_lens) if n == 1], device=DEVICE)
    multis = torch.tensor([i for i, n in enumerate(query_lens) if n > 1], device=DEVICE)
    scales = dict(k_scale=0.25, v_scale=0.5)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, tables, ctx, head_dim ** -0.5, window, splits, out=out, seq_ids=singles,
                     cu_query_lens=cu, **scales)
    prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(query_lens), head_dim ** -0.5, window, out=out,
                      seq_ids=multis, **scales)
    ref = prefill_attention_reference(q.float(), k_cache, v_cache, tables.long(), query_lens, context_lens,
                                      head_dim ** -0.5, window, **scales)
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


def test_a_launch_that_holds_its_first_tile_over_an_fp8_cache_takes_64_token_tiles():
    """A few sequences' programs read their first tile before their wait and hold it in
    registers: over an fp8 cache a 128-token tile spilled (tests/test_kernels_compile.py), so
    they take 64; a large batch, which reads nothing early, keeps its 128-token tiles."""
    from server.kernels.decode_attention import DecodeConfig, kernel_choice

    cpu = torch.device("cpu")
    assert kernel_choice(256, 8, 1, 128, True, cpu) == (DecodeConfig(block_n=128, num_stages=3), False)
    assert kernel_choice(8, 8, 32, 128, True, cpu) == (DecodeConfig(block_n=64, num_stages=3), True)
    assert kernel_choice(1, 8, 32, 128, False, cpu) == (DecodeConfig(block_n=64), True)  # bf16: as before
