"""Medusa heads: speculation's proposals from the model's own last hidden state (TGI's layout).

A Medusa speculator is a directory (or hub repo) whose `config.json` holds `medusa_num_heads`,
`medusa_num_layers` and `base_model_name_or_path` (the model it was trained on), beside
`medusa_lm_head.safetensors`; a checkpoint directory may also ship heads for itself, with a
`medusa_config.json` holding those numbers beside its own config and weights. Head i holds `medusa_num_layers` residual blocks,
`{i}.{j}.linear.weight` [hidden, hidden] and `{i}.{j}.linear.bias` [hidden], each
x -> x + silu(linear(x)), then its own output projection `{i}.{medusa_num_layers}.weight`
[vocab, hidden], or, where the file has none, the model's LM head. Fed the final (normed)
hidden state of the place whose pick is a sequence's last token, head i predicts the token
i + 1 places after that pick: the heads' argmaxes are the next step's proposals.

As TGI does, `--model-id` names the speculator; the model loaded is its base, and
`--speculate` defaults to the number of heads (more is refused).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

WEIGHTS = "medusa_lm_head.safetensors"


def medusa_speculator(model: str | None, revision: str | None = None,
                      download_dir: str | None = None) -> tuple[str, dict] | None:
    """(its directory, its config) when `model` names a Medusa speculator, else None. A hub id
    has its config read first, and its weights fetched only when it is one."""
    if model is None:
        return None
    local = Path(model).expanduser()
    if local.is_dir():
        for name in ("config.json", "medusa_config.json"):  # a speculator, or a checkpoint shipping heads
            config_file = local / name
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if "medusa_num_heads" in config:
                if name == "medusa_config.json":  # the heads sit beside the model's own weights
                    config["base_model_name_or_path"] = str(local)
                return str(local), config
        return None
    if local.exists() or model.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(model, "config.json", revision=revision, cache_dir=download_dir)
    except Exception:  # not reachable or not a repo: the model loader says what is wrong
        return None
    config = json.loads(Path(config_file).read_text())
    if "medusa_num_heads" not in config:
        return None
    hf_hub_download(model, WEIGHTS, revision=revision, cache_dir=download_dir)
    return str(Path(config_file).parent), config


class MedusaHeads(nn.Module):
    """The heads, in the model's dtype on its device; `forward` gives each row's proposals."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], layers: int,
                 outs: list[torch.Tensor] | None):
        """Each head's `layers` blocks in turn (head i's block j at i * layers + j), and each
        head's output projection (None: the model's LM head)."""
        super().__init__()
        self.layers = layers
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in biases])
        self.outs = nn.ParameterList([nn.Parameter(o, requires_grad=False) for o in outs]) if outs else None

    @property
    def num_heads(self) -> int:
        return len(self.weights) // self.layers

    @classmethod
    def load(cls, directory: str, config: dict, dtype: torch.dtype, device: torch.device) -> "MedusaHeads":
        heads, layers = int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
        path = Path(directory) / WEIGHTS
        if not path.is_file():
            raise ValueError(f"the Medusa speculator {directory} has no {WEIGHTS}")
        tensors = load_file(str(path))

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"{path} has no tensor {name!r}: Medusa heads are read in TGI's layout "
                                 "({head}.{layer}.linear.weight / .bias, then {head}.{layers}.weight)")
            return tensors[name].to(device=device, dtype=dtype)

        blocks = [(i, j) for i in range(heads) for j in range(layers)]
        own = [f"{i}.{layers}.weight" in tensors for i in range(heads)]
        if any(own) and not all(own):
            raise ValueError(f"{path}: some Medusa heads have an output projection and some do not")
        return cls([take(f"{i}.{j}.linear.weight") for i, j in blocks],
                   [take(f"{i}.{j}.linear.bias") for i, j in blocks], layers, [take(f"{i}.{layers}.weight") for i in range(heads)] if all(own) else None)

    def forward(self, hidden: torch.Tensor, lm_head) -> torch.Tensor:
        """hidden [rows, hidden] (normed, as the LM head reads it) -> each head's argmax [rows, heads];
        `lm_head(x)` gives logits where the heads share the model's."""
        states = []
        for i in range(self.num_heads):
            x = hidden
            for k in range(i * self.layers, (i + 1) * self.layers):
                x = x + F.silu(F.linear(x, self.weights[k], self.biases[k]))
            states.append(x)
        if self.outs is None:  # one pass of the shared LM head for every head: its weights read once
            return lm_head(torch.cat(states)).argmax(dim=-1).view(self.num_heads, -1).T
        return torch.stack([F.linear(x, out).argmax(dim=-1) for x, out in zip(states, self.outs)], dim=1)


def check_medusa(args, ranks: int, heads: int | None = None) -> None:
    """Refuse what Medusa heads do not run with (`args`: the EngineArgs); with `heads`, a
    --speculate larger than the speculator has heads."""
    if ranks > 1:
        raise ValueError("Medusa heads run with one rank: tensor parallelism (num_shard) is not supported with them")
    if args.speculative_model:
        raise ValueError("a Medusa speculator and a draft model (speculative_model) would both propose: choose one")
    if heads is not None and args.speculate > heads:
        raise ValueError(f"speculate is {args.speculate} but this Medusa speculator has {heads} heads: "
                         f"at most {heads}")
