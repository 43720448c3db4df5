"""Mixtral (sparse mixture of experts): batching, preemption and tensor parallelism change nothing."""
from __future__ import annotations

from server import LLM, SamplingParams

PROMPTS = [[1] + [(i * 37 + j * 11) % 30000 + 100 for j in range(n)] for i, n in enumerate([3, 40, 9, 70, 1, 25])]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(llm, prompts, **kwargs):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False, **kwargs)]


def test_mixed_batches_and_preemption_give_each_request_its_tokens_alone(mixtral_dir):
    llm = LLM(mixtral_dir, block_size=4)
    alone = [tokens(llm, [p])[0] for p in PROMPTS]
    assert tokens(llm, PROMPTS) == alone
    small = LLM(mixtral_dir, block_size=4, max_batch_total_tokens=120)
    assert tokens(small, PROMPTS) == alone
    assert small.engine.scheduler.num_preemptions > 0


def test_experts_split_over_two_ranks_give_the_tokens_of_one(mixtral_dir):
    expected = tokens(LLM(mixtral_dir, block_size=8), PROMPTS)
    sharded = LLM(mixtral_dir, block_size=8, tensor_parallel_size=2, max_batch_total_tokens=2048)
    try:
        assert tokens(sharded, PROMPTS) == expected
    finally:
        sharded.engine.shutdown()
