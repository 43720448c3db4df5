"""The library API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from typing import Sequence as Seq

from tqdm import tqdm

from server.config import EngineArgs
from server.engine.llm_engine import LLMEngine
from server.outputs import RequestOutput
from server.models.lora import parse_lora_adapters
from server.sampling_params import LoRARequest, SamplingParams

Prompt = str | list[int]
Conversation = list[dict]


def speculative_settings(config: dict | None) -> dict:
    """vLLM's `speculative_config` as EngineArgs' fields: method "ngram" (the default without a
    "model") or "draft_model" (the default with one)."""
    if not config:
        return {}
    config = dict(config)
    model = config.pop("model", None)
    method = config.pop("method", "draft_model" if model else "ngram")
    if method not in ("ngram", "draft_model"):
        raise ValueError(f"speculative method {method!r} is not supported: ngram (prompt lookup), draft_model")
    if (method == "draft_model") != bool(model):
        raise ValueError("speculative_config's \"model\" names the draft model of method draft_model, and only it")
    settings = {"speculate": int(config.pop("num_speculative_tokens", 0)), "speculative_model": model,
                "speculate_max_batch_size": int(config.pop("disable_by_batch_size", 32))}
    if method == "ngram":
        settings.update(speculate_ngram_max=int(config.pop("prompt_lookup_max", 3)),
                        speculate_ngram_min=int(config.pop("prompt_lookup_min", 1)))
    if config:
        raise ValueError(f"speculative_config keys {sorted(config)} are not supported with method {method}")
    if settings["speculate"] < 0 or settings["speculate_max_batch_size"] < 0 \
            or not 1 <= settings.get("speculate_ngram_min", 1) <= settings.get("speculate_ngram_max", 1):
        raise ValueError(f"speculative_config {settings} is out of range")
    return settings


class LLM:
    """An offline engine. `model=None` serves the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 tensor_parallel_size: int = 1, max_batch_total_tokens: int | None = None,
                 block_size: int | None = None, enable_prefix_caching: bool = True,
                 max_batch_prefill_tokens: int = 4096, max_num_seqs: int = 256,
                 max_model_len: int | None = None, revision: str | None = None,
                 download_dir: str | None = None, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", async_scheduling: bool = True,
                 lora_adapters: dict[str, str] | str | None = None, max_lora_rank: int = 64,
                 speculative_config: dict | None = None, waiting_served_ratio: float = 0.0,
                 max_waiting_tokens: int = 20, max_graph_query_len: int = 1, load_format: str = "auto"):
        """`quantization`: TGI's --quantize (fp8, awq, gptq, compressed-tensors; None: as the
        checkpoint's quantization_config says); `kv_cache_dtype`: "auto" or "fp8";
        `async_scheduling`: queue each step on the device before reading the last one back;
        `lora_adapters`: LoRA adapters in PEFT's format, {name: directory or hub id[@revision]}
        or TGI's `--lora-adapters` text, each then chosen per request with a `LoRARequest`;
        `speculative_config`: vLLM's shape, {"method": "ngram", "num_speculative_tokens": N,
        "prompt_lookup_max": 3, "prompt_lookup_min": 1} (n-gram prompt lookup) or {"method":
        "draft_model", "model": hub id or directory, "num_speculative_tokens": N} (a draft model
        of the same tokenizer), either with "disable_by_batch_size" (32: no speculation with
        more sequences running); `waiting_served_ratio`, `max_waiting_tokens`: TGI's rule for
        adding prompts to a batch that is decoding (the server's flags of those names);
        `max_graph_query_len`: steps of at most this many tokens a sequence replay the decode
        graphs (the server's --max-graph-query-len); `load_format`: "auto", or "dummy" (random
        weights of the checkpoint's shapes, for benchmarks: only its config and tokenizer are read)."""
        speculation = speculative_settings(speculative_config)
        if isinstance(lora_adapters, str):
            lora_adapters = parse_lora_adapters(lora_adapters)
        self.engine = LLMEngine(EngineArgs(
            model=model, revision=revision, download_dir=download_dir, dtype=dtype,
            device=device, tensor_parallel_size=tensor_parallel_size,
            max_batch_total_tokens=max_batch_total_tokens, max_batch_prefill_tokens=max_batch_prefill_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, quantize=quantization, kv_cache_dtype=kv_cache_dtype,
            async_scheduling=async_scheduling, lora_adapters=lora_adapters, max_lora_rank=max_lora_rank,
            waiting_served_ratio=waiting_served_ratio, max_waiting_tokens=max_waiting_tokens,
            max_graph_query_len=max_graph_query_len, load_format=load_format, **speculation))
        self.engine.stream_outputs = False  # generate() returns finished requests only

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order.
        `lora_request`: the adapter of every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        return self._run(prompts, self._params_for(sampling_params, len(prompts)), use_tqdm,
                         self._loras_for(lora_request, len(prompts)))

    def chat(self, messages: Conversation | Seq[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, tools: list[dict] | None = None,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations or any(not c for c in conversations):
            raise ValueError("no messages given")
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(c, tools=tools) for c in conversations]
        texts = [tokenizer.render_chat(c, tools=tools) for c in conversations]
        outputs = self._run(prompts, self._params_for(sampling_params, len(prompts)), use_tqdm,
                            self._loras_for(lora_request, len(prompts)))
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    @staticmethod
    def _params_for(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling params for {count} prompts")
        return params

    @staticmethod
    def _loras_for(lora, count: int) -> list[LoRARequest | None]:
        if lora is None or isinstance(lora, LoRARequest):
            return [lora] * count
        lora = list(lora)
        if len(lora) != count:
            raise ValueError(f"{len(lora)} LoRA requests for {count} prompts")
        return lora

    def _run(self, prompts: list[Prompt], params: list[SamplingParams],
             use_tqdm: bool, loras: list[LoRARequest | None]) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(engine.add_request(prompt, p, lora_request=lora))
        except Exception:
            for request_id in ids:  # a bad prompt leaves nothing queued behind it
                engine.abort(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
                while len(finals) < len(ids):
                    if not engine.has_work():
                        raise RuntimeError("requests are unfinished but nothing can be scheduled")
                    for output in engine.step():
                        if output.error:
                            raise RuntimeError(f"prompt {ids.index(output.request_id)} failed during "
                                               f"generation: {output.error}")
                        if output.finished:
                            finals[output.request_id] = output
                            bar.update(1)
        finally:
            for request_id in ids:
                if request_id not in finals:
                    engine.abort(request_id)
        return [finals[i] for i in ids]
