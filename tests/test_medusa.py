"""Medusa heads (server/models/medusa.py) in TGI's layout: a speculator directory naming its base
model, whose heads' picks at each step's last accepted place are the next step's proposals.
The oracle: transformers' final hidden states of the base model, through the heads' formula."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from server import LLM, SamplingParams
from test_speculation import EXACT, PROMPTS

HEADS, HIDDEN, VOCAB = 3, 64, 32768


def write_medusa(path: Path, base: str, own_outputs: bool, layers: int = 1, seed: int = 0) -> str:
    """A speculator as TGI reads it: config.json and medusa_lm_head.safetensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(HEADS):
        for j in range(layers):
            tensors[f"{i}.{j}.linear.weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator) * 0.3
            tensors[f"{i}.{j}.linear.bias"] = torch.randn(HIDDEN, generator=generator) * 0.3
        if own_outputs:
            tensors[f"{i}.{layers}.weight"] = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "medusa_lm_head.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "medusa_num_heads": HEADS, "medusa_num_layers": layers, "base_model_name_or_path": base,
        "architectures": ["MedusaModel"]}))
    return str(path)


@pytest.fixture(scope="module", params=["own outputs", "the model's LM head"])
def speculator(request, mistral_v03_dir, tmp_path_factory):
    own = request.param == "own outputs"
    return write_medusa(tmp_path_factory.mktemp("medusa"), mistral_v03_dir, own, layers=1 if not own else 2), own


@pytest.fixture(scope="module")
def plain(mistral_v03_dir):
    return LLM(mistral_v03_dir, dtype=EXACT, max_batch_total_tokens=4096)


def reference_proposals(base, tensors: dict, own: bool, layers: int, tokens: list[int]) -> list[int]:
    """The heads' picks from transformers' final hidden state at the place that picked the
    last of `tokens`."""
    with torch.no_grad():
        hidden = base(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        picks = []
        for i in range(HEADS):
            x = hidden
            for j in range(layers):
                x = x + F.silu(F.linear(x, tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"]))
            logits = F.linear(x, tensors[f"{i}.{layers}.weight"]) if own else base.lm_head(x)
            picks.append(int(logits.argmax()))
    return picks


def test_the_proposals_are_the_heads_picks_on_the_base_models_hidden_state(speculator, mistral_v03_dir, plain,
                                                                           monkeypatch):
    """The heads' picks after every step, checked against the oracle; the engine is handed
    plain decoding's own continuation as its proposals, so that steps accept several tokens
    and the heads must be read at the last accepted place, not at the chunk's first."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    directory, own = speculator
    llm = LLM(directory, dtype=EXACT, max_batch_total_tokens=4096)
    assert llm.engine.speculate == HEADS  # --speculate defaults to the heads
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    continuation = {tuple(o.prompt_token_ids): o.prompt_token_ids + o.outputs[0].token_ids
                    for o in plain.generate(PROMPTS, params, use_tqdm=False)}
    seen = []
    original = llm.engine.proposer.propose

    def accepted_for_sure(seqs, counts):
        heads = original(seqs, counts)
        proposals = []
        for seq, count, picks in zip(seqs, counts, heads):
            seen.append((list(seq.token_ids), picks))
            whole = continuation[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            proposals.append(whole[len(seq.token_ids):len(seq.token_ids) + count])
        return proposals
    monkeypatch.setattr(llm.engine.proposer, "propose", accepted_for_sure)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt_token_ids + o.outputs[0].token_ids for o in got] == list(continuation.values())
    assert llm.engine.num_accepted > len(PROMPTS)

    base = AutoModelForCausalLM.from_pretrained(mistral_v03_dir, dtype=torch.float32).eval()
    tensors = load_file(str(Path(directory) / "medusa_lm_head.safetensors"))
    layers = json.loads((Path(directory) / "config.json").read_text())["medusa_num_layers"]
    checked = [(tokens, picks) for tokens, picks in seen if picks]
    assert len(checked) >= 2 * len(PROMPTS)  # every sequence, after its prompt and after later steps
    for tokens, picks in checked:
        assert picks == reference_proposals(base, tensors, own, layers, tokens)[:len(picks)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                    SamplingParams(temperature=0.9, seed=4, max_tokens=24, ignore_eos=True)])
def test_medusa_gives_the_tokens_of_plain_decoding(speculator, plain, params):
    llm = LLM(speculator[0], dtype=EXACT, max_batch_total_tokens=4096)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    expected = plain.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.num_speculated > 0


def test_a_checkpoint_that_ships_heads_speculates_with_them(mistral_v03_dir, plain, tmp_path):
    """medusa_config.json and medusa_lm_head.safetensors beside the model's own files."""
    shipped = tmp_path / "model"
    shutil.copytree(mistral_v03_dir, shipped)
    write_medusa(tmp_path / "heads", mistral_v03_dir, own_outputs=False)
    shutil.copy(tmp_path / "heads" / "medusa_lm_head.safetensors", shipped)
    (shipped / "medusa_config.json").write_text((tmp_path / "heads" / "config.json").read_text())
    llm = LLM(str(shipped), dtype=EXACT, max_batch_total_tokens=4096)
    assert llm.engine.speculate == HEADS and type(llm.engine.proposer).__name__ == "MedusaProposer"
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain.generate(
        PROMPTS, params, use_tqdm=False)]
    assert llm.engine.num_speculated > 0


def test_what_medusa_cannot_run_with_is_refused(mistral_v03_dir, tmp_path):
    directory = write_medusa(tmp_path / "medusa", mistral_v03_dir, own_outputs=False)
    with pytest.raises(ValueError, match="has 3 heads"):
        LLM(directory, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(directory, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="choose one"):
        LLM(directory, speculative_config={"model": mistral_v03_dir, "num_speculative_tokens": 2})
    (Path(directory) / "medusa_lm_head.safetensors").unlink()
    save_file({"0.0.linear.weight": torch.zeros(HIDDEN, HIDDEN)}, str(Path(directory) / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match="TGI's layout"):
        LLM(directory)


def test_the_server_serves_a_medusa_speculators_base_model(speculator, plain):
    """TGI's way: --model-id names the speculator; its engine process loads the base model."""
    from server_process import generate_once

    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 16}}
    answer, log = generate_once("--model-id", speculator[0], "--max-total-tokens", "256", "--max-batch-total-tokens",
                                "4096", "--engine-process", "true", body=body)
    expected = plain.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert answer["generated_text"] == expected.outputs[0].text
    assert "proposed by the Medusa heads of" in log
