"""Which model class serves which `architectures` entry of a config."""
from __future__ import annotations

from torch import nn

from server.config import ModelConfig
from server.models.llama import LlamaForCausalLM
from server.models.mixtral import MixtralForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}") from None
