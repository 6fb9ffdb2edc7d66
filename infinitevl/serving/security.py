"""Gates in front of every route, as plain ASGI middleware: where requests may come from, the bearer API key and the
request body size and time limits.

`SameSiteMiddleware` keeps a server that web pages can reach from being driven by them: without an API key only
loopback `Host` values are accepted unless `allowed_hosts` says otherwise (a DNS-rebinding page names its own host),
a request whose `Origin` is neither the server itself nor one of `allowed_origins` is refused (browsers send
`Origin` on every POST, `no-cors` ones included), and a POST body must be declared `application/json` (the upload
route takes image/* and video/*), which no cross-site form or no-cors fetch can send.

Both answer in the OpenAI error shape before any route runs. `/health`, the API documentation (`/docs`,
`/openapi.json`) and the live-session page's files (`/`, `/web/...`) stay open; every other path needs the key
when one is set. The body limit buffers the body (never more than the limit) and replays it to the app. A refused
request's body is read to its end first (up to a bound) so that the client gets the 401 / 413 answer instead of a
connection reset while it is still sending.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

DRAIN_LIMIT = 64 * 2**20  # read at most this much of a refused body before answering
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/web/",)  # the live-session page's static files (webpage.py): they hold no data


async def send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def drain(receive: Receive, limit: int = DRAIN_LIMIT) -> None:
    """Read and drop the rest of a request body (at most `limit` bytes)."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        if not header:
            message = "missing API key: send it in the header 'Authorization: Bearer YOUR_KEY'"
        elif scheme.lower() != b"bearer":
            message = "the Authorization header must be 'Bearer YOUR_KEY'"
        else:
            message = "invalid API key"
        await drain(receive)
        await send_error(send, APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
RAW_BODY_PATHS = ("/upload",)  # routes whose body is media bytes, not JSON (they check its type themselves)


def host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1' (lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _loopback_address(name: str) -> bool:
    """An IP address literal of the loopback network (127.0.0.0/8, ::1); host names never are."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SameSiteMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = LOOPBACK_HOSTS | {host_name(h) for h in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._problem(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        await drain(receive)
        await send_error(send, problem)

    def _problem(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and host_name(host) not in self.hosts and not _loopback_address(host_name(host)):
            return APIError(
                403,
                f"the Host {host[:100]!r} is not one this server answers to: without an API key it answers only "
                "loopback names (start it with --allowed-hosts NAME, or --api-key, to serve others)",
                code="host_not_allowed",
            )
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        if origin and origin != "null" and urlsplit(origin).netloc == host.lower():
            origin = ""  # the server's own page
        if origin and not (self.any_origin or origin in self.origins):
            return APIError(
                403,
                f"cross-site request from {origin[:100]!r} refused (allow it with --allowed-origins)",
                code="cross_site",
            )
        if scope["method"] == "POST" and not scope["path"].endswith(RAW_BODY_PATHS):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            declared = headers.get(b"content-length", b"")
            has_body = declared not in (b"", b"0") or b"transfer-encoding" in headers
            if has_body and kind != b"application/json":
                return APIError(
                    415,
                    f"Content-Type {kind.decode('latin-1')[:64] or '(none)'}: send the body as JSON with "
                    "Content-Type: application/json",
                    code="bad_content_type",
                )
        return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout  # seconds to receive the whole body (a client that trickles it gets 408)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await drain(receive)
            return await send_error(send, self._too_large(int(declared)))
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > self.max_bytes:
                        await drain(receive)
                        return await send_error(send, self._too_large(None))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            message = f"the request body did not arrive within {self.timeout:g} s"
            return await send_error(send, APIError(408, message, code="body_timeout", headers={"Connection": "close"}))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(
            413, f"the request body{got} exceeds this server's limit of {self.max_bytes} bytes", code="body_too_large"
        )
