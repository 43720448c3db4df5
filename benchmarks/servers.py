"""The servers a benchmark starts: ours (`python -m server`) and Hugging Face's `transformers serve`
(the peer), each a subprocess on a free port with its own process group and its output in a log
file, ready once `/v1/models` answers, and stopped with its whole group so that no worker of it
outlives the run. `wait_ready` is the one readiness loop: serving.py and soak.py (through
`start`), multi_gpu.py's `http` mode and the tests' ServerProcess all wait through it. A
library: running it does nothing.

`transformers serve` gets no model on its command line: the flag that preloads one changed
between releases (`--force-model`, later a positional argument), so the first request, which
names the model directory, loads it: that works whatever the release.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import huggingface_hub.constants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No hub look-ups (the GPU machine is offline) and no update check from the transformers CLI.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerExited(RuntimeError):
    """The server's process ended before it answered."""


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, path: str = "/v1/models",
               interval_s: float = 0.5) -> float:
    """Polls GET `url + path` until it answers 200 and returns the seconds that took; raises
    ServerExited ("exited with CODE") if `process` ends first, TimeoutError ("not ready in N s")
    after `timeout_s`."""
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise ServerExited(f"exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not ready in {timeout_s:.0f} s")
        time.sleep(interval_s)


def our_command(model: str, port: int, dtype: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "server", "--model-id", model, "--hostname", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, *extra]


def transformers_command(model: str, port: int, dtype: str, extra: list[str]) -> list[str]:
    """Continuous batching with paged SDPA attention (flash-attn is not installed on our GPU
    machine), and a model timeout long enough that the model is never unloaded mid-run."""
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--continuous-batching", "--attn-implementation", "sdpa",
            "--model-timeout", "86400", "--log-level", "info", *extra]


COMMANDS = {"ours": our_command, "transformers": transformers_command}


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log_path: str

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the server's process ("server") and of the rest
        of its process group together ("children": an engine process, tensor-parallel ranks),
        read from /proc (Linux; empty elsewhere)."""
        tick = os.sysconf("SC_CLK_TCK")
        times = {"server": 0.0, "children": 0.0}
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone since the listing
                continue
            if int(fields[2]) != self.process.pid:  # its process group
                continue
            seconds = (int(fields[11]) + int(fields[12])) / tick
            times["server" if int(entry) == self.process.pid else "children"] += seconds
        return times if any(times.values()) else {}

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left of it after `grace_s`."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start(name: str, command: list[str], url: str, log_path: str, timeout_s: float) -> Server:
    """Starts `command` and waits until `url` answers /v1/models; on a timeout or an early exit
    the server is stopped and the error quotes the end of its log."""
    # transformers serve lists its models (our readiness probe) by scanning the hub cache, and
    # fails while that directory does not exist, as on a machine that never downloaded anything.
    os.makedirs(huggingface_hub.constants.HF_HUB_CACHE, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, **QUIET_ENV}, start_new_session=True)
    server = Server(name, url, process, log_path)
    try:
        wait_ready(url, process, timeout_s)
    except (ServerExited, TimeoutError) as why:
        server.stop()
        raise RuntimeError(f"{name} {why}; the end of {log_path}:\n{server.log_tail()}") from None
    return server
