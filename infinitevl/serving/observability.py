"""What operators see: request ids, one access-log line per request, and Prometheus metrics.

`RequestIdMiddleware` (the outermost layer) takes the client's `X-Request-Id` (printable, up to 128 characters) or
makes one, puts it on every response, errors included, and in a context variable that the log records of that
request carry (`RequestIdFilter`). `Metrics` holds the server's Prometheus series in a registry of its own (several
apps may live in one process, as in the tests); `GET /metrics` renders it. Not here: the routes themselves.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("infinitevl_request_id", default=None)
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
access_log = logging.getLogger("infinitevl.serving.access")


def current_request_id() -> str | None:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (a dash outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else "req_" + secrets.token_hex(12)
        token = _request_id.set(rid)
        t0, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "%s %s %s %d %.1f ms",
                scope.get("client", ("-",))[0] if scope.get("client") else "-",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - t0) * 1000,
            )
            _request_id.reset(token)


def configure_logging(level: str = "info") -> None:
    """Our loggers print with the request id (uvicorn's own access log is replaced by ours)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     [%(request_id)s] %(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("infinitevl.serving")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


TPS_WINDOW = 10.0  # seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's Prometheus series. Gauges that mirror live values are read when scraped."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the like (Linux)
        p = "infinitevl_"
        self.onednn_cache_capacity = Gauge(
            p + "onednn_primitive_cache_capacity", "oneDNN kernels kept (ONEDNN_PRIMITIVE_CACHE_CAPACITY)", registry=r
        )
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for the model", registry=r)
        self.active_streams = Gauge(p + "active_streams", "generations being decoded", registry=r)
        self.sessions = Gauge(p + "sessions", "streaming sessions (in memory or on disk)", registry=r)
        self.sessions_loaded = Gauge(p + "sessions_loaded", "streaming sessions in memory", registry=r)
        self.state_bytes = Gauge(
            p + "state_bytes", "bytes of inference state held (pool and loaded sessions)", registry=r
        )
        self.tokens_per_second = Gauge(
            p + "decode_tokens_per_second", "tokens decoded per second over the last 10 s", registry=r
        )
        self.generated_tokens = Counter(p + "generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens prefilled", registry=r)
        self.requests = Counter(p + "requests", "model requests finished, by outcome", ["outcome"], registry=r)
        self.prefill_seconds = Histogram(
            p + "prefill_seconds", "time from admission to the first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prefill_chunk_seconds = Histogram(
            p + "prefill_chunk_seconds", "time of one prefill chunk", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_step_seconds = Histogram(
            p + "decode_step_seconds", "time of one batched decode step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.session_write_seconds = Histogram(
            p + "session_write_seconds", "time to make a session change durable", buckets=LATENCY_BUCKETS, registry=r
        )
        self._window: list[tuple[float, int]] = []

    def decoded(self, tokens: int, seconds: float) -> None:
        """A batched decode step produced `tokens` tokens in `seconds` (called on the worker thread)."""
        self.generated_tokens.inc(tokens)
        self.decode_step_seconds.observe(seconds)
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < TPS_WINDOW] + [(now, tokens)]

    def refresh(self) -> None:
        """Values computed when scraped: tokens per second over the last TPS_WINDOW seconds."""
        now = time.monotonic()
        recent = [n for t, n in list(self._window) if now - t < TPS_WINDOW]
        self.tokens_per_second.set(sum(recent) / TPS_WINDOW)

    def render(self) -> bytes:
        return generate_latest(self.registry)
