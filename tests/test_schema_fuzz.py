"""Schema fuzzing (schemathesis) over our own /openapi.json against a live server: every
operation, valid and invalid bodies. No 5xx, no response outside the published schema, valid
bodies accepted (the schema carries the server's real limits; schema_fuzz_hooks.py the rules
between fields), generation routes reached, and the server still serving afterwards.
(schemathesis runs as its own command, which keeps it independent of the pytest version its
plugin supports.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,unsupported_method,positive_data_acceptance")
MAX_TOTAL = 128
GENERATION = ("/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/invocations")


@pytest.fixture(scope="module")
def fuzzed_server(mistral_v03_dir):
    # Short limits keep each generated request's generation short.
    server = ServerProcess("--model-id", mistral_v03_dir, "--max-total-tokens", str(MAX_TOTAL),
                           "--max-input-tokens", "100", "--max-batch-total-tokens", "8192",
                           "--max-concurrent-requests", "64")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fuzz_run(fuzzed_server, tmp_path_factory):
    # In a fresh folder: schemathesis keeps a cache of past failures where it runs, which
    # would make one run depend on the last.
    where = tmp_path_factory.mktemp("schemathesis")
    har = where / "run.har"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schema_fuzz_hooks", "FUZZ_MAX_TOTAL_TOKENS": str(MAX_TOTAL),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzzed_server.url}/openapi.json", "--checks", CHECKS,
         "--max-examples", "100", "--seed", "1", "--mode", "all", "--request-timeout", "60",
         "--report", "har", "--report-har-path", str(har), "--workers", "2"],
        capture_output=True, text=True, timeout=900, cwd=where, env=env)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter((httpx.URL(e["request"]["url"]).path, e["response"]["status"] // 100) for e in entries)
    return result, statuses


def test_every_operation_answers_within_its_schema_and_never_5xx(fuzz_run):
    result, statuses = fuzz_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert not [key for key in statuses if key[1] == 5]


def test_generated_requests_reach_generation_on_every_generation_route(fuzz_run):
    _, statuses = fuzz_run
    print({path: {f"{k}xx": n for (p, k), n in sorted(statuses.items()) if p == path} for path in GENERATION})
    for path in GENERATION:
        assert statuses[(path, 2)] >= 50, (path, statuses)


def test_the_server_still_serves_after_the_fuzzing(fuzzed_server, fuzz_run):
    r = httpx.post(f"{fuzzed_server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and httpx.get(f"{fuzzed_server.url}/health").status_code == 200
