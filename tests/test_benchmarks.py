"""The benchmark scripts run end to end on a tiny model on the CPU (their figures matter only
on the GPU, but a script that breaks there costs a device run)."""
from __future__ import annotations

import glob
import json
import shutil
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.py"), recursive=True))
SCRIPTS = [path for path in BENCHMARKS if 'if __name__ == "__main__":' in open(path).read()]


def test_every_script_says_what_it_measures_and_prints():
    """`--help` runs (so the script imports, from wherever it sits) and its description says
    what it prints."""
    def help_text(path):
        done = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=300)
        return path, done

    assert len(SCRIPTS) >= 20
    with ThreadPoolExecutor(4) as pool:
        for path, done in pool.map(help_text, SCRIPTS):
            assert done.returncode == 0, (path, done.stderr[-3000:])
            assert re.search(r"\bprint", done.stdout, re.IGNORECASE), (path, done.stdout)


def test_nothing_in_benchmarks_imports_from_tests():
    for path in BENCHMARKS:
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", open(path).read(), re.MULTILINE)
        assert not [m for m in imports if m.split(".")[0] in ("tests", "server_process", "conftest")], path


def test_wait_ready_says_when_the_server_exited_first():
    from benchmarks.servers import ServerExited, free_port, wait_ready

    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(ServerExited, match="exited with 3"):
        wait_ready(f"http://127.0.0.1:{free_port()}", process, timeout_s=60, interval_s=0.05)
    assert time.monotonic() - started < 30


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


def test_mixtral_runs_both_engines_and_reports_against_its_targets(tmp_path):
    """benchmarks/mixtral.py end to end at toy sizes (its figures matter only on a GPU): each
    engine in its own process finishes, and the report holds both and the two targets."""
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "mixtral.py"), "--num-layers", "2",
               "--hidden-size", "64", "--intermediate-size", "128", "--head-dim", "16", "--vocab-size", "512",
               "--dtype", "float32", "--num-prompts", "8", "--min-len", "8", "--max-len", "32",
               "--peer-num-prompts", "4", "--decode-batches", "1,4", "--decode-context", "16", "--decode-tokens", "32",
               "--checkpoint", str(tmp_path / "mixtral"), "--out", str(tmp_path / "report.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    ours, peer = report["engine"], report["transformers"]
    assert ours["ended"] == peer["ended"] == "finished"
    assert set(ours["decode_tokens_per_s"]) == {"1", "4"} and ours["workload"]["output_tokens"] > 0
    assert peer["workload"]["num_prompts"] == 4 and set(peer["static_cache"]) == {"compiled", "1", "4"}
    assert report["shape"]["num_hidden_layers"] == 2 and report["batch1_roofline"]["bytes_per_token"]["total"] > 0
    assert all(isinstance(met, bool) for met in report["targets"].values())


def test_mixtral_quantized_runs_our_engine_against_the_quantized_roofline(tmp_path):
    """--quantize gptq at toy sizes (whole 4-bit groups): our engine alone, on weights drawn in
    the layout, its roofline counting the 4-bit bytes of attention and experts."""
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "mixtral.py"), "--quantize", "gptq",
               "--num-layers", "2", "--hidden-size", "128", "--intermediate-size", "256", "--head-dim", "32",
               "--vocab-size", "512", "--dtype", "float32", "--num-prompts", "8", "--min-len", "8", "--max-len", "32",
               "--decode-batches", "1", "--decode-context", "16", "--decode-tokens", "16",
               "--checkpoint", str(tmp_path / "mixtral"), "--out", str(tmp_path / "report.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["engine"]["ended"] == "finished" and report["engine"]["workload"]["output_tokens"] > 0
    active = report["batch1_roofline"]["bytes_per_token"]
    assert active["experts"] < 2 * 3 * 128 * 256 * 2 * 0.6  # two layers' two experts, about half a byte a weight
    assert list(report["targets"]) == ["batch1_decode_at_least_0.7_of_roofline"]


def test_profile_step_profiles_decode_and_prefill_steps(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--model",
                           mistral_v03_dir, "--device", "cpu", "--dtype", "float32", "--batch-sizes", "2",
                           "--prompt-len", "64", "--steps", "3", "--prefill"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    decode, prefill = json.loads(done.stdout)
    assert decode["batch"] == 2 and decode["wall_ms_per_step"] > 0 and "forward" in decode["host_ms_per_step"]
    assert prefill["prefill_tokens_per_step"] == 4096 and prefill["wall_ms_per_step"] > 0


def test_profile_step_spreads_its_requests_over_adapters(mistral_v03_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(mistral_v03_dir, model)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--model", str(model),
                           "--device", "cpu", "--dtype", "float32", "--batch-sizes", "3", "--prompt-len", "16",
                           "--steps", "2", "--adapters", "2", "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (decode,) = json.loads(done.stdout)
    assert decode["batch"] == 3 and decode["running_at_end"] == 3
    assert sorted(p.name for p in (tmp_path / "model-lora-r4").iterdir()) == ["adapter-0", "adapter-1"]


def test_capture_effect_times_decode_before_and_after(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "capture_effect.py"), "--model",
                           mistral_v03_dir, "--decode-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for timing in (report["before"], report["after_one_more_capture"]):
        assert len(timing["tokens_per_s"]) == 3 and timing["host_us_a_step"] > 0 and timing["wait_us_a_step"] >= 0


def test_lora_runs_base_and_adapters_in_one_engine(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lora.py"), "--model", mistral_v03_dir,
                           "--adapters", "2", "--rank", "4", "--decode-tokens", "4", "--num-prompts", "4",
                           "--min-prompt-len", "5", "--max-prompt-len", "20", "--min-output-len", "3",
                           "--max-output-len", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["decode_tokens_per_s"]["adapter"] > 0 and report["workload_tokens_per_s"]["adapters"] > 0


def test_speculation_compares_plain_and_speculative_decoding_on_the_default_model():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speculation.py"), "--batch-sizes", "1,2",
                           "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert all(batch["same_outputs"] for batch in report["batches"].values())


def test_speculation_with_a_draft_model_reports_the_drafts_cost_a_step(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speculation.py"), "--model",
                           mistral_v03_dir, "--draft-model", mistral_v03_dir, "--batch-sizes", "1,2",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for batch in report["batches"].values():
        assert batch["same_outputs"] and batch["kept_share"] == 1.0  # the model drafting for itself
        assert batch["draft_ms_a_step"] > 0 and batch["check_ms_a_step"] > 0


def test_throughput_runs_with_speculation_on(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", mistral_v03_dir,
                           "--num-prompts", "4", "--max-tokens", "5", "--peer", "none", "--repeats", "1",
                           "--speculate", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["speculate"] == 2 and report["engine"]["output_tokens"] == 4 * 5


def test_speculation_step_times_checks_against_a_decode_step(mistral_v03_dir):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speculation_step.py"), "--model",
                           mistral_v03_dir, "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1,2",
                           "--proposals", "2", "--repeats", "2", "--context", "40"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for batch in report["batches"].values():
        check = batch["verify_2"]
        assert batch["decode_ms"] > 0 and check["ms"] > 0 and check["eager_ms"] > 0
        assert check["expected_speedup"]["0.5"] == pytest.approx(1.75 / check["ratio"])


def test_serving_streams_every_request_from_several_client_processes(mistral_v03_dir, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serving.py"), "--launch", "ours",
                           "--model", mistral_v03_dir, "--dtype", "float32", "--rates", "inf,20", "--num-prompts", "12",
                           "--prompt-len", "4,30", "--output-len", "2,8", "--client-processes", "2",
                           "--time-budget", "240", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(open(tmp_path / "serving.json").read())["servers"]["ours"]
    assert "error" not in ours, ours
    for run in ours["runs"]:
        assert run["completed"] == 12 and run["outcomes"] == {"ok": 12}
        assert run["client_processes"] == 2 and run["client_cpu_cores"] > 0
        assert run["ttft_ms"]["p50"] > 0 and run["output_token_throughput"] > 0
        assert run["cpu_us_per_token"]["server"] > 0


def test_the_rate_search_doubles_until_a_rate_misses_then_halves_the_interval():
    sys.path.insert(0, ROOT)
    from benchmarks.serving import search_rates

    for limit in (0.5, 3.0, 7.9, 100.0):
        probed = []
        best = search_rates(lambda rate: probed.append(rate) or rate <= limit, 2.0, 6)
        assert len(probed) == 6 and (best is None) == (limit < min(probed))
        if best is not None:  # the best that met it, below the lowest that missed
            missed = [r for r in probed if r > limit]
            assert best <= limit and best == max(r for r in probed if r <= limit)
            assert not missed or min(missed) - best <= max(best, min(missed)) / 2
    assert search_rates(lambda rate: True, 1.0, 4) == 8.0
    assert search_rates(lambda rate: False, 1.0, 3) is None


def test_serving_finds_the_highest_rate_that_meets_its_slo(mistral_v03_dir, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serving.py"), "--launch", "ours",
                           "--model", mistral_v03_dir, "--dtype", "float32", "--find-rate", "--rates", "10",
                           "--search-probes", "2", "--slo-tpot-p50-ms", "60000", "--slo-ttft-p99-ms", "60000",
                           "--num-prompts", "6", "--prompt-len", "4,20", "--output-len", "2,6", "--time-budget", "200",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(open(tmp_path / "serving.json").read())["servers"]["ours"]
    found = ours["find_rate"]
    assert [p["request_rate"] for p in found["probes"]] == [10.0, 20.0] and all(p["meets_slo"] for p in found["probes"])
    assert found["max_request_rate"] == 20.0 and found["output_token_throughput"] > 0
    assert [run["request_rate"] for run in ours["runs"]] == [10.0, 20.0]


def test_a_profile_is_summed_per_process_from_py_spys_stacks():
    sys.path.insert(0, ROOT)
    from benchmarks.serving import profile_summary

    parent = 'process 10:"python -m server"'
    child = 'process 11:"python -m server (engine)"'
    stacks = [f"{parent};main (server/__main__.py:3);send (uvicorn/x.py:5) 30",
              f"{parent};main (server/__main__.py:3);encode (json/encoder.py:9) 10",
              f"{parent};{child};run (server/engine/engine_core.py:7);step (server/engine/llm_engine.py:2) 45",
              f"{parent};{child};run (server/engine/engine_core.py:7);send (multiprocessing/connection.py:4) 15",
              f"{parent} 5",  # a sample in native code: the process's name alone
              "not a stack line"]
    summary = profile_summary(stacks)
    assert summary["process 10"]["samples"] == 45 and summary["process 11"]["samples"] == 60
    assert summary["process 10"]["self"][0] == ["send (uvicorn/x.py:5)", round(30 / 45, 4)]
    assert ["(no Python frame)", round(5 / 45, 4)] in summary["process 10"]["self"]
    assert summary["process 11"]["under"][0] == ["run (server/engine/engine_core.py:7)", 1.0]
    assert ["step (server/engine/llm_engine.py:2)", 0.75] in summary["process 11"]["under"]
