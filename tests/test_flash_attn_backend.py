"""The flash_attn backend's side of flash-attn 2's contract, where flash-attn cannot be
installed (it has no wheel; the Docker image builds it): the layer is run against a stand-in
with flash-attn's signatures and documented semantics, written on the torch reference, which
also checks what flash-attn checks (int32 metadata, blocks of a multiple of 256 tokens,
bottom-right causal alignment of a sequence's queries with its keys). The same batch through
the torch backend is the oracle."""
from __future__ import annotations

import pytest
import torch

from server.kernels.attention_reference import decode_attention_reference, prefill_attention_reference
from server.layers import attention
from server.layers.attention import Attention, AttentionMetadata, default_block_size, resolve_backend

BLOCK = 256
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _window(window_size: tuple[int, int]) -> int | None:
    left, right = window_size
    assert right in (0, -1)  # causal: nothing to the right
    return None if left < 0 else left + 1


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                causal=False, window_size=(-1, -1), block_table=None):
    assert causal and block_table is not None and k.shape[1] % BLOCK == 0
    assert {cu_seqlens_q.dtype, cu_seqlens_k.dtype, block_table.dtype} == {torch.int32}
    query_lens, context_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    assert max_seqlen_q == max(query_lens) and max_seqlen_k == max(context_lens)
    return prefill_attention_reference(q, k, v, block_table.long(), query_lens, context_lens, softmax_scale,
                                       _window(window_size))


def fake_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None, softmax_scale=None, causal=False,
                 window_size=(-1, -1)):
    assert q.dim() == 4 and q.shape[1] == 1 and k_cache.shape[1] % BLOCK == 0
    assert cache_seqlens.dtype == torch.int32 and block_table.dtype == torch.int32
    out = decode_attention_reference(q[:, 0], k_cache, v_cache, block_table.long(), cache_seqlens.long(),
                                     softmax_scale, _window(window_size))
    return out[:, None]


@pytest.fixture
def flash(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", fake_kvcache)


def metadata(query_lens, context_lens, tables, int32: bool) -> AttentionMetadata:
    index = torch.int32 if int32 else torch.int64
    slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK
             for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)) for p in range(ctx - q_len, ctx)]
    cumulative = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=index)  # noqa: E731
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=index),
        context_lens=torch.tensor(context_lens, dtype=index), cu_query_lens=cumulative(query_lens),
        query_lens=query_lens, context_lens_list=context_lens, decode_only=all(n == 1 for n in query_lens),
        max_query_len=max(query_lens), cu_context_lens=cumulative(context_lens), max_context_len=max(context_lens))


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 1, 1], [1, 300, 700]),  # decode, across blocks
    ([5, 300, 1], [5, 600, 257]),  # prefill with cached prefixes, and a decode row
])
def test_flash_attn_backend_equals_the_torch_backend(flash, query_lens, context_lens, window):
    torch.manual_seed(0)
    tables = [[3 * i + j for j in range(3)] for i in range(len(query_lens))]
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, HEADS, HEAD_DIM)
    k, v = torch.randn(num_tokens, KV_HEADS, HEAD_DIM), torch.randn(num_tokens, KV_HEADS, HEAD_DIM)
    prefix_k = torch.randn(12, BLOCK, KV_HEADS, HEAD_DIM)  # the cached prefixes' keys and values
    prefix_v = torch.randn(12, BLOCK, KV_HEADS, HEAD_DIM)
    outs = []
    for backend, int32 in (("flash_attn", True), ("torch", False)):
        layer = Attention(HEADS, KV_HEADS, HEAD_DIM, window, backend)
        layer.k_cache, layer.v_cache = prefix_k.clone(), prefix_v.clone()
        outs.append(layer(q, k, v, metadata(query_lens, context_lens, tables, int32)))
        caches = (layer.k_cache, layer.v_cache)
        outs.append(caches)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[3])  # the new K/V stored in the same slots


def test_auto_picks_flash_attn_on_cuda_where_its_paged_kernels_apply(flash):
    cuda = torch.device("cuda")  # a device name only: nothing runs on it
    if attention.decode_attention is None:
        pytest.skip("needs triton")
    assert resolve_backend("auto", cuda) == "flash_attn" and default_block_size("flash_attn") == BLOCK
    assert resolve_backend("auto", cuda, block_size=512) == "flash_attn"
    assert resolve_backend("auto", cuda, block_size=16) == "triton"  # blocks too small for it
    assert resolve_backend("auto", cuda, fp8_cache=True) == "triton"  # it reads no fp8 cache
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="multiple of 256"):
        resolve_backend("flash_attn", cuda, block_size=16)


def test_without_flash_attn_auto_keeps_triton(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", None)
    if attention.decode_attention is None:
        pytest.skip("needs triton")
    assert resolve_backend("auto", torch.device("cuda")) == "triton" and default_block_size("triton") == 16
    with pytest.raises(ValueError, match="flash-attn package"):
        resolve_backend("flash_attn", torch.device("cuda"))
