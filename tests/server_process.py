"""`python -m server` as a real process on loopback, for tests that drive it over HTTP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from benchmarks.servers import ServerExited, free_port, wait_ready

__all__ = ["ServerProcess", "free_port", "generate_once", "metric", "wait_until_idle"]


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, launcher: list[str] = (),
                 new_session: bool = False):
        """`new_session`: in a process group of its own, which a test may signal as a terminal would."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, *launcher, "-m", "server", "--hostname", "127.0.0.1", "--port", str(self.port),
                   *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, start_new_session=new_session)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        """Once /health answers (benchmarks/servers.py's loop); the server's log in the error."""
        try:
            wait_ready(self.url, self.process, timeout, path="/health", interval_s=0.2)
        except ServerExited as why:
            raise RuntimeError(f"server {why}:\n{self.log}") from None
        except TimeoutError:
            raise TimeoutError(f"server not ready after {timeout} s:\n{self.log}") from None
        return self

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def generate_once(*args: str, body: dict, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Start a server with `args`, answer one /generate `body`, stop it: (its answer, its log)."""
    server = ServerProcess(*args, env=env)
    try:
        server.wait_ready()
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    finally:
        server.stop()
    return answer, server.log


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one series in a Prometheus exposition (0 if absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until_idle(server: ServerProcess, within: float) -> float:
    """Seconds until the engine runs nothing and holds no KV blocks (as /metrics says); fails
    after `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "tgi_batch_current_size") == 0 and metric(text, "tgi_queue_size") == 0 \
                and metric(text, "tgi_batch_current_max_tokens") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the engine was still busy after {within} s:\n{text}")
