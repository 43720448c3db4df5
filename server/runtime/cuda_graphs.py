"""Decode steps captured as CUDA graphs, for a ladder of batch sizes, and replayed.

A decode step of a few sequences is hundreds of small kernel launches; replaying a graph
issues them at once. The graph of size B reads static input buffers, so a batch of n <= B
sequences is copied into them and padded: padding rows write no KV (slot -1) and attend to
nothing (context 0). A size whose decode kernel takes fewer context splits when every context is
short (model_runner.decode_splits) has a second graph for such steps. All share one memory pool.

With LoRA adapters loaded, a second set of graphs is captured with the adapters' updates in
(`lora_bank`): each row's adapter slot is one more static input, so one graph serves any mix.
"""
from __future__ import annotations

import bisect

import torch

from server.layers.attention import AttentionMetadata
from server.layers.lora import LoRABank

# Every 8 sequences from 16 up: a batch is padded to the next size, and at a hundred rows and
# more a decode step's matrix products are bound by arithmetic, so the padding rows cost time.
DEFAULT_SIZES = (1, 2, 4, 8) + tuple(range(16, 257, 8))


def graph_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes captured for up to `max_batch_size` sequences: DEFAULT_SIZES, then every
    32 past 256 (padding 31 rows of several hundred costs a few percent), and the largest itself."""
    ladder = DEFAULT_SIZES + tuple(range(288, max_batch_size + 1, 32))
    return sorted({s for s in ladder if s < max_batch_size} | {max(max_batch_size, 1)})


class DecodeGraphs:
    def __init__(self, model, sizes: list[int], max_blocks: int, num_splits, device: torch.device,
                 lora_bank: LoRABank | None = None, max_query_len: int = 1):
        """`num_splits(batch_size, max_context)` gives the decode kernel's context splits for a
        size, where every context is at most max_context tokens (None: any): a size is captured
        with those of any context and with those of the shortest, where they differ. With
        `lora_bank`, the graphs take each row's adapter slot (`run`'s `lora_slots`). With
        `max_query_len` > 1, steps of up to that many tokens a sequence replay them a row a token
        (decode_rows): a row's context then ends in up to that many tokens the step stores."""
        self.sizes = sorted(sizes)
        self.max_query_len = max_query_len  # steps of up to this many tokens a sequence replay them
        biggest = self.sizes[-1]
        self.token_ids = torch.zeros(biggest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(biggest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((biggest,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(biggest, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(biggest, dtype=torch.int32, device=device)
        self.cu_query_lens = torch.arange(biggest + 1, dtype=torch.int32, device=device)
        self.lora_slots = torch.full((biggest,), -1, dtype=torch.int64, device=device) if lora_bank else None
        self.num_splits = num_splits
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (size, splits) ->
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):  # the biggest first, so the pool fits them all
            for splits in sorted({num_splits(size, None), num_splits(size, 0)}, reverse=True):
                meta = AttentionMetadata(
                    slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                    context_lens=self.context_lens[:size], cu_query_lens=self.cu_query_lens[:size + 1],
                    query_lens=[1] * size, context_lens_list=[1] * size, decode_only=True, max_query_len=1,
                    num_splits=splits, fresh_tokens=max_query_len)
                args = (self.token_ids[:size], self.positions[:size], meta)
                if lora_bank is not None:
                    lora_bank.use_rows(self.lora_slots[:size])
                model(*args)  # warm-up: compiles and autotunes outside the capture
                torch.cuda.synchronize()
                if lora_bank is not None:  # the rows' ordering by adapter is computed in the graph
                    lora_bank.use_rows(self.lora_slots[:size])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size, splits] = model(*args)
                pool = graph.pool()
                self.graphs[size, splits] = graph
        if lora_bank is not None:
            lora_bank.clear()
        torch.cuda.synchronize()

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor, max_context: int,
            lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of n <= max_size sequences, none with more than `max_context` tokens
        of context (and each row's LoRA adapter slot, for graphs captured with them) ->
        hidden states [n, hidden]."""
        n = token_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        key = size, self.num_splits(size, max_context)
        self.token_ids[:n].copy_(token_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[:n].copy_(context_lens)
        self.context_lens[n:size].zero_()
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(block_tables)
        if self.lora_slots is not None:
            self.lora_slots[:n].copy_(lora_slots)
            self.lora_slots[n:size].fill_(-1)
        self.graphs[key].replay()
        return self.outputs[key][:n]


def decode_rows(cu_query_lens: torch.Tensor, context_lens: torch.Tensor, tokens: int):
    """A step whose sequences compute a few tokens each (speculation's checks: a last token and
    its proposals) as a decode step of one row a token: each token's sequence [tokens] (whose
    block table its row takes) and its context [tokens], which ends at the token itself (a
    step stores all its keys before any is read). Each token then attends exactly as in the
    step, through the decode kernel, and the step replays the decode graphs. Device ops only."""
    n = cu_query_lens.shape[0] - 1
    count = torch.arange(max(n, tokens), device=cu_query_lens.device)
    query_lens = cu_query_lens.diff()
    seq = torch.repeat_interleave(count[:n], query_lens, output_size=tokens)
    # the cached tokens of its sequence, then this step's up to itself
    contexts = context_lens[seq] - cu_query_lens[seq + 1] + count[:tokens] + 1
    return seq, contexts.to(context_lens.dtype)
