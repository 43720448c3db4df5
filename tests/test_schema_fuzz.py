"""Schema fuzzing (schemathesis) over our own /openapi.json against a live server: every
operation, valid and invalid bodies; no 5xx, no response outside the published schema, and
the server still serving afterwards. (schemathesis runs as its own command, which keeps it
independent of the pytest version its plugin supports.)"""
from __future__ import annotations

import subprocess
import sys

import httpx

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,unsupported_method")


def test_every_operation_answers_within_its_schema_and_never_5xx(tiny_server, tmp_path):
    # In a fresh folder: schemathesis keeps a cache of past failures where it runs, which
    # would make one run depend on the last.
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{tiny_server.url}/openapi.json", "--checks", CHECKS,
         "--max-examples", "25", "--seed", "1", "--mode", "all", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_the_server_still_serves_after_the_fuzzing(tiny_server):
    r = httpx.post(f"{tiny_server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and httpx.get(f"{tiny_server.url}/health").status_code == 200
