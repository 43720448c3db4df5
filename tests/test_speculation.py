"""Speculative decoding with n-gram prompt lookup: the same tokens as without it, for greedy
and seeded requests alike, alone and in mixed batches, with stops, logprobs and preemption."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import SMOLLM2_DIR
from server import LLM, SamplingParams
from server.engine.speculation import NgramIndex, propose_ngram

# Prompts that repeat themselves, so that lookups find something to propose.
PROMPTS = ["one two three four one two three four one two three",
           "the cat sat on the mat and the cat sat on the",
           "A B C D A B C D A B",
           "Hello world"]

# float32: on a GPU, bfloat16 rounds differently in the kernel that checks proposals (prefill
# attention over a few tokens) and the one that decodes a token, which can flip a near tie of a
# random model; the promise of equal tokens is float32's.
EXACT = "float32"


def test_the_proposal_is_what_followed_the_latest_earlier_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert propose_ngram([1, 2, 3, 7, 5, 2, 3, 8, 2, 3], 2, max_n=2) == [8, 2]  # the latest of two
    assert propose_ngram([5, 6, 7], 4) == []
    assert propose_ngram([4, 4, 4, 4], 2) == [4]  # what follows the earlier three: one token, then the end
    assert propose_ngram([1, 2, 3], 0) == []


def test_the_index_proposes_what_the_scan_proposes_as_a_sequence_grows_and_shrinks():
    import random

    rng = random.Random(0)
    tokens, index = [], NgramIndex(3, 1)
    for step in range(600):
        if step % 97 == 96:
            del tokens[-5:]  # a stop string's cut
        tokens.append(rng.randrange(6))
        assert index.propose(tokens, 4) == propose_ngram(tokens, 4, 3, 1), step


@pytest.fixture(scope="module")
def plain(mistral_v03_dir):
    return LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=4096)


@pytest.fixture(scope="module")
def speculating(mistral_v03_dir):
    return LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=4096,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True),
    # Near greedy, but sampled: its outputs repeat, so its proposals are checked by sampling.
    SamplingParams(temperature=0.05, seed=5, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.2, top_k=20, seed=3, max_tokens=33, ignore_eos=True, logprobs=2),
])
def test_speculation_gives_the_tokens_of_plain_decoding(plain, speculating, params):
    expected = plain.generate(PROMPTS, params, use_tqdm=False)
    before = speculating.engine.num_accepted
    got = speculating.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(got) == tokens(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    if params.logprobs is not None:
        for g, e in zip(got, expected):
            for got_step, expected_step in zip(g.outputs[0].logprobs, e.outputs[0].logprobs, strict=True):
                assert got_step.keys() == expected_step.keys()
                assert list(got_step.values()) == pytest.approx(list(expected_step.values()), abs=1e-4)
    if params.temperature < 0.1:
        assert speculating.engine.num_accepted > before  # proposals were taken, not only made


def test_each_request_alone_equals_the_batch(speculating):
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=30, ignore_eos=True)
    together = tokens(speculating.generate(PROMPTS, params, use_tqdm=False))
    assert together == [tokens(speculating.generate(p, params, use_tqdm=False))[0] for p in PROMPTS]


def test_a_stop_string_inside_an_accepted_run_ends_the_output_there(plain, speculating):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    text = plain.generate(PROMPTS[1], greedy, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], logprobs=0)
    expected = plain.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    got = speculating.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
        (expected.text, expected.token_ids, expected.finish_reason, expected.stop_reason)
    assert len(got.logprobs) == len(got.token_ids)
    assert got.cumulative_logprob == pytest.approx(expected.cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_max_tokens_inside_an_accepted_run_is_exact(plain, speculating, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    assert tokens(speculating.generate(PROMPTS, params, use_tqdm=False)) == \
        tokens(plain.generate(PROMPTS, params, use_tqdm=False))
    assert all(len(t) == max_tokens for t in tokens(speculating.generate(PROMPTS, params, use_tqdm=False)))


def test_requests_that_cannot_speculate_share_the_batch(plain, speculating):
    """Penalties and grammars make each place depend on the ones before: those rows decode one
    token a step beside the others."""
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, guided_regex="(ab|cd){1,12}"),
              SamplingParams(temperature=0.7, seed=2, max_tokens=30, ignore_eos=True, presence_penalty=0.5)]
    assert tokens(speculating.generate(PROMPTS, params, use_tqdm=False)) == \
        tokens(plain.generate(PROMPTS, params, use_tqdm=False))


def test_a_preempted_speculating_sequence_resumes_with_the_same_tokens(mistral_v03_dir, plain):
    small = LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=160, block_size=8,
                speculative_config={"num_speculative_tokens": 3})
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    got = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert tokens(got) == tokens(plain.generate(PROMPTS, params, use_tqdm=False))
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_an_aborted_speculating_request_leaves_no_block_behind(speculating):
    engine = speculating.engine
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "gone")
    for _ in range(4):
        engine.step()
    engine.abort("gone")
    while engine.has_work():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_library_checks_the_speculative_config(mistral_v03_dir):
    with pytest.raises(ValueError, match="method 'eagle' is not supported"):
        LLM(mistral_v03_dir, speculative_config={"method": "eagle", "num_speculative_tokens": 2})


def test_two_ranks_over_gloo_speculate_as_one(mistral_v03_dir, plain):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sharded = LLM(mistral_v03_dir, dtype=EXACT, tensor_parallel_size=2, max_batch_total_tokens=2048,
                  speculative_config={"num_speculative_tokens": 4})
    try:
        got = sharded.generate(PROMPTS, params, use_tqdm=False)
        assert sharded.engine.num_accepted > 0
    finally:
        sharded.engine.shutdown()
    assert tokens(got) == tokens(plain.generate(PROMPTS, params, use_tqdm=False))


@pytest.mark.parametrize("draft", [False, True], ids=["ngram", "draft_model"])
def test_the_server_speculates_with_its_flag(mistral_v03_dir, plain, draft):
    """--speculate alone looks n-grams up; SPECULATIVE_MODEL (--speculative-model's variable)
    names a draft model: here the model itself."""
    from server_process import generate_once

    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 20}}
    answer, log = generate_once("--model-id", mistral_v03_dir, "--max-total-tokens", "256", "--max-batch-total-tokens",
                                "4096", "--speculate", "3", body=body,
                                env={"SPECULATIVE_MODEL": mistral_v03_dir} if draft else None)
    expected = plain.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert answer["generated_text"] == expected.outputs[0].text
    assert f"proposed by {mistral_v03_dir if draft else 'n-gram lookup'}" in log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not SMOLLM2_DIR, reason="needs CUDA and SmolLM2")
def test_checks_through_the_decode_graphs_keep_a_real_models_greedy_tokens_in_bfloat16():
    """On a GPU the checks replay the decode graphs a row a token, and the decode kernel reads
    its first keys before the kernel that stores the step's own has finished: a check's rows
    must still read their sequence's keys of the same step (an H100 found them read stale,
    and SmolLM2 copying a passage wrote another from its 5th token)."""
    passage = ("The river rose slowly through the night, and by morning the lower fields were under water. "
               "The farmers moved their animals to the hill behind the village, where the old church stood.")
    conversation = [[{"role": "user", "content": f"Copy this passage exactly, word for word:\n\n{passage}"}]]
    params = SamplingParams(temperature=0, max_tokens=64)
    plain = LLM(dtype="bfloat16", device="cuda")
    expected = tokens(plain.chat(conversation, params, use_tqdm=False))
    del plain
    gc.collect()  # its KV cache back to the device before the next engine sizes its own
    torch.cuda.empty_cache()
    speculating = LLM(dtype="bfloat16", device="cuda",
                      speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert tokens(speculating.chat(conversation, params, use_tqdm=False)) == expected
    assert speculating.engine.num_accepted >= 20  # the copy was mostly proposed and kept
