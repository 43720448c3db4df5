"""Speculation's checks replay the decode graphs (server/runtime/cuda_graphs.py: decode_rows):
a step whose sequences compute a few tokens each runs as a decode step of one row a token, the
row taking its sequence's block table and a context that ends at the token. Here, on the
attention kernels (interpreted on a CPU): every token attends through the decode kernel to
exactly what the prefill kernel gives it in the step as the engine packs it."""
from __future__ import annotations

import pytest
import torch

from server.runtime.cuda_graphs import decode_rows
from test_kernels import DEVICE


def test_each_token_gets_its_sequence_and_a_context_ending_at_itself():
    cu = torch.tensor([0, 1, 4, 5, 10], device=DEVICE)
    context_lens = torch.tensor([8, 3, 20, 12], device=DEVICE)  # cached tokens, then this step's
    seq, contexts = decode_rows(cu, context_lens, 10)
    assert seq.tolist() == [0, 1, 1, 1, 2, 3, 3, 3, 3, 3]
    assert contexts.tolist() == [8, 1, 2, 3, 20, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("splits, query_lens, starts", [
    (1, [1, 3, 5, 2], [9, 0, 70, 13]), (3, [1, 3, 5, 2], [9, 0, 70, 13]),
    (2, [1, 1, 37, 1, 20], [9, 12, 0, 5, 40]),  # prompt chunks mixed into decoding (--max-graph-query-len)
])
def test_decode_rows_attend_as_the_packed_step(splits, query_lens, starts):
    from server.kernels.decode_attention import decode_attention
    from server.kernels.prefill_attention import prefill_attention

    generator = torch.Generator().manual_seed(splits)  # float32 tensors, moved to the device below
    heads, kv_heads, dim, page = 4, 2, 16, 4
    # starts: the tokens each sequence computed before this step
    context_lens = torch.tensor([s + n for s, n in zip(starts, query_lens)])
    blocks = -(-int(context_lens.max()) // page)
    tables = torch.randperm(len(query_lens) * blocks, generator=generator).view(len(query_lens), blocks)
    k_cache = torch.randn(tables.numel(), page, kv_heads, dim, generator=generator)
    v_cache = torch.randn(tables.numel(), page, kv_heads, dim, generator=generator)
    tokens = sum(query_lens)
    queries = torch.randn(tokens, heads, dim, generator=generator)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    tables, k_cache, v_cache, queries, cu, context_lens = (
        x.to(DEVICE) for x in (tables, k_cache, v_cache, queries, cu, context_lens))
    packed = prefill_attention(queries, k_cache, v_cache, tables, cu, context_lens, max(query_lens), 0.25, None)

    seq, contexts = decode_rows(cu, context_lens, tokens)
    rows = decode_attention(queries, k_cache, v_cache, tables[seq], contexts, 0.25, None, splits)
    assert torch.allclose(rows, packed, atol=1e-5)
    whole = decode_attention(queries, k_cache, v_cache, tables[seq], context_lens[seq], 0.25, None, splits)
    assert not torch.allclose(whole, packed, atol=1e-3)  # a check that can fail: every token seeing all


@pytest.mark.parametrize("largest, expected_tail", [
    (256, [240, 248, 256]), (100, [88, 96, 100]), (1024, [256, 288, 320, 992, 1024]), (300, [256, 288, 300])])
def test_graph_sizes_reach_the_largest_batch(largest, expected_tail):
    from server.runtime.cuda_graphs import graph_sizes

    sizes = graph_sizes(largest)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == largest
    assert [s for s in sizes if s in expected_tail] == expected_tail
    assert graph_sizes(1) == [1]
