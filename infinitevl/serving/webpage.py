"""The live-session page that `infinitevl serve` shows at `/`: HTML, CSS and JavaScript shipped in the package.

The page (files in `web/`) is a client of the public API only, the same routes curl or the openai package use, so
it doubles as an example client. Nothing is built or templated: the files are served as they are, and their
Content-Security-Policy lets them load nothing from anywhere but this server. They hold no data, so they are
served without the API key (security.py lists them as open); every API call the page makes sends the key.
This module does not add routes to the API itself.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).with_name("web")
ASSETS = "/web"  # the page's CSS and JavaScript; security.OPEN_PREFIXES keeps it open
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",  # blob: the images of a folder being sent; data: the empty favicon
        "media-src 'self' blob: mediastream:",  # a chosen video file, the webcam
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def mount_page(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/web/`."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers=HEADERS)

    app.mount(ASSETS, StaticFiles(directory=PAGE_DIR), name="web")
