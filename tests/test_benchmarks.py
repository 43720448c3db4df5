"""The benchmark scripts run end to end on a tiny model on the CPU (their figures matter only
on the GPU, but a script that breaks there costs a device run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_throughput_runs_and_traces_its_steps(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", mistral_v03_dir,
                           "--num-prompts", "4", "--max-tokens", "5", "--peer", "none", "--repeats", "1", "--trace",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    engine = report["engine"]
    assert engine["output_tokens"] == 4 * 5
    trace = engine["trace"]
    assert trace["prefill"]["steps"] == 1  # four short prompts fit one step, which samples each one's first token
    assert sum(phase["tokens"] for name, phase in trace.items() if name.startswith("decode")) == 4 * 4
