"""The 4-bit decode product (kernels/int4_gemv.py) against x times the dequantized weight: on the
CPU in Triton's interpreter over small shapes, on the GPU over Mistral-7B's.

The interpreter multiplies bf16 dots wrongly (fp16 ones rightly), so on the CPU the tensor-core
tiles run in fp16 only; the GPU runs both."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.make_checkpoint import int4_tensors
from server.kernels.gemv import MAX_ROWS
from server.kernels.int4_gemv import GEMV_MAX_ROWS, MMA_MAX_ROWS, Int4GemvConfig, int4_gemv, mma_suits, split_counters
from server.kernels.quant_reference import dequantize_int4, finish_sums, group_of_each_input, unpack_int4
from server.config import QuantConfig
from server.layers.linear import MergedColumnParallelLinear
from test_gemv import tolerance
from test_kernels import CUDA, DEVICE, gpu_only
from test_quant_kernels import int4_weights

on_gpu = [gpu_only, pytest.mark.gpu]
DTYPES = [torch.bfloat16, torch.float16]

# Both ways of multiplying, with and without K split, N off the blocks' multiples.
FMA = [Int4GemvConfig(block_n=32, block_k=32, num_warps=1, num_stages=1),
       Int4GemvConfig(block_n=16, block_k=32, num_warps=2, num_stages=2, split_k=3)]
DOT = [Int4GemvConfig(block_n=32, block_k=128, dot=True), Int4GemvConfig(block_n=16, block_k=64, dot=True, split_k=2)]
# mma.sync (emulated in the interpreter): one and two blocks of 16 columns, with and without splits,
# with 0, 1 or 2 groups read before the wait (the last: one group a program, read twice)
MMA = [Int4GemvConfig(block_n=32, num_warps=1, mma=True),
       Int4GemvConfig(block_n=16, num_warps=1, mma=True, split_k=3, early=2),
       Int4GemvConfig(block_n=64, num_warps=1, mma=True, split_k=2, early=0),
       Int4GemvConfig(block_n=32, num_warps=1, mma=True, split_k=8, early=2)]


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x times the dequantized weight [N, K] rounded to x's dtype, in float32."""
    return F.linear(x.float(), weight.to(x.dtype).float().to(x.device))


def skip_bf16_dots_in_the_interpreter(config: Int4GemvConfig | None, dtype: torch.dtype) -> None:
    if not CUDA and dtype == torch.bfloat16 and (config is None or config.dot):
        pytest.skip("Triton's interpreter gets bf16 dots wrong")


@pytest.mark.parametrize("M,config", [(M, config) for config in FMA + DOT + MMA for M in (1, 3, MMA_MAX_ROWS, MAX_ROWS)
                                      if M <= MMA_MAX_ROWS or not config.mma], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemv_matches_the_dequantized_weight(M, config, dtype):
    skip_bf16_dots_in_the_interpreter(config, dtype)
    K, N, group_size = 256, 72, 128 if config.dot else 32
    qweight, zeros, scales, _, weight = int4_weights(K, N, group_size, False, dtype, seed=M)
    x = torch.randn(M, K).to(dtype).to(DEVICE)
    out = int4_gemv(x, qweight, zeros, scales, None, group_size, config)
    assert out.shape == (M, N) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(x, weight), **tolerance(dtype, K))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_default_tiles_and_act_order_match_the_dequantized_weight(dtype):
    """Small groups too; g_idx (groups that are not runs of inputs) goes through int4_matmul."""
    skip_bf16_dots_in_the_interpreter(None, dtype)
    for M, group_size, act_order in [(1, 128, False), (2, 128, False), (4, 128, False), (5, 128, False),
                                     (3, 64, False), (16, 32, False), (2, 128, True)]:
        qweight, zeros, scales, g_idx, weight = int4_weights(512, 40, group_size, act_order, dtype, seed=M)
        x = torch.randn(M, 512).to(dtype).to(DEVICE)
        out = int4_gemv(x, qweight, zeros, scales, g_idx, group_size)
        torch.testing.assert_close(out.float(), reference(x, weight), **tolerance(dtype, 512))


def test_many_splits_are_summed_over_several_loads():
    """12 splits of 4 rows by 64 columns: the last split adds them up four to a load, the last
    load partly past the splits."""
    dtype = torch.float16
    qweight, zeros, scales, _, weight = int4_weights(1024, 72, 32, False, dtype, seed=7)
    x = torch.randn(4, 1024).to(dtype).to(DEVICE)
    config = Int4GemvConfig(block_n=64, block_k=32, num_warps=1, split_k=12)
    out = int4_gemv(x, qweight, zeros, scales, None, 32, config)
    torch.testing.assert_close(out.float(), reference(x, weight), **tolerance(dtype, 1024))


@pytest.mark.parametrize("M,config", [(M, config) for config in MMA for M in (3, MMA_MAX_ROWS)], ids=str)
def test_deferred_sums_hold_the_product_in_units_of_2_to_the_minus_32(M, config):
    """Given int64 zeros, the mma path leaves each split's sums added there (what the norm,
    silu_and_mul and the rotary kernel read), the rows past M untouched."""
    dtype = torch.float16
    qweight, zeros, scales, _, weight = int4_weights(256, 40, 32, False, dtype, seed=M)  # N: a part block
    x = torch.randn(M, 256).to(dtype).to(DEVICE)
    sums = torch.zeros(MMA_MAX_ROWS, 40, dtype=torch.int64, device=DEVICE)
    out = int4_gemv(x, qweight, zeros, scales, None, 32, config, sums=sums)
    assert out.dtype == torch.int64 and out.shape == (M, 40) and out.data_ptr() == sums.data_ptr()
    assert out.any() and not sums[M:].any()
    again = int4_gemv(x, qweight, zeros, scales, None, 32, config, sums=torch.zeros_like(sums))
    assert torch.equal(again, out)  # integer sums: the same whichever split adds first
    plain = int4_gemv(x, qweight, zeros, scales, None, 32, config)
    torch.testing.assert_close(finish_sums(out, dtype).float(), reference(x, weight), **tolerance(dtype, 256))
    assert not sums.any()  # finish_sums leaves zeros for the next product
    torch.testing.assert_close(finish_sums(again, dtype), plain, atol=1e-5, rtol=2.0 ** -9)  # an ulp or two


def test_deferred_sums_are_refused_where_they_do_not_fit():
    qweight, zeros, scales, _, _ = int4_weights(256, 32, 32, False, torch.float16)
    x = torch.randn(3, 256).to(torch.float16).to(DEVICE)
    for sums in (torch.zeros(2, 32, dtype=torch.int64, device=DEVICE), torch.zeros(8, 32, dtype=torch.int32,
                 device=DEVICE), torch.zeros(8, 64, dtype=torch.int64, device=DEVICE)[:, :32]):
        with pytest.raises(ValueError, match="deferred sums"):
            int4_gemv(x, qweight, zeros, scales, None, 32, MMA[0], sums=sums)


def test_the_mma_path_takes_only_products_it_can_read():
    """Up to 8 rows, x's rows 4-byte aligned, words four to a 16-byte load, groups of whole
    32-input steps; anything else goes to the multiply-adds."""
    x = torch.randn(2, 256).to(torch.bfloat16)
    qweight = torch.zeros(32, 64, dtype=torch.int32)
    assert mma_suits(x, qweight, 128) and mma_suits(x, qweight, 32)
    assert not mma_suits(torch.randn(MMA_MAX_ROWS + 1, 256).to(torch.bfloat16), qweight, 128)
    assert not mma_suits(x, qweight, 16)
    assert not mma_suits(x, torch.zeros(32, 66, dtype=torch.int32), 128)
    assert not mma_suits(torch.randn(2, 257).to(torch.bfloat16)[:, :256], qweight, 128)  # an odd row stride
    assert not mma_suits(x, torch.zeros(32 * 64 + 1, dtype=torch.int32)[1:].view(32, 64), 128)  # words off 16 bytes


def test_the_mma_path_refuses_more_rows_than_it_has_columns():
    qweight, zeros, scales, _, _ = int4_weights(256, 32, 32, False, torch.float16)
    x = torch.randn(MMA_MAX_ROWS + 1, 256).to(torch.float16).to(DEVICE)
    with pytest.raises(ValueError, match="up to 8 rows"):
        int4_gemv(x, qweight, zeros, scales, None, 32, MMA[0])


def test_the_splits_leave_their_counters_at_zero_for_the_next_call():
    dtype = torch.float16
    qweight, zeros, scales, _, weight = int4_weights(256, 48, 32, False, dtype)
    counters = split_counters(48, DEVICE)
    config = Int4GemvConfig(block_n=16, block_k=32, num_warps=1, split_k=4)
    for seed in range(2):
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
        out = int4_gemv(x, qweight, zeros, scales, None, 32, config, counters=counters)
        torch.testing.assert_close(out.float(), reference(x, weight), **tolerance(dtype, 256))
        assert not counters.any()


def test_int4_gemv_reads_x_rows_with_a_stride():
    dtype = torch.float16
    qweight, zeros, scales, _, _ = int4_weights(64, 16, 32, False, dtype)
    x = torch.randn(3, 64).to(dtype).to(DEVICE)
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows 128 apart
    config = FMA[0]
    assert torch.equal(int4_gemv(wide, qweight, zeros, scales, None, 32, config),
                       int4_gemv(x, qweight, zeros, scales, None, 32, config))


def test_int4_gemv_refuses_what_it_is_not_for():
    qweight, zeros, scales, _, _ = int4_weights(64, 16, 32, False, torch.float16)
    for rows in (0, MAX_ROWS + 1):
        with pytest.raises(ValueError, match="rows"):
            int4_gemv(torch.zeros(rows, 64, dtype=torch.float16, device=DEVICE), qweight, zeros, scales, None, 32)
    with pytest.raises(ValueError, match="inputs"):
        int4_gemv(torch.zeros(1, 32, dtype=torch.float16, device=DEVICE), qweight, zeros, scales, None, 32)
    with pytest.raises(ValueError, match="tile"):
        int4_gemv(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), qweight, zeros, scales, None, 32,
                  Int4GemvConfig(block_k=64))


MISTRAL = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o_proj, gate_up, down


@pytest.mark.parametrize("N, K", [pytest.param(*shape, marks=on_gpu) for shape in MISTRAL])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemv_on_mistral_shapes(N, K, dtype):
    qweight, zeros, scales, _, weight = int4_weights(K, N, 128, False, dtype)
    weight = weight.to(DEVICE).to(dtype).float()
    for M in range(1, MAX_ROWS + 1):
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        expected = F.linear(x.float(), weight)
        other = Int4GemvConfig(block_n=256, block_k=64, num_warps=1, num_stages=2, split_k=3) if M == 1 else \
            Int4GemvConfig(block_n=64, dot=True, num_stages=5, split_k=5)
        for config in (None, other):
            out = int4_gemv(x, qweight, zeros, scales, None, 128, config)
            torch.testing.assert_close(out.float(), expected, **tolerance(dtype, K))
        if M <= MMA_MAX_ROWS:  # deferred: atomics from many splits in any order, the same integers
            sums = [int4_gemv(x, qweight, zeros, scales, None, 128, sums=torch.zeros(M, N, dtype=torch.int64,
                                                                                      device=DEVICE))
                    for _ in range(2)]
            assert torch.equal(sums[0], sums[1])
            torch.testing.assert_close(finish_sums(sums[0], dtype).float(), expected, **tolerance(dtype, K))


@pytest.mark.parametrize("M", [1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, MAX_ROWS + 1])
def test_4bit_layers_take_int4_gemv_for_cuda_batches_of_up_to_eight_rows(M, monkeypatch):
    from server.layers import int4_linear

    calls = []
    gemv = int4_linear.int4_gemv
    monkeypatch.setattr(int4_linear, "int4_gemv", lambda x, *args, **kwargs: calls.append(x.shape) or gemv(
        x, *args, **kwargs))
    dtype = torch.float16
    with torch.device(DEVICE):
        layer = MergedColumnParallelLinear(256, [(64, 1)], quant=QuantConfig("gptq", 128, zero_offset=1))
    for name, tensor in int4_tensors("proj.weight", (64, 256), "gptq", torch.Generator(), "cpu").items():
        layer.load_piece(0, tensor, name.rsplit(".", 1)[1])
    layer.finish_loading()
    layer.to(dtype)  # the scales
    weight = dequantize_int4(unpack_int4(layer.qweight, dim=0), layer.zeros, layer.scales,
                             group_of_each_input(256, 128, DEVICE))
    x = torch.randn(M, 256).to(dtype).to(DEVICE)
    torch.testing.assert_close(layer(x).float(), reference(x, weight), **tolerance(dtype, 256))
    assert len(calls) == (1 if CUDA and M <= GEMV_MAX_ROWS else 0)
