"""litellm, the transport for every provider the fast path does not call (Anthropic, Gemini, Bedrock, ...):
imported once, offline and only when a backend needs it, and its exceptions mapped onto UpstreamError."""

from __future__ import annotations

import os
from typing import Any

from gateway.upstream_errors import REQUEST_ERRORS, UpstreamError, google_retry_delay, passed_on, retry_after_seconds

_LITELLM = None


def import_litellm() -> None:
    """Import litellm now (seconds), not at a backend's first call (service.Gateway starts with it)."""
    litellm_module()


def litellm_module():
    """Import litellm once, offline: its cost map is bundled, and it must not phone home."""
    global _LITELLM
    if _LITELLM is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        litellm.drop_params = True  # a knob one provider lacks must not fail the call
        _LITELLM = litellm
    return _LITELLM


def litellm_error(backend: str, exc: Exception) -> UpstreamError:
    """A litellm exception (litellm maps every provider's errors onto its own classes) as an UpstreamError."""
    status = int(getattr(exc, "status_code", 0) or 0)
    message = str(getattr(exc, "message", None) or exc)[:500]
    if "Timeout" in type(exc).__name__:
        return UpstreamError(backend, 504, f"{backend}: upstream timed out", retryable=True, cut=True)
    retryable = status in (0, 408, 429) or status >= 500
    client_status = status if status in REQUEST_ERRORS or status == 429 else 502
    # litellm keeps the upstream's error body only as text in its message (Google's RetryInfo with it)
    retry_after = retry_after_seconds(_litellm_headers(exc).get("retry-after")) or google_retry_delay(str(exc))
    body = getattr(exc, "body", None)
    error = dict(body) if isinstance(body, dict) else {}
    if not error.get("code") and type(exc).__name__ in _LITELLM_CODES:
        # litellm names these alike for every provider, and does not always keep the upstream's body
        error["code"] = _LITELLM_CODES[type(exc).__name__]
    code, param = passed_on(client_status, error)
    return UpstreamError(backend, client_status, f"{backend}: {message}", retryable=retryable, retry_after=retry_after,
                         code=code, param=param)


def _litellm_headers(exc: Exception) -> Any:
    """The upstream's response headers of a litellm error. litellm keeps them on
    `litellm_response_headers`; its `response` has them only for some providers (for Anthropic's 429 it
    is a stand-in with none, which lost the upstream's Retry-After)."""
    for headers in (getattr(exc, "litellm_response_headers", None),
                    getattr(getattr(exc, "response", None), "headers", None)):
        if headers:
            return headers
    return {}


# OpenAI's codes for the errors litellm maps every provider's own onto
_LITELLM_CODES = {"ContextWindowExceededError": "context_length_exceeded",
                  "ContentPolicyViolationError": "content_filter"}
