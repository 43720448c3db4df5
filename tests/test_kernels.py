"""Each Triton kernel against its plain-torch reference: on the GPU over many shapes, and on
the CPU in Triton's interpreter over a few small ones (CI)."""
from __future__ import annotations

import pytest
import torch

from server.kernels.attention_reference import decode_attention_reference, prefill_attention_reference
from server.kernels.reference import rmsnorm_reference, rotary_reference, silu_and_mul_reference, store_kv_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
gpu_only = pytest.mark.skipif(not CUDA, reason="the larger shapes run on the GPU only")


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)


def paged_cache(context_lens, page, kv_heads, head_dim, dtype, seed=0):
    """A cache with shuffled block tables, filled at random; returns caches and tables."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-c // page) for c in context_lens]
    num_blocks = sum(blocks_each) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_each)
    tables, used = [], 0
    for n in blocks_each:
        tables.append(order[used:used + n] + [0] * (width - n))
        used += n
    shape = (num_blocks, page, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=DEVICE)


DECODE_CASES = [  # context_lens, page, heads, kv_heads, head_dim, window, splits
    ([5, 17, 33], 16, 4, 2, 16, None, 1),
    ([40, 3], 16, 4, 1, 32, 8, 3),
    ([70], 8, 2, 2, 16, None, 4),
    ([9, 20], 4, 8, 2, 8, None, 2),  # head_dim 8: tiles padded to what tl.dot needs
    ([33, 7, 0], 8, 6, 2, 16, None, 5),  # three query heads a KV head; splits past a power of two
    ([5, 1, 40, 17, 2, 64, 3, 9, 30], 8, 4, 2, 16, 24, 2),  # more than EARLY_SEQS: no tile read before the wait
] + [pytest.param(*case, marks=gpu_only) for case in [
    ([1, 15, 16, 17, 300, 4097], 16, 32, 8, 128, None, 8),
    ([128, 1000], 16, 32, 32, 128, None, 1),
    ([2049, 77], 32, 16, 2, 64, None, 16),
    ([5000, 4096, 130], 16, 32, 8, 128, 4096, 32),
    ([513], 256, 8, 1, 128, None, 5),
]]


@pytest.mark.parametrize("context_lens, page, heads, kv_heads, head_dim, window, splits", DECODE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_matches_reference(context_lens, page, heads, kv_heads, head_dim, window, splits, dtype):
    from server.kernels.decode_attention import decode_attention

    k_cache, v_cache, tables = paged_cache(context_lens, page, kv_heads, head_dim, dtype)
    q = torch.randn(len(context_lens), heads, head_dim).to(dtype).to(DEVICE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    scale = head_dim ** -0.5
    out = decode_attention(q, k_cache, v_cache, tables, ctx, scale, window, num_splits=splits)
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables.long(), ctx, scale, window)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_gives_zeros_for_padding_rows(splits):
    from server.kernels.decode_attention import decode_attention

    k_cache, v_cache, tables = paged_cache([20, 1], 16, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    out = torch.full_like(q, float("nan"))  # written whole, merged or not
    decode_attention(q, k_cache, v_cache, tables, torch.tensor([20, 0], device=DEVICE), 0.25, None, splits, out=out)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_decode_attention_tiles_change_no_result():
    from server.kernels.decode_attention import DecodeConfig, decode_attention

    k_cache, v_cache, tables = paged_cache([45, 130], 16, 2, 16, DTYPES[0])
    q = torch.randn(2, 8, 16).to(DTYPES[0]).to(DEVICE)
    ctx = torch.tensor([45, 130], device=DEVICE)
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables.long(), ctx, 0.25, None)
    for config in (DecodeConfig(block_n=16, num_warps=2, num_stages=1), DecodeConfig(block_n=128, num_stages=3)):
        for splits in (1, 3, 12):
            out = decode_attention(q, k_cache, v_cache, tables, ctx, 0.25, None, splits, config=config)
            torch.testing.assert_close(out.float(), ref, **tol(DTYPES[0]))


PREFILL_CASES = [  # (query_len, context_len) per sequence, page, heads, kv_heads, head_dim, window
    ([(5, 5), (3, 20), (17, 17)], 16, 4, 2, 16, None),
    ([(9, 30), (1, 1)], 8, 2, 1, 32, 6),
    ([(7, 7), (3, 12)], 4, 8, 2, 8, None),
    ([(5, 5), (20, 41)], 16, 6, 2, 16, 9),  # a group of 3: one query head a program
] + [pytest.param(*case, marks=gpu_only) for case in [
    ([(128, 128), (1000, 1000), (37, 600), (1, 4097)], 16, 32, 8, 128, None),
    ([(300, 300), (64, 2048)], 32, 16, 16, 64, None),
    ([(700, 900), (513, 513)], 16, 32, 4, 128, 256),
    ([(2048, 2048)], 256, 8, 1, 128, None),
]]


@pytest.mark.parametrize("lens, page, heads, kv_heads, head_dim, window", PREFILL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_reads_cached_prefixes_like_the_reference(lens, page, heads, kv_heads, head_dim,
                                                                    window, dtype):
    from server.kernels.prefill_attention import prefill_attention

    query_lens = [q for q, _ in lens]
    context_lens = [c for _, c in lens]
    k_cache, v_cache, tables = paged_cache(context_lens, page, kv_heads, head_dim, dtype, seed=1)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(query_lens), scale, window)
    ref = prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables.long(),
                                      query_lens, context_lens, scale, window)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


def test_prefill_attention_tiles_and_packed_heads_change_no_result():
    """A program takes `heads` query heads of one KV head (rows: tokens x heads); every packing
    and tile gives the reference's output, chunks that end mid-tile included."""
    from server.kernels.prefill_attention import PrefillConfig, prefill_attention

    query_lens, context_lens = [13, 1, 6], [13, 30, 40]
    k_cache, v_cache, tables = paged_cache(context_lens, 8, 2, 16, DTYPES[0], seed=3)
    q = torch.randn(sum(query_lens), 8, 16).to(DTYPES[0]).to(DEVICE)
    cu = torch.tensor([0, 13, 14, 20], device=DEVICE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    ref = prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables.long(),
                                      query_lens, context_lens, 0.25, None)
    for heads in (1, 2, 4):
        for block_m, block_n in ((16, 16), (64, 32)):
            config = PrefillConfig(block_m=block_m, block_n=block_n, heads=heads)
            out = prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 13, 0.25, None, config=config)
            torch.testing.assert_close(out.float(), ref, **tol(DTYPES[0]))
    with pytest.raises(ValueError, match="not a divisor"):
        prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 13, 0.25, None, config=PrefillConfig(heads=8))


MIXED_CASES = [  # (query_len, context_len) per sequence (one-token ones beside longer), window, splits
    ([(1, 20), (6, 6), (1, 45), (9, 30)], None, 1),
    ([(3, 19), (1, 33), (1, 2), (1, 64)], 7, 3),
] + [pytest.param(*case, marks=gpu_only) for case in [
    ([(1, 700), (585, 585), (1, 1100), (1, 5), (300, 900), (1, 130)], None, 4),
    ([(1, 4097), (64, 64), (1, 1000)], 1024, 16),
]]


@pytest.mark.parametrize("lens, window, splits", MIXED_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mixed_step_splits_between_the_decode_and_prefill_kernels_like_the_reference(lens, window, splits, dtype):
    """The layer's mixed step: the one-token sequences through the decode kernel (indexed into
    the step's rows), the rest through the prefill kernel (indexed too); every row written once."""
    from server.kernels.decode_attention import decode_attention
    from server.kernels.prefill_attention import prefill_attention

    query_lens = [q for q, _ in lens]
    context_lens = [c for _, c in lens]
    heads, kv_heads, head_dim = (32, 8, 128) if CUDA else (4, 2, 16)
    k_cache, v_cache, tables = paged_cache(context_lens, 16, kv_heads, head_dim, dtype, seed=2)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=DEVICE)  # int64, as the runner's
    ctx = torch.tensor(context_lens, device=DEVICE)
    singles = torch.tensor([i for i, n in enumerate(query_lens) if n == 1], device=DEVICE)
    multis = torch.tensor([i for i, n in enumerate(query_lens) if n > 1], device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, tables, ctx, scale, window, splits, out=out, seq_ids=singles,
                     cu_query_lens=cu)
    prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(query_lens), scale, window, out=out, seq_ids=multis)
    ref = prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables.long(),
                                      query_lens, context_lens, scale, window)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_slots_from_strided_views_and_skips_padding(dtype):
    from server.kernels.cache import store_kv

    qkv = torch.randn(6, 3 * 2 * 16).to(dtype).to(DEVICE)
    k = qkv[:, 32:64].view(6, 2, 16)
    v = qkv[:, 64:].view(6, 2, 16)
    slots = torch.tensor([3, 0, 9, -1, 17, 30], device=DEVICE)
    caches = [torch.zeros(4, 8, 2, 16, dtype=dtype, device=DEVICE) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("hidden", [64, 100] + ([4096] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm_matches_reference(hidden, dtype):
    from server.kernels.norm import rmsnorm

    x = torch.randn(7, hidden).to(dtype).to(DEVICE)
    residual = torch.randn(7, hidden).to(dtype).to(DEVICE)
    weight = torch.rand(hidden).to(dtype).to(DEVICE)
    y, s = rmsnorm(x, weight, 1e-5, residual)
    y_ref, s_ref = rmsnorm_reference(x, weight, 1e-5, residual)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    torch.testing.assert_close(rmsnorm(x, weight, 1e-5), rmsnorm_reference(x, weight, 1e-5),
                               atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("width", [48, 1000] + ([14336] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(width, dtype):
    from server.kernels.activation import silu_and_mul

    x = torch.randn(5, 2 * width).to(dtype).to(DEVICE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (3, 1, 8)] + ([(32, 8, 128)] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_rotate_and_store_is_rotary_then_the_cache_store(heads, kv_heads, head_dim, dtype, fp8):
    from server.kernels.quant_reference import FP8
    from server.kernels.rotary import rotate_and_store
    from test_quant_kernels import e4m3_normals

    positions = torch.tensor([0, 5, 17, 2, 63], device=DEVICE)
    width = (heads + 2 * kv_heads) * head_dim
    values = torch.randn(5, width)
    if fp8 and not CUDA:
        # The interpreter's rounding to e4m3 is off (1.99 -> 1.0): e4m3 values that position 0
        # leaves unrotated, and a power-of-two scale keeps exact, test the fp8 path there.
        positions, values = torch.zeros_like(positions), e4m3_normals(5, width)
    angles = torch.outer(torch.arange(64.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)
    qkv = values.to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(5, -1, head_dim) for x in (q, k, v))
    slots = torch.tensor([3, 0, 9, -1, 17], device=DEVICE)  # -1: a padding token, nothing stored
    cache_dtype = FP8 if fp8 else dtype
    caches = [torch.zeros(4, 8, kv_heads, head_dim, device=DEVICE).to(cache_dtype) for _ in range(4)]
    scales = dict(k_scale=0.5, v_scale=2.0) if fp8 else {}
    q_ref, k_ref = rotary_reference(positions, q.clone(), k.clone(), cos_sin)
    store_kv_reference(k_ref, v, caches[2], caches[3], slots, **scales)
    k_before = k.clone()
    rotate_and_store(positions, q, k, v, cos_sin, caches[0], caches[1], slots, **scales)
    assert torch.equal(k, k_before)  # k is rotated into the cache only
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))  # v: stored as it is
    assert caches[0].float().abs().sum() > 0
    if not CUDA:  # both round the float32 rotation to the dtype once: the same bits
        assert torch.equal(q, q_ref) and torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    else:  # the GPU fuses x * cos - y * sin into one FMA: a float32 ulp may move a rounding by one step
        step = torch.finfo(dtype).eps  # one unit in the last place at 1
        torch.testing.assert_close(q.float(), q_ref.float(), rtol=step, atol=1e-5)
        torch.testing.assert_close(caches[0].float(), caches[2].float(), atol=2.0 ** -9,
                                   rtol=2.0 ** -3 if fp8 else step)


def as_deferred_sums(values: torch.Tensor) -> torch.Tensor:
    """float32 values as a 4-bit product's deferred sums: int64 counts of SUM_UNIT."""
    from server.kernels.quant_reference import SUM_UNIT

    return (values.double() / SUM_UNIT).round().long().to(DEVICE)


# rows, hidden, intermediate, heads, kv heads, head dim
DEFERRED_SHAPES = [(3, 100, 48, 4, 2, 16),
                   pytest.param((8, 4096, 14336, 32, 8, 128), marks=[pytest.mark.gpu, gpu_only], id="mistral-7b")]


@pytest.mark.parametrize("shape", DEFERRED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if CUDA else [torch.float16])
def test_kernels_read_deferred_sums_as_finish_sums_does_and_leave_zeros(dtype, shape):
    """The norm, silu_and_mul and the rotary kernel given int64 sums: the same results as given
    the values finish_sums makes of them, and the sums zero for the next product. (Triton's
    interpreter rounds float32 to bf16 by truncation, so on the CPU fp16 only.) At Mistral-7B's
    widths on the GPU, where the compiler maps a program's loads and its zeroing stores to its
    threads differently: a reader that zeroed sums before all its threads had read them gave
    another norm in every row."""
    from server.kernels.activation import silu_and_mul
    from server.kernels.norm import rmsnorm
    from server.kernels.quant_reference import finish_sums
    from server.kernels.rotary import rotate_and_store

    rows, hidden, intermediate, heads, kv_heads, head_dim = shape
    torch.manual_seed(0)
    for _ in range(3):  # a race need not show on every run
        sums = as_deferred_sums(torch.randn(rows, hidden) * 3)
        residual, weight = torch.randn(rows, hidden).to(dtype).to(DEVICE), torch.rand(hidden).to(dtype).to(DEVICE)
        expected = rmsnorm(finish_sums(sums.clone(), dtype), weight, 1e-5, residual)
        got = rmsnorm(sums, weight, 1e-5, residual, dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) and not sums.any()
        sums = as_deferred_sums(torch.randn(rows, 2 * intermediate))
        expected = silu_and_mul(finish_sums(sums.clone(), dtype))
        assert torch.equal(silu_and_mul(sums, dtype), expected) and not sums.any()

    qkv = as_deferred_sums(torch.randn(rows, (heads + 2 * kv_heads) * head_dim))
    positions = torch.tensor([0, 7, 30] + [3 * i for i in range(rows - 3)], device=DEVICE)
    slots = torch.tensor([5, -1, 2] + [8 + i for i in range(rows - 3)], device=DEVICE)
    cos_sin = torch.cat([torch.rand(32, head_dim // 2), torch.rand(32, head_dim // 2)], dim=-1).to(DEVICE)
    caches = [torch.zeros(4, 8, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]

    def views(x):
        q, k, v = x.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return [t.view(rows, -1, head_dim) for t in (q, k, v)]

    q, k, v = views(finish_sums(qkv.clone(), dtype))
    rotate_and_store(positions, q, k, v, cos_sin, caches[2], caches[3], slots)
    q_out = torch.empty(rows, heads, head_dim, dtype=dtype, device=DEVICE)
    rotated = rotate_and_store(positions, *views(qkv), cos_sin, caches[0], caches[1], slots, q_out=q_out)
    assert rotated is q_out and torch.equal(q_out, q) and not qkv.any()
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(ValueError, match="q_out"):
        rotate_and_store(positions, *views(qkv), cos_sin, caches[0], caches[1], slots)


def test_the_norm_and_silu_layers_read_deferred_sums_on_the_cpu_too():
    from server.kernels.quant_reference import finish_sums
    from server.layers.activation import silu_and_mul as silu_layer
    from server.layers.norm import RMSNorm

    norm = RMSNorm(64, 1e-5).to(torch.bfloat16).to(DEVICE)
    sums, residual = as_deferred_sums(torch.randn(2, 64)), torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
    expected = norm(finish_sums(sums.clone(), torch.bfloat16), residual)
    assert all(torch.equal(a, b) for a, b in zip(norm(sums, residual), expected)) and not sums.any()
    sums = as_deferred_sums(torch.randn(2, 64))
    expected = silu_layer(finish_sums(sums.clone(), torch.bfloat16))
    assert torch.equal(silu_layer(sums, torch.bfloat16), expected) and not sums.any()


MOE_CASES = [(1, 4, 2, 64, 48), (2, 3, 2, 64, 40), (7, 4, 2, 32, 40), (40, 8, 2, 64, 96)] + [
    pytest.param(*case, marks=gpu_only) for case in
    [(1, 8, 2, 4096, 14336), (2, 8, 2, 4096, 14336), (64, 8, 2, 4096, 14336), (4096, 8, 2, 1024, 2048), (300, 8, 2, 4096, 1792)]]


@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter", MOE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_matches_reference(tokens, experts, top_k, hidden, inter, dtype):
    from server.kernels.fused_moe import MoEConfig, fused_moe
    from server.kernels.reference import fused_moe_reference

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(DEVICE)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype).to(DEVICE)
    probs = torch.randn(tokens, experts, generator=g).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights, ids = (weights / weights.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)
    ref = fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    for config in (None, MoEConfig(block_m=32, block_n=16, block_k=16, num_warps=2, num_stages=2)):
        out = fused_moe(x, w13, w2, weights, ids, config)
        torch.testing.assert_close(out.float(), ref, **tol(dtype))
