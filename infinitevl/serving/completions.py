"""From OpenAI requests to scheduled generations, and back to OpenAI responses (JSON or server-sent events).

`chat_prompt` turns a validated chat request into the engine's prompt (media fetched and decoded here, in a worker
thread of the event loop, never on the model's thread). `submit_and_respond` queues a `Generation`, waits for its
prefill (so that a failure there is still a proper HTTP error), then streams `chat.completion.chunk` events ending
with `data: [DONE]`, or collects one `chat.completion`. A client that disconnects cancels its generation, which
frees its batch row at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.generation import SamplingParams
from ..processing.media import MediaError
from ..processing.processor import Prompt
from ..state import InfiniteVLState
from .config import ServerConfig
from .errors import APIError
from .media import MediaLoader
from .scheduler import Event, Generation, GenerationHandle, Scheduler
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    SamplingFields,
    Usage,
)


def chat_prompt(engine, media: MediaLoader, req: ChatCompletionRequest) -> Prompt:
    """Decode every image and video the messages name, and render, tokenize and expand the chat."""
    processor = engine.processor
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts: list[dict] = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            try:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url":
                    image = media.image(part.image_url.url, where)
                    parts.append({"type": "image", "image": processor.encode_image(image)})
                else:
                    video = media.video(part.video_url.url, where=where)
                    parts.append({"type": "video", "video": processor.encode_video(video)})
            except MediaError as err:  # e.g. an aspect ratio the processor cannot resize
                raise APIError(400, f"{where}: {err}", code="invalid_media") from err
        messages.append({"role": role, "content": parts})
    try:
        return processor.prompt(messages)
    except ValueError as err:  # e.g. placeholder tokens typed into the text
        raise APIError(400, f"messages: {err}", code="invalid_request", param="messages") from err


def completion_budget(req: SamplingFields, prompt_tokens: int, config: ServerConfig) -> int:
    """max_new_tokens for a request, within the tokens-per-request limit."""
    limit = config.max_request_tokens
    room = limit - prompt_tokens
    requested = req.max_completion_tokens or req.max_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = f" plus max_tokens {requested}" if requested is not None else ""
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens{asked}; this server allows {limit} tokens per request "
            "(prompt and completion)",
            code="context_length_exceeded",
            param="max_tokens" if room >= 1 else "messages",
        )
    return requested if requested is not None else min(config.default_max_tokens, room)


def sampling_params(req: SamplingFields, max_new_tokens: int) -> SamplingParams:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_k=req.top_k or 0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        stop_strings=stops,
        seed=req.seed,
    )
    try:
        return params.validate()
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_request") from err


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> torch.Tensor | None:
    if not bias:
        return None
    out = torch.zeros(vocab_size)
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: {value} for token {key} is outside [-100, 100]", param="logit_bias")
        out[int(key)] = value
    return out


def new_generation(
    engine,
    req: SamplingFields,
    prepare: Callable[[InfiniteVLState], torch.Tensor],
    max_new_tokens: int,
    history: list[int] | None = None,
) -> Generation:
    model = engine.model
    return Generation(
        handle=GenerationHandle(asyncio.get_running_loop()),
        prepare=prepare,
        params=sampling_params(req, max_new_tokens),
        decode_text=engine.processor.decode,
        stop_token_ids=frozenset(model.config.eos_token_ids),
        logit_bias=logit_bias(req.logit_bias, model.config.text.vocab_size),
        history=list(history or []),
    )


async def submit_and_respond(
    scheduler: Scheduler, gen: Generation, req: SamplingFields, request: Request, model_name: str
):
    scheduler.submit_generation(gen)  # 429 when the queue is full
    handle = gen.handle
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    streaming = False
    try:
        first = await handle.next()  # "started": the prompt is in, or an error
        if first.kind == "error":
            return first.error.response()
        if first.kind == "cancelled":
            return _gone()
        completion_id, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        if not req.stream:
            return await _collect(handle, first, completion_id, created, model_name)
        streaming = True
    finally:
        watcher.cancel()
        if not streaming:
            handle.cancel()  # a no-op when finished; frees the row if this handler was cancelled
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _sse(handle, completion_id, created, model_name, include_usage)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _cancel_on_disconnect(request: Request, handle: GenerationHandle) -> None:
    """The body has been read: the next message on the channel is the client going away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _collect(handle: GenerationHandle, event: Event, cid: str, created: int, model: str) -> JSONResponse:
    pieces = []
    while event.kind in ("started", "text"):
        pieces.append(event.text)
        event = await handle.next()
    if event.kind == "error":
        return event.error.response()
    if event.kind == "cancelled":
        return _gone()
    body = ChatCompletion(
        id=cid,
        created=created,
        model=model,
        choices=[Choice(message=AssistantMessage(content="".join(pieces)), finish_reason=event.finish_reason)],
        usage=_usage(event),
    )
    return JSONResponse(body.model_dump())


async def _sse(handle: GenerationHandle, cid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: Delta, finish: str | None = None) -> str:
        c = ChatCompletionChunk(
            id=cid, created=created, model=model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
        )
        data = c.model_dump(exclude={"usage"})
        data["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # as OpenAI: absent, not null
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            event = await handle.next()
            if event.kind == "text":
                yield chunk(Delta(content=event.text))
            elif event.kind == "done":
                yield chunk(Delta(), event.finish_reason)
                if include_usage:
                    last = ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=_usage(event))
                    yield f"data: {last.model_dump_json()}\n\n"
                break
            elif event.kind == "error":
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            else:  # cancelled
                return
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op once finished; otherwise the client went away: free its row


def _usage(event: Event) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


def _gone() -> JSONResponse:
    """The answer to a client that went away (nobody reads it; 499 as nginx logs it)."""
    return APIError(499, "the client closed the connection", code="client_closed").response()
