"""The decode matrix product (server/kernels/gemv.py) against x @ W^T in float32: on the CPU in
Triton's interpreter over small shapes, on the GPU over Mistral-7B's."""
from __future__ import annotations

import pytest
import torch

from server.kernels.gemv import MAX_ROWS, GemvConfig, gemv
from test_kernels import DEVICE, DTYPES, gpu_only

on_gpu = [gpu_only, pytest.mark.gpu]

# Both ways of multiplying, K split or not, N and K off the tiles' multiples.
SMALL_CONFIGS = [GemvConfig(block_n=16, block_k=64), GemvConfig(block_n=8, block_k=32, num_stages=2, split_k=3),
                 GemvConfig(block_n=16, block_k=32, dot=True), GemvConfig(block_n=32, block_k=64, dot=True, split_k=2)]
SMALL_CASES = [(1, 48, 256), (1, 300, 160), (3, 50, 130), (16, 33, 200), (7, 64, 96)]  # (one row, N > K: fp8 wide tiles)
GPU_CASES = [(m, n, k) for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (32768, 4096)]
             for m in (1, 2, 4, 8, 16)] + [(5, 1000, 4000), (13, 4000, 1000)]


def tolerance(dtype: torch.dtype, K: int) -> dict:
    """bf16/fp16 outputs: a few units of the output's last place, and float32's rounding of a
    K-long sum elsewhere."""
    if dtype == torch.float32:
        return dict(atol=1e-5 * K ** 0.5, rtol=1e-4)
    return dict(atol=2e-2, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0):
    """x with entries of about 1 and W scaled so that each output is about 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
    return x, weight


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("M, N, K", SMALL_CASES)
def test_gemv_matches_the_float32_product_on_small_shapes(M, N, K, config):
    dtype = DTYPES[0]
    x, weight = inputs(M, N, K, dtype)
    out = gemv(x, weight, config)
    assert out.shape == (M, N) and out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float() @ weight.float().t(), **tolerance(dtype, K))


@pytest.mark.parametrize("M, N, K", [pytest.param(*case, marks=on_gpu) for case in GPU_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_matches_the_float32_product_on_mistral_shapes(M, N, K, dtype):
    x, weight = inputs(M, N, K, dtype)
    ref = x.float() @ weight.float().t()
    for config in (None, GemvConfig(block_n=2, block_k=256, split_k=4),
                   GemvConfig(block_n=64, block_k=128, split_k=3, dot=True)):
        torch.testing.assert_close(gemv(x, weight, config).float(), ref, **tolerance(dtype, K))


def fp8_inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0):
    """x, and an e4m3 weight with per-channel scales as fp8 layers hold it; the reference is x
    times the dequantized weight (what the CPU path computes)."""
    from server.kernels.quant_reference import dequantize_fp8, quantize_fp8_rows

    x, weight = inputs(M, N, K, torch.float32, seed)
    q, scale = quantize_fp8_rows(weight)
    x = x.to(dtype)
    return x, q, scale, x.float() @ dequantize_fp8(q, scale).float().t()


@pytest.mark.parametrize("config", SMALL_CONFIGS + [None], ids=str)
@pytest.mark.parametrize("M, N, K", SMALL_CASES)
def test_fp8_weights_give_the_product_with_their_dequantized_values(M, N, K, config):
    dtype = DTYPES[0]
    x, q, scale, ref = fp8_inputs(M, N, K, dtype)
    out = gemv(x, q, config, weight_scale=scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype, K))


@pytest.mark.parametrize("M, N, K", [pytest.param(*case, marks=on_gpu) for case in GPU_CASES])
def test_fp8_weights_on_mistral_shapes(M, N, K):
    x, q, scale, ref = fp8_inputs(M, N, K, torch.bfloat16)
    torch.testing.assert_close(gemv(x, q, weight_scale=scale).float(), ref, **tolerance(torch.bfloat16, K))


def gated_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded to x's dtype as the unfused kernel rounds it, times W in float32."""
    from server.kernels.reference import silu_and_mul_reference

    return silu_and_mul_reference(x).float() @ weight.float().t()


@pytest.mark.parametrize("config", SMALL_CONFIGS + [None], ids=str)
@pytest.mark.parametrize("M, N, K", SMALL_CASES)
def test_a_gated_input_is_multiplied_as_silu_of_the_gate_times_up(M, N, K, config):
    dtype = DTYPES[0]
    x, weight = inputs(M, N, 2 * K, dtype)
    weight = weight[:, :K].contiguous()
    out = gemv(x, weight, config, gated=True)
    assert out.shape == (M, N)
    torch.testing.assert_close(out.float(), gated_reference(x, weight), **tolerance(dtype, K))
    x_q, q, scale, _ = fp8_inputs(M, N, K, dtype)
    x = torch.cat([x_q, x_q.flip(1)], dim=1)
    from server.kernels.quant_reference import dequantize_fp8
    torch.testing.assert_close(gemv(x, q, config, weight_scale=scale, gated=True).float(),
                               gated_reference(x, dequantize_fp8(q, scale).float()), **tolerance(dtype, K))


@pytest.mark.parametrize("M", [pytest.param(m, marks=on_gpu) for m in (1, 2, 4, 8, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_gated_input_on_the_down_projections_shape(M, dtype):
    x, weight = inputs(M, 4096, 2 * 14336, dtype)
    weight = weight[:, :14336].contiguous()
    torch.testing.assert_close(gemv(x, weight, gated=True).float(), gated_reference(x, weight),
                               **tolerance(dtype, 14336))


EXPERT_CONFIGS = [None, GemvConfig(block_n=8, block_k=32, num_stages=2, split_k=3)]


@pytest.mark.parametrize("config", EXPERT_CONFIGS, ids=str)
@pytest.mark.parametrize("M, repeat, N, K", [(1, 2, 48, 256), (2, 2, 33, 96), (3, 1, 40, 130)])
def test_rows_read_from_their_own_experts(M, repeat, N, K, config):
    """Output row p is x[p // repeat] times expert experts[p]'s weight; an expert may repeat."""
    dtype = DTYPES[0]
    x, _ = inputs(M, N, K, dtype)
    stack = torch.stack([inputs(1, N, K, dtype, seed=e)[1] for e in range(4)])  # [4, N, K]
    experts = torch.tensor([3, 0, 3, 1, 2, 0][:M * repeat], device=DEVICE)
    out = gemv(x, stack, config, experts=experts)
    ref = torch.stack([x[p // repeat].float() @ stack[e].float().t() for p, e in enumerate(experts.tolist())])
    assert out.shape == (M * repeat, N)
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype, K))
    gate_up = torch.cat([x, x.flip(0)], dim=1).repeat_interleave(repeat, 0)  # [P, 2K]: gated, one per row
    out = gemv(gate_up, stack, config, gated=True, experts=experts)
    ref = torch.stack([gated_reference(gate_up[p:p + 1], stack[e])[0] for p, e in enumerate(experts.tolist())])
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype, K))


def test_expert_rows_take_fp8_stacks_with_their_scales():
    from server.kernels.quant_reference import dequantize_fp8, quantize_fp8_rows

    x, _ = inputs(1, 24, 64, DTYPES[0])
    stack = torch.stack([inputs(1, 24, 64, DTYPES[0], seed=e)[1] for e in range(3)])
    quantized = [quantize_fp8_rows(w.float()) for w in stack]
    q, scales = torch.stack([w for w, _ in quantized]), torch.stack([s for _, s in quantized]).float()
    experts = torch.tensor([2, 1], device=DEVICE)
    out = gemv(x, q, weight_scale=scales, experts=experts)
    ref = torch.stack([x[0].float() @ dequantize_fp8(q[e], scales[e]).float().t() for e in (2, 1)])
    torch.testing.assert_close(out.float(), ref, **tolerance(DTYPES[0], 64))


@pytest.mark.parametrize("tokens", [pytest.param(t, marks=on_gpu) for t in (1, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_rows_on_mixtral_shapes(tokens, dtype):
    stack = torch.stack([inputs(1, 2 * 14336, 4096, dtype, seed=e)[1] for e in range(3)])
    x, _ = inputs(tokens, 8, 4096, dtype)
    experts = torch.tensor([2, 0, 0, 1][:2 * tokens], device=DEVICE)
    gate_up = gemv(x, stack, experts=experts)
    for p, e in enumerate(experts.tolist()):
        torch.testing.assert_close(gate_up[p].float(), x[p // 2].float() @ stack[e].float().t(),
                                   **tolerance(dtype, 4096))
    down = torch.stack([inputs(1, 4096, 14336, dtype, seed=e)[1] for e in range(3)])
    out = gemv(gate_up, down, experts=experts, gated=True)
    for p, e in enumerate(experts.tolist()):
        torch.testing.assert_close(out[p].float(), gated_reference(gate_up[p:p + 1], down[e])[0],
                                   **tolerance(dtype, 14336))


def test_expert_rows_refuse_what_they_cannot_read():
    x = torch.zeros(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="stacked"):
        gemv(x, torch.zeros(8, 32, device=DEVICE), experts=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        gemv(x, torch.zeros(2, 8, 32, device=DEVICE), experts=torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="tensor cores"):
        gemv(x, torch.zeros(2, 8, 32, device=DEVICE), GemvConfig(dot=True),
             experts=torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_an_fp8_weight_needs_its_scales():
    x, q, scale, _ = fp8_inputs(1, 8, 32, DTYPES[0])
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(x, q)
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(x, q, weight_scale=scale[:4])


def test_gemv_reads_x_rows_with_a_stride():
    x, weight = inputs(4, 40, 64, DTYPES[0])
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows 128 apart
    torch.testing.assert_close(gemv(wide, weight), gemv(x.contiguous(), weight))


@pytest.mark.parametrize("M", [0, MAX_ROWS + 1])
def test_gemv_refuses_batches_it_is_not_for(M):
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(M, 32, device=DEVICE), torch.zeros(8, 32, device=DEVICE))


def test_gemv_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="columns"):
        gemv(torch.zeros(1, 32, device=DEVICE), torch.zeros(8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="gated"):
        gemv(torch.zeros(1, 32, device=DEVICE), torch.zeros(8, 32, device=DEVICE), gated=True)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.zeros(1, 32, device=DEVICE), torch.zeros(32, 8, device=DEVICE).t())


@pytest.mark.parametrize("M", [1, MAX_ROWS, MAX_ROWS + 1])
def test_layers_with_gemv_on_take_it_for_cuda_decode_batches_only(M, monkeypatch):
    from server.layers import linear

    calls = []
    monkeypatch.setattr(linear, "gemv", lambda x, weight, **kw: calls.append(x.shape) or gemv(x, weight, **kw))
    dtype = DTYPES[0]
    layer = linear.MergedColumnParallelLinear(64, [(48, 1), (16, 1)], bias=True).to(DEVICE, dtype)
    for piece, rows in enumerate((48, 16)):
        layer.load_piece(piece, torch.randn(rows, 64, dtype=dtype) / 8)
        layer.load_piece(piece, torch.randn(rows, dtype=dtype), "bias")
    x = torch.randn(M, 64).to(dtype).to(DEVICE)
    out = layer(x)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x, layer.weight, layer.bias).float(),
                               **tolerance(dtype, 64))
    assert len(calls) == (1 if x.is_cuda and M <= MAX_ROWS else 0)


@pytest.mark.parametrize("M", [1, MAX_ROWS + 1])
def test_a_gated_row_parallel_layer_multiplies_silu_of_the_gate_times_up(M):
    from server.layers.linear import RowParallelLinear

    dtype = DTYPES[0]
    layer = RowParallelLinear(48, 40, gated=True).to(DEVICE, dtype)
    layer.load(torch.randn(40, 48, dtype=dtype) / 8)
    x = torch.randn(M, 96).to(dtype).to(DEVICE)
    torch.testing.assert_close(layer(x).float(), gated_reference(x, layer.weight), **tolerance(dtype, 48))
