"""The Llama family: Llama 2/3, SmolLM2 and Mistral (sliding-window attention)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from server.config import ModelConfig
from server.layers.attention import Attention, AttentionMetadata
from server.layers.embedding import Embedding, LMHead
from server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from server.layers.parallel import tensor_parallel
from server.layers.norm import RMSNorm
from server.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: str):
        super().__init__()
        tp = tensor_parallel()
        if config.num_heads % tp.size or (config.num_kv_heads % tp.size and tp.size % config.num_kv_heads):
            raise ValueError(f"{config.num_heads} attention heads and {config.num_kv_heads} KV heads "
                             f"cannot be split over {tp.size} ranks")
        # Each rank computes its share of the heads; with fewer KV heads than ranks, ranks share them.
        self.num_heads = config.num_heads // tp.size
        self.num_kv_heads = max(1, config.num_kv_heads // tp.size)
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_heads * self.head_dim, config.num_kv_heads * self.head_dim
        kv_parts = min(config.num_kv_heads, tp.size)
        quant = config.quantization
        # Their outputs go to the rotary kernel and to the norm, which read deferred sums.
        self.qkv_proj = MergedColumnParallelLinear(
            config.hidden_size, [(q_size, tp.size), (kv_size, kv_parts), (kv_size, kv_parts)], quant=quant,
            deferred=True)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, quant=quant, deferred=True)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              config.sliding_window, backend, rotary)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta, positions, hidden.dtype))  # rotary applied there

    def load(self, loaded, name: str) -> None:
        """The scales of an fp8 KV cache (`k_scale`, `v_scale`, or one `kv_scale` for both)."""
        if name not in ("k_scale", "v_scale", "kv_scale"):
            raise ValueError(f"unexpected tensor {name!r} in an attention layer")
        scale = float(loaded[...])
        if name != "v_scale":
            self.attn.k_scale = scale
        if name != "k_scale":
            self.attn.v_scale = scale


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        parts = tensor_parallel().size
        quant = config.quantization
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [(config.intermediate_size, parts)] * 2,
                                                       quant=quant, deferred=True)
        # silu(gate) * up is taken inside down_proj (in its decode kernel on CUDA); down_proj's
        # output goes to the next norm. Both read deferred sums.
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, quant=quant, gated=True,
                                           deferred=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: str, mlp: nn.Module):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, backend)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, piece index of a merged matrix)
    merged_pieces = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, attention_backend: str = "torch"):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                 config.rope_theta, config.rope_scaling)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, attention_backend, self.make_mlp(config))
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied)

    @staticmethod
    def make_mlp(config: ModelConfig) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """token_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        hidden, residual = self.embed_tokens(token_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [num_tokens, vocab]

    def load_weights(self, weights: Iterable[tuple[str, object]], already_loaded: set[str] = frozenset()) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the parameters, each rank taking
        its own slice; every parameter must be set (`already_loaded`: by a subclass). A weight
        may be any sliceable tensor. Then the layers turn what they read into what they run
        with (quantized layers repack their weights)."""
        params = dict(self.named_parameters())
        missing = set(params) - set(already_loaded)
        for name, loaded in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            try:
                missing.discard(self._load_one(name, loaded, params))
            except ValueError as error:
                raise ValueError(f"checkpoint tensor {name!r}: {error}") from error
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")
        self.finish_loading()

    def finish_loading(self) -> None:
        """Each layer turns the tensors it read into those it runs with, a module before its
        children (named_modules' order, walked lazily): a module may finish its children
        itself and remove them (server/layers/moe.py's fused experts)."""
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "finish_loading"):
                try:
                    module.finish_loading()
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from error

    def _load_one(self, name: str, loaded, params: dict) -> str:
        """Load one checkpoint tensor; -> the name of the parameter it set."""
        for checkpoint_name, (ours, index) in self.merged_pieces.items():
            if f".{checkpoint_name}." in name:
                target = name.replace(checkpoint_name, ours)
                module_name, tensor = target.rsplit(".", 1)
                self.get_submodule(module_name).load_piece(index, loaded, tensor)
                return target
        module_name, tensor = name.rsplit(".", 1)
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError("unexpected weight in the checkpoint") from None
        if hasattr(module, "load"):
            module.load(loaded, tensor)
        elif name in params:  # replicated on every rank (norms)
            params[name].data.copy_(loaded[:])
        else:
            raise ValueError("unexpected weight in the checkpoint")
        return name
