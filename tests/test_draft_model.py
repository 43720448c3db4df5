"""Speculative decoding with a draft model: the same tokens as without it, greedy or seeded,
alone and in mixed batches, with stops and preemption, and no block left in either cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MISTRAL_DATA, build_mistral, out_of_memory_on_calls
from server import LLM, SamplingParams
from server.engine.draft_model import check_same_vocabulary
from server.engine.tokenizer import Tokenizer
from server.engine.speculation import speculation_depth
from test_speculation import EXACT

PROMPTS = ["one two three four one two three four one two three",
           "the cat sat on the mat and the cat sat on the",
           "A B C D A B C D A B",
           "Hello world"]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
V3_TOKENIZER = {"tokenizer.model.v3": MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"}


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def first_layer_dir(mistral_v03_dir, tmp_path_factory) -> str:
    """The tiny Mistral cut to its first layer: a draft that agrees with it often, not always."""
    from transformers import MistralForCausalLM

    path = tmp_path_factory.mktemp("draft-first-layer")
    model = MistralForCausalLM.from_pretrained(mistral_v03_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(path)
    shutil.copy(Path(mistral_v03_dir) / "tokenizer.model.v3", path)
    return str(path)


@pytest.fixture(scope="module")
def random_draft_dir(tmp_path_factory) -> str:
    """A one-layer Mistral of other random weights, sharing the tokenizer: it rarely agrees."""
    return str(build_mistral(tmp_path_factory.mktemp("draft-random"), vocab_size=32768, num_layers=1, seed=4,
                             tokenizer_files=V3_TOKENIZER))


@pytest.fixture(scope="module")
def plain(mistral_v03_dir):
    return LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=4096)


def drafting(target: str, draft: str, n: int = 4, **kwargs) -> LLM:
    return LLM(target, dtype=EXACT, max_batch_total_tokens=kwargs.pop("max_batch_total_tokens", 4096),
               speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": n}, **kwargs)


@pytest.fixture(scope="module", params=["mistral_v03_dir", "first_layer_dir", "random_draft_dir"],
                ids=["itself", "first_layer", "random"])
def speculating(request, mistral_v03_dir):
    llm = drafting(mistral_v03_dir, request.getfixturevalue(request.param))
    llm.draft = request.param
    return llm


def assert_no_block_used(llm: LLM) -> None:
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.proposer.blocks.num_free_blocks == engine.proposer.blocks.num_blocks


def test_greedy_tokens_equal_plain_decoding_alone_and_in_a_batch(plain, speculating):
    engine = speculating.engine
    before = (engine.num_speculated, engine.num_accepted)
    expected = tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert tokens(speculating.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert [tokens(speculating.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS] == expected
    proposed, kept = engine.num_speculated - before[0], engine.num_accepted - before[1]
    assert proposed > 0
    if speculating.draft == "mistral_v03_dir":
        assert kept == proposed  # the model's own greedy picks: every one is kept
    elif speculating.draft == "first_layer_dir":
        assert 0 < kept < proposed  # acceptance and rollback both happen
    assert_no_block_used(speculating)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.05, seed=5, max_tokens=30, ignore_eos=True),  # near greedy: proposals kept
    SamplingParams(temperature=1.2, top_k=20, seed=3, max_tokens=25, ignore_eos=True, logprobs=2),
])
def test_seeded_sampling_gives_the_tokens_of_plain_decoding(plain, speculating, params):
    expected = plain.generate(PROMPTS, params, use_tqdm=False)
    got = speculating.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(got) == tokens(expected)
    if params.logprobs is not None:
        for g, e in zip(got, expected):
            for got_step, expected_step in zip(g.outputs[0].logprobs, e.outputs[0].logprobs, strict=True):
                assert got_step.keys() == expected_step.keys()
                assert list(got_step.values()) == pytest.approx(list(expected_step.values()), abs=1e-4)


def test_rows_with_and_without_proposals_share_steps(plain, mistral_v03_dir):
    """Penalties and grammars decode one token a step beside rows that check proposals."""
    llm = drafting(mistral_v03_dir, mistral_v03_dir)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, guided_regex="(ab|cd){1,12}"),
              SamplingParams(temperature=0.7, seed=2, max_tokens=30, ignore_eos=True)]
    assert tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == tokens(plain.generate(PROMPTS, params,
                                                                                          use_tqdm=False))
    assert llm.engine.num_accepted > 0
    assert_no_block_used(llm)


@pytest.fixture(scope="module")
def self_draft(mistral_v03_dir):
    """The model as its own draft: every greedy proposal is kept, so each stop lands inside an
    accepted run."""
    return drafting(mistral_v03_dir, mistral_v03_dir)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_max_tokens_inside_an_accepted_run_is_exact(plain, self_draft, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    got = tokens(self_draft.generate(PROMPTS, params, use_tqdm=False))
    assert got == tokens(plain.generate(PROMPTS, params, use_tqdm=False))
    assert all(len(t) == max_tokens for t in got)


def test_a_stop_string_or_stop_token_inside_an_accepted_run_ends_the_output_there(plain, self_draft):
    text = plain.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_token = text.token_ids[12]
    stop = text.text[len(text.text) // 2:len(text.text) // 2 + 3]
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], logprobs=0),
                   SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_token])):
        expected = plain.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
        got = self_draft.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (expected.text, expected.token_ids, expected.finish_reason, expected.stop_reason)
        assert got.finish_reason == "stop" and len(got.token_ids) < 30
    assert_no_block_used(self_draft)


def test_eos_inside_an_accepted_run_ends_the_output(plain, mistral_v03_dir, tmp_path):
    """A copy of the model whose EOS is a token its greedy output reaches mid-way, drafting for itself."""
    eos = tokens(plain.generate(PROMPTS[2], GREEDY, use_tqdm=False))[0][9]
    shutil.copytree(mistral_v03_dir, tmp_path, dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (tmp_path / name).exists():
            config = json.loads((tmp_path / name).read_text())
            config["eos_token_id"] = eos
            (tmp_path / name).write_text(json.dumps(config))
    params = SamplingParams(temperature=0, max_tokens=30)
    got = drafting(str(tmp_path), str(tmp_path)).generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    expected = LLM(str(tmp_path), dtype=EXACT, max_batch_total_tokens=4096).generate(PROMPTS[2], params,
                                                                                     use_tqdm=False)[0]
    assert got.token_ids == expected.outputs[0].token_ids
    assert got.finish_reason == "stop" and got.token_ids[-1] == eos and len(got.token_ids) <= 10


def test_a_long_prompt_is_caught_up_in_chunks(plain, mistral_v03_dir):
    prompt = " ".join(["the cat sat on the mat"] * 12)  # far past the budget of 16 tokens a step
    llm = drafting(mistral_v03_dir, mistral_v03_dir, max_batch_prefill_tokens=16)
    assert tokens(llm.generate(prompt, GREEDY, use_tqdm=False)) == tokens(plain.generate(prompt, GREEDY,
                                                                                          use_tqdm=False))
    assert llm.engine.num_accepted > 0
    assert_no_block_used(llm)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.9, seed=3, max_tokens=40, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_a_preempted_sequence_resumes_with_the_same_tokens_and_frees_both_caches(plain, mistral_v03_dir,
                                                                                 first_layer_dir, params):
    small = drafting(mistral_v03_dir, first_layer_dir, n=3, max_batch_total_tokens=160, block_size=8)
    got = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert tokens(got) == tokens(plain.generate(PROMPTS, params, use_tqdm=False))
    assert_no_block_used(small)


def test_an_aborted_request_leaves_no_block_in_either_cache(self_draft):
    engine = self_draft.engine
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "gone")
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), "stays")
    for _ in range(4):
        engine.step()
    assert engine.proposer.blocks.num_free_blocks < engine.proposer.blocks.num_blocks  # the draft holds blocks
    engine.abort("gone")
    while engine.has_work():
        engine.step()
    assert_no_block_used(self_draft)


def test_a_draft_out_of_device_memory_proposes_nothing_that_step(plain, mistral_v03_dir):
    llm = drafting(mistral_v03_dir, mistral_v03_dir)
    calls = out_of_memory_on_calls(llm.engine.proposer.runner, "forward", (3, 9))
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain.generate(PROMPTS, GREEDY,
                                                                                          use_tqdm=False))
    assert len(calls) > 9 and llm.engine.num_accepted > 0
    assert_no_block_used(llm)


def test_a_draft_of_another_vocabulary_is_refused_at_start(mistral_v03_dir, mistral_window_dir):
    with pytest.raises(ValueError, match="another vocabulary.*same tokenizer"):
        drafting(mistral_v03_dir, mistral_window_dir)


def test_the_server_refuses_to_start_with_a_draft_of_another_vocabulary(mistral_v03_dir, mistral_window_dir):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "server", "--model-id", mistral_v03_dir, "--speculative-model",
                           mistral_window_dir, "--speculate", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "another vocabulary" in done.stderr + done.stdout


def test_a_vocabulary_is_the_same_whatever_the_tokenizer_files_and_another_is_refused(hf_v1, mistral_window_dir,
                                                                                      mistral_v3):
    v1 = Tokenizer.load(mistral_window_dir)  # mistral-common's tokenizer.model.v1
    check_same_vocabulary(hf_v1, v1, 32000, 32000, "v1")  # the same, as a tokenizer.json
    with pytest.raises(ValueError, match="another vocabulary"):
        check_same_vocabulary(v1, mistral_v3, 32000, 32000, "v3")  # same sizes said, other tokens


def test_a_draft_with_tensor_parallelism_is_refused_before_the_ranks_start(mistral_v03_dir):
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(mistral_v03_dir, tensor_parallel_size=2,
            speculative_config={"model": mistral_v03_dir, "num_speculative_tokens": 2})


def test_the_library_checks_the_draft_model_config(mistral_v03_dir):
    with pytest.raises(ValueError, match="names the draft model"):
        LLM(mistral_v03_dir, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="1 or more"):
        LLM(mistral_v03_dir, speculative_config={"model": mistral_v03_dir})


def test_speculation_steps_aside_as_the_batch_grows():
    assert [speculation_depth(4, n, 32) for n in (1, 16, 17, 32, 33, 256)] == [4, 4, 2, 2, 0, 0]
    assert speculation_depth(1, 20, 32) == 1 and speculation_depth(0, 1, 32) == 0
    assert speculation_depth(4, 1, 0) == 0  # a limit of 0: never


def test_a_batch_above_the_limit_proposes_nothing_until_it_shrinks(plain, mistral_v03_dir):
    llm = LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=4096, speculative_config={
        "model": mistral_v03_dir, "num_speculative_tokens": 4, "disable_by_batch_size": 3})
    together = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert tokens(llm.generate(PROMPTS, together, use_tqdm=False)) == tokens(plain.generate(PROMPTS, together,
                                                                                            use_tqdm=False))
    assert llm.engine.num_speculated == 0  # four running, all along
    # Ending one after another: 4 running (no proposals), 3 and 2 (two tokens each), 1 (four).
    apart = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 30, 12, 20)]
    assert tokens(llm.generate(PROMPTS, apart, use_tqdm=False)) == tokens(plain.generate(PROMPTS, apart,
                                                                                         use_tqdm=False))
    assert llm.engine.num_speculated > 0


@pytest.fixture(scope="module")
def tiny_vocab_dir(tmp_path_factory) -> str:
    """Sixteen token ids (the v1 tokenizer's first: three special, then bytes), logits peaked
    enough that greedy proposals are often sampled too."""
    return str(build_mistral(tmp_path_factory.mktemp("tiny-vocab"), vocab_size=16, init_std=0.5, seed=6,
                             tokenizer_files={"tokenizer.model.v1": MISTRAL_DATA / "tokenizer.model.v1"}))


def chi_square_p_value(a: list[int], b: list[int]) -> float:
    """Two samples of one categorical distribution? The p-value of Pearson's test on their
    2 x k table (categories seen in neither left out)."""
    table = torch.tensor([a, b], dtype=torch.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def test_sampling_with_a_draft_keeps_the_distribution_of_plain_sampling(tiny_vocab_dir):
    """Over many seeds, the token at each place sampled with a draft model (the model itself,
    greedy, so that its proposals are kept only when sampling agrees) is distributed as plain
    sampling's, seeded apart; the same seeds give the same tokens."""
    draws, places = 300, 5
    prompt = [1, 5, 9, 3, 7]
    plain = LLM(tiny_vocab_dir, dtype=EXACT, max_batch_total_tokens=8192)
    speculating = LLM(tiny_vocab_dir, dtype=EXACT, max_batch_total_tokens=8192, speculative_config={
        "model": tiny_vocab_dir, "num_speculative_tokens": 3, "disable_by_batch_size": draws})

    def sample(llm, first_seed):
        params = [SamplingParams(temperature=1.0, seed=first_seed + i, max_tokens=places, ignore_eos=True)
                  for i in range(draws)]
        return tokens(llm.generate([prompt] * draws, params, use_tqdm=False))

    with_draft = sample(speculating, 0)
    assert speculating.engine.num_accepted > draws  # proposals were kept, not only made
    assert with_draft == sample(plain, 0)
    without = sample(plain, 10_000)
    for place in range(1, places):
        counts = [[sum(1 for t in run if t[place] == token) for token in range(16)] for run in (with_draft, without)]
        assert chi_square_p_value(*counts) > 1e-3, (place, counts)
