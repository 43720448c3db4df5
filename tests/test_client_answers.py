"""What third-party clients read back is right: prompt logprobs (lm-evaluation-harness scores
with them), `max_tokens: 0`, tool follow-up turns, token texts beside stop sequences, the role in
every chat chunk, vLLM's sampling extras, stream lines that line readers cannot split, and the
keep-alive comments of a quiet stream."""
from __future__ import annotations

import asyncio
import importlib.util
import json

import httpx
import pytest
import torch
from openai import OpenAI

from server import SamplingParams
from server.api.streaming import send_with_keepalive
from server.engine.chat_template import mistral_call_ids, tool_calls_as_text

EOS = 2
NEL = 32131  # Mistral v3's token for U+0085, which str.splitlines breaks a line at
PROMPT = "The quick brown fox"
# The server against transformers on the CPU: float32 both; on a GPU machine the server's
# products run in TF32 and differ in the second decimal.
TOL = 1e-4 if not torch.cuda.is_available() else 3e-2


@pytest.fixture(scope="module")
def client(tiny_server):
    return OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def oracle(mistral_v03_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(mistral_v03_dir, dtype=torch.float32).eval()


def transformers_logprobs(model, token_ids: list[int]) -> list[float]:
    """log P(token i | tokens before it), for i >= 1."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, token_ids[i]].item() for i in range(1, len(token_ids))]


# -- 1, 2: prompt logprobs and max_tokens 0 -------------------------------------------------
def test_echo_gives_the_prompts_logprobs_as_transformers_and_tgis_prefill(client, tiny_server, tiny_llm, oracle):
    ids = tiny_llm.get_tokenizer().encode(PROMPT)
    reply = client.completions.create(model="tgi", prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, temperature=0)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = transformers_logprobs(oracle, ids)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=TOL)
    for token_lp, top in zip(lp.token_logprobs[1:len(ids)], lp.top_logprobs[1:len(ids)]):
        assert len(top) == 2 and max(top.values()) >= token_lp - 1e-6
    prompt_text = tiny_llm.get_tokenizer().decode(ids)
    assert choice.text.startswith(prompt_text)
    assert lp.text_offset[:2] == [0, 0]  # BOS has no text; the first word loses its space at the start
    assert prompt_text.startswith(lp.tokens[1].lstrip())
    for token, offset in zip(lp.tokens[2:len(ids)], lp.text_offset[2:len(ids)]):
        assert prompt_text[offset:].startswith(token)
    assert lp.text_offset[len(ids)] == len(prompt_text)

    tgi = httpx.post(f"{tiny_server.url}/generate", timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}).json()
    prefill = tgi["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0]["logprob"] is None
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)


def test_max_tokens_zero_with_echo_scores_the_prompt_and_generates_nothing(client, tiny_llm, oracle):
    ids = tiny_llm.get_tokenizer().encode("Once upon a time there was")
    for stream in (False, True):
        if stream:
            chunks = [c for c in client.completions.create(model="tgi", prompt=[ids], echo=True, logprobs=1,
                                                           max_tokens=0, stream=True)]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            lp = next(c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs)
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            reply = client.completions.create(model="tgi", prompt=[ids], echo=True, logprobs=1, max_tokens=0)
            text, lp = reply.choices[0].text, reply.choices[0].logprobs
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 0
        assert text == tiny_llm.get_tokenizer().decode(ids)
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert lp.token_logprobs[1:] == pytest.approx(transformers_logprobs(oracle, ids), abs=TOL)


def test_max_tokens_zero_without_echo_is_an_empty_completion(client):
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=0)
    assert reply.choices[0].text == "" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens > 0


def test_a_multiple_choice_scored_by_echo_logprobs_picks_transformers_answers(client, tiny_llm, oracle):
    """As lm-evaluation-harness's local-completions scores it: each context + continuation as
    token ids, echo, and the continuation's logprobs summed."""
    tokenizer = tiny_llm.get_tokenizer()
    questions = [("The capital of France is", [" Paris", " Rome", " a fox", " blue"]),
                 ("Two plus two equals", [" four", " five", " the sky"]),
                 ("The quick brown fox jumps over the", [" lazy dog", " moon", " fence"])]
    for context, choices in questions:
        context_ids = tokenizer.encode(context)
        prompts = [context_ids + tokenizer.encode(c, add_special_tokens=False) for c in choices]
        reply = client.completions.create(model="tgi", prompt=prompts, echo=True, logprobs=1, max_tokens=0,
                                          temperature=0)
        ours = [sum(choice.logprobs.token_logprobs[len(context_ids):])
                for choice in sorted(reply.choices, key=lambda c: c.index)]
        theirs = [sum(transformers_logprobs(oracle, ids)[len(context_ids) - 1:]) for ids in prompts]
        assert ours == pytest.approx(theirs, abs=10 * TOL)
        assert ours.index(max(ours)) == theirs.index(max(theirs))


# -- 3: tool follow-up turns -------------------------------------------------------------------
WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}}]


def follow_up(call_id: str) -> list[dict]:
    return [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "22 degrees"}]


@pytest.mark.parametrize("call_id", ["call_abc123xyz", "abcdefghi"])
def test_the_turn_after_a_tool_call_is_answered(client, call_id):
    reply = client.chat.completions.create(model="tgi", messages=follow_up(call_id), tools=WEATHER_TOOL,
                                           max_tokens=5, temperature=0, extra_body={"tool_prompt": "Answer."})
    assert reply.choices[0].message.content is not None or reply.choices[0].message.tool_calls
    reply = client.chat.completions.create(model="tgi", messages=follow_up(call_id), max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_mistral_renders_the_call_and_its_result_with_its_own_tokens(mistral_v3):
    text = mistral_v3.render_chat(follow_up("call_abc123xyz"), tools=WEATHER_TOOL)
    (call_id,) = {call["id"] for call in mistral_call_ids(follow_up("call_abc123xyz"))[1]["tool_calls"]}
    assert len(call_id) == 9 and call_id.isalnum()
    assert f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{call_id}"}}]' in text
    assert f'[TOOL_RESULTS] {{"content": "22 degrees", "call_id": "{call_id}"}}[/TOOL_RESULTS]' in text


@pytest.mark.parametrize("name", ["hf_v1", "smollm2"])
def test_a_template_without_tools_gets_the_calls_as_tgi_writes_them(request, name):
    tokenizer = request.getfixturevalue(name)
    text = tokenizer.render_chat(follow_up("call_1"))
    calls = json.dumps(follow_up("call_1")[1]["tool_calls"])
    assert calls in text and "22 degrees" in text and "None" not in text
    assert tool_calls_as_text([{"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "x"}]}]) == [
        {"role": "assistant", "content": 'Let me look.\n[{"id": "x"}]'}]


# -- 4: token texts beside a stop sequence -------------------------------------------------------
def generate(server, **parameters) -> dict:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "details": True, **parameters}}
    return httpx.post(f"{server.url}/generate", json=body, timeout=60).json()


def test_token_texts_are_the_same_with_and_without_a_stop_sequence(tiny_server):
    plain = generate(tiny_server)
    texts = [t["text"] for t in plain["details"]["tokens"]]
    assert "".join(texts) == plain["generated_text"]
    stop = plain["generated_text"][len("".join(texts[:6])):][:6].strip() or texts[6]
    stopped = generate(tiny_server, stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    stopped_texts = [t["text"] for t in stopped["details"]["tokens"]]
    assert stopped_texts == texts[:len(stopped_texts)]
    assert "".join(stopped_texts).startswith(stopped["generated_text"])
    assert stopped["generated_text"].endswith(stop)

    best = generate(tiny_server, stop=[stop], best_of=2, do_sample=True)
    for seq in [best, *best["details"]["best_of_sequences"]]:
        details = seq.get("details", seq)  # a special token shows its own text, which the output skips
        assert "".join(t["text"] for t in details["tokens"] if not t["special"]).startswith(seq["generated_text"])

    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "stop": [stop]}}
    with httpx.stream("POST", f"{tiny_server.url}/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["text"] for e in events] == stopped_texts


# -- 5: the role in every chat chunk -------------------------------------------------------------
def test_every_chat_chunk_names_the_assistant(tiny_server, client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) > 2 and all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tgi", messages=body["messages"], max_tokens=6, stream=True, temperature=0))
    assert text


@pytest.mark.skipif(importlib.util.find_spec("text_generation") is None, reason="needs the text-generation client")
def test_the_text_generation_client_streams_chat_and_tokens(tiny_server, tiny_llm):
    from text_generation import Client

    tgi = Client(tiny_server.url, timeout=60)
    expected = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert tgi.generate(PROMPT, max_new_tokens=8).generated_text == expected.outputs[0].text
    streamed = [r.token.text for r in tgi.generate_stream(PROMPT, max_new_tokens=8)]
    assert "".join(streamed) == expected.outputs[0].text
    # The client parses every `data:` line as JSON, the `[DONE]` that ends TGI's and OpenAI's chat
    # streams too: it raises there, after every chunk has been read.
    chunks = []
    with pytest.raises(json.JSONDecodeError):
        for chunk in tgi.chat(messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True):
            chunks.append(chunk)
    assert len(chunks) >= 2 and all(c.choices[0].delta.role == "assistant" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


# -- 6: vLLM's extras ------------------------------------------------------------------------------
def chat(server, **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_ignore_eos_and_min_tokens_go_past_eos(client):
    forced_eos = {"logit_bias": {str(EOS): 100}}
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=7, temperature=0, extra_body=forced_eos)
    assert reply.usage.completion_tokens == 1 and reply.choices[0].finish_reason == "stop"
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=7, temperature=0,
                                      extra_body={**forced_eos, "ignore_eos": True})
    assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=7, temperature=0,
                                      extra_body={**forced_eos, "min_tokens": 4})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "stop"
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=3, temperature=0,
                                      extra_body={**forced_eos, "ignore_eos": True, "skip_special_tokens": False})
    assert reply.choices[0].text == "</s>" * 3


def test_top_k_repetition_penalty_and_stop_token_ids_act_as_in_the_library(client, tiny_llm):
    def library(**kwargs):
        return tiny_llm.generate(PROMPT, SamplingParams(max_tokens=10, **kwargs), use_tqdm=False)[0].outputs[0]

    greedy = library(temperature=0)
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3,
                                      extra_body={"top_k": 1})
    assert reply.choices[0].text == greedy.text
    penalised = library(temperature=0, repetition_penalty=1.8)
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"repetition_penalty": 1.8})
    assert reply.choices[0].text == penalised.text
    stop_id = greedy.token_ids[3]
    reply = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == greedy.token_ids.index(stop_id) + 1


@pytest.mark.parametrize("extra", [{"use_beam_search": True}, {"guided_choice": ["a", "b"]},
                                   {"allowed_token_ids": [1, 2]}, {"truncate_prompt_tokens": 3}])
def test_vllm_extras_not_implemented_are_refused_by_name(tiny_server, extra):
    r = chat(tiny_server, **extra)
    (name,) = extra
    assert r.status_code == 400
    assert r.json() == {"error": f"`{name}` is not supported by this server", "error_type": "validation"}


def test_vllm_extras_at_their_neutral_values_are_accepted(tiny_server):
    r = chat(tiny_server, use_beam_search=False, length_penalty=1.0, add_generation_prompt=True)
    assert r.status_code == 200


def test_vllm_guided_json_is_followed(tiny_server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = chat(tiny_server, guided_json=schema, max_tokens=30, seed=1, temperature=1.0)
    assert r.status_code == 200
    answer = r.json()["choices"][0]
    if answer["finish_reason"] == "stop":
        assert isinstance(json.loads(answer["message"]["content"])["n"], int)


# -- 7: stream lines that line readers cannot split ------------------------------------------------
def test_a_token_that_is_a_line_break_to_line_readers_stays_on_its_line(tiny_server):
    forced = {"logit_bias": {str(NEL): 100}, "max_tokens": 3, "temperature": 0, "stream": True}
    for route, body in (("/v1/completions", {"prompt": PROMPT, **forced}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **forced})):
        with httpx.stream("POST", f"{tiny_server.url}{route}", json=body, timeout=60) as r:
            raw = r.read().decode()
        assert "\\u0085" in raw and "\x85" not in raw
        lines = [line for line in raw.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
        texts = [json.loads(line[6:])["choices"][0] for line in lines]
        joined = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in texts)
        assert joined == "\x85" * 3
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}
    assert httpx.post(f"{tiny_server.url}/generate", json=body, timeout=60).status_code == 200


# -- 8: keep-alive -----------------------------------------------------------------------------------
def test_a_quiet_stream_sends_keepalive_comments_between_its_events():
    async def slow():
        await asyncio.sleep(0.35)
        yield "data: 1\n\n"
        yield "data: 2\n\n"
        await asyncio.sleep(0.25)
        yield "data: 3\n\n"

    async def collect():
        sent = []

        async def send(text):
            sent.append(text)

        await send_with_keepalive(slow(), send, 0.1)
        return sent

    events = asyncio.run(collect())
    data = [i for i, e in enumerate(events) if e != ":\n\n"]
    assert [events[i] for i in data] == ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"]
    assert set(events) - {events[i] for i in data} == {":\n\n"}
    assert 2 <= data[0] <= 4  # comments while the first event is awaited
    assert data[1] == data[0] + 1  # none between events that come together
    assert 1 <= data[2] - data[1] - 1 <= 3  # and again in the quiet after them


def test_leaving_a_stream_during_a_keepalive_wait_closes_its_events():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(10)
                yield "data: never\n\n"
        finally:
            closed.append(True)

    async def leave():
        sent = []

        async def send(text):
            sent.append(text)

        task = asyncio.ensure_future(send_with_keepalive(endless(), send, 0.05))
        while not sent:
            await asyncio.sleep(0.01)
        assert sent == [":\n\n"]
        task.cancel()  # as Starlette does when the client leaves
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert closed == [True]
