"""A Mistral-7B-Instruct-v0.3-shaped (or Mixtral-8x7B- or 8x22B-shaped) checkpoint with random
weights, laid out as on the hub, for the GPU benchmarks. Measures nothing; prints the
checkpoint's directory.

Nothing can be downloaded on the GPU machine, and shapes, not values, decide speed:

    python benchmarks/make_checkpoint.py /tmp/mistral-7b              # 32 layers, 14.5 GB bf16
    python benchmarks/make_checkpoint.py /tmp/mistral-2l --num-layers 2
    python benchmarks/make_checkpoint.py /tmp/mixtral-4l --mixtral --num-layers 4
    python benchmarks/make_checkpoint.py /tmp/mixtral --mixtral --no-weights   # --load-format dummy
    python benchmarks/make_checkpoint.py /tmp/mistral-7b-gptq --quantize gptq   # 4-bit, 4.2 GB
    python benchmarks/make_checkpoint.py /tmp/mixtral-gptq --mixtral --quantize gptq   # about 25 GB
    python benchmarks/make_checkpoint.py /tmp/mixtral-8x22b-gptq --mixtral-8x22b --quantize gptq --no-weights

Weights are drawn on the GPU when there is one (std 0.02, norms at 1), saved as bf16
safetensors shards with an index, beside the real tokenizer from mistral-common (v1 for
Mixtral-8x7B, v3 for the others) and, as on the hub, its Hugging Face `tokenizer.json`
(hf_tokenizer.py), which `transformers` needs. With `--quantize` the decoder's linear layers,
Mixtral's experts included (its router stays bf16), are drawn directly in the stored layout,
with the format's quantization_config: `gptq` or `awq` as 4-bit words (group size 128,
symmetric: random 4-bit values, zero points 8, scales giving std ~0.02), `fp8` as e4m3 values
with per-channel scales.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hf_tokenizer  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768)
MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, num_local_experts=8,
               num_experts_per_tok=2)
MIXTRAL_8X22B = dict(MIXTRAL, vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                     num_attention_heads=48, max_position_embeddings=65536)


def layer_shapes(i: int, c: dict) -> dict[str, tuple[int, ...]]:
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]
    q, inter = c["num_attention_heads"] * c["head_dim"], c["intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
              p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    experts = c.get("num_local_experts", 0)
    if not experts:
        shapes.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        return shapes
    shapes[p + "block_sparse_moe.gate.weight"] = (experts, h)
    for e in range(experts):
        moe = f"{p}block_sparse_moe.experts.{e}."
        shapes.update({moe + "w1.weight": (inter, h), moe + "w3.weight": (inter, h), moe + "w2.weight": (h, inter)})
    return shapes


GROUP_SIZE = 128
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
FP8_STD = 64.0  # of the drawn e4m3 values (448 at most), each channel's scale bringing it to 0.02


def quantization_config(quantize: str, mixtral: bool) -> dict:
    if quantize == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if quantize == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq"}
    awq = {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"}
    return {**awq, "modules_to_not_convert": ["gate"]} if mixtral else awq  # AutoAWQ's Mixtral: the router


def int4_tensors(name: str, shape: tuple[int, int], quantize: str, generator, device) -> dict[str, torch.Tensor]:
    """One linear layer's 4-bit tensors: words of random nibbles, zero points 8 (GPTQ stores 7),
    scales 0.02 / 4.6 (the std of a uniform nibble less 8)."""
    out_features, in_features = shape
    layer = name.removesuffix(".weight")
    groups = in_features // GROUP_SIZE
    words = (in_features, out_features // 8) if quantize == "awq" else (in_features // 8, out_features)
    zero_word = 0x77777777 if quantize == "gptq" else 0x88888888 - 2**32  # eight nibbles, as an int32
    tensors = {
        f"{layer}.qweight": torch.randint(-2**31, 2**31, words, generator=generator, device=device,
                                          dtype=torch.int64).to(torch.int32).cpu(),
        f"{layer}.qzeros": torch.full((groups, out_features // 8), zero_word, dtype=torch.int32),
        f"{layer}.scales": torch.full((groups, out_features), 0.02 / 4.6, dtype=torch.bfloat16),
    }
    if quantize == "gptq":
        tensors[f"{layer}.g_idx"] = (torch.arange(in_features) // GROUP_SIZE).to(torch.int32)
    return tensors


def fp8_tensors(name: str, shape: tuple[int, int], generator, device) -> dict[str, torch.Tensor]:
    """One linear layer's e4m3 weight and its per-channel weight_scale [out, 1]."""
    values = torch.randn(shape, generator=generator, device=device) * FP8_STD
    return {name: values.clamp(-448, 448).to(torch.float8_e4m3fn).cpu(),
            f"{name}_scale": torch.full((shape[0], 1), 0.02 / FP8_STD, dtype=torch.float32)}


def make(path: Path, num_layers: int | None = None, seed: int = 0, mixtral: bool = False, router_std: float = 0.02,
         weights: bool = True, quantize: str | None = None, sizes: dict | None = None,
         mixtral_8x22b: bool = False) -> Path:
    """`num_layers`: the model's own (32, or 56 for Mixtral-8x22B) unless given. `weights=False`
    writes the config and tokenizer only, for `load_format="dummy"`. `router_std`: a larger
    spread makes the experts' routing decisive, so that two implementations' rounding never
    flips which experts a token goes to (for parity tests). `quantize`: "gptq", "awq" or "fp8"
    writes the decoder's linear layers in that format. `sizes`: config values in place of the
    real model's (`hidden_size`, `vocab_size`, ...), for a smaller model of the same kind."""
    path.mkdir(parents=True, exist_ok=True)
    kind = MIXTRAL_8X22B if mixtral_8x22b else MIXTRAL if mixtral else \
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    config = {**SHAPE, **kind, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_dropout": 0.0,
              "initializer_range": 0.02, "use_cache": True, **(sizes or {})}
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    if quantize:
        config["quantization_config"] = quantization_config(quantize, "num_local_experts" in config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    if mixtral and not mixtral_8x22b:  # Mixtral-8x7B's tokenizer
        tokenizer = shutil.copy(data / "tokenizer.model.v1", path / "tokenizer.model.v1")
    else:
        tokenizer = shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", path / "tokenizer.model.v3")
    hf_tokenizer.write(Path(tokenizer), path)
    if not weights:
        return path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(seed)

    def tensors(name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if name.endswith("norm.weight"):
            return {name: torch.ones(shape, dtype=torch.bfloat16)}
        if quantize == "fp8" and name.split(".")[-2] in _LINEARS:
            return fp8_tensors(name, shape, generator, device)
        if quantize and name.split(".")[-2] in _LINEARS:
            return int4_tensors(name, shape, quantize, generator, device)
        std = router_std if name.endswith("block_sparse_moe.gate.weight") else 0.02
        return {name: (torch.randn(shape, generator=generator, device=device) * std).to(torch.bfloat16).cpu()}

    c = config
    groups = [{"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"])}]
    groups += [layer_shapes(i, c) for i in range(c["num_hidden_layers"])]
    groups.append({"model.norm.weight": (c["hidden_size"],), "lm_head.weight": (c["vocab_size"], c["hidden_size"])})
    shards: list[dict[str, tuple]] = [{}]
    for group in groups:  # a few layers per shard, as the hub's files hold
        if sum(torch.Size(s).numel() for s in shards[-1].values()) > 2_000_000_000:
            shards.append({})
        shards[-1].update(group)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        written = {n: t for checkpoint_name, shape in shard.items() for n, t in tensors(checkpoint_name, shape).items()}
        save_file(written, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(written, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--num-layers", type=int, help="default: the model's (32; 56 for Mixtral-8x22B)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixtral", action="store_true", help="Mixtral-8x7B's shapes (8 experts, top-2)")
    parser.add_argument("--mixtral-8x22b", action="store_true",
                        help="Mixtral-8x22B's shapes (hidden 6,144, 48 heads / 8 KV, 8 experts of 16,384, vocabulary "
                             "32,768, 65,536 positions)")
    parser.add_argument("--no-weights", action="store_true",
                        help="config and tokenizer only, for --load-format dummy (no disk, no wait)")
    parser.add_argument("--quantize", choices=["gptq", "awq", "fp8"],
                        help="write the linear layers (and Mixtral's experts) in this format")
    args = parser.parse_args()
    print(make(args.path, args.num_layers, args.seed, args.mixtral or args.mixtral_8x22b,
               weights=not args.no_weights, quantize=args.quantize, mixtral_8x22b=args.mixtral_8x22b))


if __name__ == "__main__":
    main()
