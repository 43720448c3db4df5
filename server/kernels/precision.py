"""What the attention and MoE kernels share about numbers (no triton here)."""
from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # softmax in exp2: e^x = 2^(x * log2(e))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full float32 (Triton would use TF32), as the torch
    reference does; half-precision inputs use the tensor cores' own precision."""
    return "ieee" if dtype == torch.float32 else "tf32"
