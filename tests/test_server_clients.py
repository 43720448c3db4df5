"""The real clients against a real server: what they get equals the engine's own greedy output."""
from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from server import SamplingParams

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]


def greedy(llm, prompt, max_tokens, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def greedy_chat(llm, messages, max_tokens):
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def openai_client(tiny_server):
    return OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def hf_client(tiny_server):
    return InferenceClient(base_url=tiny_server.url)


def test_openai_chat_equals_the_engine(openai_client, tiny_llm):
    expected = greedy_chat(tiny_llm, CHAT, 12)
    reply = openai_client.chat.completions.create(model="tgi", messages=CHAT, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.object == "chat.completion"


def test_openai_chat_accepts_content_parts(openai_client, tiny_llm):
    expected = greedy_chat(tiny_llm, CHAT, 6)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story"},
                                          {"type": "text", "text": " about a fox."}]}]
    reply = openai_client.chat.completions.create(model="tgi", messages=parts, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text


def test_openai_streamed_chat_joins_to_the_engine_text_and_reports_usage(openai_client, tiny_llm):
    expected = greedy_chat(tiny_llm, CHAT, 10)
    chunks = list(openai_client.chat.completions.create(
        model="tgi", messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_openai_chat_logprobs_are_the_engine_logprobs(openai_client, tiny_llm):
    expected = tiny_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=4, logprobs=2),
                             use_tqdm=False)[0].outputs[0]
    reply = openai_client.chat.completions.create(model="tgi", messages=CHAT, max_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry, token_id, logprobs in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(logprobs[token_id], abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_openai_chat_n_gives_n_seeded_reproducible_choices(openai_client):
    kwargs = dict(model="tgi", messages=CHAT, max_tokens=8, temperature=1.0, n=2, seed=7)
    first = openai_client.chat.completions.create(**kwargs)
    second = openai_client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.completion_tokens == 16


def test_openai_completions_batch_echo_and_logprobs(openai_client, tiny_llm):
    prompts = [PROMPT, "Once upon a time"]
    reply = openai_client.completions.create(model="tgi", prompt=prompts, max_tokens=5, temperature=0,
                                             logprobs=1)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, prompts):
        expected = greedy(tiny_llm, prompt, 5, logprobs=1)
        assert choice.text == expected.text
        assert choice.logprobs.token_logprobs == pytest.approx(
            [lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)], abs=1e-4)
    echoed = openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy(tiny_llm, PROMPT, 3).text


def test_openai_streamed_completion(openai_client, tiny_llm):
    chunks = list(openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=7, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy(tiny_llm, PROMPT, 7).text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_models_lists_the_served_model(openai_client, mistral_v03_dir):
    assert [m.id for m in openai_client.models.list().data] == [mistral_v03_dir]


def test_inference_client_text_generation_with_details(hf_client, tiny_llm):
    expected = greedy(tiny_llm, PROMPT, 8, logprobs=0)
    out = hf_client.text_generation(PROMPT, max_new_tokens=8, details=True, decoder_input_details=True,
                                    top_n_tokens=2)
    assert out.generated_text == expected.text
    assert out.details.finish_reason == "length"
    assert out.details.generated_tokens == 8
    assert [t.id for t in out.details.tokens] == expected.token_ids
    assert "".join(t.text for t in out.details.tokens) == expected.text
    assert [t.logprob for t in out.details.tokens] == pytest.approx(
        [lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)], abs=1e-4)
    assert out.details.seed is None  # greedy
    prefill = out.details.prefill
    assert [t.id for t in prefill] == tiny_llm.get_tokenizer().encode(PROMPT)
    assert prefill[0].logprob is None and all(t.logprob < 0 for t in prefill[1:])
    assert len(out.details.top_tokens) == 8 and all(len(top) == 2 for top in out.details.top_tokens)


def test_inference_client_streams_tokens_that_join_to_the_text(hf_client, tiny_llm):
    expected = greedy(tiny_llm, PROMPT, 9)
    events = list(hf_client.text_generation(PROMPT, max_new_tokens=9, stream=True, details=True))
    assert "".join(e.token.text for e in events) == expected.text
    assert [e.token.id for e in events] == expected.token_ids
    assert [e.generated_text for e in events[:-1]] == [None] * 8
    assert events[-1].generated_text == expected.text
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 9


def test_inference_client_chat_completion(hf_client, tiny_llm):
    reply = hf_client.chat_completion(CHAT, max_tokens=7, temperature=0)
    assert reply.choices[0].message.content == greedy_chat(tiny_llm, CHAT, 7).text
    streamed = hf_client.chat_completion(CHAT, max_tokens=7, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == greedy_chat(tiny_llm, CHAT, 7).text


def test_mistral_sdk_chat(tiny_server, tiny_llm):
    from mistralai.client import Mistral

    client = Mistral(api_key="unused", server_url=tiny_server.url)
    expected = greedy_chat(tiny_llm, CHAT, 6).text
    reply = client.chat.complete(model="tgi", messages=CHAT, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected
    streamed = client.chat.stream(model="tgi", messages=CHAT, max_tokens=6, temperature=0)
    assert "".join(e.data.choices[0].delta.content or "" for e in streamed) == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_generate_and_stream(tiny_server, tiny_llm):
    expected = greedy(tiny_llm, PROMPT, 5).text
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    out = subprocess.run(["curl", "-s", f"{tiny_server.url}/generate", "-X", "POST", "-d", body,
                          "-H", "Content-Type: application/json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"generated_text": expected}
    out = subprocess.run(["curl", "-sN", f"{tiny_server.url}/generate_stream", "-X", "POST", "-d", body,
                          "-H", "Content-Type: application/json"], capture_output=True, text=True, check=True)
    events = [json.loads(line[len("data:"):]) for line in out.stdout.splitlines() if line.startswith("data:")]
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["generated_text"] == expected and events[-1]["details"] is None


def test_generate_options_return_full_text_stop_and_truncate(tiny_server, tiny_llm):
    full = greedy(tiny_llm, PROMPT, 6).text
    r = httpx.post(f"{tiny_server.url}/generate", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 6, "return_full_text": True}}).json()
    assert r["generated_text"] == PROMPT + full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = httpx.post(f"{tiny_server.url}/generate", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 6, "stop": [stop], "details": True}}).json()
    assert r["generated_text"].endswith(stop) and full.startswith(r["generated_text"])  # TGI keeps the stop text
    assert r["details"]["finish_reason"] == "stop_sequence"
    ids = tiny_llm.get_tokenizer().encode(PROMPT)
    r = httpx.post(f"{tiny_server.url}/generate", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 4, "truncate": 3}}).json()
    assert r["generated_text"] == greedy(tiny_llm, ids[-3:], 4).text


def test_sampled_generate_reports_its_seed_and_reproduces(tiny_server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "do_sample": True, "details": True}}
    first = httpx.post(f"{tiny_server.url}/generate", json=body).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    body["parameters"]["seed"] = seed
    again = httpx.post(f"{tiny_server.url}/generate", json=body).json()
    assert again["generated_text"] == first["generated_text"]


def test_best_of_returns_the_others_in_best_of_sequences(tiny_server):
    r = httpx.post(f"{tiny_server.url}/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 4, "best_of": 2, "do_sample": True, "details": True}}).json()
    others = r["details"]["best_of_sequences"]
    assert len(others) == 1 and others[0]["generated_tokens"] == 4
    best_logprob = sum(t["logprob"] for t in r["details"]["tokens"])
    assert best_logprob >= sum(t["logprob"] for t in others[0]["tokens"]) - 1e-6


def test_compat_route_and_invocations(tiny_server, tiny_llm):
    expected = greedy(tiny_llm, PROMPT, 3).text
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    assert httpx.post(f"{tiny_server.url}/", json=body).json() == [{"generated_text": expected}]
    assert httpx.post(f"{tiny_server.url}/invocations", json=body).json() == [{"generated_text": expected}]
    chat = httpx.post(f"{tiny_server.url}/invocations", json={
        "messages": CHAT, "max_tokens": 3, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == greedy_chat(tiny_llm, CHAT, 3).text


def test_tokenize_gives_ids_and_character_offsets(tiny_server, tiny_llm):
    tokens = httpx.post(f"{tiny_server.url}/tokenize", json={"inputs": PROMPT}).json()
    assert [t["id"] for t in tokens] == tiny_llm.get_tokenizer().encode(PROMPT)
    assert "".join(t["text"] for t in tokens) == PROMPT
    assert all(PROMPT[t["start"]:t["stop"]] == t["text"] for t in tokens)


def test_info_health_docs_and_openapi(tiny_server, mistral_v03_dir):
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["model_id"] == mistral_v03_dir
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (200, 256)
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert httpx.get(f"{tiny_server.url}/docs").status_code == 200
    paths = httpx.get(f"{tiny_server.url}/openapi.json").json()["paths"]
    for route in ("/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/v1/models",
                  "/info", "/health", "/metrics", "/tokenize", "/invocations"):
        assert route in paths


def test_watermark_is_accepted_and_steers_sampling(tiny_server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 4}}
    plain = httpx.post(f"{tiny_server.url}/generate", json=body).json()["generated_text"]
    body["parameters"]["watermark"] = True
    marked = httpx.post(f"{tiny_server.url}/generate", json=body)
    assert marked.status_code == 200 and marked.json()["generated_text"] != plain
