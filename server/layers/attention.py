"""The attention layer over the paged KV cache, and the choice of backend.

The cache of one layer is a pair of tensors K, V of shape
`[num_blocks, block_size, num_kv_heads, head_dim]` (flash-attn's paged layout). A token at
position p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.layers import torch_attention


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to.

    Tokens of the batch are flattened: sequence i owns `query_lens[i]` consecutive tokens, the
    last ones of its `context_lens[i]` tokens (cached prefix + this step's tokens).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int64
    query_lens: list[int]
    context_lens_list: list[int]

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, backend: str = "torch"):
        super().__init__()
        if backend != "torch":
            raise ValueError(f"attention backend {backend!r} is not available (torch)")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [num_tokens, heads, head_dim], k and v [num_tokens, kv_heads, head_dim]."""
        torch_attention.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.decode_only:
            out = torch_attention.decode(q, self.k_cache, self.v_cache, meta.block_tables,
                                         meta.context_lens, self.scale, self.sliding_window)
        else:
            out = torch_attention.prefill(q, self.k_cache, self.v_cache, meta.block_tables,
                                          meta.query_lens, meta.context_lens_list, self.scale,
                                          self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
