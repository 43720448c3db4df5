"""Faults inside the server: a failing model step, malformed input, a runaway chat template.
Each ends the request it belongs to with a clear error and nothing else."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from server import AsyncEngine
from server.api.app import create_app
from server.api.settings import ServerSettings
from server.config import EngineArgs
from server.engine.chat_template import render_template

BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 4}}


def request(app, method, path, **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def failing_once(engine, monkeypatch):
    runner = engine.engine.runner
    forward, calls = runner.forward, []

    def flaky(chunks, previous=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault at 0x7f00deadbeef")
        return forward(chunks, previous)

    monkeypatch.setattr(runner, "forward", flaky)


def test_a_failing_step_is_424_for_its_request_and_the_server_keeps_serving(app_engine, monkeypatch):
    app, engine = app_engine
    failing_once(engine, monkeypatch)
    r = request(app, "POST", "/generate", json=BODY)
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    assert "injected fault" in r.json()["error"] and "0x7f00deadbeef" not in r.json()["error"]
    assert request(app, "GET", "/health").status_code == 200
    assert request(app, "POST", "/generate", json=BODY).status_code == 200


def test_a_failing_step_ends_a_stream_with_an_error_event(app_engine, monkeypatch):
    app, engine = app_engine
    failing_once(engine, monkeypatch)
    r = request(app, "POST", "/generate_stream", json=BODY)
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert r.status_code == 200 and events[-1]["error_type"] == "generation"
    failing_once(engine, monkeypatch)
    r = request(app, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    lines = [line for line in r.text.splitlines() if line.startswith("data:")]
    assert json.loads(lines[-2][5:])["error"]["type"] == "generation" and lines[-1] == "data: [DONE]"


def test_a_dead_engine_fails_health(mistral_v03_dir):
    engine = AsyncEngine(EngineArgs(model=mistral_v03_dir, max_batch_total_tokens=1024))
    app = create_app(engine, ServerSettings(model_id="tiny", max_input_tokens=200, max_total_tokens=256))
    try:
        assert request(app, "GET", "/health").status_code == 200
        engine.engine.has_unfinished_requests = None  # the engine loop itself breaks on its next turn
        time.sleep(1.5)
        r = request(app, "GET", "/health")
        assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        assert request(app, "POST", "/generate", json=BODY).status_code == 424
    finally:
        engine.shutdown()


@pytest.mark.parametrize("body, content_type", [
    (b"42", "application/json"), (b"null", "application/json"), (b"[1, 2]", "application/json"),
    (b'"a string"', "application/json"), (b"\xff\xfe{\"inputs\": 1}", "application/json"),
    (b'{"inputs": "hi"}', "text/plain"),
    (b'{"inputs": "hi", "parameters": {"max_new_tokens": 99999999999999999999999}}', "application/json"),
    (b'{"inputs": "hi", "parameters": {"temperature": NaN}}', "application/json"),
    (b'{"inputs": "hi", "parameters": {"top_p": Infinity}}', "application/json"),
    (b'{"inputs": ""}', "application/json"),
])
def test_malformed_generate_bodies_are_4xx_with_an_error_body(app_engine, body, content_type):
    app, _ = app_engine
    r = request(app, "POST", "/generate", content=body, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500 and r.json()["error_type"] == "validation"


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user"}]},  # no content
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}},
])
def test_malformed_chat_bodies_are_4xx(app_engine, body):
    app, _ = app_engine
    r = request(app, "POST", "/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500 and "error" in r.json()


@pytest.mark.parametrize("body", [{"prompt": [[1, -5]]}, {"prompt": [[1, 10**12]]}, {"prompt": ""}, {"prompt": []}])
def test_out_of_vocabulary_or_empty_prompts_are_4xx(app_engine, body):
    app, _ = app_engine
    assert request(app, "POST", "/v1/completions", json=body).status_code == 422


def test_a_runaway_chat_template_is_stopped():
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ValueError, match="Template error: rendering took longer than"):
        render_template(looping)


def test_cors_headers_only_for_the_allowed_origins(app_engine):
    app, engine = app_engine
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
    closed = request(app, "OPTIONS", "/generate", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers  # off by default
    open_app = create_app(engine, ServerSettings(model_id="tiny", max_input_tokens=200, max_total_tokens=256,
                                                 cors_allow_origin=("https://chat.example",)))
    allowed = request(open_app, "OPTIONS", "/generate", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
    other = request(open_app, "GET", "/info", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
