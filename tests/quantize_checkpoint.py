"""A small quantizer that writes AWQ, GPTQ and fp8 checkpoints of a model, as AutoAWQ,
GPTQ tools and fp8 exporters lay them out (none can be downloaded here), and keeps the
dequantized weights it implies: the oracle the server's loaders and kernels are held to.

It is written from the formats' descriptions with numpy, separately from the server's torch
code, so that a wrong nibble order or zero-point convention cannot hide in both. Weights are
rounded to the nearest level of each group (no calibration, unlike real AWQ/GPTQ): the
layouts, not the quality of the rounding, are what is tested. Act-order is imitated with a
random order of the inputs, which is what GPTQ's g_idx records.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# each linear layer -> the layers that read the same input (GPTQ's act-order is one order per input)
LINEARS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
           "up_proj": "gate_up", "down_proj": "down", "w1": "w13", "w3": "w13", "w2": "w2"}  # w*: Mixtral's experts
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]


def pack_along_rows(values: np.ndarray) -> np.ndarray:
    """[R, C] nibbles -> [R/8, C] int32: row 8r + i in bits 4i..4i+3 of word r (GPTQ's qweight)."""
    words = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for i in range(8):
        words |= values[i::8].astype(np.uint32) << (4 * i)
    return words.view(np.int32)


def pack_along_columns(values: np.ndarray, order=range(8)) -> np.ndarray:
    """[R, C] nibbles -> [R, C/8] int32: column 8c + order[i] in bits 4i..4i+3 of word c."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for i, column in enumerate(order):
        words |= values[:, column::8].astype(np.uint32) << (4 * i)
    return words.view(np.int32)


def round_to_groups(weight: np.ndarray, group_size: int, groups_of_inputs: np.ndarray, sym: bool,
                    min_zero: int = 0):
    """weight [N, K] -> (q [K, N], zeros [G, N], scales [G, N] float16, dequantized [N, K] float32).
    Asymmetric: each group's range [min, max] (widened to hold 0) in 15 steps, zero point
    min_zero..15; symmetric: zero point 8 and steps of max|w| / 7.5."""
    w = weight.astype(np.float32).T  # [K, N]
    num_groups = w.shape[0] // group_size
    q = np.zeros(w.shape, dtype=np.int64)
    zeros = np.zeros((num_groups, w.shape[1]), dtype=np.int64)
    scales = np.zeros((num_groups, w.shape[1]), dtype=np.float16)
    for g in range(num_groups):
        rows = groups_of_inputs == g
        block = w[rows]
        if sym:
            scale = (np.abs(block).max(axis=0) / 7.5).astype(np.float16)
            zero = np.full(w.shape[1], 8)
        else:
            low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
            scale = ((high - low) / 15).astype(np.float16)
            zero = np.clip(np.round(-low / scale.astype(np.float32)), min_zero, 15).astype(np.int64)
        q[rows] = np.clip(np.round(block / scale.astype(np.float32)) + zero, 0, 15)
        zeros[g], scales[g] = zero, scale
    dequantized = (q - zeros[groups_of_inputs]).astype(np.float32) * scales[groups_of_inputs].astype(np.float32)
    return q, zeros, scales, dequantized.T.copy()


def quantize_int4(weight: torch.Tensor, method: str, group_size: int, desc_act: bool = False,
                  sym: bool = False, v2: bool = False, seed: int = 0):
    """One linear layer's checkpoint tensors and its dequantized weight [N, K] float32."""
    k = weight.shape[1]
    groups = np.arange(k) // group_size
    if desc_act:  # the inputs in a random order, grouped in that order
        order = np.random.default_rng(seed).permutation(k)
        groups = np.empty(k, dtype=np.int64)
        groups[order] = np.arange(k) // group_size
    q, zeros, scales, dequantized = round_to_groups(weight.numpy(), group_size, groups, sym,
                                                    min_zero=1 if method == "gptq" and not v2 else 0)
    if method == "awq":
        tensors = {"qweight": pack_along_columns(q, AWQ_ORDER), "qzeros": pack_along_columns(zeros, AWQ_ORDER),
                   "scales": scales}
    else:  # GPTQ's original format stores each zero point minus one
        tensors = {"qweight": pack_along_rows(q), "qzeros": pack_along_columns(zeros - (0 if v2 else 1)),
                   "scales": scales, "g_idx": groups.astype(np.int32)}
    return {name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in tensors.items()}, \
        torch.from_numpy(dequantized)


def quantize_fp8(weight: torch.Tensor, per_channel: bool):
    """e4m3 weight and its weight_scale ([N, 1] per channel, or one value), and the dequantized
    weight. The scale is amax times 1/448 rounded to float32, the server's rule when it
    quantizes as it loads, so that the per-channel weights are also that path's oracle."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax * (1.0 / 448.0)
    q = (w / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def quantization_config(method: str, group_size: int, desc_act: bool, sym: bool, v2: bool) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    return {"quant_method": "fp8", "activation_scheme": "dynamic"}


def write_quantized(source: Path, target: Path, method: str, group_size: int = 32, desc_act: bool = False,
                    sym: bool = False, v2: bool = False, per_channel: bool = True) -> dict[str, torch.Tensor]:
    """Copy the checkpoint in `source` to `target` with its decoder's linear layers quantized;
    -> the dequantized weights by name (each layer's own weight, [N, K] float32)."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    out, dequantized = {}, {}
    for name, tensor in tensors.items():
        layer = name.removesuffix(".weight")
        kind = layer.rsplit(".", 1)[-1]
        if not name.endswith(".weight") or kind not in LINEARS:
            out[name] = tensor
            continue
        if method == "fp8":
            parts, dequantized[name] = quantize_fp8(tensor, per_channel)
        else:
            block = layer.rsplit(".", 2)[0]  # model.layers.N
            seed = zlib.crc32(f"{block}.{LINEARS[kind]}".encode())
            parts, dequantized[name] = quantize_int4(tensor, method, group_size, desc_act, sym, v2, seed)
        out.update({f"{layer}.{part}": value for part, value in parts.items()})
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(method, group_size, desc_act, sym, v2)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def write_dequantized(source: Path, target: Path, dequantized: dict[str, torch.Tensor]) -> None:
    """The plain float32 checkpoint of the dequantized weights, for transformers."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({**tensors, **dequantized}, str(target / "model.safetensors"), metadata={"format": "pt"})
