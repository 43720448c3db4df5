"""LoRA updates in the linear layers: slots of adapter weights, and which rows use which.

A projection that some adapter touches holds A [slots, pieces * rank, in] and
B [slots, out, pieces * rank]: slot i is the i-th adapter loaded; a merged projection's pieces
(q, k, v of qkv_proj; gate, up) stack their A along the rank and keep their B block-diagonal,
so that one pair of products serves them all; each rank is padded with zeros to the largest
(exact), each scale folded into B. A layer adds B_s(A_s x) to the rows of slot s after its base
product for the whole batch. The runner tells the `LoRABank` which rows use which slot:
  - on a GPU, as a slot per row on the device (`use_rows`), for every step (replayed from the
    decode graphs or run eagerly): server/kernels/lora.py's two launches a projection, whatever
    the mix of adapters, the rows put in order of their slots once a step;
  - elsewhere, as runs of rows (`set`): one pair of torch products per adapter, over its rows.

Tensor parallelism shards the slots with their layer: a column-parallel layer keeps B's rows of
its outputs (A whole); a row-parallel one keeps A's columns of its inputs (B whole), so that
each rank's update is a partial sum that the layer's all-reduce adds up with its product.
"""
from __future__ import annotations

import torch
from torch import nn

from server.layers.activation import silu_and_mul

try:
    from server.kernels.lora import LoRARows, LoRAUpdate, lora_rows, lora_shrink
except ImportError:  # pragma: no cover - no triton: the CPU path only
    LoRARows = LoRAUpdate = lora_rows = lora_shrink = None


class LoRABank:
    """The rows of the step under way that use each adapter slot (none: no row does)."""

    def __init__(self):
        self.spans: list[tuple[int, int, int]] = []  # (slot, first row, rows) of each adapter's runs
        self.device: torch.device | None = None
        self._groups: list[tuple[int, torch.Tensor]] | None = None
        self.row_slots: torch.Tensor | None = None  # [rows] int64 on the device, -1: the base model
        self._rows: LoRARows | None = None  # the rows in order of their slots, made by the first layer

    @property
    def active(self) -> bool:
        return bool(self.spans) or self.row_slots is not None

    def set(self, spans: list[tuple[int, int, int]], device: torch.device) -> None:
        """`spans`: (slot, first row, rows) of each run of rows that uses an adapter."""
        self.spans, self.device, self._groups, self.row_slots, self._rows = spans, device, None, None, None

    @property
    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, its rows [n] on the device), made at the first eager layer that asks: a decode
        step replayed from the graphs reads `row_slots` and never needs them."""
        if self._groups is None:
            rows: dict[int, list[torch.Tensor]] = {}
            for slot, start, count in self.spans:
                rows.setdefault(slot, []).append(torch.arange(start, start + count))
            self._groups = [(slot, torch.cat(parts).to(self.device)) for slot, parts in rows.items()]
        return self._groups

    def use_rows(self, row_slots: torch.Tensor) -> None:
        """Each row's slot, read on the device by the kernels (what a captured graph replays:
        called again before a capture, so that the ordering of the rows is captured too)."""
        self.spans, self._groups, self.row_slots, self._rows = [], None, row_slots, None

    def rows(self, num_slots: int) -> "LoRARows":
        """The step's rows in order of their slots: sorted by the first layer that asks, once a step."""
        if self._rows is None:
            self._rows = lora_rows(self.row_slots, num_slots)
        return self._rows

    def clear(self) -> None:
        self.spans, self._groups, self.row_slots, self._rows = [], None, None, None


class LoRASlots:
    """One projection's adapter weights."""

    def __init__(self, bank: LoRABank, num_slots: int, rank: int, in_features: int,
                 outputs: list[tuple[int, int]], b_rows: list[tuple[int, int] | None],
                 a_columns: tuple[int, int] | None, dtype: torch.dtype, device: torch.device):
        """`outputs`: (offset, length) of each piece in the layer's output on this rank;
        `b_rows`: the rows of each piece's B this rank keeps (None: all); `a_columns`: the
        columns of A it keeps (None: all)."""
        self.bank, self.rank = bank, rank
        self.outputs, self.b_rows, self.a_columns = outputs, b_rows, a_columns
        stacked = rank * len(outputs)
        self.A = torch.zeros(num_slots, stacked, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(num_slots, sum(length for _, length in outputs), stacked, dtype=dtype, device=device)

    @classmethod
    def for_layer(cls, layer: nn.Module, bank: LoRABank, num_slots: int, rank: int,
                  dtype: torch.dtype) -> "LoRASlots":
        """Slots shaped for `layer` (its `lora_geometry()`), in the model's dtype."""
        device = next(layer.parameters()).device
        return cls(bank, num_slots, rank, *layer.lora_geometry(), dtype=dtype, device=device)

    def load(self, slot: int, piece: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """A [r, in] and B [out, r] (scale included) of one adapter's piece, whole."""
        rank = a.shape[0]
        if self.a_columns is not None:
            start, length = self.a_columns
            a = a[:, start:start + length]
        if self.b_rows[piece] is not None:
            start, length = self.b_rows[piece]
            b = b[start:start + length]
        offset, length = self.outputs[piece]
        if a.shape[1] != self.A.shape[2] or b.shape[0] != length:
            raise ValueError(f"LoRA weights of shapes {list(a.shape)} and {list(b.shape)} do not fit a "
                             f"projection of {self.A.shape[2]} inputs and {length} outputs")
        first = piece * self.rank
        self.A[slot, first:first + rank] = a
        self.B[slot, offset:offset + length, first:first + rank] = b

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
        """The layer's product of x [rows, in] (gated: [gate | up], multiplied as silu(gate) * up)
        plus each row's adapter update. With the slots on the device, the shrink runs first and
        the layer's product adds the update: in its own epilogue where it is the gemv kernel,
        else by the expand kernel after it."""
        if self.bank.row_slots is not None:
            rows = self.bank.rows(self.A.shape[0])
            update = LoRAUpdate(lora_shrink(x, self.A, rows, gated=gated), self.B, rows, self.bank.row_slots)
            return layer.scheme.apply(layer, x, bias, gated, update)
        x = silu_and_mul(x) if gated else x  # the layer's real input, made once for the product and the update
        out = layer.scheme.apply(layer, x, bias)
        for slot, rows in self.bank.groups:
            update = (x[rows] @ self.A[slot].T) @ self.B[slot].T  # [n, out]
            out.index_add_(0, rows, update.to(out.dtype))
        return out
