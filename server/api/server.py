"""Running the app under uvicorn, with TGI's shutdown: on SIGTERM or SIGINT new requests are
refused (the listening socket closes; requests on open connections get 503), running ones
get `grace_seconds` to finish, then `serve` returns so the caller can stop the engine and
exit with status 0."""
from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn
from fastapi import FastAPI


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.server.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal once it has stopped, which would kill the process
        # before the engine is shut down; a handled signal here ends in a normal return.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, host: str, port: int, grace_seconds: int) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=grace_seconds)
    _DrainingServer(config, app).run()
