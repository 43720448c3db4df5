"""Mixtral: the Mistral architecture with a sparse mixture of experts in place of the MLP."""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from server.config import ModelConfig
from server.layers.moe import QuantizedSparseMoE, SparseMoE
from server.models.llama import LlamaForCausalLM

_EXPERT = re.compile(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


class MixtralForCausalLM(LlamaForCausalLM):
    # A quantized model's experts are linear layers: w1 and w3 are the pieces of w13.
    merged_pieces = {**LlamaForCausalLM.merged_pieces, "w1": ("w13", 0), "w3": ("w13", 1)}

    @staticmethod
    def make_mlp(config: ModelConfig) -> nn.Module:
        if config.quantization is not None:
            return QuantizedSparseMoE(config.hidden_size, config.intermediate_size, config.num_experts,
                                      config.num_experts_per_tok, config.quantization)
        return SparseMoE(config.hidden_size, config.intermediate_size, config.num_experts,
                         config.num_experts_per_tok)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Hugging Face names (`block_sparse_moe.gate`, `block_sparse_moe.experts.N.w1/w2/w3`);
        the expert matrices go into each layer's stacked expert weights, or, quantized, into
        each expert's linear layers (the router stays in the model's dtype)."""
        if self.config.quantization is not None:
            super().load_weights((name.replace("block_sparse_moe.gate.weight", "mlp.gate")
                                  .replace("block_sparse_moe.experts", "mlp.experts"), loaded)
                                 for name, loaded in weights)
            return
        expert_params = {f"layers.{i}.mlp.{name}" for i in range(len(self.layers)) for name in ("w13", "w2")}
        seen: set[str] = set()

        def the_rest():
            for name, loaded in weights:
                match = _EXPERT.search(name)
                if match:
                    layer, expert, which = int(match[1]), int(match[2]), match[3]
                    self.layers[layer].mlp.load_expert(expert, which, loaded)
                    seen.add(f"layers.{layer}.mlp.{'w2' if which == 'w2' else 'w13'}")
                    continue
                yield name.replace("block_sparse_moe.gate.weight", "mlp.gate"), loaded

        super().load_weights(the_rest(), already_loaded=expert_params)
        if seen != expert_params:
            raise ValueError(f"expert weights missing from the checkpoint: {sorted(expert_params - seen)[:3]}")
