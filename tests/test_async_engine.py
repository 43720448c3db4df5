"""The asynchronous engine: streams, aborts, and errors that end one request, not the engine."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from server import LLM, AsyncEngine, SamplingParams
from server.config import EngineArgs
from server.engine.async_engine import EngineDeadError

PROMPTS = ["The quick brown fox", "Bonjour, je m'appelle", "数学は", "Emoji: 🎉🚀 and more"]


@pytest.fixture(scope="module")
def engine(mistral_v03_dir):
    engine = AsyncEngine(EngineArgs(model=mistral_v03_dir, block_size=4))
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params, request_id=None):
    deltas, last = [], None
    async for output in engine.generate(prompt, params, request_id):
        deltas.append(output.outputs[0].delta if output.outputs else "")
        last = output
    return deltas, last


@pytest.mark.parametrize("stop", [None, ["ab", "e"]], ids=["no-stop", "stop-strings"])
def test_streamed_deltas_join_to_the_final_text(engine, stop):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, stop=stop)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS))

    for deltas, final in asyncio.run(main()):
        assert final.finished
        assert "".join(deltas) == final.outputs[0].text


def test_stream_equals_the_offline_result(engine, mistral_v03_dir):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    _, final = asyncio.run(collect(engine, PROMPTS[0], params))
    offline = LLM(mistral_v03_dir).generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert final.outputs[0].token_ids == offline.outputs[0].token_ids
    assert final.outputs[0].text == offline.outputs[0].text


def test_a_reader_that_falls_behind_gets_merged_outputs_whose_deltas_still_join(engine):
    """Outputs waiting together in a request's queue come out as one: fewer outputs than
    tokens, and still every token and every character once, in order."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True, stop=["e "])

    async def slow_reader():
        deltas, counts, last = [], [], None
        async for output in engine.generate(PROMPTS[3], params):
            deltas.append(output.outputs[0].delta)
            counts.append(len(output.outputs[0].token_ids))
            last = output
            time.sleep(0.05)  # the event loop busy elsewhere: the engine's steps pile up
        return deltas, counts, last

    deltas, counts, final = asyncio.run(slow_reader())
    _, alone = asyncio.run(collect(engine, PROMPTS[3], params))
    assert final.outputs[0].token_ids == alone.outputs[0].token_ids
    assert "".join(deltas) == final.outputs[0].text == alone.outputs[0].text
    assert len(deltas) < len(final.outputs[0].token_ids)
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_queued_outputs_before_an_error_come_out_before_it():
    from server.engine.async_engine import stream_outputs
    from server.outputs import CompletionOutput, RequestOutput

    def output(text, delta):
        return RequestOutput("r", None, [1], None, [CompletionOutput(0, text, [], 0.0, None, None, delta=delta)], False)

    async def main():
        stream, seen = asyncio.Queue(), []
        for item in (output("a", "a"), output("ab", "b"), output("abc", "c"), RuntimeError("step failed")):
            stream.put_nowait(item)
        with pytest.raises(RuntimeError, match="step failed"):
            async for item in stream_outputs(stream, lambda: None):
                seen.append(item)
        return seen

    seen = asyncio.run(main())
    assert [(o.outputs[0].text, o.outputs[0].delta) for o in seen] == [("abc", "abc")]


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        async for output in engine.generate(PROMPTS[1], params, "to-abort"):
            if len(output.outputs[0].token_ids) >= 3:
                break  # the client goes away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not engine.engine.has_unfinished_requests():
                break

    asyncio.run(main())
    manager = engine.engine.block_manager
    assert not engine.engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks


def test_bad_input_raises_for_that_request_only(engine):
    async def main():
        with pytest.raises(ValueError):
            await collect(engine, [1] * 10_000, SamplingParams(max_tokens=4))
        return await collect(engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))

    _, final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) >= 1


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    runner = engine.engine.runner
    original = runner.forward
    calls = {"n": 0}

    def flaky(chunks, previous=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return original(chunks, previous)

    monkeypatch.setattr(runner, "forward", flaky)

    async def main():
        with pytest.raises(RuntimeError, match="injected fault"):
            await collect(engine, PROMPTS[2], SamplingParams(max_tokens=4))
        return await collect(engine, PROMPTS[2], SamplingParams(temperature=0, max_tokens=4))

    _, final = asyncio.run(main())
    assert final.finished
    manager = engine.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_a_dead_engine_loop_fails_its_streams_and_says_so(mistral_v03_dir):
    engine = AsyncEngine(EngineArgs(model=mistral_v03_dir))

    def broken_step():
        raise SystemError("the loop itself broke")

    engine._step = broken_step  # a fault outside any model step

    async def main():
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], SamplingParams(max_tokens=4))

    asyncio.run(main())
    assert not engine.is_alive


def test_aborting_ten_of_a_hundred_leaves_the_other_ninety_exact_and_ids_reusable(engine, mistral_v03_dir):
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(100, 30000) for _ in range(rng.randint(1, 40))] for _ in range(100)]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True, n=1)
    alone = LLM(mistral_v03_dir, block_size=4).generate(prompts, params, use_tqdm=False)
    doomed = set(rng.sample(range(100), 10))

    async def run(i):
        seen = 0
        async for output in engine.generate(prompts[i], params, request_id=f"r{i}"):
            seen += 1
            if i in doomed and seen == 1 + i % 5:  # give up at a different point each
                engine.abort(f"r{i}")
                return None
            if output.finished:
                return output
        return None

    async def main():
        return await asyncio.gather(*(run(i) for i in range(100)))

    results = asyncio.run(main())
    for i, output in enumerate(results):
        if i not in doomed:
            assert output.outputs[0].token_ids == alone[i].outputs[0].token_ids
    inner = engine.engine
    deadline = time.monotonic() + 10
    while inner.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not inner.has_unfinished_requests()
    assert inner.block_manager.num_free_blocks == inner.block_manager.num_blocks
    # An aborted id can be used again.
    again = asyncio.run(collect(engine, prompts[min(doomed)], params, request_id=f"r{min(doomed)}"))[1]
    assert again.outputs[0].token_ids == alone[min(doomed)].outputs[0].token_ids
