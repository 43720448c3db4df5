"""The tensor-parallel group this process belongs to, its two collectives, and reading a
rank's slice of a checkpoint tensor.

Set once per process by the runtime (`set_tensor_parallel`) before the model is built; the
layers read it to know which slice of each weight is theirs. With one rank (the default)
every collective is a no-op, so the same layers serve the single-device case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object = None  # the torch.distributed group of the model's collectives
    control: object = None  # a gloo group for messages between the ranks' hosts

    def part(self, total: int, parts: int | None = None) -> tuple[int, int]:
        """(start, length) of this rank's share when `total` rows are cut into `parts` equal
        parts (default: one per rank); with fewer parts than ranks, ranks share a part."""
        parts = parts or self.size
        if total % parts:
            raise ValueError(f"{total} rows cannot be split into {parts} equal parts")
        length = total // parts
        return (self.rank * parts // self.size) * length, length


_current = TensorParallel()


def read_shard(loaded, cuts: dict[int, tuple[int, int] | None]) -> torch.Tensor:
    """`loaded` (a tensor, or a lazy safetensors slice that reads only what is asked for)
    cut to `length` entries from `start` along each dimension of `cuts` that has a
    (start, length); the other dimensions whole."""
    cuts = {dim: cut for dim, cut in cuts.items() if cut is not None}
    if not cuts:
        return loaded[...]
    index = [slice(None)] * (max(cuts) + 1)
    for dim, (start, length) in cuts.items():
        index[dim] = slice(start, start + length)
    # Rows alone are asked for with a plain slice, which row-regrouping views also take.
    return loaded[index[0]] if len(index) == 1 else loaded[tuple(index)]


def set_tensor_parallel(group: TensorParallel) -> None:
    global _current
    _current = group


def tensor_parallel() -> TensorParallel:
    return _current


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    tp = _current
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[.., n] on each rank -> [.., n * ranks], rank order."""
    tp = _current
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
