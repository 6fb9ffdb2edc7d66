"""The HTTP routes: thin functions over the scheduler, the session registry and the media loader.

OpenAI-compatible: `POST /v1/chat/completions`, `GET /v1/models`, plus `GET /health`. Our extension, streaming
sessions: `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/frames|upload|text|ask|
snapshot|restore`. Anything that runs the model is a job on the scheduler's single worker thread; media is decoded
in the event loop's thread pool first. The OpenAPI schema is at `/openapi.json` (browsable at `/docs`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool

from ..engine.generation import prefill
from .completions import chat_prompt, completion_budget, new_generation, submit_and_respond
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .media import MediaLoader
from .scheduler import Scheduler
from .schemas import (
    AppendResult,
    AskRequest,
    ChatCompletion,
    ChatCompletionRequest,
    Deleted,
    ErrorResponse,
    FramesRequest,
    Health,
    ModelCard,
    ModelList,
    RestoreRequest,
    SessionCreate,
    SessionInfo,
    SessionList,
    SnapshotInfo,
    TextAppend,
)
from .security import APIKeyMiddleware, BodyLimitMiddleware
from .sessions import SessionRegistry
from .webpage import mount_page

log = logging.getLogger("infinitevl.serving")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500)}
SSE = {"text/event-stream": {"schema": {"type": "string", "description": "chat.completion.chunk events, then [DONE]"}}}
STREAMED = {200: {"content": SSE, "description": "a chat.completion, or server-sent events with stream: true"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/*", "video/*")},
    }
}


@dataclass
class ServerContext:
    engine: object
    config: ServerConfig
    scheduler: Scheduler
    sessions: SessionRegistry
    media: MediaLoader
    started: int


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The server for one loaded `InfiniteVL` engine. The model runs only on the scheduler's worker thread."""
    config = config or ServerConfig()
    ctx = ServerContext(
        engine,
        config,
        Scheduler(engine.model, config.max_batch, config.max_queue),
        SessionRegistry(engine, config),
        MediaLoader(config),
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

    app = FastAPI(
        title="InfiniteVL",
        summary="OpenAI-compatible chat with images and videos, and persistent streaming-video sessions.",
        version="0.1.0",
        lifespan=lifespan,
        strict_content_type=False,  # a JSON body without a Content-Type header is still JSON
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    _openai_routes(app, ctx)
    _session_routes(app, ctx)
    mount_page(app)
    return app


def _openai_routes(app: FastAPI, ctx: ServerContext) -> None:
    engine, config = ctx.engine, ctx.config

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness and load: queue length, active generations, sessions, and counters. Needs no API key."""
        s = ctx.scheduler
        return Health(
            model=config.model_name,
            untrained=bool(engine.untrained),
            queued=s.queued,
            active=s.active,
            max_batch=s.max_batch,
            sessions=len(ctx.sessions.ids()),
            sessions_loaded=ctx.sessions.loaded_count(),
            **s.counters,
        )

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=ctx.started)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS, tags=["openai"])
    async def model(model_id: str) -> ModelCard:
        _check_model(model_id, config)
        return ModelCard(id=config.model_name, created=ctx.started)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat with text, images (`image_url`) and videos (`video_url`); `stream: true` for server-sent events."""
        _check_model(body.model, config)
        prompt = await run_in_threadpool(chat_prompt, engine, ctx.media, body)
        n_prompt = prompt.input_ids.shape[1]
        max_new = completion_budget(body, n_prompt, config)
        vision = prompt.model_inputs()
        ids = vision.pop("input_ids")

        def prepare(row):
            row.reset()
            return prefill(engine.model, row, ids, chunk_size=engine.chunk_size, **vision)

        gen = new_generation(engine, body, prepare, max_new, history=ids[0].tolist())
        return await submit_and_respond(ctx.scheduler, gen, body, request, config.model_name)


def _session_routes(app: FastAPI, ctx: ServerContext) -> None:
    engine, config, sessions = ctx.engine, ctx.config, ctx.sessions
    tags = ["sessions"]

    @app.post("/v1/sessions", response_model=SessionInfo, responses=ERRORS, tags=tags)
    async def create_session(body: SessionCreate | None = None) -> dict:
        """Open a streaming session (a conversation fed frames, videos and text, in constant memory)."""
        body = body or SessionCreate()
        session_id = await ctx.scheduler.run(lambda: sessions.create(body.system_prompt, body.frame_size))
        return sessions.info(session_id)

    @app.get("/v1/sessions", response_model=SessionList, responses=ERRORS, tags=tags)
    async def list_sessions() -> dict:
        return {"data": [sessions.info(i) for i in sessions.ids()]}

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=ERRORS, tags=tags)
    async def get_session(session_id: str) -> dict:
        """Stats: tokens in the stream, frames, state bytes (constant), frames per second, snapshots."""
        return sessions.info(session_id)

    @app.delete("/v1/sessions/{session_id}", response_model=Deleted, responses=ERRORS, tags=tags)
    async def delete_session(session_id: str) -> Deleted:
        sessions.info(session_id)
        await ctx.scheduler.run(lambda: sessions.delete(session_id))
        return Deleted(id=session_id)

    @app.post("/v1/sessions/{session_id}/frames", response_model=AppendResult, responses=ERRORS, tags=tags)
    async def push_frames(session_id: str, body: FramesRequest) -> dict:
        """Append live frames (images with timestamps) or a video chunk; all or nothing."""
        sessions.info(session_id)
        if body.frames is not None:
            frames = await run_in_threadpool(
                lambda: [
                    (ctx.media.image(f.image_url.url, f"frames[{i}]"), f.timestamp) for i, f in enumerate(body.frames)
                ]
            )
            job = lambda: sessions.append_frames(session_id, frames)
        else:
            video = await run_in_threadpool(ctx.media.video, body.video_url.url, body.fps, "video_url")
            job = lambda: sessions.append_video(session_id, video, body.timestamp_offset)
        return _appended(session_id, await ctx.scheduler.run(job), sessions)

    @app.post(
        "/v1/sessions/{session_id}/upload",
        response_model=AppendResult,
        responses=ERRORS,
        tags=tags,
        openapi_extra=UPLOAD_BODY,
    )
    async def upload(
        session_id: str,
        request: Request,
        timestamp: float | None = Query(None, ge=0, description="images: the frame's time in seconds"),
        fps: float | None = Query(None, gt=0, description="videos: frames sampled per second"),
        timestamp_offset: float | None = Query(None, ge=0, description="videos: time of the first frame"),
    ) -> dict:
        """Append one frame (an image/* body, with ?timestamp=) or a video chunk (a video/* body) as raw bytes."""
        sessions.info(session_id)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        data = await request.body()
        if not data:
            raise APIError(400, "the request body is empty; send the image or video bytes", code="empty_body")
        if kind.startswith("image/"):
            if timestamp is None:
                raise APIError(400, "an image upload needs ?timestamp=SECONDS", param="timestamp")
            image = await run_in_threadpool(ctx.media.image_from, data, "body")
            job = lambda: sessions.append_frames(session_id, [(image, timestamp)])
        elif kind.startswith("video/"):
            video = await run_in_threadpool(ctx.media.video_from, data, fps, "body")
            job = lambda: sessions.append_video(session_id, video, timestamp_offset)
        else:
            raise APIError(415, f"Content-Type {kind or '(none)'}: send image/* or video/* bytes", code="bad_type")
        return _appended(session_id, await ctx.scheduler.run(job), sessions)

    @app.post("/v1/sessions/{session_id}/text", response_model=AppendResult, responses=ERRORS, tags=tags)
    async def push_text(session_id: str, body: TextAppend) -> dict:
        """Append text to the stream (e.g. a caption or a remark between frames)."""
        sessions.info(session_id)
        return _appended(
            session_id, await ctx.scheduler.run(lambda: sessions.append_text(session_id, body.text)), sessions
        )

    @app.post(
        "/v1/sessions/{session_id}/ask", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}, tags=tags
    )
    async def ask(session_id: str, body: AskRequest, request: Request):
        """Answer a question from a branch of the session's state: the stream itself is not changed. The answer
        has the chat.completion shape (server-sent chunks with `stream: true`)."""
        sessions.info(session_id)
        n_question = len(engine.processor.tokenize(body.question)) + 8  # and the turn's markup
        max_new = completion_budget(body, n_question, config)
        gen = new_generation(engine, body, lambda row: sessions.branch(session_id, row, body.question), max_new)
        return await submit_and_respond(ctx.scheduler, gen, body, request, config.model_name)

    @app.post("/v1/sessions/{session_id}/snapshot", response_model=SnapshotInfo, responses=ERRORS, tags=tags)
    async def snapshot(session_id: str) -> dict:
        """Save the session's state as it is now (to the state directory, or in memory without one)."""
        sessions.info(session_id)
        return await ctx.scheduler.run(lambda: sessions.snapshot(session_id))

    @app.post("/v1/sessions/{session_id}/restore", response_model=SessionInfo, responses=ERRORS, tags=tags)
    async def restore(session_id: str, body: RestoreRequest) -> dict:
        """Put the session back exactly as it was at a snapshot."""
        sessions.info(session_id)
        await ctx.scheduler.run(lambda: sessions.restore(session_id, body.snapshot_id))
        return sessions.info(session_id)


def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {config.model_name!r}",
            code="model_not_found",
            param="model",
        )


def _appended(session_id: str, result: tuple[int, int], sessions: SessionRegistry) -> dict:
    frames, tokens = result
    return {
        "session_id": session_id,
        "frames_appended": frames,
        "tokens_appended": tokens,
        "session": sessions.info(session_id),
    }


async def _sweep_idle_sessions(ctx: ServerContext) -> None:
    interval = min(ctx.config.janitor_interval, ctx.config.session_idle_timeout / 4)
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.wrap_future(ctx.scheduler.submit_task(ctx.sessions.expire_idle, internal=True))
        except Exception:
            log.exception("the idle-session sweep failed")
            continue
        if expired:
            log.info("idle sessions left memory: %s", ", ".join(expired))
