"""One request's failure inside a step ends that request alone: the step is redone for the
others, which finish with the tokens they would have had alone."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from server import SamplingParams

POISON_TOP_K = 13  # the injected fault fires for any step that samples a row with this top_k
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello there, my friend"]


def poison_sampling(engine, monkeypatch) -> list[int]:
    """Make the runner's sampling fail whenever a poisoned row is in the step (the way a bad
    parameter fails a sampling kernel); returns the list of batch sizes it failed with."""
    runner = engine.runner
    sample, failures = runner.sample, []

    def failing(forward, allowed=None):
        rows = [chunk.sampling for chunk in forward.chunks if chunk.sampling is not None]
        if any(options.top_k == POISON_TOP_K for options in rows):
            failures.append(len(rows))
            raise RuntimeError("injected sampling fault")
        return sample(forward, allowed)

    monkeypatch.setattr(runner, "sample", failing)
    return failures


def run_all(engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(prompt, params, request_id)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def innocent_params():
    return [SamplingParams(temperature=0, max_tokens=12),
            SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12),
            SamplingParams(temperature=1.0, seed=11, max_tokens=12, logprobs=2)]


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("poisoned_at", [0, 2])
def test_a_failing_request_ends_alone_and_the_others_get_their_tokens(tiny_llm, monkeypatch, async_scheduling,
                                                                      poisoned_at):
    engine = tiny_llm.engine
    monkeypatch.setattr(engine, "async_scheduling", async_scheduling)
    alone = {}
    for i, params in enumerate(innocent_params()):
        alone[f"ok{i}"] = run_all(engine, {f"ok{i}": (PROMPTS[i], params)})[f"ok{i}"]

    failures = poison_sampling(engine, monkeypatch)
    batch = {f"ok{i}": (PROMPTS[i], params) for i, params in enumerate(innocent_params())}
    poisoned = ("bad", (PROMPTS[3], SamplingParams(temperature=0.5, top_k=POISON_TOP_K, max_tokens=12)))
    items = list(batch.items())
    items.insert(poisoned_at, poisoned)
    finals = run_all(engine, dict(items))

    assert finals["bad"].error == "injected sampling fault"
    assert finals["bad"].outputs[0].finish_reason == "abort"
    assert failures[0] > 1 and failures[-1] == 1  # failed in a batch, then found alone
    for request_id, output in alone.items():
        assert finals[request_id].error is None
        assert finals[request_id].outputs[0].token_ids == output.outputs[0].token_ids, request_id
        assert finals[request_id].outputs[0].text == output.outputs[0].text
    for got, expected in zip(finals["ok2"].outputs[0].logprobs, alone["ok2"].outputs[0].logprobs, strict=True):
        assert got == pytest.approx(expected, abs=1e-4)
    assert not engine.scheduler.running and not engine.scheduler.waiting and engine.scheduler.isolated is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


class BrokenDetokenizer:
    def add(self, token_id):
        raise UnicodeError("injected detokenizer fault")


def test_a_failure_in_one_requests_text_ends_only_it(tiny_llm):
    engine = tiny_llm.engine
    alone = run_all(engine, {"ok": (PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))})["ok"]
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8), "bad")
    for seq in engine.requests["bad"].sequences:
        engine.detokenizers[seq.seq_id] = BrokenDetokenizer()
    finals = run_all(engine, {"ok": (PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))})
    assert finals["bad"].error == "injected detokenizer fault"
    assert finals["ok"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert finals["ok"].outputs[0].text == alone.outputs[0].text


def test_the_library_raises_for_the_failed_prompt(tiny_llm, monkeypatch):
    poison_sampling(tiny_llm.engine, monkeypatch)
    with pytest.raises(RuntimeError, match="prompt 1 failed during generation: injected sampling fault"):
        tiny_llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=4),
                                        SamplingParams(temperature=0.5, top_k=POISON_TOP_K, max_tokens=4)],
                          use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


def generate_all(app, bodies: list[dict]) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))
    return asyncio.run(go())


def test_over_http_the_failed_request_gets_424_and_the_others_their_answers(app_engine, monkeypatch):
    app, engine = app_engine
    bodies = [{"inputs": prompt, "parameters": {"max_new_tokens": 10}} for prompt in PROMPTS[:3]]
    alone = [generate_all(app, [body])[0].json()["generated_text"] for body in bodies]
    poison_sampling(engine.engine, monkeypatch)
    bad = {"inputs": PROMPTS[3], "parameters": {"max_new_tokens": 10, "do_sample": True, "top_k": POISON_TOP_K}}
    answers = generate_all(app, bodies[:1] + [bad] + bodies[1:])
    assert answers[1].status_code == 424
    assert answers[1].json() == {"error": "Request failed during generation: injected sampling fault",
                                 "error_type": "generation"}
    assert [r.status_code for r in answers[:1] + answers[2:]] == [200, 200, 200]
    assert [r.json()["generated_text"] for r in answers[:1] + answers[2:]] == alone
