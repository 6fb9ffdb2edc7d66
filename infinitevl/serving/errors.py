"""Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status.

Every failure the server reports goes through `APIError` or one of the handlers installed here, so clients (the
official `openai` package maps statuses to exception classes) always get the same shape and a message that says
what was wrong, in terms of the client's own input (never a server path or an object's address). Validation errors
are 400 (as OpenAI answers them), not FastAPI's default 422. An unexpected failure is a 500 whose message gives only
the request id; the details go to the server log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("infinitevl.serving")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    499: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A failure to report to the client: HTTP status, a clear message, and the OpenAI `type` / `code` / `param`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message (and the first offending parameter) from pydantic / FastAPI validation errors."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        pos = first.get("loc", ("body", "?"))[-1]
        return f"malformed JSON in the request body: {ctx.get('error', 'decode error')} (at character {pos})", None
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        where = ".".join(loc)
        if param is None and where:
            param = where
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object (send it with Content-Type: application/json)")
        elif err.get("type") == "missing" and not loc:
            parts.append("the request body is missing (send a JSON object)")
        else:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return APIError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return APIError(err.status_code, message, headers=dict(err.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return internal_error().response()


def internal_error(request_id: str | None = None) -> APIError:
    """A 500 that says nothing about the server's insides; the log has the traceback under the request id (the
    current request's, unless given: the model's worker thread runs outside any request)."""
    from .observability import current_request_id

    rid = request_id or current_request_id() or "-"
    return APIError(
        500,
        f"internal server error (request id {rid}); the server log has the details",
        code="internal_error",
    )
