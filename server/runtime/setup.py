"""Starting a model runner: what every tensor-parallel rank does at start, in the same order
(their collectives must match): choose device, dtype and quantization, build and load the
model shard, size the KV cache (the smallest that fits on every rank), allocate it, capture
graphs."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from server.config import CacheConfig, EngineArgs, ModelConfig
from server.layers.attention import default_block_size
from server.layers.parallel import TensorParallel, set_tensor_parallel
from server.models.loader import ModelSource, load_config, load_generation_config, resolve_model
from server.models.lora import read_adapter
from server.models.medusa import MedusaHeads, check_medusa, medusa_speculator
from server.models.quantization import resolve_quantization
from server.runtime.model_runner import ModelRunner

_KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3fn": "fp8"}  # TGI's name for e4m3, and ours
_DTYPE_NAMES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16", "fp16": "float16"}


DRAFT_WITHOUT_TENSOR_PARALLELISM = ("a draft model (speculative_model) runs whole on one device: it cannot be "
                                    "combined with tensor parallelism yet")


@dataclass
class StartedRunner:
    runner: ModelRunner
    model: ModelConfig
    source: ModelSource
    cache: CacheConfig
    max_model_len: int
    device: str
    dtype: str
    lora_adapters: list[str]  # the adapters' names, in slot order
    draft: "StartedDraft | None" = None  # speculative decoding's draft model, on rank 0
    speculate: int = 0  # tokens proposed a step (--speculate, or a Medusa speculator's heads)
    medusa: bool = False  # proposals from Medusa heads


@dataclass
class StartedDraft:
    runner: ModelRunner
    source: ModelSource
    max_model_len: int  # its context, at most the model's


def device_and_dtype(args: EngineArgs, model: ModelConfig, rank: int) -> tuple[str, str]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    if device == "cuda" and args.tensor_parallel_size > 1:
        device = f"cuda:{local_device_index(rank)}"
    if args.dtype == "auto":
        native = _DTYPE_NAMES.get(str(model.torch_dtype), "bfloat16")
        dtype = "float32" if device == "cpu" else ("bfloat16" if native == "float32" else native)
    elif args.dtype in _DTYPE_NAMES:
        dtype = _DTYPE_NAMES[args.dtype]
    else:
        raise ValueError(f"dtype {args.dtype!r} is not supported: auto, float32, float16, bfloat16")
    return device, dtype


def kv_cache_dtype(name: str) -> str:
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported: auto (the model dtype), fp8 or fp8_e4m3fn "
                         "(e4m3 with a scale per layer)")
    return _KV_CACHE_DTYPES[name]


def check_fp8(device: str, what: str) -> None:
    """fp8 matmuls and conversions need compute capability 8.9 (Ada, Hopper and newer)."""
    if device.startswith("cuda"):
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"{what} needs a GPU with fp8 (compute capability 8.9 or newer); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def launched_rank() -> int | None:
    """This process's rank when torchrun (or any torch.distributed launcher) started the
    ranks, as for several machines; None when the server starts its own."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def local_device_index(rank: int) -> int:
    return int(os.environ.get("LOCAL_RANK", rank))


def join_group(args: EngineArgs, rank: int, port: int) -> TensorParallel:
    """Join the ranks' process group (NCCL on GPUs, gloo on CPUs) and a gloo group for the
    step messages that rank 0 sends; with one rank, nothing to join. Ranks started by a
    launcher meet through its rendezvous (MASTER_ADDR, MASTER_PORT)."""
    size = args.tensor_parallel_size
    if size == 1:
        return TensorParallel()
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_device_index(rank))
    launched = launched_rank() is not None
    init = "env://" if launched else f"tcp://127.0.0.1:{port}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init,
                            rank=rank, world_size=size, timeout=timedelta(seconds=120))
    control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return TensorParallel(rank, size, dist.group.WORLD, control)


def leave_group() -> None:
    dist.destroy_process_group()
    set_tensor_parallel(TensorParallel())


def start_runner(args: EngineArgs, rank: int = 0, port: int = 0) -> StartedRunner:
    tp = join_group(args, rank, port)
    set_tensor_parallel(tp)
    if args.load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format {args.load_format!r} is not supported: auto, dummy")
    if args.speculative_model and tp.size > 1:  # ranks that torchrun started
        raise ValueError(DRAFT_WITHOUT_TENSOR_PARALLELISM)
    dummy = args.load_format == "dummy"
    medusa = medusa_speculator(args.model, args.revision, args.download_dir)
    if medusa is not None:  # TGI's way: the speculator names its base model, which is loaded
        check_medusa(args, tp.size)
        source, model = read_model(medusa[1]["base_model_name_or_path"], None, args, args.quantize)
    else:
        source, model = read_model(args.model, args.revision, args, args.quantize)
    device, dtype = device_and_dtype(args, model, rank)
    kv_dtype = kv_cache_dtype(args.kv_cache_dtype)
    if model.quantization is not None and model.quantization.method == "fp8":
        check_fp8(device, "fp8 quantization")
    if kv_dtype == "fp8":
        check_fp8(device, "an fp8 KV cache")
    runner = ModelRunner(model, None if dummy else source, device, dtype, args.attention_backend, tp, kv_dtype,
                         args.block_size)
    # Before the KV cache is sized: the draft's weights come out of the memory it gets.
    draft = None
    if args.speculative_model:
        draft_source, draft_model = read_model(args.speculative_model, None, args, None)
        draft = ModelRunner(draft_model, None if dummy else draft_source, device, dtype, args.attention_backend,
                            block_size=args.block_size)
    # Before the KV cache is sized: the adapters' slots come out of the memory it gets.
    adapters = [read_adapter(name, where, args.download_dir, args.max_lora_rank)
                for name, where in (args.lora_adapters or {}).items()]
    runner.attach_lora(adapters)
    speculate = args.speculate
    if medusa is not None:  # before the KV cache is sized: the heads' weights come out of its memory
        runner.medusa = MedusaHeads.load(*medusa, runner.dtype, runner.device)
        check_medusa(args, tp.size, runner.medusa.num_heads)
        speculate = args.speculate or runner.medusa.num_heads
        runner.medusa_max_rows = args.speculate_max_batch_size * (speculate + 1)
    block_size = args.block_size or default_block_size(runner.attention_backend)
    model_len = min(args.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
    kv_tokens = args.max_batch_total_tokens or runner.kv_tokens_that_fit(
        args.cpu_kv_cache_bytes, args.max_batch_prefill_tokens, args.cuda_memory_fraction,
        model_len, block_size)
    if draft is not None and not args.max_batch_total_tokens:
        # The draft's cache holds as many tokens as the model's, out of the same memory.
        target_bytes = runner.kv_bytes_per_token()
        kv_tokens = kv_tokens * target_bytes // (target_bytes + draft.kv_bytes_per_token())
    if tp.size > 1:  # the cache must fit on the rank with the least room
        smallest = torch.tensor([kv_tokens], dtype=torch.int64)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=tp.control)
        kv_tokens = int(smallest)
    num_blocks = -(-kv_tokens // block_size)
    if num_blocks < 2:
        raise ValueError(f"no room for a KV cache: {kv_tokens} tokens fit in the memory left")
    max_model_len = min(model_len, num_blocks * block_size)
    cache = CacheConfig(block_size, num_blocks, args.enable_prefix_caching)
    runner.allocate_kv_cache(cache)
    if not args.enforce_eager:
        runner.capture_decode_graphs(args.max_num_seqs, max_model_len, max(speculate + 1, args.max_graph_query_len))
    runner.warm_up(args.max_num_seqs)
    started = StartedRunner(runner, model, source, cache, max_model_len, device, dtype, [a.name for a in adapters],
                            speculate=speculate, medusa=medusa is not None)
    if draft is not None:
        draft.allocate_kv_cache(replace(cache, enable_prefix_caching=False))
        draft_len = min(draft.model_config.max_position_embeddings, max_model_len)
        max_drafting = max(1, min(args.max_num_seqs, args.speculate_max_batch_size))  # larger batches never draft
        if not args.enforce_eager:
            draft.capture_decode_graphs(max_drafting, draft_len)
        draft.warm_up(max_drafting)
        started.draft = StartedDraft(draft, draft_source, draft_len)
    return started


def read_model(name: str | None, revision: str | None, args: EngineArgs,
               quantize: str | None) -> tuple[ModelSource, ModelConfig]:
    """Where a model is (downloaded unless its weights are drawn at random) and its config."""
    dummy = args.load_format == "dummy"
    source = resolve_model(name, revision, args.download_dir, weights=not dummy)
    hf_config = load_config(source)
    quantization = resolve_quantization(hf_config, quantize)
    return source, replace(ModelConfig.from_hf(hf_config, load_generation_config(source)), quantization=quantization)
