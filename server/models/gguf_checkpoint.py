"""Read a llama-architecture GGUF file as if it were a Hugging Face checkpoint.

GGUF keeps hyper-parameters as `llama.*` metadata, names tensors llama.cpp's way
(`blk.N.attn_q.weight`), stores shapes innermost-first and quantizes most matrices.
This module turns all of that back into an HF config dict and float32 tensors
under HF parameter names, so the model code never learns that GGUF exists.
"""

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
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


# GGUF's metadata value types: the fixed-size ones by their struct format, then string and array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # innermost first, as GGUF lists dimensions
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # its bytes in the memory-mapped file: [..., bytes of one innermost row]


class GGUFFile:
    """A GGUF file's metadata and tensors, read from the memory-mapped file in one pass.

    Layout (GGUF v2/v3, little-endian): "GGUF", version, tensor count, metadata count; the
    metadata as (key, type, value); each tensor's name, dimensions, type and offset; then,
    aligned to `general.alignment` (32 by default), the tensors' data. Arrays in the metadata
    (the vocabulary, its scores and merges) are stepped over, not kept: the tokenizer reads them
    through transformers. gguf's own GGUFReader makes a numpy view of every entry of every
    array, which for SmolLM2's 49,152-token vocabulary took 4-5 s of each load on 2 CPU cores;
    this reader steps over the arrays instead, in a small fraction of that."""

    def __init__(self, path: str):
        self.path = path
        self._file = np.memmap(path, dtype=np.uint8, mode="r")
        self._buffer = memoryview(self._file)
        if bytes(self._buffer[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        self._pos = 4
        self.metadata: dict[str, object] = {}
        infos = []
        try:
            version = self._unpack("<I")
            if version < 2:
                raise ValueError(f"{path}: GGUF version {version} is not supported (2 and later are)")
            num_tensors, num_metadata = self._unpack("<Q"), self._unpack("<Q")
            for _ in range(num_metadata):
                key = self._string()
                self.metadata[key] = self._value(self._unpack("<I"))
            for _ in range(num_tensors):
                name = self._string()
                shape = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
                infos.append((name, shape, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        except struct.error:
            raise ValueError(f"{path}: the GGUF header is cut short") from None
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buffer, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = bytes(self._buffer[self._pos:self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, value_type: int):
        if value_type in _SCALARS:
            return self._unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {value_type}")
        item_type, count = self._unpack("<I"), self._unpack("<Q")
        if item_type in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[item_type])
        else:
            for _ in range(count):
                self._value(item_type)
        return None  # stepped over

    def _tensor(self, data_start: int, name: str, shape: tuple[int, ...], tensor_type, offset: int) -> GGUFTensor:
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        row_bytes = shape[0] // block_size * type_size
        start = data_start + offset
        rows = math.prod(shape[1:])
        if start + rows * row_bytes > len(self._file):
            raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file")
        data = self._file[start:start + rows * row_bytes].reshape(*reversed(shape[1:]), row_bytes)
        return GGUFTensor(name, shape, tensor_type, data)


@lru_cache(maxsize=1)
def open_gguf(path: str) -> GGUFFile:
    """A GGUF file's header, read once: loading asks for the config, generation config and
    weights one after another."""
    return GGUFFile(path)


def _metadata(reader: GGUFFile, key: str, default=None):
    value = reader.metadata.get(key)
    return default if value is None else value


def gguf_config(reader: GGUFFile) -> dict:
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


def gguf_generation_config(reader: GGUFFile) -> dict:
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


def iter_gguf_weights(reader: GGUFFile, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
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
