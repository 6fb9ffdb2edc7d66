"""The streaming-session routes, our extension: `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`,
`POST /v1/sessions/{id}/frames|upload|text|ask|snapshot|restore`.

Media is decoded in the event loop's thread pool; the change itself is a task on the scheduler (appends advance one
frame or chunk per step, between decode steps) and, with a state directory, is durable before the reply. A client
that goes away while its append waits in the queue withdraws it.
"""

from __future__ import annotations

from fastapi import FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from .fixed import FixedReply
from .openai_routes import ERRORS, STREAMED, chat_reply, new_generation
from .prompts import check_supported, completion_budget
from .responses import respond, run_task
from .schemas import ChatCompletion
from .session_schemas import (
    MAX_TIMESTAMP,
    AppendResult,
    AskRequest,
    Deleted,
    FramesRequest,
    RestoreRequest,
    SessionCreate,
    SessionInfo,
    SessionList,
    SnapshotInfo,
    TextAppend,
)

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/*", "video/*")},
    }
}
TAGS = ["sessions"]


def check_video_end(video, offset: float | None) -> None:
    """A chunk placed at `offset` must end within the stream's clock limit: past it every later frame is refused."""
    if offset is not None and video.timestamps:
        end = offset + video.timestamps[-1] - video.timestamps[0]
        if end > MAX_TIMESTAMP:
            raise APIError(
                400,
                f"timestamp_offset {offset:g} s: the video chunk would end at {end:.3f} s, past the limit of "
                f"{MAX_TIMESTAMP:g} s of stream time",
                param="timestamp_offset",
            )


def install_session_routes(app: FastAPI, ctx) -> None:
    engine, config, sessions, scheduler = ctx.engine, ctx.config, ctx.sessions, ctx.scheduler

    def appended(session_id: str, result: tuple[int, int], dropped: int = 0) -> dict:
        frames, tokens = result
        return {
            "session_id": session_id,
            "frames_appended": frames,
            "tokens_appended": tokens,
            "frames_dropped": dropped,
            "session": sessions.info(session_id),
        }

    async def live_frames(session_id: str, frames: list, request: Request) -> dict:
        """Frames appended in their turn; a realtime session's waiting frames give way to a newer upload."""
        ticket = sessions.arrive(session_id, len(frames))
        try:
            result = await run_task(scheduler, lambda: sessions.append_frames(session_id, frames, ticket), request)
        finally:
            sessions.leave(session_id, ticket)
        return appended(session_id, result, len(frames) if ticket is not None and ticket.dropped else 0)

    @app.post("/v1/sessions", response_model=SessionInfo, responses=ERRORS, tags=TAGS)
    async def create_session(body: SessionCreate | None = None) -> dict:
        """Open a streaming session (a conversation fed frames, videos and text, in constant memory)."""
        body = body or SessionCreate()
        if body.system_prompt:
            await run_in_threadpool(ctx.budget.check, [body.system_prompt], engine.processor, "system_prompt")
        session_id = await scheduler.run(
            lambda: sessions.create(
                body.system_prompt, body.frame_size, body.pair_frames, body.realtime, body.frames_per_step
            )
        )
        return sessions.info(session_id)

    @app.get("/v1/sessions", response_model=SessionList, responses=ERRORS, tags=TAGS)
    async def list_sessions() -> dict:
        return {"data": [sessions.info(i) for i in sessions.ids()]}

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=ERRORS, tags=TAGS)
    async def get_session(session_id: str) -> dict:
        """Stats: tokens in the stream, frames, state bytes (constant), frames per second, snapshots, status."""
        return sessions.info(session_id)

    @app.delete("/v1/sessions/{session_id}", response_model=Deleted, responses=ERRORS, tags=TAGS)
    async def delete_session(session_id: str) -> Deleted:
        sessions.info(session_id)
        await scheduler.run(lambda: sessions.delete(session_id))
        return Deleted(id=session_id)

    @app.post("/v1/sessions/{session_id}/frames", response_model=AppendResult, responses=ERRORS, tags=TAGS)
    async def push_frames(session_id: str, body: FramesRequest, request: Request) -> dict:
        """Append live frames (images with timestamps) or a video chunk; all or nothing."""
        sessions.info(session_id)
        if body.frames is not None:
            frames = await run_in_threadpool(
                lambda: [
                    (ctx.media.image(f.image_url.url, f"frames[{i}]"), f.timestamp) for i, f in enumerate(body.frames)
                ]
            )
            return await live_frames(session_id, frames, request)
        else:
            video = await run_in_threadpool(ctx.media.video, body.video_url.url, body.fps, "video_url")
            check_video_end(video, body.timestamp_offset)
            job = lambda: sessions.append_video(session_id, video, body.timestamp_offset)
        return appended(session_id, await run_task(scheduler, job, request))

    @app.post(
        "/v1/sessions/{session_id}/upload",
        response_model=AppendResult,
        responses=ERRORS,
        tags=TAGS,
        openapi_extra=UPLOAD_BODY,
    )
    async def upload(
        session_id: str,
        request: Request,
        timestamp: float | None = Query(
            None, ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False, description="images: the frame's time in seconds"
        ),
        fps: float | None = Query(None, gt=0, le=120, allow_inf_nan=False, description="videos: frames per second"),
        timestamp_offset: float | None = Query(
            None, ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False, description="videos: time of the first frame"
        ),
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
            return await live_frames(session_id, [(image, timestamp)], request)
        elif kind.startswith("video/"):
            video = await run_in_threadpool(ctx.media.video_from, data, fps, "body")
            check_video_end(video, timestamp_offset)
            job = lambda: sessions.append_video(session_id, video, timestamp_offset)
        else:
            raise APIError(415, f"Content-Type {kind[:64] or '(none)'}: send image/* or video/* bytes", code="bad_type")
        return appended(session_id, await run_task(scheduler, job, request))

    @app.post("/v1/sessions/{session_id}/text", response_model=AppendResult, responses=ERRORS, tags=TAGS)
    async def push_text(session_id: str, body: TextAppend, request: Request) -> dict:
        """Append text to the stream (e.g. a caption or a remark between frames), as plain text."""
        sessions.info(session_id)
        await run_in_threadpool(ctx.budget.check, [body.text], engine.processor, "text")
        job = lambda: sessions.append_text(session_id, body.text)
        return appended(session_id, await run_task(scheduler, job, request))

    @app.post(
        "/v1/sessions/{session_id}/ask", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}, tags=TAGS
    )
    async def ask(session_id: str, body: AskRequest, request: Request):
        """Answer a question from a branch of the session's state: the stream itself is not changed. The answer
        has the chat.completion shape (server-sent chunks with `stream: true`)."""
        sessions.info(session_id)
        check_supported(body)
        await run_in_threadpool(ctx.budget.check, [body.question], engine.processor, "question")
        n_question = len(await run_in_threadpool(engine.processor.tokenize_text, body.question)) + 8  # turn markup
        max_new = completion_budget(body, n_question, config)
        top = (body.top_logprobs or 0) if body.logprobs else None
        prepare = lambda row: sessions.branch(session_id, row, body.question)  # noqa: E731
        gen = new_generation(ctx, body, prepare, max_new, top_logprobs=top)
        fixed = FixedReply.for_prompt(engine, body.question, max_new, n_question)
        return await respond(fixed or scheduler, gen, chat_reply(ctx, body, logprobs=body.logprobs), request)

    @app.post("/v1/sessions/{session_id}/snapshot", response_model=SnapshotInfo, responses=ERRORS, tags=TAGS)
    async def snapshot(session_id: str) -> dict:
        """Save the session's state as it is now (to the state directory, or in memory without one)."""
        sessions.info(session_id)
        return await scheduler.run(lambda: sessions.snapshot(session_id))

    @app.post("/v1/sessions/{session_id}/restore", response_model=SessionInfo, responses=ERRORS, tags=TAGS)
    async def restore(session_id: str, body: RestoreRequest) -> dict:
        """Put the session back exactly as it was at a snapshot (also the way back for a damaged session)."""
        sessions.info(session_id)
        await scheduler.run(lambda: sessions.restore(session_id, body.snapshot_id))
        return sessions.info(session_id)
