"""A TGI-compatible LLM inference server in Python; `LLM` and `SamplingParams` for libraries."""
from server.config import EngineArgs
from server.engine.async_engine import AsyncEngine
from server.llm import LLM
from server.outputs import CompletionOutput, RequestOutput
from server.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs",
           "AsyncEngine"]
