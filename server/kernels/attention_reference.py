"""Attention over the paged KV cache in plain torch: the CPU path, and the oracle that the
Triton kernels (decode_attention, prefill_attention) are tested against.

A sequence's token at position p lives in slot `block_table[p // block_size] * block_size +
p % block_size` of a cache shaped `[num_blocks, block_size, num_kv_heads, head_dim]`. With a
sliding `window`, a query at position p sees keys p - window + 1 .. p (Mistral's convention).
An fp8 cache holds values divided by the layer's scale: they are read back as cache * scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.quant_reference import FP8


def _read(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached values in the queries' dtype (fp8 ones times their scale, as the kernels do)."""
    if values.dtype != FP8:
        return values
    return (values.float() * scale).to(dtype)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: float, dtype) -> torch.Tensor:
    """The first `length` tokens of a sequence: [length, kv_heads, head_dim]."""
    return _read(cache[blocks].flatten(0, 1)[:length], scale, dtype)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal mask, narrowed to the last `window` positions (Mistral's sliding window)."""
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if window is not None:
        mask &= (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)) < window
    return mask


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
            scale: float, window: int | None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Variable-length attention, one sequence at a time, reading cached prefixes."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)  # [num_tokens, heads, head_dim]
    start = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        blocks = block_tables[i, :-(-ctx // block_size)]
        k = _gather(k_cache, blocks, ctx, k_scale, q.dtype).repeat_interleave(group, dim=1)
        v = _gather(v_cache, blocks, ctx, v_scale, q.dtype).repeat_interleave(group, dim=1)
        k_pos = torch.arange(ctx, device=q.device)
        mask = _allowed(k_pos[ctx - q_len:], k_pos, window)
        qi = q[start:start + q_len].transpose(0, 1)  # [heads, q_len, head_dim]
        oi = F.scaled_dot_product_attention(qi, k.transpose(0, 1), v.transpose(0, 1),
                                            attn_mask=mask, scale=scale)
        out[start:start + q_len] = oi.transpose(0, 1)
        start += q_len
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
           window: int | None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence, the whole batch at once over padded block tables."""
    k = _read(k_cache[block_tables].flatten(1, 2), k_scale, q.dtype)  # [num_seqs, max_blocks * block_size, kv, dim]
    v = _read(v_cache[block_tables].flatten(1, 2), v_scale, q.dtype)
    k_pos = torch.arange(k.shape[1], device=q.device)
    mask = _allowed(context_lens - 1, k_pos, window)  # [num_seqs, keys]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)  # [num_seqs, heads, head_dim]
