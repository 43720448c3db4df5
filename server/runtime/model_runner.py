"""The executor: one step's sequence chunks -> tensors -> model -> sampled tokens.

It owns the model and its paged KV cache, and knows nothing of requests: the engine hands it
`SequenceChunk`s (plain token ids, positions and block tables) and gets `ChunkResult`s back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.config import CacheConfig, ModelConfig
from server.layers.attention import Attention, AttentionMetadata
from server.models.loader import ModelSource, iter_weights
from server.models.registry import model_class
from server.runtime.sampler import SampledToken, SamplingOptions, prompt_logprobs, sample


@dataclass
class SequenceChunk:
    """`token_ids` of one sequence at positions `start_pos`.., to compute this step."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sampling: SamplingOptions | None = None  # set when the chunk ends the sequence: sample
    prompt_targets: list[int] = field(default_factory=list)  # next prompt tokens to score
    prompt_top_n: int = 0


@dataclass
class ChunkResult:
    sampled: SampledToken | None
    prompt_logprobs: list[dict[int, float]]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    def __init__(self, model_config: ModelConfig, source: ModelSource, device: str,
                 dtype: str, attention_backend: str = "torch"):
        self.model_config = model_config
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.block_size = 0  # set with the KV cache
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(model_config)(model_config, attention_backend)
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():
            self.model.load_weights(iter_weights(source))
        self.model.eval()

    def kv_bytes_per_token(self) -> int:
        m = self.model_config
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * self.dtype.itemsize

    def kv_tokens_that_fit(self, cpu_budget_bytes: int, max_batch_prefill_tokens: int,
                           memory_fraction: float = 1.0) -> int:
        """KV capacity, in tokens, of the memory left once the weights are loaded.

        On CUDA: 90% of the free memory (less what `memory_fraction` leaves to others), less
        room for one step's activations at the prefill budget; on the CPU: the given budget.
        """
        if self.device.type != "cuda":
            return cpu_budget_bytes // self.kv_bytes_per_token()
        free, total = torch.cuda.mem_get_info(self.device)
        free = max(0, free - int((1 - memory_fraction) * total))
        m = self.model_config
        activations = max_batch_prefill_tokens * (4 * m.intermediate_size + 8 * m.hidden_size
                                                  + m.vocab_size) * 4
        return max(0, int(0.9 * free) - activations - (1 << 30)) // self.kv_bytes_per_token()

    def allocate_kv_cache(self, cache: CacheConfig) -> None:
        self.block_size = cache.block_size
        m = self.model_config
        shape = (cache.num_blocks, cache.block_size, m.num_kv_heads, m.head_dim)
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
                module.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _metadata(self, chunks: list[SequenceChunk]):
        size = self.block_size
        token_ids, positions, slots = [], [], []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            for pos in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)):
                positions.append(pos)
                slots.append(chunk.block_table[pos // size] * size + pos % size)
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
        context_lens = [c.start_pos + len(c.token_ids) for c in chunks]

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots), block_tables=tensor(tables),
            context_lens=tensor(context_lens), query_lens=[len(c.token_ids) for c in chunks],
            context_lens_list=context_lens)
        return tensor(token_ids), tensor(positions), meta

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk]) -> list[ChunkResult]:
        token_ids, positions, meta = self._metadata(chunks)
        hidden = self.model(token_ids, positions, meta)  # [num_tokens, hidden]
        rows, row_chunks, results = [], [], []
        start = 0
        for i, chunk in enumerate(chunks):
            end = start + len(chunk.token_ids)
            scored = []
            if chunk.prompt_targets:
                logits = self.model.compute_logits(hidden[start:start + len(chunk.prompt_targets)])
                scored = prompt_logprobs(logits, chunk.prompt_targets, chunk.prompt_top_n)
            results.append(ChunkResult(None, scored))
            if chunk.sampling is not None:
                rows.append(end - 1)
                row_chunks.append(i)
            start = end
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
            for i, token in zip(row_chunks, sample(logits, [chunks[i].sampling for i in row_chunks])):
                results[i].sampled = token
        return results
