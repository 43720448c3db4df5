"""Counter-based random numbers: the noise of a row depends only on (seed, step, token id).

This is what makes a seeded request reproduce the same tokens whatever else shares its batch,
and after preemption: no generator state is carried from step to step. The hash is
Chris Wellons' `lowbias32` over 32-bit values held in int64 tensors (vectorised on any device).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, in halves so that int64 never overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """`mix32` on a Python int (the same function, without a tensor per call)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, step: int) -> int:
    """A 32-bit key for one row's draw at one step of a sequence."""
    key = _mix32_int(seed & _MASK32)
    key = _mix32_int(key ^ ((seed >> 32) & _MASK32))
    return _mix32_int(key ^ (step & _MASK32))


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) draws [rows, vocab] from per-row keys [rows] (int64)."""
    ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = mix32(mix32(keys[:, None] ^ ids[None, :]) ^ keys[:, None])
    # 23 bits, so that the largest uniform stays below 1 in float32 (with 24 it rounds to 1:
    # a draw of 0, and then p / 0 = NaN wins the argmax even for a token of probability 0).
    uniform = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))  # in (0, 1)
    return -torch.log(uniform)


WATERMARK_SALT = 0x5EED_CAFE


def watermark_greenlist(previous_tokens: torch.Tensor, vocab_size: int, gammas: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool: the "green" share `gammas[row]` of the vocabulary after each row's previous
    token (Kirchenbauer et al. 2023), a pure function of (previous token, token id) so that a
    detector with the same hash can count green tokens in a text."""
    ids = torch.arange(vocab_size, device=previous_tokens.device, dtype=torch.int64)
    keys = mix32(previous_tokens.to(torch.int64) ^ WATERMARK_SALT)
    bits = mix32(keys[:, None] ^ ids[None, :])
    thresholds = (gammas.to(torch.float64) * 2**32).to(torch.int64)
    return bits < thresholds[:, None]
