"""The kernels compile for an H100, and fit its shared memory, as a decode step launches them
(tests/hopper_compile.py: what the interpreter cannot show on the CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from kernels.gemv import SHARED_MEMORY  # an H100 block's limit


def test_every_decode_step_kernel_compiles_for_hopper_within_its_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "hopper_compile.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {name.split("(")[0] for name in shared}
    assert {"_gemv_kernel", "_rmsnorm_kernel", "_rotate_and_store_kernel", "_decode_split_kernel",
            "_merge_splits_kernel", "_prefill_kernel", "_int4_gemv_kernel", "_gate_up_kernel", "_down_kernel"} <= kernels
    too_big = {name: used for name, used in shared.items() if used > SHARED_MEMORY}
    assert not too_big, f"more shared memory than an H100 block has ({SHARED_MEMORY} bytes): {too_big}"
