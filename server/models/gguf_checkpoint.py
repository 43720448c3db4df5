"""Read a llama-architecture GGUF file as if it were a Hugging Face checkpoint.

GGUF keeps hyper-parameters as `llama.*` metadata, names tensors llama.cpp's way
(`blk.N.attn_q.weight`), stores shapes innermost-first and quantizes most matrices.
This module turns all of that back into an HF config dict and float32 tensors
under HF parameter names, so the model code never learns that GGUF exists.
"""

import re
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from server.models.rotary_rows import unpermute_rotary_rows

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@lru_cache(maxsize=1)
def open_gguf(path: str) -> GGUFReader:
    """Parse a GGUF file's header once: parsing the ~50k-entry vocabulary takes seconds,
    and loading asks for the config, generation config and weights one after another."""
    return GGUFReader(path)


def _metadata(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader) -> dict:
    """The HF `config.json` equivalent of a llama GGUF's metadata."""
    architecture = _metadata(reader, "general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; only 'llama' GGUF files are"
        )
    rope_scaling = _metadata(reader, "llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"GGUF rope scaling {rope_scaling!r} is not supported; only unscaled rope is")
    tensor_shapes = {t.name: t.shape for t in reader.tensors}
    hidden_size, vocab_size = (int(n) for n in tensor_shapes["token_embd.weight"])
    num_attention_heads = _metadata(reader, "llama.attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": _metadata(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _metadata(reader, "llama.block_count"),
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": _metadata(reader, "llama.attention.head_count_kv", num_attention_heads),
        "head_dim": _metadata(reader, "llama.attention.key_length", hidden_size // num_attention_heads),
        "rms_norm_eps": _metadata(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _metadata(reader, "llama.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": _metadata(reader, "llama.context_length"),
        "vocab_size": vocab_size,
        # llama.cpp drops output.weight when the head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _metadata(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def gguf_generation_config(reader: GGUFReader) -> dict:
    """The special token ids that HF keeps in `generation_config.json`."""
    token_ids = {
        "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _metadata(reader, "tokenizer.ggml.eos_token_id"),
    }
    return {key: value for key, value in token_ids.items() if value is not None}


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama counterpart")
    layer, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.weight"


def iter_gguf_weights(reader: GGUFReader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor dequantized to float32, under its HF name and in HF's shape."""
    rotary_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF tensors"):
        name = hf_tensor_name(tensor.name)
        # GGUF lists dimensions innermost first; numpy and torch list them outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(values).reshape(shape)
        kind = tensor.name.split(".")[-2]
        if kind in rotary_heads:
            weight = unpermute_rotary_rows(weight, rotary_heads[kind])
        yield name, weight
