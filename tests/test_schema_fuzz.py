"""Schema fuzzing (schemathesis) over our own /openapi.json against a live server: every
operation, valid and invalid bodies; no 5xx, no response outside the published schema, and
the server still serving afterwards."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance, unsupported_method)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, unsupported_method]


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_within_its_schema_and_never_5xx(case):
    case.call_and_validate(checks=CHECKS, timeout=60)


def test_the_server_still_serves_after_the_fuzzing(tiny_server):
    r = httpx.post(f"{tiny_server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and httpx.get(f"{tiny_server.url}/health").status_code == 200
