"""What the HTTP layer is configured with: TGI's router limits, resolved once at start."""
from __future__ import annotations

from dataclasses import dataclass

from server.version import __version__


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    disable_grammar_support: bool = False
    model_sha: str | None = None
    model_dtype: str = "float32"
    model_device_type: str = "cpu"
    max_logprobs: int = 20  # OpenAI's bound on `top_logprobs`
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    version: str = __version__
    lora_adapters: tuple[str, ...] = ()  # the LoRA adapters' names, as requests choose them
