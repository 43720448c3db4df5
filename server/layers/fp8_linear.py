"""fp8 (e4m3) weights with one scale per output channel, multiplied by the GPU's fp8 matmul.

The weights come from a bf16/fp16/fp32 checkpoint, quantized as they load (each output
channel scaled by its largest magnitude / 448), or from an fp8 checkpoint as they are:
`weight` in float8_e4m3fn with `weight_scale` holding one value for the tensor or one per
output channel ([N] or [N, 1]), the layout of AutoFP8/vLLM's "fp8", FBGEMM's "fbgemm_fp8" and
compressed-tensors' float8 tensor/channel schemes. A static `input_scale` is read and set
aside: activations always get dynamic per-token scales.

On a GPU (which start-up has checked has fp8: compute capability 8.9+), a decode batch of up to
16 rows goes through server/kernels/gemv.py, which reads the e4m3 weight at half bf16's bytes, widens
it in registers and scales each output (the activations stay as they are); a larger batch
quantizes its input rows to e4m3 with their own scales and runs torch._scaled_mm with row-wise
scales.
On the CPU the weight is dequantized to the activations' dtype and multiplied: its twin
without the activation rounding, so that CPU results can be held to transformers on the
dequantized weights. Quantizing at load under row parallelism scales each rank's slice of a
channel by its own maximum, so the ranks' weights differ slightly from one rank's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.quant_reference import FP8, dequantize_fp8, quantize_fp8_rows
from server.layers.activation import silu_and_mul
from server.layers.parallel import read_shard

if TYPE_CHECKING:
    from server.kernels.lora import LoRAUpdate

try:
    from server.kernels.fp8_quant import quantize_fp8_per_token
    from server.kernels.gemv import gemv, suits
except ImportError:  # pragma: no cover - no triton: the CPU path only
    quantize_fp8_per_token = gemv = suits = None


class Fp8Weight:
    """weight [out, in] e4m3 and weight_scale [out] float32."""

    def create(self, layer: nn.Module, in_features: int, out_features: int, full_in_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        # NaN until set: an fp8 weight whose scale never comes is caught by `finish`.
        layer.register_buffer("weight_scale", torch.full((out_features,), float("nan"), dtype=torch.float32))

    def load(self, layer: nn.Module, name: str, loaded, out_cut, in_cut, rows: tuple[int, int]) -> None:
        lo, hi = rows
        if name == "weight":
            piece = read_shard(loaded, {0: out_cut, 1: in_cut}).to(layer.weight.device)
            if piece.dtype == FP8:
                layer.weight.data[lo:hi].copy_(piece)
            else:
                quantized, scale = quantize_fp8_rows(piece)
                layer.weight.data[lo:hi].copy_(quantized)
                layer.weight_scale[lo:hi].copy_(scale)
        elif name == "weight_scale":
            scale = loaded[...].float().reshape(-1)  # one per tensor, or one per output channel
            if scale.numel() > 1 and out_cut is not None:
                scale = scale[out_cut[0]:out_cut[0] + out_cut[1]]
            layer.weight_scale[lo:hi].copy_(scale)
        elif name != "input_scale":
            raise ValueError(f"unexpected tensor {name!r} in an fp8 layer (weight, weight_scale, input_scale)")

    def finish(self, layer: nn.Module) -> None:
        if torch.isnan(layer.weight_scale).any():
            raise ValueError("an fp8 weight came without its weight_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False,
              lora: LoRAUpdate | None = None) -> torch.Tensor:
        """gated: x is [gate | up], multiplied as silu(gate) * up (see linear.py); lora: the rows'
        adapter updates, added."""
        if gemv is not None and suits(x):  # a decode batch: the weight widened as it is read
            out = gemv(x, layer.weight, weight_scale=layer.weight_scale, gated=gated, lora=lora)
        else:
            x = silu_and_mul(x) if gated else x
            if x.is_cuda:
                x_q, x_scale = quantize_fp8_per_token(x)  # [M, K] e4m3, [M, 1]
                # Row-wise scaled fp8 matmul writes bfloat16 (its other outputs depend on the build).
                out = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale.view(1, -1),
                                       out_dtype=torch.bfloat16).to(x.dtype)
            else:
                out = F.linear(x, dequantize_fp8(layer.weight, layer.weight_scale).to(x.dtype))
            if lora is not None:
                out = lora.add_to(out)
        return out + bias if bias is not None else out
