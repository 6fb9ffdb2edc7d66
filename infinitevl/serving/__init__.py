"""`infinitevl serve`: an OpenAI-compatible HTTP server with persistent streaming-video sessions (FastAPI + uvicorn).

app.py (routes) over completions.py (OpenAI requests <-> generations), scheduler.py (the model's one worker
thread, fair queue, batched decoding), sessions.py (registry, persistence, snapshots), media.py (data URLs, the
media root, remote fetches), security.py (API key, body limit), errors.py (the OpenAI error shape).
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
