"""Running the app under uvicorn: in the foreground (`infinitevl serve`) or in a background thread on a loopback
port (tests, notebooks). Stopping either first drains the scheduler: nothing new starts, queued requests get 503,
running answers have the app's `shutdown_grace` seconds to finish and are then ended with an error event (and
`[DONE]`); then the app's shutdown saves the sessions."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .observability import configure_logging


class _DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        ctx = getattr(getattr(self.config.app, "state", None), "ctx", None)
        if ctx is not None:
            ctx.drain()
        await super().shutdown(sockets)


def _config(app, log_level: str, **kwargs) -> uvicorn.Config:
    ctx = getattr(app.state, "ctx", None)
    grace = ctx.config.shutdown_grace if ctx is not None else 5.0
    # uvicorn's own limit comes after ours, so that answers end with an error event rather than a cut connection
    return uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=grace + 2.0, access_log=False, lifespan="on", **kwargs
    )


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM."""
    configure_logging(log_level)
    _DrainingServer(_config(app, log_level, host=host, port=port)).run()


class BackgroundServer:
    """`with BackgroundServer(app) as server: httpx.get(server.url + "/health")`: a real socket, port chosen by
    the OS unless given."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = _DrainingServer(_config(self.app, self.log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
