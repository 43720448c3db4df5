"""The sampling kernel (server/kernels/sampling.py) against the torch sampler it replaces on CUDA:
the same token for every row, whatever mix of temperature, top-k, top-p and min-p the rows
ask for. On the CPU in Triton's interpreter over a small vocabulary; on the GPU at Mistral's."""
from __future__ import annotations

import pytest
import torch

from server.runtime import sampler
from server.runtime.random import row_key
from server.runtime.sampler import SamplingOptions

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="the larger shapes run on the GPU only")

ROWS = [  # temperature, top_k, top_p, min_p
    (0.7, 50, 0.9, 0.0),
    (1.3, 0, 0.5, 0.0),
    (1.0, 5, 1.0, 0.1),
    (0.2, 1, 1.0, 0.0),
    (2.0, 0, 1.0, 0.0),
    (1.0, 0, 0.95, 0.05),
    (0.9, 400, 0.3, 0.0),  # top-k past the vocabulary of the CPU cases: off
]


def columns(settings, keys):
    temperature, top_k, top_p, min_p = zip(*settings)
    warps = {"top_k": torch.tensor(top_k), "top_p": torch.tensor(top_p), "min_p": torch.tensor(min_p)}
    return torch.tensor(temperature), torch.tensor(keys, dtype=torch.int64), warps


@pytest.mark.parametrize("vocab, block, seed", [(300, 128, 0), (257, 64, 1)] + [
    pytest.param(32768, 2048, 2, marks=gpu_only), pytest.param(131072, 2048, 3, marks=gpu_only)])
def test_the_kernel_draws_what_the_torch_sampler_draws(vocab, block, seed):
    from server.kernels.sampling import sample_rows

    g = torch.Generator().manual_seed(seed)
    settings = ROWS * (1 if vocab < 1000 else 12)
    logits = torch.randn(len(settings) + 2, vocab, generator=g) * 3
    logits[1, : vocab // 2] = float("-inf")  # a grammar's or a ban's row
    rows = torch.randperm(len(settings) + 2, generator=g)[:len(settings)]
    temperature, keys, warps = columns(settings, [row_key(seed, step) for step in range(len(settings))])
    expected = sampler.draw(logits[rows] / temperature[:, None], keys, warps)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    got = sample_rows(on(logits), on(rows), on(temperature), on(keys), block=block,
                      **{name: on(column) for name, column in warps.items()})
    assert got.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("warp, value", [("top_k", 3), ("top_p", 0.6), ("min_p", 0.3), (None, None)])
def test_the_kernel_draws_only_what_a_filter_keeps_and_all_of_it(warp, value):
    """One row of logits drawn with 48 keys: every pick is a token the torch warp keeps, and
    each kept token of some weight is picked at least once (one of probability 0.15 is missed
    by 48 draws once in 2,500 runs; the keys are fixed, so a run is repeatable)."""
    from server.kernels.sampling import sample_rows

    vocab, draws = 32, 48
    logits = torch.linspace(-1.0, 3.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(5))]
    logits = logits[None, :]
    keys = torch.tensor([row_key(7, step) for step in range(draws)], dtype=torch.int64)
    temperature = torch.ones(draws)
    warps = {} if warp is None else {warp: torch.full((draws,), value, dtype=torch.int64 if warp == "top_k" else
                                                     torch.float32)}
    picks = set(sample_rows(logits.to(DEVICE), torch.zeros(draws, dtype=torch.int64, device=DEVICE),
                            temperature.to(DEVICE), keys.to(DEVICE), block=32,
                            **{k: v.to(DEVICE) for k, v in warps.items()}).cpu().tolist())
    kept = logits[0] if warp is None else dict(
        top_k=sampler._top_k, top_p=sampler._top_p, min_p=sampler._min_p)[warp](logits, warps[warp][:1])[0]
    probs = kept.softmax(-1)
    assert picks <= set(torch.nonzero(torch.isfinite(kept)).flatten().tolist())
    assert set(torch.nonzero(probs > 0.15).flatten().tolist()) <= picks


def test_a_token_of_probability_zero_is_never_drawn_by_the_kernel():
    """The key of test_sampler's same case: token 1 gets the largest uniform of the hash."""
    from server.kernels.sampling import sample_rows

    logits = torch.zeros(1, 16, device=DEVICE)
    logits[0, 0] = 5.0
    one = lambda x, dtype: torch.tensor([x], dtype=dtype, device=DEVICE)  # noqa: E731
    picked = sample_rows(logits, one(0, torch.int64), one(1.0, torch.float32), one(284183, torch.int64),
                         top_k=one(1, torch.int64), block=16)
    assert picked.tolist() == [0]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_the_cuda_sampler_draws_what_the_cpu_sampler_draws():
    """sample() on CUDA takes the kernel for its random rows (and torch where a row asks for
    typical-p); on the CPU it runs torch throughout: the same tokens and logprobs."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(24, 32768, generator=g) * 2
    rows = [SamplingOptions(temperature=t, top_k=k, top_p=p, min_p=m, key=row_key(3, i), num_logprobs=1)
            for i, (t, k, p, m) in enumerate(ROWS * 3)]
    rows += [SamplingOptions(), SamplingOptions(temperature=0.0, repetition_penalty=1.3, all_token_ids=[1, 2])]
    rows += [SamplingOptions(temperature=0.8, top_k=20, key=5, repetition_penalty=1.2, all_token_ids=[4])]
    cpu = sampler.sample(logits[:len(rows)], rows)
    gpu = sampler.sample(logits[:len(rows)].cuda(), rows)
    assert [t.token_id for t in gpu] == [t.token_id for t in cpu]
    assert [t.logprob for t in gpu] == pytest.approx([t.logprob for t in cpu], abs=1e-4)
    typical = [SamplingOptions(temperature=1.0, typical_p=0.5, key=row_key(4, i)) for i in range(4)]
    assert [t.token_id for t in sampler.sample(logits[:4].cuda(), typical)] == \
        [t.token_id for t in sampler.sample(logits[:4], typical)]
