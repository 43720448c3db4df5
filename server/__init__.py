"""A TGI-compatible LLM inference server in Python; `LLM` and `SamplingParams` for libraries.

The names below are imported on first use, so that `python -m server --help` and a lone
kernel (`server.kernels.norm`) do not pay for torch, transformers and the engine up front."""
from __future__ import annotations

import importlib

from server.version import __version__

_EXPORTS = {
    "LLM": "server.llm",
    "SamplingParams": "server.sampling_params",
    "LoRARequest": "server.sampling_params",
    "RequestOutput": "server.outputs",
    "CompletionOutput": "server.outputs",
    "EngineArgs": "server.config",
    "AsyncEngine": "server.engine.async_engine",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
