"""The executor: one step's sequence chunks -> tensors -> model -> sampled tokens.

It owns the model and its paged KV cache, and knows nothing of requests: the engine hands it
`SequenceChunk`s (plain token ids, positions and block tables) and gets `ChunkResult`s back.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from server.kernels.quant_reference import FP8
from server.config import CacheConfig, ModelConfig
from server.layers.attention import Attention, AttentionMetadata, resolve_backend
from server.layers.int4_linear import clear_deferred_sums
from server.layers.lora import LoRABank
from server.layers.parallel import TensorParallel
from server.models.loader import ModelSource, fill_random_weights, iter_weights
from server.models.lora import LoRAAdapter, attach_adapters
from server.models.registry import model_class
from server.runtime.cuda_graphs import DecodeGraphs, decode_rows, graph_sizes
from server.runtime.sampler import (AllowedTokens, DeviceSample, SampledToken, SamplingOptions,
                                   prompt_logprobs, sample_on_device, sampled_tokens, to_host)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on the CPU from numpy's calloc'd pages, which the OS zeroes when first
    touched: the default 2 GiB CPU cache is free until used, not seconds of memset at start."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


SHORT_CONTEXT = 512  # tokens: the longest context a step may have to take SHORT_SPLITS
SHORT_SPLITS = 8


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_context: int | None = None) -> int:
    """Context splits of the decode kernel: enough programs for about two per SM (at most 32
    splits); a function of the batch shape, so that graphs can be captured, and of whether
    every context is at most SHORT_CONTEXT tokens (`max_context`; None: any), then at most
    SHORT_SPLITS. A split's range is whole 64-key tiles, so that over 512 tokens or fewer 32
    splits leave all but 8 without keys, each still launched, storing an empty result and
    merged. Both limits come from 4-bit one-sequence decode of a Mistral-7B-shaped model on one
    H100 (engines in one process, runs alternated) at several split counts and contexts;
    docs/kernels.md has the sweep."""
    splits = max(1, min(32, -(-2 * num_sms // (num_seqs * num_kv_heads))))
    if max_context is not None and max_context <= SHORT_CONTEXT:
        splits = min(splits, SHORT_SPLITS)
    return splits


@dataclass
class SequenceChunk:
    """`token_ids` of one sequence at positions `start_pos`.., to compute this step."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sampling: SamplingOptions | None = None  # set when the chunk ends the sequence: sample
    prompt_targets: list[int] = field(default_factory=list)  # next prompt tokens to score
    prompt_top_n: int = 0
    # >= 0: the last token id is not known yet; it is what the previous step sampled in this row
    # (read on the device, so that this step can be queued before that one is read back).
    pending_row: int = -1
    lora_slot: int = -1  # the LoRA adapter slot its tokens use (-1: the base model)
    # Speculation: the chunk ends in k proposed tokens, and its last k + 1 tokens each sample
    # the token after them: these rows' settings, the last row's being `sampling`.
    draft_sampling: list[SamplingOptions] = field(default_factory=list)


@dataclass
class ChunkResult:
    sampled: SampledToken | None
    prompt_logprobs: list[dict[int, float]]
    draft_samples: list[SampledToken] = field(default_factory=list)  # the rows before the last, in order
    medusa: list[list[int]] = field(default_factory=list)  # each sampled row's Medusa heads' picks, in order


GRAPH_RESERVE_BYTES = 512 << 20  # what captured graphs and the allocator's slack may take
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    """With tensor parallelism, every rank has a runner over its shard; rank 0's (the driver)
    sends each step's chunks to the others before running it, and alone samples. Without a
    `source` the weights are random (benchmarks)."""

    def __init__(self, model_config: ModelConfig, source: ModelSource | None, device: str,
                 dtype: str, attention_backend: str = "auto", tp: TensorParallel = TensorParallel(),
                 kv_cache_dtype: str = "auto", block_size: int | None = None):
        self.model_config = model_config
        self.tp = tp
        self.num_kv_heads = max(1, model_config.num_kv_heads // tp.size)  # on this rank
        self.sends_steps = False  # the driver, once the other ranks wait for steps
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.kv_dtype = FP8 if kv_cache_dtype == "fp8" else self.dtype
        self.block_size = 0  # set with the KV cache
        self.graphs: DecodeGraphs | None = None
        self.lora_graphs: DecodeGraphs | None = None  # the same, with LoRA adapters' updates
        self.medusa = None  # Medusa heads (server/models/medusa.py): proposals from each sampled row
        self.medusa_max_rows = 0  # of a step whose rows the heads read
        self.lora_bank = LoRABank()  # which rows of a step use which adapter (the model's LoRA layers read it)
        self.has_lora = False
        self.lora_kernels = self.device.type == "cuda"  # each step's adapters' updates through the Triton kernels
        self._driver_picks: torch.Tensor | None = None  # ranks but 0: the last step's picks
        self._staging = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        attention_backend = resolve_backend(attention_backend, self.device, block_size, kv_cache_dtype == "fp8")
        self.attention_backend = attention_backend
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 4
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(model_config)(model_config, attention_backend)
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():
            if source is None:  # random weights (benchmarks)
                fill_random_weights(self.model, seed=tp.rank)
            else:
                self.model.load_weights(iter_weights(source))
        self.model.eval()

    def kv_bytes_per_token(self) -> int:
        m = self.model_config
        return 2 * m.num_layers * self.num_kv_heads * m.head_dim * self.kv_dtype.itemsize

    def kv_tokens_that_fit(self, cpu_budget_bytes: int, max_batch_prefill_tokens: int,
                           memory_fraction: float, max_model_len: int, block_size: int) -> int:
        """KV capacity, in tokens, of the memory left once the weights are loaded (TGI's warmup).

        On CUDA a forward pass at the prefill budget is run to measure the activations' peak;
        the KV cache then gets 95% of what is left under `memory_fraction`. On the CPU: the
        given budget.
        """
        if self.device.type != "cuda":
            return cpu_budget_bytes // self.kv_bytes_per_token()
        self.activation_bytes = self.profile_activation_bytes(max_batch_prefill_tokens, max_model_len, block_size)
        free, total = torch.cuda.mem_get_info(self.device)
        usable = free - (1 - memory_fraction) * total - self.activation_bytes - GRAPH_RESERVE_BYTES
        return int(0.95 * max(0, usable)) // self.kv_bytes_per_token()

    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int, max_model_len: int, block_size: int) -> int:
        """Peak memory of one prefill step of `num_tokens` tokens (and their sampling), measured."""
        seq_len = min(num_tokens, max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        per_seq = -(-seq_len // block_size)
        self.allocate_kv_cache(CacheConfig(block_size, num_seqs * per_seq))
        chunks, left = [], num_tokens
        for i in range(num_seqs):
            length = min(seq_len, left)
            left -= length
            chunks.append(SequenceChunk([0] * length, 0, list(range(i * per_seq, (i + 1) * per_seq)),
                                        sampling=SamplingOptions(temperature=1.0, top_p=0.9, top_k=50)))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute(chunks)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.free_kv_cache()
        return peak

    def allocate_kv_cache(self, cache: CacheConfig) -> None:
        self.block_size, self.num_blocks = cache.block_size, cache.num_blocks
        m = self.model_config
        shape = (cache.num_blocks, cache.block_size, self.num_kv_heads, m.head_dim)
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.k_cache = zeroed(shape, self.kv_dtype, self.device)
                module.v_cache = zeroed(shape, self.kv_dtype, self.device)

    def free_kv_cache(self) -> None:
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.k_cache = module.v_cache = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def capture_decode_graphs(self, max_batch_size: int, max_model_len: int, max_query_len: int = 1) -> None:
        """Capture decode steps for batch sizes up to `max_batch_size` (CUDA, triton or flash_attn),
        which steps of up to `max_query_len` tokens a sequence (speculation's checks) replay too,
        a row a token (cuda_graphs.decode_rows), where they have no more rows."""
        if self.device.type != "cuda" or self.attention_backend == "torch":
            return
        if any(getattr(module, "graph_safe", True) is False for module in self.model.modules()):
            return  # a layer reads the step's values on the host (quantized experts): eager steps
        sizes = graph_sizes(max_batch_size)
        max_blocks = -(-max_model_len // self.block_size)
        kv_heads, sms = self.num_kv_heads, self.num_sms  # the graphs keep no reference to the runner

        def splits(size: int, context: int | None) -> int:
            return decode_splits(size, kv_heads, sms, context)

        self.graphs = DecodeGraphs(self.model, sizes, max_blocks, splits, self.device, max_query_len=max_query_len)
        if self.has_lora:
            self.lora_graphs = DecodeGraphs(self.model, sizes, max_blocks, splits, self.device, self.lora_bank,
                                            max_query_len)

    @torch.inference_mode()
    def warm_up(self, max_num_seqs: int = 1) -> None:
        """Compile, before the first request, the kernel variants that the graph capture and the
        activation profile leave out. Triton compiles a kernel anew for each specialization of
        its integer arguments (equal to 1, divisible by 16): prefill attention takes the block
        tables' width as a stride (one block, a multiple of 16 blocks, any other width) and
        16-row tiles for chunks of up to 32 tokens. Mixed steps (one-token sequences beside a
        prompt chunk, run without graphs) take an indexed variant of each attention kernel,
        the decode kernel's varying with the number of one-token sequences (its tiles, and
        whether it splits contexts). Each compile takes the better part of a second, which the
        first request of its kind would wait for: the 256-request workload's first run on a
        fresh H100 took 22.3 s where the next took 15.9, before mixed steps were warmed up
        here. Every rank runs this, in lockstep, as it runs the profile; the cache's blocks
        are written with nothing that outlives it."""
        if self.device.type == "cuda" and self.attention_backend == "triton":
            for chunks in self.warm_up_steps(max_num_seqs):
                self.execute(chunks)

    def warm_up_steps(self, max_num_seqs: int = 1) -> list[list[SequenceChunk]]:
        """One prefill for each block-table width (1, 3 and 16 blocks) and tile height; then at
        each width, beside such a prefill, one-token sequences in each number that picks
        another variant of the decode kernel (up to `max_num_seqs` sequences in all), so that
        each width meets each variant and the prefill's tile heights."""
        steps = []
        counts = self._decode_variant_counts(max_num_seqs - 1)
        for width in (1, 3, 16):
            table = [block % self.num_blocks for block in range(width)]
            lengths = sorted({min(8, width * self.block_size), min(40, width * self.block_size)})
            for length in lengths:
                steps.append([SequenceChunk([0] * length, 0, table, sampling=SamplingOptions())])
            context = width * self.block_size
            for i in range(max(len(counts), len(lengths)) if counts else 0):
                prompt = SequenceChunk([0] * lengths[i % len(lengths)], 0, table, sampling=SamplingOptions())
                singles = [SequenceChunk([0], context - 1, table, sampling=SamplingOptions())
                           for _ in range(counts[i % len(counts)])]
                steps.append([prompt, *singles])
        return steps

    def _decode_variant_counts(self, max_seqs: int) -> list[int]:
        """The smallest number of one-token sequences, up to `max_seqs`, that takes each variant
        of the decode kernel (server/kernels/decode_attention.py: kernel_choice)."""
        from server.kernels.decode_attention import kernel_choice

        m = self.model_config
        first: dict[tuple, int] = {}
        for count in range(1, max_seqs + 1):
            splits = self._num_splits(count)
            choice = kernel_choice(count, self.num_kv_heads, splits, m.head_dim, self.kv_dtype == FP8, self.device)
            first.setdefault((choice, splits == 1), count)
        return sorted(first.values())

    def _num_splits(self, num_seqs: int, max_context: int | None = None) -> int:
        return decode_splits(num_seqs, self.num_kv_heads, self.num_sms, max_context)

    def _pack(self, chunks: list[SequenceChunk]) -> "PackedStep":
        """The step's inputs in one int64 array (on the host): token ids, positions, slots,
        context lengths, query starts, the rows to sample, the pending tokens' places and
        rows, context starts, in a mixed step the chunks of one token and the others (empty
        otherwise), then the block tables padded to one width.

        The sequences that the decode kernel takes go to it longest context first: those of a
        decode step are packed in that order, a mixed step's one-token chunks are listed so.
        Its programs (one per sequence and KV head, dispatched in that order) then end about
        together, instead of a few long ones running on after the rest
        (server/kernels/decode_attention.py). The rows sampled keep the chunks' order, so results and
        pending rows are the engine's."""
        size = self.block_size
        token_ids, positions, slots, scored = [], [], [], []
        pending_at, pending_rows = [], []  # token index <- row of the previous step's picks
        order = range(len(chunks))
        if all(len(chunk.token_ids) == 1 for chunk in chunks):  # a decode step
            order = sorted(order, key=lambda i: -chunks[i].start_pos)
        last = [0] * len(chunks)  # each chunk's last token
        for index in order:
            chunk = chunks[index]
            start, ids, table = chunk.start_pos, chunk.token_ids, chunk.block_table
            if chunk.prompt_targets:
                scored.append((index, len(token_ids), len(chunk.prompt_targets)))
            token_ids += ids
            last[index] = len(token_ids) - 1
            if chunk.pending_row >= 0:
                pending_at.append(len(token_ids) - 1)
                pending_rows.append(chunk.pending_row)
            if len(ids) == 1:
                positions.append(start)
                slots.append(table[start // size] * size + start % size)
            else:
                span = range(start, start + len(ids))
                positions += span
                slots += [table[pos // size] * size + pos % size for pos in span]
        sample_rows = [last[i] - k for i, chunk in enumerate(chunks) if chunk.sampling is not None
                       for k in range(len(chunk.draft_sampling), -1, -1)]
        packed = [chunks[i] for i in order]
        width = max(len(c.block_table) for c in packed)
        query_lens = [len(c.token_ids) for c in packed]
        context_lens = [c.start_pos + n for c, n in zip(packed, query_lens)]
        cu_query_lens, cu_context_lens = [0], [0]
        for n, context in zip(query_lens, context_lens):
            cu_query_lens.append(cu_query_lens[-1] + n)
            cu_context_lens.append(cu_context_lens[-1] + context)
        multis = [i for i, n in enumerate(query_lens) if n > 1]
        singles = sorted((i for i, n in enumerate(query_lens) if n == 1), key=lambda i: -context_lens[i]) \
            if multis else []  # a decode step: none
        if not singles:  # not a mixed step
            multis = []
        lora_slots = [c.lora_slot for c in packed] if any(c.lora_slot >= 0 for c in packed) else []
        sections = (token_ids, positions, slots, context_lens, cu_query_lens, sample_rows, pending_at, pending_rows,
                    cu_context_lens, singles, multis, lora_slots)
        values = array("q")
        for section in sections:  # each section starts on 16 bytes (PackedStep.starts)
            values.extend(section)
            if len(section) % 2:
                values.append(0)
        padding = array("q", bytes(8 * width))
        for chunk in packed:  # block tables are arrays: copied as bytes, not int by int
            values.extend(chunk.block_table)
            values.extend(padding[:width - len(chunk.block_table)])
        return PackedStep(values, [len(x) for x in sections], len(chunks), width, scored, query_lens, context_lens)

    def _unpack(self, packed: "PackedStep", previous: "LaunchedStep | None" = None):
        """The step's inputs on the device, moved in one copy from a pinned staging buffer;
        token ids still pending are then taken from `previous`'s picks (on rank 0; the other
        ranks have the driver's last picks)."""
        device_values = self._to_device(packed.values)
        (ids_d, positions_d, slots_d, context_d, cu_query_d, sample_d, pending_at_d, pending_rows_d,
         cu_context_d, singles_d, multis_d, lora_slots_d) = packed.sections(device_values)
        tables = device_values[packed.starts()[-1]:].view(packed.num_chunks, packed.width)
        if self.attention_backend == "flash_attn":  # its kernels take int32 metadata
            tables, context_d, cu_query_d, cu_context_d = tables.int(), context_d.int(), cu_query_d.int(), \
                cu_context_d.int()
        if packed.lengths[6]:
            picks = self._driver_picks if self.tp.rank != 0 else \
                previous.picked.next_ids if previous is not None and previous.picked is not None else None
            if picks is None:
                raise ValueError("a chunk takes a token from a previous step that sampled nothing")
            ids_d[pending_at_d] = picks[pending_rows_d]
        query_lens, context_lens = packed.query_lens, packed.context_lens
        self._set_lora_rows(packed, lora_slots_d, cu_query_d)
        decode_only = all(n == 1 for n in query_lens)
        singles = packed.lengths[PackedStep.SINGLES]
        mixed = singles > 0  # sequences of one token beside longer ones
        # the sequences the decode kernel takes: all of a decode step, a mixed step's one-token ones
        decoding = singles if mixed else packed.num_chunks if decode_only else 0
        meta = AttentionMetadata(
            slot_mapping=slots_d, block_tables=tables, context_lens=context_d, cu_query_lens=cu_query_d,
            query_lens=query_lens, context_lens_list=context_lens, decode_only=decode_only,
            max_query_len=max(query_lens), cu_context_lens=cu_context_d, max_context_len=max(context_lens),
            num_splits=self._num_splits(decoding, max(context_lens)) if decoding else 1,
            single_seqs=singles_d if mixed else None, multi_seqs=multis_d if mixed else None)
        return ids_d, positions_d, meta, sample_d

    def attach_lora(self, adapters: list[LoRAAdapter]) -> None:
        """Put LoRA adapters in the model's slots (slot i: adapters[i]), this rank's share."""
        attach_adapters(self.model, adapters, self.lora_bank, self.dtype)
        self.has_lora = bool(adapters)

    def _set_lora_rows(self, packed: "PackedStep", chunk_slots: torch.Tensor, cu_query_lens: torch.Tensor) -> None:
        """Tell the model's LoRA layers which rows of this step use which adapter: on a GPU,
        each token's slot on the device (from each chunk's, with no host work)."""
        if not packed.lengths[PackedStep.LORA_SLOTS]:
            self.lora_bank.clear()
            return
        if self.lora_kernels:
            tokens = sum(packed.query_lens)
            self.lora_bank.use_rows(chunk_slots if tokens == packed.num_chunks else torch.repeat_interleave(
                chunk_slots, cu_query_lens.diff().long(), output_size=tokens))
            return
        values = packed.values if isinstance(packed.values, torch.Tensor) else torch.frombuffer(
            packed.values, dtype=torch.int64)
        slots = packed.sections(values)[PackedStep.LORA_SLOTS].tolist()
        starts = [0]
        for n in packed.query_lens:
            starts.append(starts[-1] + n)
        self.lora_bank.set([(slot, starts[i], packed.query_lens[i]) for i, slot in enumerate(slots) if slot >= 0],
                           self.device)

    def _to_device(self, values: array | torch.Tensor) -> torch.Tensor:
        host = values if isinstance(values, torch.Tensor) else \
            torch.frombuffer(values, dtype=torch.int64)  # much faster than torch.tensor(list)
        if self.device.type != "cuda":
            return host
        # Two staging buffers in turn: with one step queued ahead of the last one read back, a
        # buffer is refilled only once the step that read it was collected.
        self._staging.reverse()
        if self._staging[0].numel() < host.numel():
            self._staging[0] = torch.empty(max(host.numel(), 2 * self._staging[0].numel()), dtype=torch.int64,
                                           pin_memory=True)
        stage = self._staging[0][:host.numel()]
        stage.copy_(host)
        return stage.to(self.device, non_blocking=True)

    def _run(self, packed: "PackedStep", previous: "LaunchedStep | None") -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [num_tokens, hidden] and the rows to sample from."""
        token_ids, positions, meta, sample_rows = self._unpack(packed, previous)
        # A step with adapters' rows replays the graphs captured with their updates.
        graphs = self.lora_graphs if self.lora_bank.active else self.graphs
        if graphs is not None and token_ids.shape[0] <= graphs.max_size and meta.max_query_len <= graphs.max_query_len:
            tables, contexts = meta.block_tables, meta.context_lens
            if not meta.decode_only:  # speculation's checks: a decode row a token
                seq, contexts = decode_rows(meta.cu_query_lens, contexts, token_ids.shape[0])
                tables = tables[seq]
            hidden = graphs.run(token_ids, positions, meta.slot_mapping, tables, contexts, meta.max_context_len,
                                self.lora_bank.row_slots if self.lora_bank.active else None)
        else:
            try:
                hidden = self.model(token_ids, positions, meta)
            except BaseException:  # e.g. out of memory: a product's deferred sums may be left unread
                clear_deferred_sums()
                raise
        return hidden, sample_rows

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk]) -> list[ChunkResult]:
        return self.collect(self.launch(chunks))

    def launch(self, chunks: list[SequenceChunk],
               allowed_tokens: Callable[[], AllowedTokens] | None = None) -> "LaunchedStep":
        """Queue one step's work on the device and return without waiting for it (on CUDA),
        so that the host can do other work while the GPU computes."""
        return self.sample(self.forward(chunks), allowed_tokens)

    @torch.inference_mode()
    def forward(self, chunks: list[SequenceChunk], previous: "LaunchedStep | None" = None) -> "ForwardStep":
        """Queue a step's forward pass. Chunks with a `pending_row` read their last token from
        `previous`'s picks on the device, so `previous` need not have been collected; their
        sampling options may still change until `sample`."""
        packed = self._pack(chunks)
        if self.sends_steps:
            self._send(packed)
        return self._forward_packed(packed, previous, chunks)

    def _forward_packed(self, packed: "PackedStep", previous: "LaunchedStep | None",
                        chunks: list[SequenceChunk] | None = None) -> "ForwardStep":
        """The forward pass of a packed step, and the collectives every rank joins after it;
        `chunks` (rank 0's) receive the prompt logprobs."""
        hidden, sample_rows = self._run(packed, previous)  # [num_tokens, hidden]
        results = [ChunkResult(None, []) for _ in range(packed.num_chunks)]
        for index, start, count in packed.scored:  # rare: read at once
            logits = self.model.compute_logits(hidden[start:start + count])  # a collective
            if chunks is not None:
                chunk = chunks[index]
                results[index].prompt_logprobs = prompt_logprobs(logits, chunk.prompt_targets, chunk.prompt_top_n)
        num_rows = packed.lengths[5]
        row_chunks = [i for i, c in enumerate(chunks) if c.sampling is not None
                      for _ in range(len(c.draft_sampling) + 1)] if chunks is not None else []
        step = ForwardStep(chunks, results, row_chunks, hidden[sample_rows] if num_rows else None)
        if self.tp.rank != 0 and num_rows:  # the LM head is a collective: every rank joins it
            self.model.compute_logits(step.hidden)
            # The driver's picks, which the next step may read before the host has seen them.
            self._driver_picks = torch.empty(num_rows, dtype=torch.int64, device=self.device)
            dist.broadcast(self._driver_picks, src=0, group=self.tp.group)
        return step

    def _send(self, packed: "PackedStep | None") -> None:
        """Rank 0: the step (None: no more steps) to the other ranks, as one int64 tensor."""
        message = torch.frombuffer(packed.message(), dtype=torch.int64) if packed is not None \
            else torch.empty(0, dtype=torch.int64)
        dist.broadcast(torch.tensor([message.numel()]), src=0, group=self.tp.control)
        if message.numel():
            dist.broadcast(message, src=0, group=self.tp.control)

    def _receive(self) -> "PackedStep | None":
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.tp.control)
        if not int(size):
            return None
        message = torch.empty(int(size), dtype=torch.int64)
        dist.broadcast(message, src=0, group=self.tp.control)
        return PackedStep.read(message)

    @torch.inference_mode()
    def sample(self, step: "ForwardStep",
               allowed_tokens: Callable[[], AllowedTokens] | None = None) -> "LaunchedStep":
        """Queue the sampling of a step's rows (rank 0), with the chunks' sampling options as
        they are now, and the copy of the picks to the host.

        `allowed_tokens` gives the grammar masks of the sampled rows (numbered in the order of
        the chunks that sample); it is called once the logits are queued, so that the host
        fills the masks while the device computes them."""
        picked = medusa = None
        if step.hidden is not None and self.tp.rank == 0:  # the other ranks did their part in forward
            logits = self.model.compute_logits(step.hidden)  # a collective: every rank
            allowed = allowed_tokens() if allowed_tokens is not None else None
            picked = sample_on_device(logits, row_options(step.chunks, step.row_chunks), allowed)
            if self.tp.size > 1:
                dist.broadcast(picked.next_ids, src=0, group=self.tp.group)
            picked = to_host(picked)
            if self.medusa is not None and step.hidden.shape[0] <= self.medusa_max_rows:
                # one rank: the heads' picks, read back with the step's (larger steps never speculate)
                medusa = self.medusa(step.hidden, self.model.compute_logits)
        return LaunchedStep(step.chunks, step.results, step.row_chunks, picked, medusa)

    def serve_steps(self) -> None:
        """The loop of a rank other than 0: run each step rank 0 sends, until it sends None."""
        while True:
            packed = self._receive()
            if packed is None:
                self.drop_graphs()
                return
            with torch.inference_mode():
                self._forward_packed(packed, None)

    def drop_graphs(self) -> None:
        """Free the captured graphs. Before the ranks' process group is destroyed: NCCL's
        teardown hangs while a graph holding its collectives exists."""
        self.graphs = self.lora_graphs = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stop_serving(self) -> None:
        """Rank 0: tell the other ranks that no step follows."""
        if self.sends_steps:
            self.sends_steps = False
            self._send(None)

    def collect(self, step: "LaunchedStep") -> list[ChunkResult]:
        """Wait for a launched step (and nothing queued after it) and return its results."""
        if step.medusa is not None:
            for i, picks in zip(step.row_chunks, step.medusa.tolist()):
                step.results[i].medusa.append(picks)
        if step.picked is not None:
            for i, token in zip(step.row_chunks, sampled_tokens(step.picked, row_options(step.chunks, step.row_chunks))):
                result = step.results[i]  # a chunk's draft rows come first, its last row after them
                if len(result.draft_samples) < len(step.chunks[i].draft_sampling):
                    result.draft_samples.append(token)
                else:
                    result.sampled = token
        return step.results


def row_options(chunks: list[SequenceChunk], row_chunks: list[int]) -> list[SamplingOptions]:
    """The sampling settings of each sampled row: a chunk's draft rows, then its last."""
    options, seen = [], {}
    for i in row_chunks:
        k = seen.get(i, 0)
        seen[i] = k + 1
        chunk = chunks[i]
        options.append(chunk.draft_sampling[k] if k < len(chunk.draft_sampling) else chunk.sampling)
    return options


@dataclass
class PackedStep:
    """A step's inputs as the device reads them (see `ModelRunner._pack`), and what rank 0
    sends the other ranks: `values` after a header of the sizes and the scored prompt rows."""

    values: array | torch.Tensor  # int64: the twelve sections of `lengths` (see `starts`), then the block tables
    lengths: list[int]
    num_chunks: int
    width: int  # of the padded block tables
    scored: list[tuple[int, int, int]]  # (chunk, first token, tokens) of each prompt whose logprobs are asked
    query_lens: list[int]
    context_lens: list[int]

    SECTIONS = 12  # of `values`, each of `lengths[i]` entries
    SINGLES = 9  # the section of a mixed step's one-token chunks
    LORA_SLOTS = 11  # each chunk's adapter slot, in packed order (empty: no chunk uses one)
    HEADER = SECTIONS + 3  # num_chunks, width, the lengths, len(scored); then 3 per scored entry

    def starts(self) -> list[int]:
        """Where each section of `values` starts, then where the block tables do: each at an
        even entry, 16 bytes in, so that every view a kernel reads is 16-byte aligned whatever
        the step's sizes. (Triton compiles a kernel anew for each alignment of its pointers: a
        prompt whose length moved a view by 8 bytes waited most of a second for it.)"""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n + n % 2)
        return starts

    def sections(self, values: torch.Tensor) -> list[torch.Tensor]:
        return [values[start:start + n] for start, n in zip(self.starts(), self.lengths)]

    def message(self) -> array:
        header = [self.num_chunks, self.width, *self.lengths, len(self.scored)]
        header += [v for entry in self.scored for v in entry]
        return array("q", header) + self.values

    @classmethod
    def read(cls, message: torch.Tensor) -> "PackedStep":
        num_chunks, width, *lengths, num_scored = message[:cls.HEADER].tolist()
        end = cls.HEADER + 3 * num_scored
        flat = message[cls.HEADER:end].tolist()
        step = cls(message[end:], lengths, num_chunks, width, [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)],
                   [], [])
        sections = step.sections(step.values)
        cu_query_lens = sections[4].tolist()
        step.query_lens = [b - a for a, b in zip(cu_query_lens, cu_query_lens[1:])]
        step.context_lens = sections[3].tolist()
        return step


@dataclass
class ForwardStep:
    chunks: list[SequenceChunk]
    results: list[ChunkResult]
    row_chunks: list[int]  # the chunk each sampled row belongs to (a chunk's rows in order)
    hidden: torch.Tensor | None  # the hidden states of their last tokens


@dataclass
class LaunchedStep:
    chunks: list[SequenceChunk]
    results: list[ChunkResult]
    row_chunks: list[int]  # the chunk each sampled row belongs to (a chunk's rows in order)
    picked: DeviceSample | None
    medusa: torch.Tensor | None = None  # [rows, heads] the Medusa heads' picks of each sampled row
