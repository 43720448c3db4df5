"""The quantized MoE kernels (server/kernels/quantized_moe.py) against their torch reference:
4-bit experts with consecutive groups, act-order (rows sorted by group, columns gathered) and
uneven groups (g_idx read per row, as a row-parallel rank's share under act-order), and fp8
experts; sorted by expert or a block per pair (decode), K of the down kernel split or not. On the CPU in Triton's interpreter over small shapes; on the GPU over Mixtral-8x7B's
and 8x22B's expert shapes, from one token to 4,096."""
from __future__ import annotations

import pytest
import torch

from server.kernels.quant_reference import Fp8Experts, Int4Experts, group_of_each_input, pack_int4, quantize_fp8_rows
from server.kernels.reference import quantized_moe_reference
from server.kernels.gemv import gemv as _gemv
from test_kernels import DEVICE, DTYPES, gpu_only, tol


def int4_experts(experts: int, K: int, N: int, group_size: int, order: str, dtype: torch.dtype,
                 g: torch.Generator) -> Int4Experts:
    """Random 4-bit experts, scales giving outputs of about 1. `order`: "runs" (input k in group
    k // group_size), "act-order" (each expert's inputs in a random order, rows sorted by group:
    perm) or "uneven" (also groups of unequal sizes: perm and g_idx)."""
    groups = K // group_size
    tensors = {"qweight": [], "zeros": [], "scales": [], "g_idx": [], "perm": []}
    for _ in range(experts):
        q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.uint8)
        tensors["qweight"].append(pack_int4(q, dim=0))
        tensors["zeros"].append(torch.randint(0, 16, (groups, N), generator=g, dtype=torch.uint8))
        tensors["scales"].append((torch.rand(groups, N, generator=g) * 2 / (8 * K ** 0.5)).to(dtype))
        uneven = torch.randint(0, groups, (K,), generator=g).sort().values
        tensors["g_idx"].append((uneven if order == "uneven" else group_of_each_input(K, group_size)).int())
        tensors["perm"].append(torch.randperm(K, generator=g).int())
    stacked = {name: torch.stack(values).to(DEVICE) for name, values in tensors.items()}
    return Int4Experts(stacked["qweight"], stacked["zeros"], stacked["scales"],
                       stacked["g_idx"] if order == "uneven" else None,
                       stacked["perm"] if order != "runs" else None, group_size)


def fp8_experts(experts: int, K: int, N: int, g: torch.Generator) -> Fp8Experts:
    rows = [quantize_fp8_rows(torch.randn(N, K, generator=g) / K ** 0.5) for _ in range(experts)]
    return Fp8Experts(torch.stack([q for q, _ in rows]).to(DEVICE), torch.stack([s for _, s in rows]).to(DEVICE))


def routed(tokens: int, experts: int, top_k: int, g: torch.Generator):
    probs = torch.randn(tokens, experts, generator=g).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


FORMATS = ["runs", "act-order", "uneven", "fp8"]
CASES = [(1, 4, 2, 64, 96, 32), (5, 4, 2, 64, 96, 32), (40, 8, 2, 128, 64, 64)] + [
    pytest.param(*case, marks=[gpu_only, pytest.mark.gpu]) for case in [  # Mixtral-8x7B and 8x22B, one GPU
        (1, 8, 2, 4096, 14336, 128), (4, 8, 2, 4096, 14336, 128), (64, 8, 2, 4096, 14336, 128),
        (300, 8, 2, 4096, 14336, 128), (4096, 8, 2, 4096, 14336, 128),
        (1, 8, 2, 6144, 16384, 128), (256, 8, 2, 6144, 16384, 128), (4096, 8, 2, 6144, 8192, 128)]]


@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter, group_size", CASES)
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_moe_matches_the_reference(tokens, experts, top_k, hidden, inter, group_size, layout, dtype):
    from server.kernels.quantized_moe import QuantizedMoEConfig, quantized_moe

    g = torch.Generator().manual_seed(tokens)
    if layout == "fp8":
        w13, w2 = fp8_experts(experts, hidden, 2 * inter, g), fp8_experts(experts, inter, hidden, g)
    else:
        w13 = int4_experts(experts, hidden, 2 * inter, group_size, layout, dtype, g)
        w2 = int4_experts(experts, inter, hidden, group_size, layout, dtype, g)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(DEVICE)
    weights, ids = routed(tokens, experts, top_k, g)
    ref = quantized_moe_reference(x, w13, w2, weights, ids)
    small = dict(block_n=16, block_k=32, num_warps=2, num_stages=2)
    configs = [None, QuantizedMoEConfig(block_m=32, **small), QuantizedMoEConfig(block_m=16, split_k=2, **small)]
    if tokens * top_k <= 16:  # a program a pair: the interpreter's time grows with the pairs
        configs.append(QuantizedMoEConfig(block_m=16, by_pair=True, split_k=3, **small))
    for config in configs:
        out = quantized_moe(x, w13, w2, weights, ids, config)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("tokens", [1, 2])
def test_fp8_decode_rows_read_their_experts_through_gemv(tokens, monkeypatch):
    """One or two tokens of e4m3 experts in half precision (a decode step) take gemv's rows read
    from their own experts, as bf16 experts do: the reference's sums, and gemv called twice."""
    import server.kernels.fused_moe as fused
    import server.kernels.quantized_moe as module

    g = torch.Generator().manual_seed(tokens)
    w13, w2 = fp8_experts(4, 64, 192, g), fp8_experts(4, 96, 64, g)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    weights, ids = routed(tokens, 4, 2, g)
    gated = []

    def counted(*args, **kwargs):
        gated.append(kwargs.get("gated", False))
        return _gemv(*args, **kwargs)

    monkeypatch.setattr(fused, "gemv", counted)  # fused_moe.experts_by_gemv's
    out = module.quantized_moe(x, w13, w2, weights, ids)
    assert gated == [False, True]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), quantized_moe_reference(x, w13, w2, weights, ids), **tol(torch.bfloat16))


@pytest.mark.parametrize("tokens", [1, 2])
def test_4bit_decode_rows_read_their_experts_through_the_mma_path(tokens, monkeypatch):
    """One or two tokens of 4-bit experts whose groups are runs (a decode step) take int4_gemv's
    mma path, a row from each pair's expert (the mma emulated here), K split for the down
    product; act-order experts keep the grouped kernel (test_quantized_moe_matches_the_reference)."""
    import server.kernels.quantized_moe as module
    from server.kernels.int4_gemv import int4_gemv_experts

    g = torch.Generator().manual_seed(tokens)
    calls = []

    def counted(x, *args):
        calls.append(x.shape[0])
        return int4_gemv_experts(x, *args)

    monkeypatch.setattr(module, "int4_gemv_experts", counted)
    w13 = int4_experts(4, 64, 192, 32, "runs", torch.bfloat16, g)
    w2 = int4_experts(4, 96, 64, 32, "runs", torch.bfloat16, g)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    weights, ids = routed(tokens, 4, 2, g)
    ids[0, 1] = ids[0, 0]  # an expert picked twice
    out = module.quantized_moe(x, w13, w2, weights, ids)
    assert calls == [tokens, 2 * tokens]  # gate_up from the tokens' rows, down from the pairs'
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), quantized_moe_reference(x, w13, w2, weights, ids), **tol(torch.bfloat16))
    assert not module._runs_for_mma(int4_experts(4, 64, 192, 32, "act-order", torch.bfloat16, g))


def test_the_reference_puts_each_act_order_row_on_the_input_it_multiplies():
    """Int4Experts.dense undoes perm: row k of qweight is input perm[k]'s weight."""
    g = torch.Generator().manual_seed(0)
    sorted_rows = int4_experts(2, 64, 16, 16, "act-order", torch.float32, g)
    in_order = Int4Experts(sorted_rows.qweight, sorted_rows.zeros, sorted_rows.scales, None, None, 16)
    perm = sorted_rows.perm.long().cpu()
    for e in range(2):
        assert torch.equal(sorted_rows.dense()[e][:, perm[e]], in_order.dense()[e])
