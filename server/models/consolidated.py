"""Read Mistral's own checkpoint format as if it were a Hugging Face checkpoint.

Mistral publishes its models as `params.json` plus `consolidated*.safetensors`, the format
its reference code (mistral-inference) reads: beside the HF files in most repos, alone in a
few (Codestral-22B-v0.1). The tensors carry mistral-inference's module names
(`layers.3.attention.wq.weight`) and its rotary layout, which rotates adjacent pairs of each
head's dimensions. This module gives back HF's config keys, tensor names and q/k row order,
the same mapping as transformers' convert_mistral_weights_to_hf.py, so the model code never
learns the format exists.
"""

import re
from collections.abc import Iterator
from pathlib import Path

from server.models.rotary_rows import HalfSplitRows

_GLOBAL_TENSORS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "block_sparse_moe.gate",  # the router of a mixture of experts
}
_LAYER_TENSOR_NAME = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])")
# params.json features of other Mistral models (Pixtral, Voxtral, Mistral Large 3, quantized
# releases) that the Mistral and Mixtral architectures here do not have.
_UNSUPPORTED = ("quantization", "vision_encoder", "multimodal", "lora", "yarn", "llama_4_scaling",
                "qk_nope_head_dim")
# What HF's converter assumes when params.json does not say (Mistral-7B-v0.1's has neither).
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_MAX_POSITIONS = 32768


def consolidated_files(directory: Path) -> list[Path]:
    """`consolidated.safetensors`, or its parts (`consolidated.00.safetensors`, ...)."""
    return sorted(directory.glob("consolidated*.safetensors"))


def consolidated_config(params: dict) -> dict:
    """The HF `config.json` equivalent of a `params.json`."""
    unsupported = [key for key in _UNSUPPORTED if params.get(key)]
    if params.get("model_type", "transformer") != "transformer":
        unsupported.append(f"model_type {params['model_type']!r}")
    moe = params.get("moe") or {}
    unsupported += [f"moe.{key}" for key in moe if key not in ("num_experts", "num_experts_per_tok")]
    window = params.get("sliding_window")
    if isinstance(window, list):
        unsupported.append("per-layer sliding_window")
    if unsupported:
        raise ValueError(f"params.json asks for {', '.join(unsupported)}, which is not supported; "
                         "supported: Mistral and Mixtral text models")
    num_heads = params["n_heads"]
    return {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "hidden_size": params["dim"],
        "intermediate_size": params["hidden_dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": params.get("n_kv_heads") or num_heads,
        "head_dim": params.get("head_dim") or params["dim"] // num_heads,
        "rms_norm_eps": params["norm_eps"],
        "vocab_size": params["vocab_size"],
        "rope_theta": params.get("rope_theta") or _DEFAULT_ROPE_THETA,
        "rope_scaling": None,
        "max_position_embeddings": params.get("max_seq_len") or params.get("max_position_embeddings")
        or _DEFAULT_MAX_POSITIONS,
        "sliding_window": int(window) if window else None,  # some params.json write it as a string
        "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
        "num_local_experts": moe.get("num_experts", 0),
        "num_experts_per_tok": moe.get("num_experts_per_tok", 0),
    }


def hf_tensor_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR_NAME.fullmatch(name)
    if match is not None:
        layer, kind = match.groups()
        if kind in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.weight"
        expert = _EXPERT.fullmatch(kind)
        if expert is not None:
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert[1]}.{expert[2]}.weight"
    raise ValueError(f"consolidated tensor {name!r} has no Hugging Face Mistral or Mixtral counterpart")


def as_hf_weights(weights: Iterator[tuple[str, object]], config: dict) -> Iterator[tuple[str, object]]:
    """Consolidated (name, sliceable tensor) pairs -> HF names, with q/k rows read in HF's order."""
    for name, tensor in weights:
        name = hf_tensor_name(name)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            tensor = HalfSplitRows(tensor, config["head_dim"])
        yield name, tensor
