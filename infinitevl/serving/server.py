"""Running the app under uvicorn: in the foreground (`infinitevl serve`) or in a background thread on a loopback
port (tests, notebooks). Stopping either first drains the scheduler: nothing new starts, queued requests get 503,
running answers have the app's `shutdown_grace` seconds to finish and are then ended with an error event (and
`[DONE]`); then the app's shutdown saves the sessions.

Connections are bounded (`max_connections`: beyond them uvicorn answers 503) and must send each request's headers
within `header_timeout` seconds (uvicorn itself only times out idle keep-alive connections, so a client trickling
its headers one byte at a time would hold a connection forever); idle keep-alive connections close after 5 s."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional
    HttpToolsProtocol = None

from .observability import configure_logging


class _DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        ctx = getattr(getattr(self.config.app, "state", None), "ctx", None)
        if ctx is not None:
            ctx.drain()
        await super().shutdown(sockets)


class _HeaderTimeout:
    """Mixed into uvicorn's HTTP protocol: a connection that has not sent a whole request head `header_timeout`
    seconds after it opened (or after its last response) is closed. Its kernel send buffer is `send_buffer`
    bytes (no autotuning to megabytes), so that a client that stops reading a stream is noticed after a bounded
    number of tokens (the scheduler then pauses its answer)."""

    header_timeout = 10.0
    send_buffer = 0  # bytes; 0: the system's default

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if self.send_buffer and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._cycle_before:
            self._header_timer.cancel()  # a request's head arrived
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        self._cycle_before = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is self._cycle_before and not self.transport.is_closing():
            self.transport.close()


def _protocol(header_timeout: float, send_buffer: int) -> type:
    base = HttpToolsProtocol if HttpToolsProtocol is not None else H11Protocol
    fields = {"header_timeout": header_timeout, "send_buffer": send_buffer}
    return type("TimedHTTPProtocol", (_HeaderTimeout, base), fields)


def _config(app, log_level: str, **kwargs) -> uvicorn.Config:
    ctx = getattr(app.state, "ctx", None)
    grace = ctx.config.shutdown_grace if ctx is not None else 5.0
    limits = {}
    if ctx is not None:
        c = ctx.config
        limits = dict(http=_protocol(c.header_timeout, c.send_buffer_bytes), limit_concurrency=c.max_connections)
    # uvicorn's own limit comes after ours, so that answers end with an error event rather than a cut connection
    return uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=grace + 2.0,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=5,
        **limits,
        **kwargs,
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
