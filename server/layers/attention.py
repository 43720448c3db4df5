"""The attention layer over the paged KV cache, and the choice of backend.

The cache of one layer is a pair of tensors K, V of shape
`[num_blocks, block_size, num_kv_heads, head_dim]` (flash-attn's paged layout). A token at
position p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Backends: `flash_attn` (flash-attn 2's paged kernels: `flash_attn_varlen_func` with the block
tables for prefill, `flash_attn_with_kvcache` for decode; chosen on CUDA when the package is
installed, the KV cache is not fp8 and blocks hold a multiple of 256 tokens, which its paged
kernels require), `triton` (our kernels, the default on CUDA otherwise) and `torch` (the
reference, and the CPU path). Each step stores the new K/V first, then attends over the cache,
so a prefill chunk sees its cached prefix and itself the same way. A layer given the model's
rotary embedding rotates q and k first; on CUDA in the kernel that stores K and V
(server/kernels/rotary.py), one launch instead of three. An fp8 (e4m3) cache stores K / k_scale and
V / v_scale, one scale per layer: the checkpoint's `k_scale`/`v_scale` when it has them, 1.0
otherwise (K and V of the usual models stay well inside e4m3's range of +-448). q, k and v may
come as a 4-bit product's deferred sums (int64, kernels/int4_gemv.py), which the rotary kernel
reads (q then rotated into a new tensor of the model dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.kernels.attention_reference import decode_attention_reference, prefill_attention_reference
from server.kernels.quant_reference import finish_sums
from server.kernels.reference import store_kv_reference

try:  # triton is optional where only the CPU path runs
    from server.kernels.cache import store_kv
    from server.kernels.decode_attention import decode_attention
    from server.kernels.prefill_attention import prefill_attention
    from server.kernels.rotary import rotate_and_store
except ImportError:  # pragma: no cover - depends on the install
    store_kv = decode_attention = prefill_attention = rotate_and_store = None
try:  # flash-attn 2 (the Docker image installs it; no wheel on PyPI)
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None

BACKENDS = ("torch", "triton", "flash_attn")
FLASH_BLOCK_MULTIPLE = 256  # flash-attn's paged kernels take blocks of a multiple of 256 tokens


def default_block_size(backend: str) -> int:
    return FLASH_BLOCK_MULTIPLE if backend == "flash_attn" else 16


def resolve_backend(name: str, device: torch.device, block_size: int | None = None, fp8_cache: bool = False) -> str:
    """The backend `name` ("auto" or one of BACKENDS) comes to on `device`, for a cache of
    `block_size`-token blocks (None: the backend's default) in fp8 or not."""
    flash_fits = (flash_attn_with_kvcache is not None and store_kv is not None and not fp8_cache
                  and (block_size is None or block_size % FLASH_BLOCK_MULTIPLE == 0))
    if name == "auto":
        if device.type != "cuda" or decode_attention is None:
            return "torch"
        return "flash_attn" if flash_fits else "triton"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not known: auto, {', '.join(BACKENDS)}")
    if name == "triton" and (device.type != "cuda" or decode_attention is None):
        raise ValueError("the triton attention backend needs CUDA and the triton package")
    if name == "flash_attn" and (device.type != "cuda" or not flash_fits):
        raise ValueError(f"the flash_attn attention backend needs CUDA, the flash-attn package, a KV cache in "
                         f"the model's dtype and a block size that is a multiple of {FLASH_BLOCK_MULTIPLE}")
    return name


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to.

    Tokens of the batch are flattened: sequence i owns `query_lens[i]` consecutive tokens, the
    last ones of its `context_lens[i]` tokens (cached prefix + this step's tokens).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1: padding)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32
    cu_query_lens: torch.Tensor  # [num_seqs + 1] int32: where each sequence's tokens start
    query_lens: list[int]
    context_lens_list: list[int]
    decode_only: bool
    max_query_len: int
    num_splits: int = 1  # context splits of the decode kernel (fixed per batch size)
    # A mixed step (sequences of one token beside longer ones), for the triton backend: the
    # sequences of one token, which the decode kernel takes, and the others (prefill kernel).
    single_seqs: torch.Tensor | None = None
    multi_seqs: torch.Tensor | None = None
    cu_context_lens: torch.Tensor | None = None  # [num_seqs + 1] int32: flash-attn's cu_seqlens_k
    max_context_len: int = 0
    # Of a decode step, the newest tokens of a row's context that the step stores: 1, or for the
    # decode graphs that speculation's checks replay a row a token, the longest query they take.
    fresh_tokens: int = 1


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, backend: str = "torch", rotary: nn.Module | None = None):
        super().__init__()
        self.rotary = rotary  # a RotaryEmbedding (shared by the layers), or None
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not known ({', '.join(BACKENDS)})")
        self.backend = backend
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.k_scale = self.v_scale = 1.0  # of an fp8 cache
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                positions: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k and v [num_tokens, kv_heads, head_dim] (views of
        the QKV projection may be rotated in place); `positions` [num_tokens] with a rotary
        embedding. `dtype`: the model's, in which deferred sums are read."""
        if q.dtype == torch.int64 and (self.backend == "torch" or self.rotary is None):
            q, k, v = (finish_sums(x, dtype) for x in (q, k, v))
        if self.backend == "torch":
            if self.rotary is not None:
                q, k = self.rotary(positions, q, k)
            out = self._torch(q, k, v, meta)
        else:
            q = self._store(q, k, v, meta, positions, dtype)
            out = self._triton(q, meta) if self.backend == "triton" else self._flash(q, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _store(self, q, k, v, meta: AttentionMetadata, positions, dtype) -> torch.Tensor:
        """K and V into their cache slots (rotating q and k on the way, with a rotary embedding);
        -> q as rotated."""
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if self.rotary is None:
            store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, **scales)
            return q
        q_out = torch.empty(q.shape, dtype=dtype, device=q.device) if q.dtype == torch.int64 else None
        return rotate_and_store(positions, q, k, v, self.rotary.cos_sin, self.k_cache, self.v_cache,
                                meta.slot_mapping, **scales, q_out=q_out)

    def _triton(self, q, meta: AttentionMetadata) -> torch.Tensor:
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if meta.decode_only:
            return decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                    self.scale, self.sliding_window, meta.num_splits, fresh=meta.fresh_tokens,
                                    **scales)
        out = None
        if meta.single_seqs is not None:  # the decode kernel reads a context once for a KV head's query heads
            out = torch.empty_like(q)
            decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale,
                             self.sliding_window, meta.num_splits, out=out, seq_ids=meta.single_seqs,
                             cu_query_lens=meta.cu_query_lens, **scales)
        return prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_query_lens,
                                 meta.context_lens, meta.max_query_len, self.scale, self.sliding_window, out=out,
                                 seq_ids=meta.multi_seqs, **scales)

    def _flash(self, q, meta: AttentionMetadata) -> torch.Tensor:
        """flash-attn's paged kernels (int32 metadata, a cache in the model's dtype). Its window
        (left, right) counts the positions besides the query's own."""
        window = (self.sliding_window - 1, 0) if self.sliding_window else (-1, -1)
        if meta.decode_only:
            out = flash_attn_with_kvcache(q.unsqueeze(1), self.k_cache, self.v_cache, cache_seqlens=meta.context_lens,
                                          block_table=meta.block_tables, softmax_scale=self.scale, causal=True,
                                          window_size=window)
            return out.squeeze(1)
        # Each sequence's queries are the last of its keys: causal from the bottom right.
        return flash_attn_varlen_func(q, self.k_cache, self.v_cache, meta.cu_query_lens, meta.cu_context_lens,
                                      meta.max_query_len, meta.max_context_len, softmax_scale=self.scale,
                                      causal=True, window_size=window, block_table=meta.block_tables)

    def _torch(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        store_kv_reference(k, v, self.k_cache, self.v_cache, meta.slot_mapping, **scales)
        tables = meta.block_tables.long()
        if meta.decode_only:
            return decode_attention_reference(q, self.k_cache, self.v_cache, tables,
                                              meta.context_lens.long(), self.scale, self.sliding_window, **scales)
        return prefill_attention_reference(q, self.k_cache, self.v_cache, tables, meta.query_lens,
                                           meta.context_lens_list, self.scale, self.sliding_window, **scales)
