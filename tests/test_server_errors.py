"""Bad requests get TGI's error bodies and status codes, and nothing they do harms the server."""
from __future__ import annotations

import httpx
import pytest

from server_process import metric

PROMPT = "The quick brown fox"


def post(server, body, route="/generate"):
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def params(**kwargs):
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **kwargs}}


@pytest.mark.parametrize("body, message", [
    (params(temperature=0), "`temperature` must be strictly positive"),
    (params(temperature=-1), "`temperature` must be strictly positive"),
    (params(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (params(top_p=0), "`top_p` must be > 0.0 and < 1.0"),
    (params(typical_p=1.5), "`typical_p` must be > 0.0 and < 1.0"),
    (params(top_k=0), "`top_k` must be strictly positive"),
    (params(repetition_penalty=0), "`repetition_penalty` must be strictly positive"),
    (params(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (params(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (params(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (params(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (params(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
    (params(best_of=2), "you must use sampling when `best_of` is > 1"),
    (params(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
    (params(truncate=0), "`truncate` must be strictly positive and less than 200. Given: 0"),
    (params(truncate=201), "`truncate` must be strictly positive and less than 200. Given: 201"),
    ({"inputs": "", "parameters": {"max_new_tokens": 2}}, "`inputs` cannot be empty"),
    ({"inputs": "fox " * 300, "parameters": {"max_new_tokens": 2}}, "`inputs` must have less than 200 tokens. Given: 602"),
    (params(grammar={"type": "regex", "value": "(?<=a)b"}),
     'grammar is not valid: invalid regex "(?<=a)b" (in regex): regex parse error (look-around, including '
     'look-ahead and look-behind, is not supported)'),
])
def test_out_of_range_parameters_get_422_with_tgi_message(tiny_server, body, message):
    r = post(tiny_server, body)
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_inputs_plus_max_new_tokens_over_the_total_is_422(tiny_server, tiny_llm):
    n = len(tiny_llm.get_tokenizer().encode(PROMPT))
    assert post(tiny_server, params(max_new_tokens=256 - n)).status_code == 200
    r = post(tiny_server, params(max_new_tokens=257 - n))
    assert r.status_code == 422
    assert r.json()["error"] == (f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 256. "
                                 f"Given: {n} `inputs` tokens and {257 - n} `max_new_tokens`")


@pytest.mark.parametrize("body", [
    {"parameters": {"max_new_tokens": 2}},  # no inputs
    {"inputs": PROMPT, "parameters": {"max_new_tokens": -1}},
    {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}},
    {"inputs": PROMPT, "parameters": {"seed": -1}},
    {"inputs": 42},
])
def test_malformed_bodies_get_422_validation(tiny_server, body):
    r = post(tiny_server, body)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_invalid_json_gets_400(tiny_server):
    r = httpx.post(f"{tiny_server.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "validation"


def test_a_stream_refused_before_it_starts_gets_its_status(tiny_server):
    r = post(tiny_server, params(best_of=2, do_sample=True), route="/generate_stream")
    assert r.status_code == 422
    assert r.json()["error"] == "Input validation error: `best_of` != 1 is not supported when streaming tokens"


@pytest.mark.parametrize("body, needle", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}, "`max_new_tokens` must be <= 256"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 1}, "<= 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0}, "must use sampling"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
    ({"messages": []}, "messages"),
])
def test_chat_validation_errors_are_422(tiny_server, body, needle):
    r = post(tiny_server, body, route="/v1/chat/completions")
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"] and r.json()["error_type"] == "validation"


def test_a_chat_template_error_is_422_template_error(tiny_server):
    # Mistral's format needs the conversation to end with a user (or tool) turn.
    r = post(tiny_server, {"messages": [{"role": "assistant", "content": "hi"}]}, route="/v1/chat/completions")
    assert r.status_code == 422 and r.json()["error_type"] == "template_error"


def test_completions_refuse_suffix_and_oversized_batches(tiny_server):
    r = post(tiny_server, {"prompt": "a", "suffix": "b"}, route="/v1/completions")
    assert r.status_code == 422 and "suffix" in r.json()["error"]
    r = post(tiny_server, {"prompt": ["a"] * 5}, route="/v1/completions")
    assert r.status_code == 422 and "<= 4" in r.json()["error"]
    r = post(tiny_server, {"prompt": [[1, 99999999]]}, route="/v1/completions")
    assert r.status_code == 422


def test_logit_bias_steers_the_choice(tiny_server, tiny_llm):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logit_bias": {"1234": 100}}
    reply = post(tiny_server, body, route="/v1/chat/completions").json()
    assert reply["choices"][0]["message"]["content"] == tiny_llm.get_tokenizer().decode([1234] * 3)


def test_metrics_count_what_happened(tiny_server):
    before = httpx.get(f"{tiny_server.url}/metrics").text
    assert post(tiny_server, params()).status_code == 200
    assert post(tiny_server, params(top_k=0)).status_code == 422
    after = httpx.get(f"{tiny_server.url}/metrics").text
    assert metric(after, "tgi_request_count") - metric(before, "tgi_request_count") == 2
    assert metric(after, "tgi_request_success") - metric(before, "tgi_request_success") == 1
    failure = 'err="validation"'
    assert metric(after, "tgi_request_failure", failure) - metric(before, "tgi_request_failure", failure) == 1
    assert metric(after, "tgi_request_generated_tokens_sum") - metric(before, "tgi_request_generated_tokens_sum") == 2
    assert metric(after, "tgi_request_input_length_count") - metric(before, "tgi_request_input_length_count") == 1
    for name in ("tgi_request_duration_count", "tgi_request_queue_duration_count", "tgi_queue_size",
                 "tgi_batch_current_size", "tgi_batch_max_total_tokens"):
        assert f"\n{name}" in after
    assert metric(after, "tgi_batch_current_size") == 0 and metric(after, "tgi_batch_current_max_tokens") == 0
    assert metric(after, "tgi_kv_cache_blocks_in_use") == 0
    assert metric(after, "tgi_kv_cache_blocks_total") == 8192 // 16  # --max-batch-total-tokens / block size
    assert "# TYPE tgi_request_count counter" in after
