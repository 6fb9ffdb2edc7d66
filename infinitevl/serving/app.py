"""The application: one loaded engine, its scheduler, sessions and media loader, behind the middleware and routes.

Routes: openai_routes.py (`/v1/chat/completions`, `/v1/completions`, `/v1/models`), session_routes.py (our
streaming sessions, `/v1/sessions...`), and here the operational ones: `GET|HEAD /health` (open, for load
balancers; 503 when the model's worker thread has died), `GET /version`, `GET /metrics` (Prometheus). Middleware,
outermost first: request id and access log, CORS (only with `allowed_origins`), where requests may come from
(loopback `Host` without an API key, no cross-site requests: security.py), the API key, the body size and time
limits. JSON bodies are parsed in the thread pool and their list lengths bounded before validation (limits.py).
Anything that runs the model is a job on the scheduler's single worker thread; media is decoded in the event loop's
thread pool first. The OpenAPI schema is at `/openapi.json` (browsable at `/docs`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .limits import bounded_routes
from .media import MediaLoader
from .observability import Metrics, RequestIdMiddleware
from .prompts import TextBudget
from .scheduler import Scheduler
from .schemas import Health, Version
from .security import APIKeyMiddleware, BodyLimitMiddleware, SameSiteMiddleware
from .sessions import SessionRegistry
from .webpage import mount_page

log = logging.getLogger("infinitevl.serving")


@dataclass
class ServerContext:
    engine: object
    config: ServerConfig
    scheduler: Scheduler
    sessions: SessionRegistry
    media: MediaLoader
    budget: TextBudget
    metrics: Metrics
    started: int

    @property
    def model_kind(self) -> str:
        return "untrained" if self.engine.untrained else ("task" if self.engine.note else "general")

    def refresh_metrics(self) -> None:
        """Set the gauges that are read, not counted, to their values now (before the metrics are rendered)."""
        m, scheduler, sessions = self.metrics, self.scheduler, self.sessions
        m.queue_depth.set(scheduler.queued)
        m.active_streams.set(scheduler.active)
        m.sessions.set(len(sessions.ids()))
        loaded = sessions.loaded_count()
        m.sessions_loaded.set(loaded)
        m.state_bytes.set(scheduler.pool.nbytes + loaded * sessions.state_nbytes)
        m.refresh()

    def drain(self) -> None:
        """The server is stopping: running answers get `shutdown_grace` seconds, nothing new starts."""
        self.scheduler.drain(self.config.shutdown_grace)


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The server for one loaded `InfiniteVL` engine. The model runs only on the scheduler's worker thread."""
    from .. import __version__
    from .openai_routes import install_openai_routes
    from .session_routes import install_session_routes

    config = config or ServerConfig()
    bound_onednn_cache(config.onednn_cache_capacity)
    metrics = Metrics()
    metrics.onednn_cache_capacity.set(int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]))
    ctx = ServerContext(
        engine,
        config,
        Scheduler(engine.model, config.max_batch, config.max_queue, metrics, config.stream_stall_timeout),
        SessionRegistry(engine, config, metrics),
        MediaLoader(config),
        TextBudget.of(engine.processor, config.max_request_tokens),
        metrics,
        int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.sessions.load_index()
        ctx.scheduler.start()
        janitor = asyncio.create_task(_sweep_idle_sessions(ctx)) if config.session_idle_timeout else None
        try:
            yield
        finally:
            if janitor is not None:
                janitor.cancel()
            ctx.scheduler.stop()
            ctx.sessions.save_all()
            ctx.sessions.close()

    app = FastAPI(
        title="InfiniteVL",
        summary="OpenAI-compatible chat with images and videos, and persistent streaming-video sessions.",
        version=__version__,
        lifespan=lifespan,
        strict_content_type=False,  # a JSON body without a Content-Type header is still JSON
    )
    app.state.ctx = ctx
    app.router.route_class = bounded_routes(config)
    install_error_handlers(app)
    # added innermost first: the body limit runs last, the request id first
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, timeout=config.body_timeout)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    hosts = ("*",) if config.api_key else config.allowed_hosts  # a page cannot send the key: any Host is safe
    app.add_middleware(SameSiteMiddleware, allowed_hosts=hosts, allowed_origins=config.allowed_origins)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS", "HEAD"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "X-Model-Note", "Retry-After"],
        )
    app.add_middleware(RequestIdMiddleware)
    _ops_routes(app, ctx, __version__)
    install_openai_routes(app, ctx)
    install_session_routes(app, ctx)
    mount_page(app)
    return app


def _ops_routes(app: FastAPI, ctx: ServerContext, version: str) -> None:
    config, scheduler, sessions = ctx.config, ctx.scheduler, ctx.sessions

    precision = ctx.engine.precision

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health():
        """Liveness and load: queue length, active generations, sessions, counters, and what the model is for.
        Needs no API key. 503 (status "dead") when the model's worker thread has stopped: restart the server."""
        alive = scheduler.alive
        body = Health(
            status="stopping" if scheduler.draining else "ok" if alive else "dead",
            model=config.model_name,
            model_kind=ctx.model_kind,
            note=ctx.engine.note,
            queued=scheduler.queued,
            active=scheduler.active,
            max_batch=scheduler.max_batch,
            sessions=len(sessions.ids()),
            sessions_loaded=sessions.loaded_count(),
            sessions_damaged=sessions.damaged_count(),
            precision=precision,
            **scheduler.counters,
        )
        return body if alive else JSONResponse(body.model_dump(), status_code=503)

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/version", response_model=Version, tags=["server"])
    async def version_info() -> Version:
        return Version(
            version=version,
            model=config.model_name,
            model_kind=ctx.model_kind,
            torch=torch.__version__,
            durability=config.durability if config.state_dir else "no state directory",
        )

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: queue depth, active streams, tokens per second, prefill and decode latency
        histograms, sessions and state bytes."""
        ctx.refresh_metrics()
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def bound_onednn_cache(capacity: int) -> None:
    """Bound oneDNN's primitive cache (one compiled kernel per input shape: prompts of many lengths grew the process
    by hundreds of MiB). oneDNN reads the variable when it first runs, so a value set earlier (by the operator, or
    by `infinitevl serve` before the model is loaded) is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


async def _sweep_idle_sessions(ctx: ServerContext) -> None:
    interval = min(ctx.config.janitor_interval, ctx.config.session_idle_timeout / 4)
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.wrap_future(ctx.scheduler.submit_task(ctx.sessions.expire_idle, internal=True))
        except APIError:  # stopping, or the worker is gone (/health says so)
            return
        except Exception:
            log.exception("the idle-session sweep failed")
            continue
        if expired:
            log.info("idle sessions left memory: %s", ", ".join(expired))
