"""`infinitevl serve`: an OpenAI-compatible HTTP server with persistent streaming-video sessions (FastAPI + uvicorn).

app.py (the app, middleware, health / version / metrics) over openai_routes.py and session_routes.py (the routes),
prompts.py (requests -> token ids within the limits), responses.py (events -> JSON or server-sent events),
scheduler.py (the model's one worker thread: fair queue, prefill chunks between batched decode steps), sampling.py
(one request's choices), prefill.py (chunked prefill), sessions.py and store.py (sessions, durable on disk),
media.py (data URLs, the media root, remote fetches), security.py (API key, body limit), observability.py (request
ids, access log, Prometheus), errors.py (the OpenAI error shape), schemas.py and session_schemas.py (the bodies); write_cost.py
measures what durable session writes cost at a real model's size.
FastAPI and uvicorn (the `serve` extra) are imported only when the app is built, not by `config`.
"""

from __future__ import annotations

from .config import ServerConfig

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("BackgroundServer", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
