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


def test_a_traced_run_leaves_nothing_holding_the_engine(mistral_v03_dir):
    """The trace wraps the engine's step and the scheduler's schedule; once done, nothing it
    added may keep the engine alive, or its GPU memory would still be held when the peer loads
    its own copy of the model (an out-of-memory on an H100)."""
    import gc
    import weakref

    sys.path.insert(0, ROOT)
    from benchmarks.throughput import traced_run
    from server import LLM, SamplingParams

    llm = LLM(mistral_v03_dir, dtype="float32")
    trace = traced_run(llm, [[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    assert trace["prefill"]["steps"] == 1
    assert "step" not in vars(llm.engine) and "schedule" not in vars(llm.engine.scheduler)
    engine = weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
