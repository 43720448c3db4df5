"""The plain-torch twins of the small kernels: the math each kernel must reproduce, and what
the CPU path runs. (Attention's twins are in attention_reference.py.) No triton here, so the
CPU path works where triton is not installed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.quant_reference import FP8, FP8_MAX, Fp8Experts, Int4Experts


def store_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [num_tokens, kv_heads, head_dim] into their slots; slot -1 (padding) is skipped.
    An fp8 cache gets clamp(k * (1 / k_scale), -448, 448) (and v likewise)."""
    keep = slot_mapping >= 0
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for values, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype == FP8:  # index_copy_ has no fp8 kernel: copy the bytes
            values = (values.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
            cache = cache.view(torch.uint8)
        cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, values)


def rmsnorm_reference(x, weight, eps, residual=None):
    """y = weight * dtype(s * rsqrt(mean(s^2) + eps)) with s = x (+ residual, in x's dtype);
    returns y, or (y, s) when a residual is given."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    y = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)


def silu_and_mul_reference(x):
    """[.., 2 * width] = [gate | up] -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_reference(positions, q, k, cos_sin):
    """Rotate-half rotary embedding in float32; cos_sin [max_position, head_dim] = [cos | sin]."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def fused_moe_reference(x, w13, w2, topk_weights, topk_ids):
    """Each token through its top-k experts, weighted and summed (Mixtral's expert MLPs).

    x [tokens, hidden]; w13 [experts, 2 * inter, hidden] = [gate; up] of each expert;
    w2 [experts, hidden, inter]; topk_weights, topk_ids [tokens, k]. Computed expert by expert,
    summing into token order in expert order, as transformers' Mixtral does.
    """
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token_idx, k_pos = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x[token_idx], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def quantized_moe_reference(x, w13: Int4Experts | Fp8Experts, w2: Int4Experts | Fp8Experts, topk_weights, topk_ids):
    """fused_moe_reference on the experts' dequantized weights (float32): what the quantized
    MoE kernels compute, up to their rounding of each weight tile to x's dtype."""
    return fused_moe_reference(x.float(), w13.dense(), w2.dense(), topk_weights, topk_ids)
