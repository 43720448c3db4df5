"""Programmatic dependent launch (Hopper and later): a kernel may start before the one ahead
of it in the stream has finished.

A decode step is hundreds of kernels of a few microseconds each, and between two of them the
device idles while the last programs of one drain and the next is launched. A kernel launched
with `launch_pdl` has its programs placed on the SMs as soon as the kernel ahead of it lets
them (`gdc_launch_dependents`, which each of ours calls first); each program then waits
(`gdc_wait`) until everything ahead has finished and its writes are visible, before it reads
anything. Every program of every kernel launched this way waits, so the order stays
transitive: a kernel that has finished has seen the one ahead of it finish.

On for CUDA devices of compute capability 9.0 or more; never in Triton's interpreter (the CPU
tests), where `PDL` is False and the calls compile away; and off with KERNELS_PDL=0 in the
environment (a profile's kernel times then exclude the waits: benchmarks/profile_step.py).
On one H100 it made one-sequence decode of a Mistral-7B-shaped model faster, in bf16
(benchmarks/latency.py, without and with, on one machine) and with fp8 weights. The 4-bit
products (kernels/int4_gemv.py's mma path) and silu_and_mul joined them later, measured with
two or more engines made in one process, each capturing its graphs under its own setting, and
their runs alternated: earlier measurements, each from a process of its own, had moved between
runs by more than the difference. Asking L2 for a program's first words before its wait added
nothing. docs/kernels.md has the figures.

What a program may read before its wait: what no kernel of the forward writes. That is the
weights and tables (constants), and the step's inputs (positions, slots, block tables,
context lengths), which are written before the forward's first kernel starts: a kernel
launched this way starts only after the one ahead has started, so every kernel of the
forward starts after the work queued before it has finished. And the KV cache but for this
step's new slots: a decode row's context holds only its own (the block manager publishes blocks
to the prefix cache after their step is queued), and a row of speculation's checks, replayed
a row a token, its sequence's tokens of the step up to its own (decode_attention's `fresh`). Reading them early
turned a decode step's small kernels from a chain of round trips into one each: the norm's
weight, the rotary kernel's position, slot and angles, the decode attention's first tile
(server/kernels/decode_attention.py) and the 4-bit products' first groups (kernels/int4_gemv.py).
Together with the deferred reads of each kernel put in flight at once (server/kernels/deferred.py),
that made 4-bit one-sequence decode faster (engines in one process, runs alternated, one H100;
docs/kernels.md has the figures).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs

PDL = (os.environ.get("KERNELS_PDL", "1") != "0" and not knobs.runtime.interpret and torch.cuda.is_available()
       and torch.cuda.get_device_capability()[0] >= 9)
LAUNCH = {"launch_pdl": True} if PDL else {}  # the launch options of every kernel that calls wait_for_inputs


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """First thing in a kernel launched with LAUNCH: let the next kernel launch, then wait for
    the ones ahead (nothing when PDL is off)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
