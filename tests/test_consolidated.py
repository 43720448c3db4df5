"""Mistral's own checkpoint format (params.json + consolidated*.safetensors) loads as the HF
checkpoint it was converted from: same greedy tokens as transformers, on one rank and two."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import save_file
from test_parity import hf_greedy

from server import LLM, SamplingParams
from server.models import loader
from server.models.loader import iter_weights, resolve_model
from server.models.rotary_rows import HalfSplitRows

PROMPTS = [[1, 42] + list(range(300, 400, 3)), [1, 5, 9]]  # the first is longer than the window of 8
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

# HF name -> Mistral's, for the tensors of one layer (the inverse of what the loader maps).
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "block_sparse_moe.gate": "feed_forward.gate",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}


def interleave_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's half-split q/k rows -> Mistral's interleaved pairs: per head [2, d/2] -> [d/2, 2]
    (the inverse of permute_for_rope in transformers' convert_mistral_weights_to_hf.py)."""
    rows, columns = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def mistral_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module = rest.removesuffix(".weight")
    if module.startswith("block_sparse_moe.experts."):
        return f"layers.{layer}.feed_forward.experts.{module.removeprefix('block_sparse_moe.experts.')}.weight"
    return f"layers.{layer}.{_LAYER_NAMES[module]}.weight"


def write_consolidated(hf_dir: str, out: Path, num_files: int, with_rope_theta: bool = True) -> Path:
    """What Mistral publishes for the same weights: params.json, consolidated safetensors
    (split over `num_files` files as `consolidated.00.safetensors`... when more than one) and
    the mistral-common tokenizer; no config.json."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    with safe_open(Path(hf_dir) / "model.safetensors", framework="pt") as checkpoint:
        for name in checkpoint.keys():
            tensor = checkpoint.get_tensor(name)
            projection = name.split(".")[-2]
            if projection in heads:
                tensor = interleave_rotary_rows(tensor, heads[projection])
            tensors[mistral_name(name)] = tensor.contiguous()
    out.mkdir()
    names = sorted(tensors)
    files = ["consolidated.safetensors"] if num_files == 1 else [f"consolidated.{i:02d}.safetensors"
                                                                  for i in range(num_files)]
    for i, file in enumerate(files):
        save_file({n: tensors[n] for n in names[i::num_files]}, str(out / file))
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "head_dim": config["head_dim"],
              "hidden_dim": config["intermediate_size"], "n_heads": config["num_attention_heads"],
              "n_kv_heads": config["num_key_value_heads"], "norm_eps": config["rms_norm_eps"],
              "vocab_size": config["vocab_size"]}
    if with_rope_theta:
        params["rope_theta"] = config["rope_theta"]
    if config.get("sliding_window"):
        params["sliding_window"] = str(config["sliding_window"])  # as a string, as Mistral-7B-v0.1 wrote it
    if config.get("num_local_experts"):
        params["moe"] = {"num_experts": config["num_local_experts"],
                         "num_experts_per_tok": config["num_experts_per_tok"]}
    (out / "params.json").write_text(json.dumps(params))
    for tokenizer in Path(hf_dir).glob("tokenizer.model*"):
        shutil.copy(tokenizer, out / tokenizer.name)
    return out


@pytest.fixture(scope="module")
def mistral_consolidated(mistral_window_dir, tmp_path_factory) -> Path:
    # Mistral-7B-v0.1's shape of params.json: a sliding window, no rope_theta (10000 meant).
    return write_consolidated(mistral_window_dir, tmp_path_factory.mktemp("c") / "mistral", 1,
                              with_rope_theta=False)


@pytest.fixture(scope="module")
def mixtral_consolidated(mixtral_dir, tmp_path_factory) -> Path:
    return write_consolidated(mixtral_dir, tmp_path_factory.mktemp("c") / "mixtral", 2)


def tokens(model_dir, **kwargs) -> list[list[int]]:
    llm = LLM(str(model_dir), max_batch_total_tokens=2048, block_size=8, **kwargs)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def transformers_tokens(hf_dir: str) -> list[list[int]]:
    return [hf_greedy(hf_dir, prompt, GREEDY.max_tokens)[0] for prompt in PROMPTS]


@pytest.mark.parametrize("hf_fixture, consolidated_fixture", [
    ("mistral_window_dir", "mistral_consolidated"), ("mixtral_dir", "mixtral_consolidated")])
def test_consolidated_checkpoint_gives_transformers_tokens_of_the_hf_checkpoint(
        hf_fixture, consolidated_fixture, request):
    consolidated = request.getfixturevalue(consolidated_fixture)
    source = resolve_model(str(consolidated))
    assert source.consolidated and not (consolidated / "config.json").exists()
    assert tokens(consolidated) == transformers_tokens(request.getfixturevalue(hf_fixture))


def test_consolidated_weights_equal_the_hf_weights(mixtral_dir, mixtral_consolidated):
    hf = {name: tensor[:] for name, tensor in iter_weights(resolve_model(mixtral_dir))}
    ours = {name: tensor[:] for name, tensor in iter_weights(resolve_model(str(mixtral_consolidated)))}
    assert ours.keys() == hf.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf[name]), name


def test_two_ranks_load_their_heads_of_a_consolidated_checkpoint(mixtral_dir, mixtral_consolidated):
    # 4 heads and 2 KV heads: each rank reads and regroups the rows of its own heads only.
    assert tokens(mixtral_consolidated, tensor_parallel_size=2) == transformers_tokens(mixtral_dir)


def test_a_slice_of_whole_heads_is_regrouped_alone():
    head_dim, hf_rows = 8, torch.randn(4 * 8, 3)
    lazy = HalfSplitRows(interleave_rotary_rows(hf_rows, 4), head_dim)
    assert torch.equal(lazy[:], hf_rows)
    assert torch.equal(lazy[8:24], hf_rows[8:24])
    with pytest.raises(ValueError, match="whole heads"):
        lazy[4:12]


def test_hf_files_are_preferred_when_both_formats_are_there(mixtral_dir, mixtral_consolidated, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(mixtral_dir, both)
    for file in mixtral_consolidated.iterdir():
        shutil.copy(file, both / file.name)
    source = resolve_model(str(both))
    assert not source.consolidated
    assert all(name.startswith(("model.", "lm_head")) for name, _ in iter_weights(source))


def test_unsupported_params_json_is_a_value_error_naming_the_feature(mistral_consolidated, tmp_path):
    vision = tmp_path / "pixtral"
    shutil.copytree(mistral_consolidated, vision)
    params = json.loads((vision / "params.json").read_text())
    (vision / "params.json").write_text(json.dumps({**params, "vision_encoder": {"hidden_size": 1024}}))
    with pytest.raises(ValueError, match="vision_encoder"):
        LLM(str(vision))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download over local "repos": copies the files its patterns select, as the hub
    does, and records which it was asked for."""
    fetched: list[str] = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        remote, snapshot = tmp_path / "remote" / repo_id, tmp_path / "snapshots" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        files = sorted(p.name for p in remote.iterdir())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            shutil.copy(remote / name, snapshot / name)
            fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr(loader, "snapshot_download", snapshot_download)
    return tmp_path / "remote", fetched


def test_hub_repo_in_mistral_format_only_fetches_the_consolidated_files(fake_hub, mistral_consolidated,
                                                                         mistral_window_dir):
    remote, fetched = fake_hub
    shutil.copytree(mistral_consolidated, remote / "mistralai" / "Codestral")
    source = resolve_model("mistralai/Codestral")
    assert source.consolidated
    assert sorted(fetched) == ["consolidated.safetensors", "params.json", "tokenizer.model.v1"]
    assert tokens(source.path) == transformers_tokens(mistral_window_dir)


def test_hub_repo_with_both_formats_skips_the_consolidated_copy(fake_hub, mixtral_dir, mixtral_consolidated):
    remote, fetched = fake_hub
    repo = remote / "mistralai" / "Mixtral"
    shutil.copytree(mixtral_dir, repo)
    for file in mixtral_consolidated.iterdir():
        shutil.copy(file, repo / file.name)
    assert not resolve_model("mistralai/Mixtral").consolidated
    assert "model.safetensors" in fetched and not any(name.startswith("consolidated") for name in fetched)
