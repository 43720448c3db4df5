"""Sampling on the model's device, vectorised over the batch.

Order of work per row, as in Hugging Face's processors: min-tokens ban, repetition /
frequency / presence penalties, a grammar's allowed tokens, temperature, top-k, top-p,
typical-p, min-p, then a draw.
The draw is the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i, and E comes from a counter-based hash of (seed, step), so a seeded row gives
the same token wherever it sits in the batch. Logprobs are those of the raw model output.
On CUDA the random rows' temperature, top-k, top-p, min-p and draw run as one Triton kernel
(server/kernels/sampling.py) unless a row asks for typical-p; the torch code here is its reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.runtime.random import exponential_noise, watermark_greenlist

try:  # triton is optional where only the CPU path runs
    from server.kernels.sampling import sample_rows
except ImportError:  # pragma: no cover - depends on the install
    sample_rows = None


@dataclass
class SamplingOptions:
    """One row's settings. `key` is the row's random key for this step (see random.py)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    key: int = 0
    num_logprobs: int = 0
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, for repetition
    output_token_ids: list[int] = field(default_factory=list)  # for frequency / presence
    banned_token_ids: list[int] = field(default_factory=list)  # EOS etc. before min_tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's additive bias
    watermark: tuple[float, float] | None = None  # (gamma, delta): bias the green list by delta
    previous_token: int = 0  # the last token so far, which picks the watermark's green list

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


@dataclass
class AllowedTokens:
    """The tokens a grammar allows in some of the rows: bit j % 32 of word j // 32 of
    `bitmask[i]` allows token j in row `rows[i]` (the layout grammar engines fill)."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float]  # the row's top-n tokens (n = num_logprobs), by logprob


def _on_device(host: torch.Tensor | list, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A small host tensor (or list) on the device, without waiting: a plain copy to a GPU
    waits for all the work queued before it (PyTorch synchronizes the stream after it), which
    would make the host wait for the step's forward pass; a pinned copy is queued instead."""
    host = host if isinstance(host, torch.Tensor) else torch.tensor(host, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _column(rows: list[SamplingOptions], name: str, device, dtype=torch.float32):
    return _on_device([getattr(r, name) for r in rows], device, dtype)


def _padded(lists: list[list[int]], device) -> torch.Tensor:
    """[rows, longest] token ids padded with -1."""
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), -1, dtype=torch.int64)
    for i, ids in enumerate(lists):
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return _on_device(out, device)


def _counts(lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] occurrences of each token id."""
    ids = _padded(lists, device)
    counts = torch.zeros(len(lists), vocab + 1, device=device)
    counts.scatter_add_(1, torch.where(ids < 0, vocab, ids), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingOptions]) -> torch.Tensor:
    vocab, device = logits.shape[1], logits.device
    rep = _column(rows, "repetition_penalty", device)[:, None]
    seen = _counts([r.all_token_ids for r in rows], vocab, device) > 0
    # Hugging Face's repetition penalty: shrink positive logits, grow negative ones.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = _counts([r.output_token_ids for r in rows], vocab, device)
    logits = logits - _column(rows, "frequency_penalty", device)[:, None] * counts
    return logits - _column(rows, "presence_penalty", device)[:, None] * (counts > 0)


def apply_watermark(logits: torch.Tensor, rows: list[SamplingOptions]) -> torch.Tensor:
    marked = [i for i, r in enumerate(rows) if r.watermark]
    device = logits.device
    index = _on_device(marked, device, torch.int64)
    previous = _on_device([rows[i].previous_token for i in marked], device, torch.int64)
    gammas = _on_device([rows[i].watermark[0] for i in marked], device, torch.float64)
    delta = _on_device([rows[i].watermark[1] for i in marked], device)[:, None]
    green = watermark_greenlist(previous, logits.shape[1], gammas)
    logits = logits.clone()
    logits[index] = logits[index] + delta * green
    return logits


def apply_allowed(logits: torch.Tensor, allowed: AllowedTokens) -> torch.Tensor:
    device = logits.device
    words = allowed.bitmask.to(device, non_blocking=True)  # [guided rows, words]
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    forbidden = torch.zeros(logits.shape[0], words.shape[1] * 32, dtype=torch.bool, device=device)
    rows = _on_device(allowed.rows, device, torch.int64)
    forbidden[rows] = ((words[:, :, None] >> shifts) & 1).flatten(1) == 0
    return logits.masked_fill(forbidden[:, :logits.shape[1]], float("-inf"))


def _top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    k = torch.where(top_k > 0, top_k, logits.shape[1]).clamp(max=logits.shape[1])
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False  # keep at least the most likely token
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(torch.nan_to_num(p * logp)).sum(dim=-1, keepdim=True)
    surprise_gap = (-logp - entropy).abs()
    sorted_gap, order = surprise_gap.sort(dim=-1)
    cumulative = p.gather(1, order).cumsum(dim=-1)
    last_kept = (cumulative < typical_p[:, None]).sum(dim=-1, keepdim=True)
    drop_sorted = sorted_gap > sorted_gap.gather(1, last_kept.clamp(max=logits.shape[1] - 1))
    return logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


# The warps of a random row, in order: (option, warp, the value that leaves a row alone).
WARPS = (("top_k", _top_k, 0), ("top_p", _top_p, 1.0), ("typical_p", _typical_p, 1.0), ("min_p", _min_p, 0.0))


def draw(scaled: torch.Tensor, keys: torch.Tensor, warps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token ids [rows] from logits over their temperatures [rows, vocab]: the warps named in
    `warps` (each a column of the rows' settings) in WARPS' order, then the exponential race."""
    for name, warp, _ in WARPS:
        if name in warps:
            scaled = warp(scaled, warps[name])
    return (scaled.softmax(dim=-1) / exponential_noise(keys, scaled.shape[1])).argmax(dim=-1)


@dataclass
class DeviceSample:
    """A step's picks, still on the device: reading them is what waits for the GPU."""

    next_ids: torch.Tensor  # [rows] int64
    chosen: torch.Tensor  # [rows] float32: logprob of each pick
    top: tuple[torch.Tensor, torch.Tensor] | None  # values, indices [rows, max top-n]
    host: "DeviceSample | None" = None  # the same, being copied to pinned host memory
    copied: "torch.cuda.Event | None" = None  # recorded once that copy is queued


def to_host(picked: DeviceSample) -> DeviceSample:
    """Queue the picks' copy to the host, so that reading them later waits for this step
    alone, not for work queued after it (on the CPU: nothing to do)."""
    if picked.next_ids.device.type != "cuda":
        return picked

    def pinned(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    top = (pinned(picked.top[0]), pinned(picked.top[1])) if picked.top is not None else None
    picked.host = DeviceSample(pinned(picked.next_ids), pinned(picked.chosen), top)
    picked.copied = torch.cuda.Event()
    picked.copied.record()
    return picked


def sample(logits: torch.Tensor, rows: list[SamplingOptions],
           allowed: AllowedTokens | None = None) -> list[SampledToken]:
    """Pick one token per row of logits [rows, vocab] (float32)."""
    return sampled_tokens(sample_on_device(logits, rows, allowed), rows)


def sample_on_device(logits: torch.Tensor, rows: list[SamplingOptions],
                     allowed: AllowedTokens | None = None) -> DeviceSample:
    """Queue the sampling work of `sample` without waiting for it."""
    device = logits.device
    raw_logprobs = logits.log_softmax(dim=-1)
    if any(r.banned_token_ids for r in rows):
        banned = _padded([r.banned_token_ids for r in rows], device)
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask.scatter_(1, banned.clamp(min=0), banned >= 0)
        logits = logits.masked_fill(mask, float("-inf"))
    if any(r.logit_bias for r in rows):
        entries = [(i, token, value) for i, r in enumerate(rows) for token, value in r.logit_bias.items()]
        at_rows, at_tokens, values = zip(*entries)
        bias = torch.zeros_like(logits)
        bias[_on_device(list(at_rows), device, torch.int64), _on_device(list(at_tokens), device, torch.int64)] = \
            _on_device(list(values), device, bias.dtype)
        logits = logits + bias
    if any(r.watermark for r in rows):
        logits = apply_watermark(logits, rows)
    if any(r.has_penalties for r in rows):
        logits = apply_penalties(logits, rows)
    if allowed is not None:
        logits = apply_allowed(logits, allowed)
    next_ids = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if r.temperature > 0]
    if random_rows:
        picked = [rows[i] for i in random_rows]
        index = _on_device(random_rows, device, torch.int64)
        temperature = _column(picked, "temperature", device)
        keys = _on_device([r.key for r in picked], device, torch.int64)
        warps = {name: _column(picked, name, device, torch.int64 if name == "top_k" else torch.float32)
                 for name, _, neutral in WARPS if any(getattr(r, name) != neutral for r in picked)}
        if logits.is_cuda and sample_rows is not None and "typical_p" not in warps:
            next_ids[index] = sample_rows(logits.contiguous(), index, temperature, keys, **warps)
        else:
            next_ids[index] = draw(logits[index] / temperature[:, None], keys, warps)
    chosen = raw_logprobs.gather(1, next_ids[:, None])[:, 0]
    top_n = max(r.num_logprobs for r in rows)
    top = raw_logprobs.topk(top_n, dim=-1) if top_n else None
    return DeviceSample(next_ids, chosen, (top.values, top.indices) if top is not None else None)


def sampled_tokens(picked: DeviceSample, rows: list[SamplingOptions]) -> list[SampledToken]:
    """The picks on the host (waits for the device)."""
    if picked.copied is not None:
        picked.copied.synchronize()
        picked = picked.host
    next_ids, chosen = picked.next_ids.tolist(), picked.chosen.tolist()
    top_vals = picked.top[0].tolist() if picked.top else None
    top_ids = picked.top[1].tolist() if picked.top else None
    out = []
    for i, r in enumerate(rows):
        n = r.num_logprobs
        tops = dict(zip(top_ids[i][:n], top_vals[i][:n])) if n else {}
        out.append(SampledToken(next_ids[i], chosen[i], tops))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: list[int], top_n: int) -> list[dict[int, float]]:
    """For each position, the logprob of the actual next prompt token plus the top-n."""
    logprobs = logits.log_softmax(dim=-1)  # [positions, vocab]
    target = torch.tensor(targets, device=logits.device)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    result = [{t: lp} for t, lp in zip(targets, chosen)]
    if top_n:
        top = logprobs.topk(top_n, dim=-1)
        for entry, ids, vals in zip(result, top.indices.tolist(), top.values.tolist()):
            entry.update((i, v) for i, v in zip(ids, vals) if i not in entry)
    return result
