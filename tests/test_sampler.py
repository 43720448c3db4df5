"""The sampler against Hugging Face's logits processors, and the draw against its distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper,
                                                    TypicalLogitsWarper)

from server.runtime import sampler
from server.runtime.random import exponential_noise, row_key
from server.runtime.sampler import SamplingOptions, sample

torch.manual_seed(0)
LOGITS = torch.randn(4, 300) * 3


def finite(x):
    return torch.isfinite(x)


@pytest.mark.parametrize("value", [1, 5, 50])
def test_top_k_keeps_what_transformers_keeps(value):
    ours = sampler._top_k(LOGITS, torch.full((4,), value))
    assert torch.equal(finite(ours), finite(TopKLogitsWarper(value)(None, LOGITS.clone())))


@pytest.mark.parametrize("value", [0.1, 0.5, 0.95])
def test_top_p_keeps_what_transformers_keeps(value):
    ours = sampler._top_p(LOGITS, torch.full((4,), value))
    assert torch.equal(finite(ours), finite(TopPLogitsWarper(value)(None, LOGITS.clone())))


@pytest.mark.parametrize("value", [0.2, 0.9])
def test_typical_p_keeps_what_transformers_keeps(value):
    ours = sampler._typical_p(LOGITS, torch.full((4,), value))
    assert torch.equal(finite(ours), finite(TypicalLogitsWarper(value)(None, LOGITS.clone())))


def test_min_p_keeps_what_transformers_keeps():
    ours = sampler._min_p(LOGITS, torch.full((4,), 0.1))
    assert torch.equal(finite(ours), finite(MinPLogitsWarper(0.1)(None, LOGITS.clone())))


def test_repetition_penalty_equals_transformers():
    history = torch.tensor([[3, 7, 7, 250], [0, 1, 2, 3], [5, 5, 5, 5], [299, 10, 11, 12]])
    rows = [SamplingOptions(repetition_penalty=1.3, all_token_ids=h.tolist()) for h in history]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, LOGITS.clone())
    assert torch.allclose(sampler.apply_penalties(LOGITS, rows), expected)


def test_frequency_and_presence_penalties_follow_openai():
    rows = [SamplingOptions(frequency_penalty=0.5, presence_penalty=0.25, output_token_ids=[4, 4, 9])]
    out = sampler.apply_penalties(LOGITS[:1], rows)
    assert out[0, 4] == pytest.approx(LOGITS[0, 4].item() - 2 * 0.5 - 0.25)
    assert out[0, 9] == pytest.approx(LOGITS[0, 9].item() - 0.5 - 0.25)
    assert out[0, 5] == LOGITS[0, 5]


def test_the_exponential_race_draws_from_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    draws = 20000
    keys = torch.tensor([row_key(123, step) for step in range(draws)])
    picks = (logits.softmax(-1) / exponential_noise(keys, 4)).argmax(-1)
    frequencies = torch.bincount(picks, minlength=4).float() / draws
    assert torch.allclose(frequencies, logits.softmax(-1)[0], atol=0.015)


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    row = SamplingOptions(temperature=1.0, key=row_key(99, 4))
    others = [SamplingOptions(temperature=0.7, key=row_key(s, 0)) for s in range(3)]
    alone = sample(LOGITS[:1], [row])[0].token_id
    batched = sample(torch.cat([LOGITS[1:], LOGITS[:1]]), others + [row])[-1].token_id
    assert alone == batched


def test_banned_tokens_are_never_drawn():
    row = SamplingOptions(temperature=0.0, banned_token_ids=[int(LOGITS[0].argmax())])
    assert sample(LOGITS[:1], [row])[0].token_id != int(LOGITS[0].argmax())


def test_logprobs_are_of_the_raw_distribution():
    row = SamplingOptions(temperature=0.5, top_k=3, key=1, num_logprobs=2)
    token = sample(LOGITS[:1], [row])[0]
    raw = LOGITS[0].log_softmax(-1)
    assert token.logprob == pytest.approx(raw[token.token_id].item(), abs=1e-6)
    assert list(token.top_logprobs) == raw.topk(2).indices.tolist()


def test_a_token_of_probability_zero_is_never_drawn():
    # This key hashes token 1 to the largest uniform value, where an Exp(1) draw of 0 would
    # make 0 / 0 = NaN win the argmax; top_k=1 leaves token 1 no probability at all.
    key = 284183
    assert exponential_noise(torch.tensor([key]), 16)[0, 1] > 0
    logits = torch.zeros(1, 16)
    logits[0, 0] = 5.0
    assert sample(logits, [SamplingOptions(temperature=1.0, top_k=1, key=key)])[0].token_id == 0


def test_allowed_tokens_restrict_their_rows_and_no_other():
    logits = torch.randn(3, 70)
    allowed = {0: [5, 63], 2: [69]}  # 63 is the sign bit of its 32-bit word
    words = np.zeros((2, 3), dtype=np.uint32)
    for i, ids in enumerate(allowed.values()):
        for token in ids:
            words[i, token // 32] |= np.uint32(1 << (token % 32))
    mask = sampler.AllowedTokens(list(allowed), torch.from_numpy(words.view(np.int32)))
    rows = [SamplingOptions(), SamplingOptions(), SamplingOptions(temperature=1.0, key=3)]
    picks = [p.token_id for p in sample(logits, rows, mask)]
    assert picks == [max(allowed[0], key=lambda t: logits[0, t]), logits[1].argmax().item(), 69]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queueing_a_sampled_step_does_not_wait_for_the_gpu():
    """With async scheduling the host queues the sampling right behind the forward pass and goes
    on; a synchronising copy of the rows' settings would make it wait for the whole pass."""
    from server.runtime.sampler import AllowedTokens, sample_on_device

    logits = torch.randn(8, 32000, device="cuda")
    rows = [SamplingOptions(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, key=i, repetition_penalty=1.2,
                            frequency_penalty=0.3, all_token_ids=[1, 2, 3], output_token_ids=[3],
                            logit_bias={5: 1.0}, banned_token_ids=[2], watermark=(0.5, 2.0), num_logprobs=2)
            for i in range(8)]
    allowed = AllowedTokens([0, 3], torch.full((2, 1000), -1, dtype=torch.int32).pin_memory())
    sample_on_device(logits, rows, allowed)  # warm-up: kernels compiled, allocations cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued ahead
    sample_on_device(logits, rows, allowed)
    assert not torch.cuda.current_stream().query()  # the host got here while the GPU still works
    torch.cuda.synchronize()
