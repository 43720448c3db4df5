"""Mixtral with quantized experts (GPTQ, AWQ, fp8): loaded from their checkpoints' layouts with
no flag, the router left in the model's dtype, and held to transformers on the dequantized
weights (float32, CPU); the experts fused for the GPU's kernels (run here in Triton's
interpreter) give the outputs of the CPU's loop over experts, on one rank and on each of two."""
from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from quantize_checkpoint import write_dequantized, write_quantized
from server import LLM, SamplingParams
from server.config import EngineArgs, ModelConfig
from server.engine.llm_engine import LLMEngine
from server.kernels.quant_reference import FP8, dequantize_fp8, dequantize_int4, group_of_each_input, unpack_int4
from server.layers.moe import QuantizedSparseMoE
from server.layers.parallel import TensorParallel, set_tensor_parallel
from server.models.loader import FP8_STD, iter_weights, load_config, resolve_model
from server.models.mixtral import MixtralForCausalLM
from server.models.quantization import resolve_quantization
from server.runtime.model_runner import SequenceChunk
from test_parity import GREEDY
from test_quantization import assert_greedy_equals_transformers, drawn_weight, write_oracle
from test_tensor_parallel import run as run_sharded

FORMATS = {  # name -> write_quantized's arguments
    "gptq-act-order": dict(method="gptq", desc_act=True, group_size=32),
    "gptq": dict(method="gptq", group_size=32),
    "gptq-v2-sym-group16": dict(method="gptq", sym=True, v2=True, group_size=16),
    "awq": dict(method="awq", group_size=32),
    "fp8-per-channel": dict(method="fp8"),
    "fp8-per-tensor": dict(method="fp8", per_channel=False),
}


@pytest.fixture(scope="module")
def quantized_mixtral(mixtral_dir, tmp_path_factory):
    """{format: (quantized dir, dequantized float32 dir)} of the tiny Mixtral."""
    made = {}
    for name, arguments in FORMATS.items():
        root = tmp_path_factory.mktemp(f"mixtral-{name}")
        weights = write_quantized(Path(mixtral_dir), root / "quantized", **arguments)
        assert any(".experts." in key for key in weights)  # the experts were quantized, not only attention
        write_dequantized(Path(mixtral_dir), root / "dequantized", weights)
        made[name] = (str(root / "quantized"), str(root / "dequantized"))
    return made


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_experts_give_transformers_greedy_on_the_dequantized_weights(name, quantized_mixtral):
    path, oracle = quantized_mixtral[name]
    assert isinstance(LLM(path, device="cpu").engine.runner.model.layers[0].mlp, QuantizedSparseMoE)
    assert_greedy_equals_transformers(path, oracle, dtype="float32")


def test_fp8_at_load_quantizes_the_experts_too(mixtral_dir, quantized_mixtral):
    """--quantize fp8 on a float32 Mixtral rounds every expert's channels as the per-channel
    checkpoint does, so that checkpoint's dequantized weights are its oracle."""
    _, oracle = quantized_mixtral["fp8-per-channel"]
    assert_greedy_equals_transformers(mixtral_dir, oracle, dtype="float32", quantization="fp8")


@pytest.mark.parametrize("name", ["gptq-v2-sym-group16", "fp8-per-channel"])
def test_two_ranks_give_the_tokens_of_one_rank(name, quantized_mixtral):
    path, _ = quantized_mixtral[name]
    one, _ = run_sharded(path, 1, GREEDY)
    two, _ = run_sharded(path, 2, GREEDY)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]


def first_moe_layer(model_dir: str, rank: int, ranks: int) -> QuantizedSparseMoE:
    """Layer 0's experts as rank `rank` of `ranks` loads them (float32, CPU)."""
    source = resolve_model(model_dir)
    hf_config = load_config(source)
    config = replace(ModelConfig.from_hf(hf_config), quantization=resolve_quantization(hf_config, None))
    set_tensor_parallel(TensorParallel(rank, ranks))
    try:
        model = MixtralForCausalLM(config)
        model.load_weights(iter_weights(source))
    finally:
        set_tensor_parallel(TensorParallel())
    return model.layers[0].mlp


@pytest.mark.parametrize("name, ranks", [(name, 1) for name in FORMATS] + [
    ("gptq-act-order", 2), ("gptq-v2-sym-group16", 2), ("fp8-per-channel", 2)])
@torch.inference_mode()
def test_fused_experts_give_the_expert_loops_outputs(name, ranks, quantized_mixtral):
    """Each rank's share, fused (stacked tensors, the quantized MoE kernels) and looped (each
    expert's own layers); the shares add up to one rank's whole output."""
    path, _ = quantized_mixtral[name]
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    shares = []
    for rank in range(ranks):
        moe = first_moe_layer(path, rank, ranks)
        looped = moe(x)
        moe.fuse_experts()
        assert moe.graph_safe and not hasattr(moe, "experts")
        stacked = [getattr(w, f.name) for w in (moe.w13, moe.w2) for f in fields(w)]
        held = {p.data_ptr() for p in moe.parameters()}  # counted among the model's weights
        assert all(t.data_ptr() in held for t in stacked if isinstance(t, torch.Tensor))
        fused = moe(x)
        torch.testing.assert_close(fused, looped, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x[:2]), looped[:2], atol=1e-5, rtol=1e-5)  # decode: a block a pair
        shares.append(fused)
    if ranks > 1:
        torch.testing.assert_close(sum(shares), first_moe_layer(path, 0, 1)(x), atol=1e-5, rtol=1e-5)


def test_the_router_stays_unquantized_and_the_experts_are_smaller(mixtral_dir, quantized_mixtral):
    plain = LLM(mixtral_dir, dtype="float32", device="cpu").engine.runner.model
    gptq = LLM(quantized_mixtral["gptq"][0], dtype="float32", device="cpu").engine.runner.model
    assert gptq.layers[0].mlp.gate.dtype == torch.float32
    assert torch.equal(gptq.layers[0].mlp.gate, plain.layers[0].mlp.gate)
    expert_bytes = sum(t.numel() * t.element_size() for t in gptq.layers[0].mlp.experts.parameters())
    dense_bytes = plain.layers[0].mlp.w13.numel() * 4 + plain.layers[0].mlp.w2.numel() * 4
    assert expert_bytes < dense_bytes / 4


def test_fp8_experts_hold_the_checkpoints_e4m3_weights(quantized_mixtral):
    from safetensors import safe_open

    path, _ = quantized_mixtral["fp8-per-channel"]
    model = LLM(path, dtype="float32", device="cpu").engine.runner.model
    layer = model.layers[1].mlp.experts[2].w2
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
        scale = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight_scale")
    assert torch.equal(dequantize_fp8(layer.weight, layer.weight_scale), dequantize_fp8(weight, scale.reshape(-1)))


TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=512)  # for make_checkpoint.py: inputs of whole 4-bit groups (128)


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_a_checkpoint_drawn_in_its_stored_layout_gives_transformers_greedy_on_its_weights(method, tmp_path):
    """benchmarks/make_checkpoint.py --mixtral --quantize: the experts and attention drawn as
    stored words (or e4m3 values), the router in bf16, a quantization_config that loads them."""
    from benchmarks.make_checkpoint import make

    model_dir = make(tmp_path / method, num_layers=2, mixtral=True, router_std=0.5, quantize=method, sizes=TINY)
    assert isinstance(LLM(str(model_dir), device="cpu").engine.runner.model.layers[1].mlp, QuantizedSparseMoE)
    oracle = write_oracle(model_dir, tmp_path / "oracle", drawn_weight(method), device="cpu", dtype=torch.float32)
    assert_greedy_equals_transformers(str(model_dir), oracle, dtype="float32")


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_load_format_dummy_draws_quantized_experts_in_their_layouts(method, tmp_path):
    from benchmarks.make_checkpoint import make

    model_dir = make(tmp_path / method, num_layers=2, mixtral=True, weights=False, quantize=method, sizes=TINY)
    engine = LLMEngine(EngineArgs(model=str(model_dir), device="cpu", load_format="dummy"))
    expert = engine.runner.model.layers[0].mlp.experts[3].w2
    if method == "fp8":
        assert expert.weight.dtype == FP8 and torch.all(expert.weight_scale == 0.02 / FP8_STD)
        weight = dequantize_fp8(expert.weight, expert.weight_scale)
    else:
        assert torch.all(expert.zeros == 8) and expert.qweight.dtype == torch.int32
        weight = dequantize_int4(unpack_int4(expert.qweight, dim=0), expert.zeros, expert.scales,
                                 group_of_each_input(256, 128))
    assert abs(weight.std().item() - 0.02) < 0.004
    engine.add_request([1, 5, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))
    while engine.has_unfinished_requests():
        finished = [o for o in engine.step() if o.finished]
    output = finished[0].outputs[0]
    assert len(output.token_ids) == 4
    assert all(math.isfinite(entry[token]) for token, entry in zip(output.token_ids, output.logprobs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_quantized_mixtral_8x7b_shapes_match_transformers_bf16_on_the_dequantized_weights(method, tmp_path):
    """Two layers of Mixtral-8x7B's shapes, quantized, through the fused quantized MoE kernels:
    scored against fp32 transformers on the dequantized weights no further off than its bf16
    (greedy tokens cannot be the check: test_parity's Mixtral test says why); and a greedy
    continuation's logprobs, decoded a token a step from CUDA graphs (a block a pair, K split),
    equal to the same tokens scored in one prefill (sorted blocks)."""
    import random

    from benchmarks.make_checkpoint import make
    from test_parity import bf16_prompt_errors

    model_dir = str(make(tmp_path / method, num_layers=2, mixtral=True, router_std=0.5, quantize=method))
    oracle = write_oracle(Path(model_dir), tmp_path / "oracle", drawn_weight(method))
    rng = random.Random(1)
    prompt = [1] + [rng.randrange(100, 32000) for _ in range(400)]
    ours, theirs = bf16_prompt_errors(model_dir, prompt, "cuda", oracle_dir=oracle)
    assert ours <= 1.25 * theirs, f"ours {ours:.4f} against transformers' {theirs:.4f} nats"
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", max_batch_total_tokens=8192)
    assert llm.engine.runner.graphs is not None  # the fused experts let the decode steps be captured
    decoded = llm.generate([prompt[:50]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0),
                           use_tqdm=False)[0].outputs[0]
    scored = llm.generate([prompt[:50] + decoded.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0].prompt_logprobs[50:]
    for token, step, prefill in zip(decoded.token_ids, decoded.logprobs, scored):
        assert step[token] == pytest.approx(prefill[token], abs=0.1)


@torch.inference_mode()
def next_token_log_probs(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    """The model's next-token log-probabilities at every position, in one prefill."""
    runner = LLM(model_dir, dtype="float32", device="cpu").engine.runner
    blocks = -(-len(token_ids) // runner.block_size)
    hidden, _ = runner._run(runner._pack([SequenceChunk(token_ids, 0, list(range(blocks)))]), None)
    return runner.model.compute_logits(hidden).log_softmax(-1)  # [tokens, vocab]


def test_each_formats_distributions_stay_close_to_the_unquantized_models(mixtral_dir, quantized_mixtral):
    """Mean KL divergence of the next-token distributions over a fixed token sequence: fp8 moves
    them least, 4-bit more; a broken layout would move them far more than either."""
    token_ids = [1] + [(7 * i * i + 13 * i) % 31000 + 500 for i in range(48)]
    reference = next_token_log_probs(mixtral_dir, token_ids)
    kl = {}
    for name in ("fp8-per-channel", "gptq-act-order", "awq"):
        other = next_token_log_probs(quantized_mixtral[name][0], token_ids)
        kl[name] = (reference.exp() * (reference - other)).sum(-1).mean().item()
    print("mean KL from float32:", kl)
    assert kl["fp8-per-channel"] < kl["gptq-act-order"] and kl["fp8-per-channel"] < kl["awq"]
    assert max(kl.values()) < 0.5
