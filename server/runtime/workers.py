"""The other tensor-parallel ranks: processes that rank 0 starts, each running its shard of
every step that rank 0 sends. A rank that dies takes the whole server down at once, with the
reason in the log, rather than leaving the others waiting in a collective forever."""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time

import torch

from server.config import EngineArgs
from server.runtime.setup import leave_group, start_runner

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _worker_main(args: EngineArgs, rank: int, port: int, parent_pid: int) -> None:
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // args.tensor_parallel_size))
    start_runner(args, rank, port).runner.serve_steps()
    leave_group()


class Workers:
    def __init__(self, args: EngineArgs, port: int):
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_worker_main, args=(args, rank, port, os.getpid()),
                            name=f"tp-rank-{rank}", daemon=True)
            for rank in range(1, args.tensor_parallel_size)]
        self._stopping = False
        for rank, process in enumerate(self.processes, start=1):
            process.start()
            logger.info("tensor-parallel rank %d started (pid %d)", rank, process.pid)
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopping:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None and not self._stopping:
                    logger.error("tensor-parallel rank %d (pid %d) exited with code %s; stopping the "
                                 "server, since no step can run without it", rank, process.pid, process.exitcode)
                    for other in self.processes:
                        if other.is_alive():
                            other.kill()
                    logging.shutdown()
                    os._exit(1)
            time.sleep(0.2)

    def stop(self, timeout: float = 10) -> None:
        self._stopping = True
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
