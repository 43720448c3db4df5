"""Our import names never shadow the ecosystem's, and the CLI answers before the heavy imports.

Our Triton kernels once lived in a top-level `kernels/`; Hugging Face's `kernels` package (a
dependency of transformers) took that name, and from the repository's root ours shadowed theirs:
transformers could not import, so neither could the server nor the tests. These tests run fresh
interpreters from the repository's root and from elsewhere, as users start them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_KERNELS = sorted(p.stem for p in (ROOT / "server" / "kernels").glob("*.py") if p.stem != "__init__")

IMPORTS = f"""
import importlib, importlib.util, json, sys
theirs = importlib.util.find_spec("kernels")
if theirs is not None:
    import kernels
    theirs = kernels.__file__
import transformers.models.llama.modeling_llama
import transformers.models.mistral.modeling_mistral
from server import LLM, SamplingParams
for name in {OUR_KERNELS!r}:
    importlib.import_module("server.kernels." + name)
print(json.dumps({{"kernels": theirs, "server": importlib.util.find_spec("server").origin}}))
"""


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # From elsewhere the repository is found as an installed project would be: on the path,
    # after the working directory.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_our_server_and_our_kernels_import_together(where, tmp_path):
    result = run_python(IMPORTS, ROOT if where == "root" else tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["server"]).resolve() == ROOT / "server" / "__init__.py"
    if importlib.util.find_spec("kernels") is not None:  # Hugging Face's, when transformers brings it
        assert not Path(found["kernels"]).resolve().is_relative_to(ROOT), found["kernels"]


def test_no_top_level_package_of_ours_is_named_like_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    ours = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    clashes = {name: owners[name] for name in ours if set(owners.get(name, [])) - {"tgi-py"}}
    assert clashes == {}


def test_our_kernels_live_under_server():
    assert not (ROOT / "kernels").exists()


HEAVY = ("torch", "transformers", "llguidance", "fastapi", "triton", "numpy")


def test_cli_help_imports_nothing_heavy(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['server', '--help']\n"
            "try:\n    runpy.run_module('server', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--max-input-tokens" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def test_cli_help_shows_defaults_and_environment_names(tmp_path):
    result = run_python("from server.__main__ import main\nmain(['--help'])", tmp_path)
    text = " ".join(result.stdout.split())
    assert "[env: MAX_CONCURRENT_REQUESTS] [default: 128]" in text
    assert "[env: PORT] [default: 3000]" in text
    assert "[env: JSON_OUTPUT] [default: off]" in text


def test_cli_offers_only_the_quantizations_that_run():
    from server.__main__ import parse_args

    for offered in ("awq", "compressed-tensors", "fp8", "gptq"):
        assert parse_args(["--quantize", offered]).quantize == offered
    for refused in ("eetq", "exl2", "marlin", "bitsandbytes", "bitsandbytes-nf4"):
        with pytest.raises(SystemExit):
            parse_args(["--quantize", refused])


def test_a_kernel_imports_alone_without_the_server_above_it(tmp_path):
    code = ("import sys\nimport server.kernels.norm, server.kernels.decode_attention\n"
            "print('LOADED', sorted(m for m in ('transformers', 'fastapi', 'server.engine', 'server.layers') "
            "if m in sys.modules))")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"
