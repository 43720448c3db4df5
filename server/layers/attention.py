"""The attention layer over the paged KV cache, and the choice of backend.

The cache of one layer is a pair of tensors K, V of shape
`[num_blocks, block_size, num_kv_heads, head_dim]` (flash-attn's paged layout). A token at
position p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Backends: `triton` (our kernels, the default on CUDA) and `torch` (the reference, and the CPU
path). Each step stores the new K/V first, then attends over the cache, so a prefill chunk
sees its cached prefix and itself the same way. An fp8 (e4m3) cache stores K / k_scale and
V / v_scale, one scale per layer: the checkpoint's `k_scale`/`v_scale` when it has them, 1.0
otherwise (K and V of the usual models stay well inside e4m3's range of +-448).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention_reference import decode_attention_reference, prefill_attention_reference
from kernels.reference import store_kv_reference

try:  # triton is optional where only the CPU path runs
    from kernels.cache import store_kv
    from kernels.decode_attention import decode_attention
    from kernels.prefill_attention import prefill_attention
except ImportError:  # pragma: no cover - depends on the install
    store_kv = decode_attention = prefill_attention = None

BACKENDS = ("torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" and decode_attention is not None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not known: auto, {', '.join(BACKENDS)}")
    if name == "triton" and (device.type != "cuda" or decode_attention is None):
        raise ValueError("the triton attention backend needs CUDA and the triton package")
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


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, backend: str = "torch"):
        super().__init__()
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k and v [num_tokens, kv_heads, head_dim]."""
        if self.backend == "triton":
            out = self._triton(q, k, v, meta)
        else:
            out = self._torch(q, k, v, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _triton(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, **scales)
        if meta.decode_only:
            return decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                    self.scale, self.sliding_window, meta.num_splits, **scales)
        return prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_query_lens,
                                 meta.context_lens, meta.max_query_len, self.scale, self.sliding_window, **scales)

    def _torch(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        store_kv_reference(k, v, self.k_cache, self.v_cache, meta.slot_mapping, **scales)
        tables = meta.block_tables.long()
        if meta.decode_only:
            return decode_attention_reference(q, self.k_cache, self.v_cache, tables,
                                              meta.context_lens.long(), self.scale, self.sliding_window, **scales)
        return prefill_attention_reference(q, self.k_cache, self.v_cache, tables, meta.query_lens,
                                           meta.context_lens_list, self.scale, self.sliding_window, **scales)
