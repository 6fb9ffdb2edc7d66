"""From a queued generation's events to OpenAI responses: one JSON body, or server-sent events ending in [DONE].

`respond` queues a `Generation`, waits for its prefill (so that a failure there is still a proper HTTP error), then
collects one `chat.completion` / `text_completion` or streams chunks. A client that disconnects cancels its
generation: a queued one leaves the queue at once, a running one frees its rows at the next decode step. A stream
that the server has to end early (shutdown) gets an error event, then `data: [DONE]`. When the model is not a
general one, its note is in the `model_note` field of every body and in the `X-Model-Note` header.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .sampling import Event, Generation, GenerationHandle, TokenInfo
from .scheduler import Scheduler
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class Reply:
    """How to answer: chat or completion shape, the model's name and note, and for completions the echo."""

    kind: str  # "chat" | "completion"
    model: str
    note: str | None
    token_text: Callable[[int], str]  # one token's text (for log-probabilities)
    logprobs: bool = False  # log-probabilities were asked for
    token_bytes: Callable[[int], list[int]] | None = None  # a token's own bytes (default: its text's)
    echo: str | None = None  # completions with echo: the prompt's text
    echo_ids: list[int] | None = None  # and its token ids
    stream: bool = False
    include_usage: bool = False

    def headers(self) -> dict[str, str]:
        return {"X-Model-Note": self.note} if self.note else {}


async def respond(scheduler: Scheduler, gen: Generation, reply: Reply, request: Request):
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
        rid, created = ("chatcmpl-" if reply.kind == "chat" else "cmpl-") + secrets.token_hex(12), int(time.time())
        if not reply.stream:
            return await _collect(handle, gen.n, first, rid, created, reply)
        streaming = True
    finally:
        watcher.cancel()
        if not streaming:
            handle.cancel()  # a no-op when finished; frees the rows if this handler was cancelled
    events = _sse(handle, gen.n, first, rid, created, reply)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reply.headers()}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def run_task(scheduler: Scheduler, fn: Callable[[], object], request: Request):
    """Await `fn()` on the worker thread; a client that disconnects while it waits in the queue withdraws it."""
    future = scheduler.submit_task(fn)
    watcher = asyncio.create_task(_withdraw_on_disconnect(request, future))
    try:
        return await asyncio.wrap_future(future)
    finally:
        watcher.cancel()


async def _withdraw_on_disconnect(request: Request, future) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            future.cancel()  # takes effect only while the task is queued
            return


async def _cancel_on_disconnect(request: Request, handle: GenerationHandle) -> None:
    """The body has been read: the next message on the channel is the client going away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


@dataclass
class _Answer:
    text: str = ""
    finish: str | None = None
    tokens: list[TokenInfo] | None = None
    completion_tokens: int = 0


async def _collect(handle: GenerationHandle, n: int, first: Event, rid: str, created: int, reply: Reply):
    answers = [_Answer(tokens=[]) for _ in range(n)]
    prompt_tokens, event = first.prompt_tokens, first
    while sum(a.finish is not None for a in answers) < n:
        event = await handle.next()
        if event.kind == "error":
            return event.error.response()
        if event.kind == "cancelled":
            return _gone()
        a = answers[event.index]
        if event.kind == "text":
            a.text += event.text
            a.tokens += event.logprobs
        elif event.kind == "done":
            a.finish, a.completion_tokens = event.finish_reason, event.completion_tokens
    completion_tokens = sum(a.completion_tokens for a in answers)
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    if reply.kind == "chat":
        body = ChatCompletion(
            id=rid,
            created=created,
            model=reply.model,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content=a.text),
                    finish_reason=a.finish,
                    logprobs=_chat_logprobs(a.tokens, reply) if reply.logprobs else None,
                )
                for i, a in enumerate(answers)
            ],
            usage=usage,
            model_note=reply.note,
        )
    else:
        body = Completion(
            id=rid,
            created=created,
            model=reply.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=(reply.echo or "") + a.text,
                    finish_reason=a.finish,
                    logprobs=_completion_logprobs(first.prompt_logprobs, a.tokens, reply),
                )
                for i, a in enumerate(answers)
            ],
            usage=usage,
            model_note=reply.note,
        )
    return JSONResponse(body.model_dump(), headers=reply.headers())


async def _sse(
    handle: GenerationHandle, n: int, first: Event, rid: str, created: int, reply: Reply
) -> AsyncIterator[str]:
    chat = reply.kind == "chat"
    shape = ChatCompletionChunk if chat else Completion
    want_logprobs = reply.logprobs

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False, tokens=None) -> str:
        if chat:
            delta = Delta(role="assistant" if role else None, content=text)
            logprobs = _chat_logprobs(tokens, reply) if want_logprobs and tokens is not None else None
            c = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
            body = shape(id=rid, created=created, model=reply.model, choices=[c]).model_dump(exclude={"usage"})
            body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # as OpenAI: absent, not null
        else:
            logprobs = _completion_logprobs(None, tokens, reply) if want_logprobs and tokens is not None else None
            c = CompletionChoice(index=index, text=text or "", finish_reason="stop", logprobs=logprobs)
            body = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": reply.model,
                "choices": [{**c.model_dump(), "finish_reason": finish}],
            }
        return data(body)

    completion_tokens, finished = 0, 0
    try:
        for i in range(n):
            yield chunk(i, "" if chat else reply.echo or "", role=True, tokens=_echoed(first, reply))
        while finished < n:
            event = await handle.next()
            if event.kind == "text":
                yield chunk(event.index, event.text, tokens=event.logprobs)
            elif event.kind == "done":
                finished += 1
                completion_tokens += event.completion_tokens
                yield chunk(event.index, None if chat else "", event.finish_reason)
            elif event.kind == "error":
                yield data(event.error.body())
                break
            else:  # cancelled: the client is gone
                return
        if reply.include_usage:
            usage = Usage(
                prompt_tokens=first.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=first.prompt_tokens + completion_tokens,
            )
            yield data({"id": rid, "object": shape.model_fields["object"].default, "created": created,
                        "model": reply.model, "choices": [], "usage": usage.model_dump()})  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op once finished; otherwise the client went away: free its rows


def _chat_logprobs(tokens: list[TokenInfo] | None, reply: Reply) -> ChoiceLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = reply.token_text(token)
        raw = reply.token_bytes(token) if reply.token_bytes is not None else list(text.encode("utf-8"))
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    content = []
    for t in tokens or []:
        head = top(t.token, t.logprob)
        content.append(TokenLogprob(**head.model_dump(), top_logprobs=[top(i, lp) for i, lp in t.top]))
    return ChoiceLogprobs(content=content)


def _echoed(first: Event, reply: Reply) -> list[TokenInfo | None] | None:
    """The echoed prompt's entries for log-probabilities (the first token has none)."""
    if not (reply.logprobs and reply.echo_ids):
        return None
    scores = first.prompt_logprobs or [None] * len(reply.echo_ids)
    return [s if s is not None else TokenInfo(t, float("nan"), []) for t, s in zip(reply.echo_ids, scores)]


def _completion_logprobs(
    prompt: list[TokenInfo | None] | None, tokens: list[TokenInfo | None] | None, reply: Reply
) -> CompletionLogprobs | None:
    if not reply.logprobs:
        return None
    out = CompletionLogprobs()
    offset = 0
    entries: list[tuple[int, TokenInfo | None]] = []
    if prompt is not None and reply.echo_ids:
        entries += [(t, p) for t, p in zip(reply.echo_ids, prompt)]
    entries += [(t.token, t if t.logprob == t.logprob else None) for t in tokens or []]  # NaN: no score
    for token, info in entries:
        text = reply.token_text(token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if info is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(info.logprob)
            top: dict[str, float] = {}
            for i, lp in info.top:
                top.setdefault(reply.token_text(i), lp)
            out.top_logprobs.append(top)
    return out


def _gone() -> JSONResponse:
    """The answer to a client that went away (nobody reads it; 499 as nginx logs it)."""
    return APIError(499, "the client closed the connection", code="client_closed").response()
