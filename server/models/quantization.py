"""Which quantization a model runs with: TGI's `--quantize` and the checkpoint's own
`quantization_config` (config.json), reconciled into a QuantConfig.

A checkpoint that says how it was quantized is loaded that way with no flag needed, and a
flag must agree with it. Supported:
  fp8                  a bf16/fp16/fp32 checkpoint quantized as it loads; or an fp8 checkpoint
                       (`quant_method` "fp8" or "fbgemm_fp8") with per-tensor or per-channel
                       `weight_scale`. Block-wise scales (`weight_block_size`) are not read.
  compressed-tensors   its float8 schemes (weights of 8 bits, type float, strategy tensor or
                       channel), loaded as fp8.
  awq                  AutoAWQ's 4-bit GEMM checkpoints (`version` "gemm", with zero points).
  gptq                 4-bit GPTQ checkpoints, with or without act-order (`desc_act`), in the
                       original format or `checkpoint_format` "gptq_v2".
"""
from __future__ import annotations

from server.config import QuantConfig

SUPPORTED = ("fp8", "awq", "gptq", "compressed-tensors")
# --quantize value -> the checkpoint quant_methods it may name
_APPLIES_TO = {"fp8": {"fp8", "fbgemm_fp8", "compressed-tensors"}, "compressed-tensors": {"compressed-tensors"},
               "awq": {"awq"}, "gptq": {"gptq"}}


def resolve_quantization(hf_config: dict, requested: str | None) -> QuantConfig | None:
    stored = hf_config.get("quantization_config")
    found = _from_checkpoint(stored) if stored else None
    if requested is None:
        return found
    if requested not in SUPPORTED:
        raise ValueError(f"--quantize {requested} is not supported; supported: fp8 (quantized at load, or an fp8 "
                         "checkpoint), awq and gptq (4-bit checkpoints), compressed-tensors (fp8 checkpoints)")
    if found is None:
        if requested == "fp8":
            return QuantConfig("fp8")
        raise ValueError(f"--quantize {requested} needs a checkpoint quantized with it (a quantization_config in "
                         "config.json and its tensors); this one is not quantized. Only fp8 quantizes as it loads")
    method = stored.get("quant_method")
    if method not in _APPLIES_TO[requested]:
        raise ValueError(f"the checkpoint is quantized with {method}; --quantize {requested} does not apply to it "
                         "(leave --quantize out to load it as it is)")
    return found


def _from_checkpoint(stored: dict) -> QuantConfig:
    method = stored.get("quant_method")
    if method in ("fp8", "fbgemm_fp8"):
        if stored.get("weight_block_size"):
            raise ValueError("fp8 checkpoints with block-wise scales (weight_block_size) are not supported; "
                             "per-tensor and per-channel weight_scale are")
        return QuantConfig("fp8")
    if method == "compressed-tensors":
        for name, group in (stored.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            if (weights.get("num_bits"), weights.get("type"), weights.get("strategy")) not in \
                    ((8, "float", "tensor"), (8, "float", "channel")):
                raise ValueError(f"compressed-tensors scheme {name!r} is not supported; only 8-bit float weights "
                                 "with tensor or channel scales are")
        return QuantConfig("fp8")
    if method in ("awq", "gptq"):
        bits = stored.get("bits", stored.get("w_bit"))
        if bits != 4:
            raise ValueError(f"{method} checkpoints of {bits} bits are not supported; only 4-bit ones are")
        group_size = stored.get("group_size", stored.get("q_group_size", 128))
        if method == "awq":
            version = str(stored.get("version", "gemm")).lower()
            if version != "gemm" or stored.get("zero_point") is False:
                raise ValueError(f"AWQ checkpoints of version {version!r} or without zero points are not "
                                 "supported; AutoAWQ's GEMM layout with zero points is")
            return QuantConfig("awq", group_size)
        if stored.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        layout = stored.get("checkpoint_format", stored.get("format", "gptq"))
        if layout not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {layout!r} is not supported; gptq and gptq_v2 are")
        return QuantConfig("gptq", group_size, bool(stored.get("desc_act", False)), 1 if layout == "gptq" else 0)
    raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: fp8, fbgemm_fp8, "
                     "compressed-tensors (fp8), awq, gptq")
