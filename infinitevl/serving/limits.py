"""JSON request bodies parsed off the event loop and held to the server's size limits before any deep validation.

FastAPI parses a JSON body on the event loop and then validates all of it, so one body of a million content parts
(or a prompt of millions of token ids) would freeze every other client for seconds before its 400. Here, before
FastAPI sees the body, a cheap scan bounds how many JSON items it can hold (`MAX_JSON_ITEMS`, counted as commas:
an upper bound on list elements and object members), `json.loads` runs in the thread pool, and the counts that
matter (messages, content parts, prompts, token ids, frames, stops, logit_bias entries) are checked against the
configuration; only then does pydantic validate a body of bounded size. Not here: what the values mean (schemas.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from .config import ServerConfig
from .errors import APIError
from .schemas import MAX_STOPS

MAX_JSON_ITEMS = 1 << 20
MAX_LOGIT_BIAS = 1024


def _too_many(param: str, count: int | str, limit: int, what: str) -> APIError:
    return APIError(
        400, f"{param}: {count} {what}, more than this server's limit of {limit}", code="too_many", param=param
    )


def load_json(body: bytes, config: ServerConfig) -> object:
    """Parse a request body, refusing what exceeds the limits (APIError 400); malformed JSON raises ValueError."""
    if body.count(b",") >= MAX_JSON_ITEMS:
        raise APIError(
            400, f"the request body holds more than {MAX_JSON_ITEMS} JSON items", code="too_many", param=None
        )
    try:
        data = json.loads(body)
    except RecursionError as err:
        raise APIError(400, "the request body is nested too deeply", code="invalid_request") from err
    if isinstance(data, dict):
        check_counts(data, config)
    return data


def check_counts(body: dict, config: ServerConfig) -> None:
    """The list lengths of a request body against the configuration (before pydantic looks at it)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > config.max_messages:
            raise _too_many("messages", len(messages), config.max_messages, "messages")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > config.max_content_parts:
            raise _too_many("messages", parts, config.max_content_parts, "content parts")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], (list, str)):
            limit = min(config.max_prompts, config.max_queue)
            if len(prompt) > limit:
                raise _too_many("prompt", len(prompt), limit, "prompts (each one is a request in the queue)")
            lists = [p for p in prompt if isinstance(p, list)]
        else:
            lists = [prompt]
        for ids in lists:
            if len(ids) > config.max_request_tokens:
                raise APIError(
                    400,
                    f"prompt: {len(ids)} token ids; this server allows {config.max_request_tokens} tokens per request",
                    code="context_length_exceeded",
                    param="prompt",
                )
    for key, limit in (("frames", config.max_video_frames), ("stop", MAX_STOPS), ("logit_bias", MAX_LOGIT_BIAS)):
        value = body.get(key)
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise _too_many(key, len(value), limit, "entries")


class BoundedJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `load_json` in the thread pool; FastAPI then validates the result."""

    config: ServerConfig = ServerConfig()  # replaced by `bounded_routes`

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        config = self.config

        async def bounded(request: Request):
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if request.method == "POST" and kind == "application/json":
                body = await request.body()
                if body:
                    with contextlib.suppress(ValueError):  # malformed: FastAPI parses it again and says where
                        request._json = await run_in_threadpool(load_json, body, config)
            return await handler(request)

        return bounded


def bounded_routes(config: ServerConfig) -> type[BoundedJSONRoute]:
    """The route class for one app, bound to its configuration."""
    return type("BoundedJSONRoute", (BoundedJSONRoute,), {"config": config})
