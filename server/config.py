"""Configuration dataclasses, created once (by `LLM(...)` or the CLI) and passed down."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantConfig:
    """How the linear layers of the decoder hold their weights (resolved from `--quantize` and
    the checkpoint's `quantization_config`; the embedding and LM head stay in the model dtype)."""

    method: str  # "fp8" (e4m3, per-channel scales), "awq" or "gptq" (4-bit)
    group_size: int = 128  # 4-bit: inputs sharing a scale and zero point (-1: all of them)
    desc_act: bool = False  # GPTQ's act-order: g_idx spreads each group over the inputs
    zero_offset: int = 0  # added to stored zero points (1 for the original GPTQ format)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts read from a checkpoint's config.json (or GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    num_experts: int = 0  # mixture of experts (Mixtral): experts per layer, 0 for a dense MLP
    num_experts_per_tok: int = 0
    quantization: QuantConfig | None = None  # None: every weight in the model dtype

    @classmethod
    def from_hf(cls, hf: dict, generation: dict | None = None) -> "ModelConfig":
        generation = generation or {}
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        eos = generation.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = hf.get("sliding_window")
        if hf.get("use_sliding_window") is False:
            window = None
        return cls(
            architecture=(hf.get("architectures") or ["LlamaForCausalLM"])[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=hf.get("rope_scaling"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=window,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=generation.get("bos_token_id", hf.get("bos_token_id")),
            eos_token_ids=eos_ids,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            num_experts=hf.get("num_local_experts", 0),
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: `num_blocks` blocks of `block_size` token slots per layer."""

    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True

    @property
    def max_total_tokens(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one engine step (TGI's names)."""

    max_batch_prefill_tokens: int = 4096
    max_num_seqs: int = 256
    max_model_len: int = 4096
    # TGI's rule for adding prompts to a batch that is decoding (scheduler.py); 0: whenever room
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    dtype: str = "float32"
    device: str = "cpu"
    model_id: str = ""


@dataclass
class EngineArgs:
    """What a user can set, by `LLM(...)` or the CLI; resolved into an `EngineConfig`."""

    model: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    max_batch_total_tokens: int | None = None
    max_batch_prefill_tokens: int = 4096
    max_num_seqs: int = 256
    max_model_len: int | None = None
    waiting_served_ratio: float = 0.0  # TGI's: see SchedulerConfig
    max_waiting_tokens: int = 20
    block_size: int | None = None  # KV tokens per block: 16, or 256 with flash-attn (whose paged kernels need it)
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = 2 << 30
    cuda_memory_fraction: float = 1.0  # share of the GPU's memory this process may use
    quantize: str | None = None  # TGI's --quantize: fp8, awq, gptq, compressed-tensors (None: as stored)
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" (e4m3, half the bytes)
    attention_backend: str = "auto"  # triton on CUDA, torch on the CPU
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: bool = True  # queue each step before the previous one is read back
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shapes (benchmarks)
    lora_adapters: dict[str, str] | None = None  # name -> local directory, hub id or id@revision (PEFT's format)
    max_lora_rank: int = 64  # adapters of a larger rank are refused at start
    speculate: int = 0  # tokens proposed a step by n-gram lookup and checked in one pass (0: off)
    speculate_ngram_max: int = 3  # the longest n-gram looked up
    speculate_ngram_min: int = 1  # the shortest
    speculative_model: str | None = None  # a draft model proposes instead (hub id or directory, same tokenizer)
    speculate_max_batch_size: int = 32  # no speculation with more sequences running (engine/speculation.py)
    # Steps whose sequences compute at most this many tokens each (short prompt chunks mixed into
    # decoding) replay the decode graphs a row a token, where their tokens fit the largest graph
    max_graph_query_len: int = 1
