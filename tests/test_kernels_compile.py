"""The kernels compile for an H100, and fit its shared memory, as a decode step launches them
(tests/hopper_compile.py: what the interpreter cannot show on the CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.kernels.gemv import SHARED_MEMORY  # an H100 block's limit


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[int]]:
    """hopper_compile.py's report: kernel variant -> [shared memory, unguarded zeroing stores,
    registers a thread, bytes a thread spills]."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "hopper_compile.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_decode_step_kernel_compiles_for_hopper_within_its_shared_memory(compiled):
    shared = {name: used for name, (used, *_) in compiled.items()}
    kernels = {name.split("(")[0] for name in shared}
    assert {"_gemv_kernel", "_rmsnorm_kernel", "_rotate_and_store_kernel", "_decode_split_kernel",
            "_merge_splits_kernel", "_prefill_kernel", "_int4_gemv_kernel", "_gate_up_kernel", "_down_kernel",
            "_quantized_gate_up_kernel", "_quantized_down_kernel", "_sample_kernel"} <= kernels
    too_big = {name: used for name, used in shared.items() if used > SHARED_MEMORY}
    assert not too_big, f"more shared memory than an H100 block has ({SHARED_MEMORY} bytes): {too_big}"


def test_readers_of_deferred_sums_zero_them_only_after_every_thread_has_read_them(compiled):
    """Each kernel that reads a 4-bit product's deferred sums stores their zeros behind a
    barrier (hopper_compile.py's unguarded_zeroing), checked on the compiled sm_90 code: the
    race it prevents is the GPU's alone. Without it the norm at 4,096 wide zeroed sums that
    other threads had yet to read, on an H100 in every row."""
    readers = [name for name in compiled if name.split("(")[0] in ("_rmsnorm_kernel", "_silu_and_mul_kernel",
                                                                    "_rotate_and_store_kernel")]
    assert len(readers) >= 6  # each with bf16 and with int64 inputs
    assert not {name: unguarded for name, (_, unguarded, *_) in compiled.items() if unguarded}


def test_no_kernel_spills_registers_on_hopper(compiled):
    """Every variant fits its registers (at most 255 a thread on sm_90) without spilling to local
    memory: the interpreter cannot show a spill, and a spilled decode kernel reads its own stack
    at every tile. An fp8 cache's decode attention holding its first 128-token tile across the
    wait spilled 432 bytes a thread, and a 16-row tile of a product's LoRA epilogue took 254
    registers where the product alone took 80 (server/kernels/lora.py's epilogue_chunk)."""
    spilled = {name: spill for name, (*_, spill) in compiled.items() if spill}
    assert not spilled, f"kernel variants that spill (bytes a thread): {spilled}"
    gemv = [registers for name, (*_, registers, _) in compiled.items() if name.startswith("_gemv_kernel")]
    assert len(gemv) >= 20 and max(gemv) <= 160  # the most: 128, one row of the gated down projection
