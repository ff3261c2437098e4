"""Upstream errors: a failed call as UpstreamError, with what the client sees of it (status, OpenAI's
`code` and `param`) and what the retries need (retryable, the wait an upstream asked for).

Shared by both transports of gateway/backends.py: the fast path's HTTP answers (http_error) and
litellm's exceptions (gateway/litellm_calls.py).
"""

from __future__ import annotations

import email.utils
import errno
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import orjson

# Upstream statuses that are about the request itself: passed on to the client as they are, never
# retried, and no mark against the backend's health.
REQUEST_ERRORS = frozenset({400, 404, 413, 422})
# OpenAI's codes for a parameter (or value) the model does not take, and the gateway's for a content part
# a text-only backend cannot read (an image for the local model): another backend may take it
MODEL_REFUSALS = frozenset({"unsupported_parameter", "unsupported_value", "unsupported_content"})
# Upstream statuses that refuse the gateway's own credentials for the backend (its API key wrong, revoked,
# unset, or not allowed this model): the operator's to fix, never the client's (credentials_refused)
CREDENTIAL_REFUSALS = frozenset({401, 403})
# The longest wait an upstream may ask for, as kept: a backend's cool-down holds it at most this long
# (BackendHealth.max_cooldown_s), so a client told to wait longer (a year's HTTP-date) would wait for nothing
MAX_UPSTREAM_WAIT_S = 30.0

class UpstreamError(Exception):
    """A failed upstream call. `status` is what the client would see if nothing else can serve it."""

    def __init__(self, backend: str, status: int, message: str, *, retryable: bool,
                 retry_after: float | None = None, code: str | None = None, param: str | None = None,
                 upstream_status: int | None = None, cut: bool = False, local: bool = False,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend
        self.status = status
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code  # the client's error code, when more precise than upstream_error
        self.param = param  # the request field the error is about, when the upstream named one
        # the HTTP status the upstream refused the call with; None when it did not answer with one
        # (no answer, or a stream it accepted and then broke)
        self.upstream_status = upstream_status
        # the upstream had the whole request and was answering when the gateway stopped waiting (a
        # timeout): a cut call, billed as one (Backend.cut), not a failure that cost nothing
        self.cut = cut
        # the gateway itself could not make the call (out of file descriptors): no mark against the
        # backend's health, and the client is told to come back (a 503, `overloaded`)
        self.local = local
        # what the upstream said, for the operator's log only, where `message` (the client's) must not
        # say it: a refusal of the gateway's credentials may quote its key (credentials_refused)
        self.detail = detail

    @property
    def credentials(self) -> bool:
        """The upstream refused the gateway's credentials for this backend (a 401 or 403)."""
        return self.upstream_status in CREDENTIAL_REFUSALS

    @property
    def about_request(self) -> bool:
        """The upstream refused the request itself (400, 404, 413, 422): every backend would refuse it
        alike, so no fallback arm is sent it. Other failures a call is not retried for (a 401 for the
        backend's key) are the backend's, and another backend may serve; so may a 400 for a parameter
        this model does not take (`logprobs` of a reasoning model, of Claude), which another takes."""
        return self.refuses_body and self.code not in MODEL_REFUSALS

    @property
    def refuses_body(self) -> bool:
        """The upstream refused what it was sent (a 4xx about the request or a parameter of it): every
        call of that body to this backend would fail alike, so none is made again."""
        return self.status in REQUEST_ERRORS


# The process (EMFILE) or the system (ENFILE) has no file descriptor left for the call's socket
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_files_error(backend: str, exc: BaseException) -> UpstreamError | None:
    """The gateway's own lack of file descriptors behind a failed connect, as the error a client may
    retry (503 `overloaded`), or None when the failure was not that. aiohttp keeps the OSError on
    `os_error`; litellm's and httpx's errors carry it as a cause."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in OUT_OF_FILES:
            return UpstreamError(backend, 503, f"{backend}: not called: the gateway has run out of open files "
                                 f"({cause.strerror or 'Too many open files'}); send the request again after the "
                                 "time in Retry-After", retryable=True, code="overloaded", local=True)
        cause = getattr(cause, "os_error", None) or cause.__cause__ or cause.__context__
    return None


def credentials_refused(backend: str, status: int, detail: str) -> UpstreamError:
    """A backend's 401 or 403: the gateway's key for it is wrong, revoked, unset or not allowed the model.
    The operator's problem, not the client's: a 502 naming the backend's failure, never a 401 (the
    client's key is fine) nor the upstream's words (they may quote the masked key, or name the
    account); those go to the log (BackendHealth). Not retried on this backend, which another arm
    replaces, and which cools down at once for its longest cool-down (BackendHealth.failed)."""
    return UpstreamError(backend, 502, f"{backend}: the backend refused the gateway's credentials for it "
                         f"(upstream {status}); the gateway's operator must fix its key", retryable=False,
                         upstream_status=status, detail=detail[:500])


def http_error(backend: str, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """An upstream's HTTP error answer (the fast path's) as the UpstreamError the client and the retries act on."""
    try:
        error = orjson.loads(raw)["error"]
        message = error["message"]
    except Exception:  # any shape: the upstream's body is only informative
        error, message = None, raw[:500].decode("utf-8", "replace")
    if status in CREDENTIAL_REFUSALS:
        return credentials_refused(backend, status, str(message))
    retryable = status == 429 or status >= 500 or status == 408
    client_status = status if status in REQUEST_ERRORS else (429 if status == 429 else 502)
    code, param = passed_on(client_status, error)
    if code is None and client_status == 400 and _says_context_exceeded(str(message)):
        code, param = "context_length_exceeded", param or "messages"
    wait = upstream_wait(headers) or google_retry_delay(raw.decode("utf-8", "replace"))
    return UpstreamError(backend, client_status, f"{backend}: upstream {status}: {message}",
                         retryable=retryable, retry_after=wait, code=code, param=param,
                         upstream_status=status)


def passed_on(client_status: int, error: Any) -> tuple[str | None, str | None]:
    """The upstream's `code` and `param` of an error the client gets with the upstream's own status
    (a request error, a rate limit): apps branch on them (`context_length_exceeded` -> trim the
    history, `content_filter`, `insufficient_quota`). A 5xx becomes our 502, with our code."""
    if (client_status not in REQUEST_ERRORS and client_status != 429) or not isinstance(error, dict):
        return None, None
    code, param = error.get("code"), error.get("param")
    return (code if isinstance(code, str) and code else None), (param if isinstance(param, str) and param else None)


# How OpenAI-compatible servers word a prompt over the model's window when their error has no string
# `code` (vLLM's and llama.cpp's `code` is the HTTP status): vLLM ("This model's maximum context length
# is ...", "The decoder prompt ... is longer than the maximum model length"), SGLang, llama.cpp's server.
# litellm knows these phrases too, but the fast path does not import it.
CONTEXT_EXCEEDED_PHRASES = ("maximum context length", "longer than the maximum model length",
                            "longer than the model's context length", "exceeds the available context size")


def _says_context_exceeded(message: str) -> bool:
    message = message.lower()
    return any(phrase in message for phrase in CONTEXT_EXCEEDED_PHRASES)


def upstream_wait(headers: Mapping[str, str]) -> float | None:
    """The wait, in seconds, an upstream's error answer asks for (headers looked up case-insensitively,
    as aiohttp's and httpx's are): `retry-after-ms` first, as the openai SDK reads it (Azure OpenAI
    may send only that one), else `Retry-After` as seconds or as an HTTP-date (RFC 9110); at most
    MAX_UPSTREAM_WAIT_S."""
    milliseconds = _finite(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return min(max(0.0, milliseconds / 1000), MAX_UPSTREAM_WAIT_S)
    seconds = retry_after_seconds(headers.get("retry-after"))
    return None if seconds is None else min(seconds, MAX_UPSTREAM_WAIT_S)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    if (seconds := _finite(value)) is not None:
        return max(0.0, seconds)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _finite(value: str | None) -> float | None:
    """A header's number, or None: "inf", "1e999" and "nan" parse as floats but are no wait (an
    infinite one crashed the Retry-After written to the client)."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


# Google's APIs (Gemini, Vertex AI) send no Retry-After: a 429's wait is in the error body's RetryInfo
# detail, a protobuf Duration such as "7s" or "0.5s"
_GOOGLE_RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"')


def google_retry_delay(text: str) -> float | None:
    match = _GOOGLE_RETRY_DELAY.search(text)
    return min(float(match.group(1)), MAX_UPSTREAM_WAIT_S) if match else None
