"""Speculation's checks replayed from graphs (server/runtime/cuda_graphs.py: VerifyGraphs) put
each sequence's tokens in a row of fixed length, padded, with its context taken as that long.
Here, on the prefill attention kernel (interpreted on a CPU): every real token attends to what
it attends to in the step as the engine packs it, so the padding changes no output."""
from __future__ import annotations

import torch

from server.runtime.cuda_graphs import padded_places
from test_kernels import DEVICE


def test_places_put_each_sequences_tokens_at_the_start_of_its_row():
    cu = torch.tensor([0, 1, 4, 5, 10], device=DEVICE)
    assert padded_places(cu, 10, 5).tolist() == [0, 5, 6, 7, 10, 15, 16, 17, 18, 19]


def test_padded_rows_attend_as_the_packed_step():
    from server.kernels.prefill_attention import prefill_attention

    generator = torch.Generator().manual_seed(0)  # float32 tensors, moved to the device below
    heads, kv_heads, dim, page, q = 4, 2, 16, 4, 5
    query_lens, starts = [1, 3, 5, 2], [9, 0, 6, 13]  # tokens computed before this step
    context_lens = [s + n for s, n in zip(starts, query_lens)]
    blocks = -(-(max(starts) + q) // page)
    tables = torch.arange(len(query_lens) * blocks).view(len(query_lens), blocks)
    k_cache = torch.randn(tables.numel(), page, kv_heads, dim, generator=generator)
    v_cache = torch.randn(tables.numel(), page, kv_heads, dim, generator=generator)
    tokens = sum(query_lens)
    queries = torch.randn(tokens, heads, dim, generator=generator)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    tables, k_cache, v_cache, queries, cu = (x.to(DEVICE) for x in (tables, k_cache, v_cache, queries, cu))
    packed = prefill_attention(queries, k_cache, v_cache, tables, cu, torch.tensor(context_lens, device=DEVICE),
                               max(query_lens), 0.25, None)

    places = padded_places(cu, tokens, q)
    rows = torch.zeros(len(query_lens) * q, heads, dim, device=DEVICE)
    rows[places] = queries
    padded_context = torch.tensor([s + q for s in starts], device=DEVICE)
    row_starts = torch.arange(0, (len(query_lens) + 1) * q, q, device=DEVICE)
    padded = prefill_attention(rows, k_cache, v_cache, tables, row_starts, padded_context, q, 0.25, None)
    assert torch.allclose(padded[places], packed, atol=1e-5)
    assert not torch.allclose(padded[places], prefill_attention(  # a check that can fail: context not widened
        rows, k_cache, v_cache, tables, row_starts, torch.tensor(context_lens, device=DEVICE), q, 0.25,
        None)[places], atol=1e-3)
