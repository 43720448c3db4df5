"""LoRA adapters in PEFT's format, read and put into a model's adapter slots.

An adapter is a directory (or a hub repo) with `adapter_config.json` and
`adapter_model.safetensors`: for each adapted projection of each layer, `lora_A.weight`
[r, in] and `lora_B.weight` [out, r]; the update of an input x is B(A x) * scale, with
scale = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`). The projections we adapt are
the attention's q/k/v/o and the MLP's gate/up/down; what PEFT can express beyond plain LoRA
on those (modules_to_save, DoRA, biases, per-module alphas, fan-in-fan-out weights) is refused
at load with what was found.

`--lora-adapters` takes TGI's syntax: comma-separated `id`, `id@revision` or `name=path`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from server.layers.lora import LoRABank, LoRASlots
from server.models.loader import download_files

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the largest of its modules' ranks
    # "layers.{i}.{self_attn|mlp}.{target}" -> (A [r, in], B [out, r] times the scale), on the CPU
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)


def parse_lora_adapters(text: str | None) -> dict[str, str]:
    """TGI's `--lora-adapters`: `id`, `id@revision`, `name=path`, comma-separated -> {name: source}
    (a source is a local directory, `id` or `id@revision`; an `id`'s name is the id itself)."""
    adapters: dict[str, str] = {}
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, _, source = entry.partition("=") if "=" in entry else (entry.split("@")[0], "", entry)
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise ValueError(f"LoRA adapter {entry!r}: expected `id`, `id@revision` or `name=path`")
        if name in adapters:
            raise ValueError(f"LoRA adapter name {name!r} is given twice")
        adapters[name] = source
    return adapters


def read_adapter(name: str, source: str, download_dir: str | None, max_rank: int) -> LoRAAdapter:
    """An adapter from a local directory, or from the hub (`id` or `id@revision`)."""
    directory = Path(source).expanduser()
    if not directory.is_dir():
        repo, _, revision = source.partition("@")
        directory = download_files(repo, revision or None, download_dir, ADAPTER_FILES, what="LoRA adapter")
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"LoRA adapter {name!r} ({source}): expected adapter_config.json and "
                         f"adapter_model.safetensors (PEFT's format) in {directory}")
    config = json.loads(config_file.read_text())
    _check_config(name, config)
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    found: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), "pt") as weights:
        for key in weights.keys():
            module, kind = _module_of(name, key)
            found.setdefault(module, {})[kind] = weights.get_tensor(key).float()
    adapter = LoRAAdapter(name, str(directory), 0)
    for module, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {name!r}: {module} has {sorted(pair)}, not lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(f"LoRA adapter {name!r}: {module}'s lora_B {list(b.shape)} does not match "
                             f"its lora_A {list(a.shape)}")
        if rank > max_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {rank} at {module}; the server takes ranks "
                             f"up to {max_rank} (--max-lora-rank)")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        adapter.modules[module] = (a, b * scale)
        adapter.rank = max(adapter.rank, rank)
    if not adapter.modules:
        raise ValueError(f"LoRA adapter {name!r} has no lora_A/lora_B weights")
    return adapter


def _check_config(name: str, config: dict) -> None:
    def refuse(what: str) -> None:
        raise ValueError(f"LoRA adapter {name!r}: {what} is not supported; plain LoRA on "
                         f"{', '.join(TARGETS)} is")

    if config.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r}")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save {config['modules_to_save']}")
    if config.get("use_dora"):
        refuse("DoRA (use_dora)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"bias {config.get('bias')!r}")
    if config.get("alpha_pattern"):
        refuse("a per-module lora_alpha (alpha_pattern)")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out")


def _module_of(name: str, key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> ("layers.3.self_attn.q_proj", "lora_A")."""
    parts = key.split(".")
    if len(parts) < 4 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise ValueError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
    module = ".".join(parts[:-2]).removeprefix("base_model.model.").removeprefix("model.")
    if module.rsplit(".", 1)[-1] not in TARGETS or not module.startswith("layers."):
        raise ValueError(f"LoRA adapter {name!r} adapts {module!r}; the server adapts only "
                         f"{', '.join(TARGETS)} in the decoder layers")
    return module, parts[-2]


def attach_adapters(model: nn.Module, adapters: list[LoRAAdapter], bank: LoRABank, dtype: torch.dtype) -> None:
    """Give every projection an adapter touches its slots (one per adapter, in order, each of the
    largest rank among them), and copy each adapter's weights into its slot, this rank's share."""
    if not adapters:
        return
    if getattr(model.config, "quantization", None) is not None and model.config.quantization.method != "fp8":
        raise ValueError("LoRA adapters on a 4-bit (GPTQ/AWQ) model are not supported yet; fp8 and dense are")
    rank = max(a.rank for a in adapters)
    pieces = getattr(model, "merged_pieces", {})
    for slot, adapter in enumerate(adapters):
        for module, (a, b) in adapter.modules.items():
            prefix, target = module.rsplit(".", 1)
            ours, piece = pieces.get(target, (target, 0))
            try:
                layer = model.get_submodule(f"{prefix}.{ours}")
            except AttributeError:
                raise ValueError(f"LoRA adapter {adapter.name!r} adapts {module!r}, which this model "
                                 "does not have") from None
            if getattr(layer, "lora", None) is None:
                layer.lora = LoRASlots.for_layer(layer, bank, len(adapters), rank, dtype)
            layer.lora.load(slot, piece, a, b)
