"""Query and key rows laid out for interleaved rotary, put back in Hugging Face's order.

Meta's and Mistral's own checkpoints (and llama.cpp's GGUF files) rotate adjacent pairs of
each head's dimensions, (x0, x1), (x2, x3), ...; Hugging Face's `rotate_half` rotates
dimension i with i + head_dim/2. HF's converters (`permute_for_rope` in transformers'
convert_mistral_weights_to_hf.py) therefore regroup each head's rows of q_proj and k_proj
from [head_dim/2, 2] to [2, head_dim/2]; this module does the same when a checkpoint is read.
"""
import torch


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of `num_heads` heads in interleaved-pair order -> the same rows in HF's order."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


class HalfSplitRows:
    """A lazy q or k matrix in interleaved-pair order that reads out in HF's row order.

    The permutation moves rows only within their head, so a slice of whole heads (what a
    tensor-parallel rank asks for) is read from the same rows of the file and regrouped
    alone: no rank reads the whole matrix.
    """

    def __init__(self, interleaved, head_dim: int):
        self.interleaved = interleaved  # a tensor or a lazy safetensors slice
        self.head_dim = head_dim
        self.num_rows = interleaved.get_shape()[0] if hasattr(interleaved, "get_shape") else interleaved.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.num_rows)
        if step != 1 or start % self.head_dim or stop % self.head_dim:
            raise ValueError(f"rows {start}:{stop}:{step} of a rotary matrix do not cover whole heads "
                             f"of {self.head_dim} rows")
        return unpermute_rotary_rows(self.interleaved[start:stop], (stop - start) // self.head_dim)
