"""Continuous batching, preemption, prefix caching, seeds and stops: outputs never change."""
from __future__ import annotations

import pytest
import torch

from conftest import out_of_memory_on_calls
from server import LLM, SamplingParams

PROMPTS = [[1] + [(i * 37 + j * 11) % 30000 + 100 for j in range(n)]
           for i, n in enumerate([3, 40, 9, 70, 1, 25, 120, 14])]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=20,
                         ignore_eos=True)


@pytest.fixture(scope="module")
def llm(mistral_v03_dir):
    return LLM(mistral_v03_dir, block_size=4)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def alone(llm, prompts, params):
    return [tokens(llm.generate([p], params, use_tqdm=False))[0] for p in prompts]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_request_alone_and_in_a_mixed_batch_give_the_same_tokens(llm, params):
    assert tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == alone(llm, PROMPTS, params)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_preempted_sequences_resume_with_the_same_tokens(mistral_v03_dir, llm, params):
    expected = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    small = LLM(mistral_v03_dir, block_size=4, max_batch_total_tokens=160)
    assert tokens(small.generate(PROMPTS, params, use_tqdm=False)) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_step_out_of_device_memory_preempts_and_retries_with_the_same_tokens(mistral_v03_dir, llm, params):
    expected = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    fresh = LLM(mistral_v03_dir, block_size=4)
    calls = out_of_memory_on_calls(fresh.engine.runner, "forward", (1, 4))
    assert tokens(fresh.generate(PROMPTS, params, use_tqdm=False)) == expected
    assert len(calls[1]) < len(calls[0]) and fresh.engine.scheduler.num_preemptions >= 4
    assert fresh.engine.block_manager.num_free_blocks == fresh.engine.block_manager.num_blocks


def test_running_out_of_memory_while_sampling_changes_no_tokens(mistral_v03_dir, llm):
    """The step's forward pass was queued and its tokens counted as computed; the sampling then
    fails for memory: the step must count for nothing and run again."""
    expected = tokens(llm.generate(PROMPTS, SAMPLED, use_tqdm=False))
    fresh = LLM(mistral_v03_dir, block_size=4)
    out_of_memory_on_calls(fresh.engine.runner, "sample", (2, 7))
    assert tokens(fresh.generate(PROMPTS, SAMPLED, use_tqdm=False)) == expected
    assert fresh.engine.scheduler.num_preemptions >= 2
    assert fresh.engine.block_manager.num_free_blocks == fresh.engine.block_manager.num_blocks


def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(mistral_v03_dir, llm):
    expected = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    chunked = LLM(mistral_v03_dir, block_size=4, max_batch_prefill_tokens=16)
    assert tokens(chunked.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected


def test_prefix_cache_hits_skip_recomputation_and_change_nothing(mistral_v03_dir):
    shared = PROMPTS[6]
    cold = LLM(mistral_v03_dir, block_size=4, enable_prefix_caching=False)
    expected = tokens(cold.generate([shared, shared[:50] + [7, 8, 9]], GREEDY, use_tqdm=False))
    warm = LLM(mistral_v03_dir, block_size=4)
    first = warm.generate([shared], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    again, branch = warm.generate([shared, shared[:50] + [7, 8, 9]], GREEDY, use_tqdm=False)
    assert again.num_cached_tokens == len(shared) - 1 - (len(shared) - 1) % 4
    assert branch.num_cached_tokens == 48  # the 12 full blocks of the shared 50 tokens
    assert tokens([again, branch]) == expected
    assert cold.engine.block_manager.prefix_hits == 0


def test_a_seed_reproduces_and_different_seeds_differ(llm):
    prompt = PROMPTS[1]
    first = llm.generate([prompt], SAMPLED, use_tqdm=False)[0].outputs[0].token_ids
    second = llm.generate([prompt], SAMPLED, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=8, max_tokens=20,
                           ignore_eos=True)
    assert first == second
    assert llm.generate([prompt], other, use_tqdm=False)[0].outputs[0].token_ids != first


def test_unseeded_requests_draw_a_seed_that_reproduces_them(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    first = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    replay = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=first.seed)
    assert llm.generate([PROMPTS[2]], replay, use_tqdm=False)[0].outputs[0].token_ids == \
        first.outputs[0].token_ids


def test_n_and_best_of_return_distinct_ranked_samples(llm):
    params = SamplingParams(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=8,
                            ignore_eos=True)
    output = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    assert output.outputs[0].cumulative_logprob >= output.outputs[1].cumulative_logprob
    three = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in three.outputs}) == 3


def test_the_samples_of_one_request_share_its_prompt_through_the_prefix_cache(mistral_v03_dir):
    llm = LLM(mistral_v03_dir, block_size=4)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    llm.generate([PROMPTS[6]], params, use_tqdm=False)
    full_blocks = (len(PROMPTS[6]) - 1) // 4 * 4
    assert llm.engine.block_manager.prefix_hits == 2 * full_blocks


def test_stop_strings_are_cut_exactly(llm):
    base = llm.generate([PROMPTS[3]], GREEDY, use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text.index(stop)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    out = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                          include_stop_str_in_output=True)
    assert llm.generate([PROMPTS[3]], kept, use_tqdm=False)[0].outputs[0].text == \
        text[:cut + len(stop)]


def test_stop_token_ids_eos_and_min_tokens(llm):
    base = llm.generate([PROMPTS[3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = base[5]
    first = base.index(stop_id)
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20,
                                                    stop_token_ids=[stop_id]), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.token_ids == base[:first + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)
    banned = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                            min_tokens=first + 2)
    later = llm.generate([PROMPTS[3]], banned, use_tqdm=False)[0].outputs[0].token_ids
    assert len(later) > first + 1 and stop_id not in later[:first + 2]


def test_max_tokens_and_logprobs_shapes(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    completion = llm.generate([PROMPTS[4]], params, use_tqdm=False)[0].outputs[0]
    assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
    assert len(completion.logprobs) == 5
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and len(entry) in (2, 3)
        assert entry[token] == max(entry.values())  # greedy takes the most likely


def test_steps_queued_ahead_give_what_steps_run_one_at_a_time_give(llm, monkeypatch):
    """Async scheduling queues each step before reading the last one back: tokens, text,
    logprobs and finish reasons stay those of running one step at a time, for requests that
    end early (stop ids, stop strings, max_tokens), sample with penalties, or share a prompt."""
    base = llm.generate([PROMPTS[3]], GREEDY, use_tqdm=False)[0].outputs[0]
    mix = [GREEDY, SAMPLED,
           SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[base.token_ids[4]], logprobs=2),
           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[base.text[5:8]]),
           SamplingParams(temperature=0.9, seed=1, max_tokens=1, ignore_eos=True),
           SamplingParams(temperature=1.0, seed=2, max_tokens=15, repetition_penalty=1.3,
                          frequency_penalty=0.5, presence_penalty=0.3, min_tokens=3, ignore_eos=True),
           SamplingParams(n=2, best_of=3, temperature=1.0, seed=4, max_tokens=9, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, ignore_eos=True)]
    params = [mix[i % len(mix)] for i in range(2 * len(mix))]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]

    def run():
        return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
                + [o.prompt_logprobs] for o in llm.generate(prompts, params, use_tqdm=False)]

    assert llm.engine.async_scheduling
    ahead = run()
    monkeypatch.setattr(llm.engine, "async_scheduling", False)
    assert run() == ahead
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


@pytest.mark.parametrize("bad", [
    dict(prompts=[], params=GREEDY),
    dict(prompts=[[1] * 600], params=GREEDY),
    dict(prompts=[[1, 40000]], params=GREEDY),
    dict(prompts=[""], params=GREEDY),
], ids=["empty-list", "too-long", "out-of-vocab", "empty-prompt"])
def test_bad_input_raises_value_error_and_the_engine_keeps_working(llm, bad):
    with pytest.raises(ValueError):
        llm.generate(bad["prompts"], bad["params"], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)) == alone(llm, PROMPTS[:1], GREEDY)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                    dict(max_tokens=-1), dict(min_tokens=5, max_tokens=2),
                                    dict(temperature=float("nan")), dict(n=2, best_of=1),
                                    dict(frequency_penalty=3)])
def test_out_of_range_sampling_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_a_bad_prompt_in_a_list_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate([PROMPTS[0], [1] * 600], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_top_k_minus_one_means_disabled_as_in_vllm():
    assert SamplingParams(top_k=-1).top_k == 0


def test_unknown_model_path_raises_value_error(tmp_path):
    with pytest.raises(ValueError):
        LLM(str(tmp_path / "no-such-model"))


def test_a_watermark_makes_most_tokens_green_and_a_plain_text_does_not(llm):
    import torch

    from server.runtime.random import watermark_greenlist

    prompts = PROMPTS[:4]
    vocab = llm.engine.config.model.vocab_size

    def green_share(params):
        shares = []
        for prompt, output in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
            tokens = output.outputs[0].token_ids
            previous = torch.tensor([prompt[-1]] + tokens[:-1])
            green = watermark_greenlist(previous, vocab, torch.full((len(tokens),), 0.5))
            shares.append(green[torch.arange(len(tokens)), torch.tensor(tokens)].float().mean().item())
        return sum(shares) / len(shares)

    marked = SamplingParams(temperature=1.0, seed=5, max_tokens=64, ignore_eos=True, watermark=True)
    plain = SamplingParams(temperature=1.0, seed=5, max_tokens=64, ignore_eos=True)
    assert green_share(marked) > 0.75
    assert green_share(plain) < 0.65


def _compiled_variants() -> dict[str, int]:
    """How many variants of each of our Triton kernels have been compiled in this process."""
    import importlib

    from triton.runtime.jit import JITFunction

    modules = [importlib.import_module(f"server.kernels.{name}")
               for name in ("prefill_attention", "decode_attention", "norm", "rotary", "activation", "gemv")]
    kernels = [k for m in modules for k in vars(m).values() if isinstance(k, JITFunction)]
    return {k.fn.__name__: sum(len(cache[0]) for cache in k.device_caches.values()) for k in kernels}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_after_warm_up_no_prompt_waits_for_a_kernel_to_compile(mistral_v03_dir):
    """Triton compiles a kernel once per specialization of its integer arguments; start-up
    compiles every variant a prompt of any length can ask for (ModelRunner.warm_up)."""
    llm = LLM(mistral_v03_dir, device="cuda", dtype="bfloat16")
    before = _compiled_variants()
    for n in (3, 17, 30, 45, 100, 256, 300):
        llm.generate([list(range(10, 10 + n))], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    after = _compiled_variants()
    assert after == before, {name: (before[name], count) for name, count in after.items() if count != before[name]}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_after_warm_up_no_mixed_step_waits_for_a_kernel_to_compile(mistral_v03_dir):
    """Nor does a mixed step: a prompt (of each table width and tile height) beside any number
    of decoding sequences, which the attention kernels take indexed, the decode kernel with
    its split count as an argument and its tiles by the number of sequences."""
    llm = LLM(mistral_v03_dir, device="cuda", dtype="bfloat16")
    engine = llm.engine
    before = _compiled_variants()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for count, prompt_len in ((1, 10), (5, 45), (9, 20), (20, 256), (40, 10), (100, 45), (140, 300), (200, 20)):
        for _ in range(count):
            engine.add_request(list(range(10, 14)), params)
        engine.step()  # their prefill
        engine.add_request(list(range(10, 10 + prompt_len)), params)
        engine.step()  # the prompt beside `count` sequences of one token
        while engine.has_unfinished_requests():
            engine.step()
    after = _compiled_variants()
    assert after == before, {name: (before[name], count) for name, count in after.items() if count != before[name]}


def test_every_view_of_a_steps_inputs_starts_on_16_bytes(mistral_v03_dir):
    """Each section of a step's packed inputs (positions, slots, query starts, block tables...)
    starts at an even int64 entry whatever the chunks' lengths, so that a kernel's pointers are
    16-byte aligned in every step and Triton never compiles a variant for an 8-byte one."""
    from server.runtime.model_runner import PackedStep, SequenceChunk

    runner = LLM(mistral_v03_dir, max_batch_total_tokens=512).engine.runner
    for lengths in ([1], [3], [1, 1, 1], [5, 2, 7], [16, 1], [1, 4, 1]):
        chunks = [SequenceChunk(list(range(10, 10 + n)), 0, [i, i + 1]) for i, n in enumerate(lengths)]
        packed = runner._pack(chunks)
        assert all(start % 2 == 0 for start in packed.starts())
        values = runner._to_device(packed.values)
        ids, positions, slots, context_lens, cu_query_lens = packed.sections(values)[:5]
        assert ids.tolist() == [t for n in lengths for t in range(10, 10 + n)]
        assert positions.tolist() == [p for n in lengths for p in range(n)]
        assert context_lens.tolist() == lengths and cu_query_lens.tolist()[-1] == sum(lengths)
        tables = values[packed.starts()[-1]:].view(len(lengths), packed.width)
        assert tables.tolist() == [[i, i + 1] for i in range(len(lengths))]
        # A mixed step lists its one-token chunks (the decode kernel's) and the others apart.
        singles, multis = (x.tolist() for x in packed.sections(values)[9:11])
        mixed = 1 in lengths and any(n > 1 for n in lengths)
        assert singles == ([i for i, n in enumerate(lengths) if n == 1] if mixed else [])
        assert multis == ([i for i, n in enumerate(lengths) if n > 1] if mixed else [])
        meta = runner._unpack(packed)[2]
        assert (meta.single_seqs is not None) == mixed and (meta.multi_seqs is not None) == mixed
        message = torch.frombuffer(packed.message(), dtype=torch.int64)
        other = PackedStep.read(message)  # as another tensor-parallel rank reads it
        assert other.query_lens == lengths and other.context_lens == lengths


def test_a_decode_step_reaches_the_device_longest_context_first(mistral_v03_dir):
    """A decode step's sequences are packed longest context first (the decode kernel's
    programs then end together), while each chunk's sampled token is still its own: the same
    as that chunk's step alone, and the rows to sample keep the chunks' order."""
    from server.runtime.model_runner import SequenceChunk
    from server.runtime.sampler import SamplingOptions

    runner = LLM(mistral_v03_dir, max_batch_total_tokens=512).engine.runner
    prompts = [list(range(10, 10 + n)) for n in (3, 12, 7)]
    first = [runner.execute([SequenceChunk(p, 0, [i], sampling=SamplingOptions())])[0].sampled.token_id
             for i, p in enumerate(prompts)]

    def decode(indices):
        return [SequenceChunk([first[i]], len(prompts[i]), [i], sampling=SamplingOptions(num_logprobs=2))
                for i in indices]

    packed = runner._pack(decode(range(3)))
    values = runner._to_device(packed.values)
    ids, positions, _, context_lens, _, sample_rows = (x.tolist() for x in packed.sections(values)[:6])
    assert context_lens == [13, 8, 4] and positions == [12, 7, 3] and ids == [first[1], first[2], first[0]]
    assert sample_rows == [2, 0, 1]  # chunk 0's token is the packed step's third
    tables = values[packed.starts()[-1]:].view(3, packed.width)
    assert tables[:, 0].tolist() == [1, 2, 0]
    together = runner.execute(decode(range(3)))
    for i in range(3):
        [alone] = runner.execute(decode([i]))  # writes the same K/V into the same slot
        assert together[i].sampled.token_id == alone.sampled.token_id
        assert together[i].sampled.top_logprobs == pytest.approx(alone.sampled.top_logprobs, abs=1e-4)


def test_the_warm_up_steps_run_and_sample(mistral_v03_dir):
    """What start-up runs on CUDA (ModelRunner.warm_up), run here on the CPU path (by an engine
    of its own: the steps write over cache blocks, which start-up does before any request):
    prefills of each table width and tile height, then mixed steps with one-token sequences in
    each number that takes another variant of the decode kernel, at each width."""
    from server.kernels.decode_attention import EARLY_SEQS

    llm = LLM(mistral_v03_dir, max_batch_total_tokens=512)
    runner = llm.engine.runner
    counts = runner._decode_variant_counts(40)
    assert counts[0] == 1 and EARLY_SEQS + 1 in counts  # the first tile read early, or not
    steps = runner.warm_up_steps(max_num_seqs=41)
    widths = {len(chunks[0].block_table) for chunks in steps}
    assert widths == {1, 3, 16} and any(len(chunks[0].token_ids) > 32 for chunks in steps)
    mixed = {(len(chunks[0].block_table), len(chunks) - 1) for chunks in steps if len(chunks) > 1}
    assert mixed == {(width, count) for width in (1, 3, 16) for count in counts}
    for chunks in steps:
        results = runner.execute(chunks)
        assert len(results) == len(chunks)
        assert all(0 <= r.sampled.token_id < llm.engine.config.model.vocab_size for r in results)
    assert all(len(chunks) == 1 for chunks in runner.warm_up_steps(max_num_seqs=1))  # no mixed step fits


def test_the_decode_kernel_takes_fewer_splits_where_every_context_is_short():
    """Splits fill the GPU for the batch; past 32 or over short contexts they would hold no
    64-key tile, so a step whose contexts are all short takes at most SHORT_SPLITS."""
    from server.runtime.model_runner import SHORT_CONTEXT, SHORT_SPLITS, decode_splits

    assert decode_splits(1, 8, 132) == decode_splits(1, 8, 132, SHORT_CONTEXT + 1) == 32
    assert decode_splits(1, 8, 132, SHORT_CONTEXT) == decode_splits(1, 8, 132, 1) == SHORT_SPLITS
    assert decode_splits(3, 8, 132) == 11 and decode_splits(3, 8, 132, 100) == SHORT_SPLITS
    assert decode_splits(6, 8, 132) == decode_splits(6, 8, 132, 100) == 6
    assert decode_splits(64, 8, 132, 100) == decode_splits(64, 8, 132) == 1


def test_a_cpu_kv_cache_is_zeros_whose_pages_are_taken_when_touched():
    """The CPU cache (2 GiB by default) reads as zeros in every KV dtype and takes its memory
    only as blocks are written: a GiB of it leaves the process's resident memory nearly flat."""
    import os

    from server.runtime.model_runner import zeroed

    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        k, v = zeroed((6, 16, 2, 8), dtype, torch.device("cpu")), zeroed((6, 16, 2, 8), dtype, torch.device("cpu"))
        assert k.shape == (6, 16, 2, 8) and k.dtype == dtype and k.is_contiguous()
        assert not k.float().any() and not v.float().any()
        k[3, 5] = 1.5
        assert k.float().sum() == 1.5 * 16 and not v.float().any()  # separate storage

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    cache = zeroed((1 << 14, 16, 8, 128), torch.float32, torch.device("cpu"))  # 1 GiB
    assert resident() - before < 128 << 20
    cache[:8].fill_(1.0)  # 8 blocks: 512 KiB
    assert resident() - before < 128 << 20 and cache[:8].all() and not cache[8:16].any()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_decode_graphs_for_short_and_long_contexts_give_the_eager_tokens(mistral_v03_dir):
    """Batches of 1 and 2 decoding across SHORT_CONTEXT: their graphs switch from the short
    contexts' splits to the long ones', with the tokens and logprobs of steps run without graphs."""
    from server.runtime.model_runner import SHORT_CONTEXT

    prompts = [[(7 * i + 3) % 900 + 50 for i in range(SHORT_CONTEXT - 20)], [(5 * i + 1) % 700 + 9 for i in range(40)]]
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, logprobs=1)
    from server.config import EngineArgs
    from server.engine.llm_engine import LLMEngine

    results = {}
    for eager in (False, True):
        engine = LLMEngine(EngineArgs(model=mistral_v03_dir, device="cuda", dtype="bfloat16", enforce_eager=eager))
        assert (engine.runner.graphs is None) == eager
        results[eager] = []
        for batch in ([prompts[0]], prompts):
            for prompt in batch:
                engine.add_request(prompt, params)
            finished = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
            results[eager].append([finished[key] for key in sorted(finished, key=int)])
        del engine
    assert results[False] == results[True]


def test_an_engine_dropped_before_the_next_is_made_is_collected(mistral_v03_dir):
    """An engine freezes what exists when it is made (out of the collector's scans); one in a
    reference cycle dropped since, with its cache on the GPU, must still be collected when
    the next is made."""
    import weakref

    from server.config import EngineArgs
    from server.engine.llm_engine import LLMEngine

    first = LLMEngine(EngineArgs(model=mistral_v03_dir, device="cpu"))
    first.runner.engine = first  # a cycle, which only the collector can free
    gone = weakref.ref(first.runner.model)
    del first
    second = LLMEngine(EngineArgs(model=mistral_v03_dir, device="cpu"))
    assert gone() is None and second.runner.model is not None
