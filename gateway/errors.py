"""Errors in the OpenAI error schema: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see goes through `ApiError`, so no handler ever leaks a traceback.
"""

from __future__ import annotations

import logging
import math
import secrets

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("ponder.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


# The OpenAI SDKs retry a 408, 409, 429 and any 5xx (twice by default) unless the answer says this:
# it goes on answers a client's retry cannot help (docs/api.md "Client retries").
NO_CLIENT_RETRY = {"x-should-retry": "false"}


def retry_after(seconds: float | None) -> dict[str, str]:
    """A Retry-After header in whole seconds, at least 1; none when there is no time to give."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds else {}


def unrouted_request_id() -> str:
    """An id for an answer to a request that no plan gave one (a refusal before routing, a model list,
    a health check): OpenAI answers every request with one, which clients log and quote. No request
    record holds it (docs/api.md)."""
    return f"req_{secrets.token_hex(16)}"


def request_id_headers(request_id: str) -> dict[str, str]:
    """The request's id, under Ponder's name and OpenAI's: the openai SDKs read `x-request-id` into a
    result's `_request_id` and an error's `request_id`, which apps log to report a failed request."""
    return {"x-ponder-request-id": request_id, "x-request-id": request_id}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        if "x-request-id" not in headers:
            # refused before routing (auth, validation, budget, an unknown path): no plan, so no id yet
            headers.update(request_id_headers(unrouted_request_id()))
        return Response(orjson.dumps(self.body()), self.status, headers, media_type="application/json")


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "method_not_allowed" if exc.status_code == 405 else "not_found" if exc.status_code == 404 else None
    # Starlette's headers: a 405's Allow (which methods the path takes) is required there (RFC 9110)
    return ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()


def internal_error() -> ApiError:
    """What a client is told of a bug (an unhandled exception): no traceback, no exception text (it may
    quote the request or a backend's answer); the traceback goes to the log (AnswerEveryRequest, below)."""
    return ApiError(500, "Internal error in the gateway; the request was not served.",
                    type="server_error", code="internal_error")


# The request id a request's plan assigned it, kept in its ASGI scope: an unhandled error after the
# plan is answered under the id the request's record has.
REQUEST_ID_SCOPE_KEY = "ponder.request_id"

# An unhandled exception is no handler's: Starlette answers it from outside every middleware (no
# x-request-id, no CORS headers), so AnswerEveryRequest answers it instead (gateway/app.py).
EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    HTTPException: http_exception_handler,
}


class AnswerEveryRequest:
    """Every answer carries an `x-request-id`, and an unhandled exception on any route is answered.

    OpenAI answers every request with an `x-request-id`, which the openai SDKs read into every result's
    `_request_id` and every error's `request_id`. Completions carry their own (the request id) and
    errors one made for them; any other answer (the model list, health, metrics, the dashboard) gets
    one made here. A bug (an exception no handler took) is answered a 500 `internal_error` in the OpenAI
    schema, under the id the request's plan gave it if it had one, inside the CORS middleware (a browser
    app reads it), and its traceback is logged once, here: Starlette's own answer came from outside
    every middleware, and it raised the exception again for the server to log a second time. An answer
    whose headers went out cannot become a 500 (a stream ends with its API's error event instead:
    streaming.EventStream). One send wrapper and one try for both: no extra cost per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def with_request_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not any(name == b"x-request-id" for name, _ in message.get("headers", ())):
                    added = [(name.encode(), value.encode()) for name, value in
                             request_id_headers(scope.get(REQUEST_ID_SCOPE_KEY) or unrouted_request_id()).items()]
                    message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        try:
            await self.app(scope, receive, with_request_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # its headers (or all of it: a background task failed after) went out already
                return
            request_id = scope.get(REQUEST_ID_SCOPE_KEY)
            await internal_error().response(request_id_headers(request_id) if request_id else None)(
                scope, receive, with_request_id)
