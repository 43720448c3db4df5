"""The real SmolLM2-135M on the CPU, quantized: its next-token distributions over a fixed text
stay close to the unquantized model's (mean KL divergence), so that a quantization that is
silently broken (a misread zero point, a wrong scale) shows.

What "close" can mean here: fp8 with per-channel scales moves the distributions by about
0.016 nats. 4-bit moves them by about 0.26 (GPTQ layout, act-order, groups of 32; rounded
to nearest by the tests' quantizer): this model is small and its weights are already
4-bit (the GGUF's Q4_1, with float minimums that integer zero points cannot express), and
even real GPTQ with calibration reached only about 0.16 on it in an experiment. So the 4-bit
bound is looser than fp8's, and the same checkpoint read with its zero points off by one
(as a loader that gets GPTQ's minus-one convention wrong would read it) must land far
outside it."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantize_checkpoint import write_quantized
from server.config import CacheConfig, ModelConfig
from server.models.loader import ModelSource, iter_weights, load_config, resolve_model
from server.models.quantization import resolve_quantization
from server.runtime.model_runner import ModelRunner, SequenceChunk

pytestmark = pytest.mark.slow

TEXT = ("The history of science is the study of the development of science and scientific knowledge, including "
        "both the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge "
        "about the natural world, produced by scientists who emphasize the observation, explanation, and prediction "
        "of real-world phenomena. The earliest roots of science can be traced to Ancient Egypt and Mesopotamia.")
BLOCK = 16


@torch.inference_mode()
def log_probs(source: ModelSource, quantize: str | None, token_ids: list[int]) -> torch.Tensor:
    """The model's next-token log-probabilities at every position of the text, float32 on the CPU."""
    hf_config = load_config(source)
    config = replace(ModelConfig.from_hf(hf_config), quantization=resolve_quantization(hf_config, quantize))
    runner = ModelRunner(config, source, "cpu", "float32")
    blocks = -(-len(token_ids) // BLOCK)
    runner.allocate_kv_cache(CacheConfig(BLOCK, blocks))
    hidden, _ = runner._run(runner._pack([SequenceChunk(token_ids, 0, list(range(blocks)))]), None)
    return runner.model.compute_logits(hidden).log_softmax(-1)  # [tokens, vocab]


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return (reference.exp() * (reference - other)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def text_ids(smollm2) -> list[int]:
    return smollm2.encode(TEXT)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> ModelSource:
    """The GGUF's weights, dequantized once, as a safetensors checkpoint."""
    gguf = resolve_model(None)
    path = tmp_path_factory.mktemp("smollm2")
    (path / "config.json").write_text(json.dumps(load_config(gguf)))
    save_file({name: tensor.contiguous() for name, tensor in iter_weights(gguf)}, str(path / "model.safetensors"))
    return ModelSource(str(path), None, "smollm2")


@pytest.fixture(scope="module")
def unquantized(dense, text_ids) -> torch.Tensor:
    return log_probs(dense, None, text_ids)


def test_fp8_smollm2_stays_within_0_05_nats_of_the_unquantized_model(dense, text_ids, unquantized):
    assert mean_kl(unquantized, log_probs(dense, "fp8", text_ids)) < 0.05


def test_4bit_smollm2_stays_close_and_a_misread_zero_point_does_not(dense, text_ids, unquantized, tmp_path):
    write_quantized(Path(dense.path), tmp_path / "gptq", method="gptq", group_size=32, desc_act=True)
    kl = mean_kl(unquantized, log_probs(ModelSource(str(tmp_path / "gptq"), None, "gptq"), None, text_ids))
    assert kl < 0.35

    misread = tmp_path / "misread"  # the same tensors, said to be gptq_v2: zero points not shifted back
    shutil.copytree(tmp_path / "gptq", misread)
    config = json.loads((misread / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (misread / "config.json").write_text(json.dumps(config))
    assert mean_kl(unquantized, log_probs(ModelSource(str(misread), None, "misread"), None, text_ids)) > 3 * kl
