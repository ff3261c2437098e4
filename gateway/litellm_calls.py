"""litellm, the transport for every provider the fast path does not call (Anthropic, Gemini, Bedrock, ...):
imported once, offline and only when a backend needs it; what it knows of a model (the parameters it
sends it), asked once per model; and its exceptions mapped onto UpstreamError. The calls themselves, and
the rules that use what litellm knows, are the backend's (gateway/backends.py)."""

from __future__ import annotations

import functools
import os
from typing import Any

from gateway.upstream_errors import REQUEST_ERRORS, UpstreamError, google_retry_delay, passed_on, upstream_wait

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


# -- what litellm knows of a model (`model` as configured: provider/name) ----------------------------
def _provider_and_name(model: str) -> tuple[str, str]:
    provider, _, name = model.partition("/")
    return provider, name or provider


@functools.cache
def supported_openai_params(model: str) -> frozenset[str] | None:
    """The OpenAI parameters litellm sends this model's provider; None where it has no list for it."""
    provider, name = _provider_and_name(model)
    supported = litellm_module().get_supported_openai_params(model=name, custom_llm_provider=provider)
    return frozenset(supported) if supported is not None else None


@functools.cache
def sends_embedding_dimensions(model: str) -> bool:
    """Whether litellm sends an embedding's `dimensions` to this model (under its provider's name for
    it). It drops it where its lists say the model has none (`drop_params`: Mistral, Fireworks, an
    `openai/` model not named text-embedding-3), and the vectors then come back at full length, which
    an app's index would refuse or, worse, store."""
    provider, name = _provider_and_name(model)
    optional_params = litellm_module().utils.get_optional_params_embeddings
    try:
        return (optional_params(model=name, custom_llm_provider=provider, dimensions=256)
                != optional_params(model=name, custom_llm_provider=provider))
    except Exception:  # a provider litellm cannot map: it is sent what it is asked, and answers for it
        return True


@functools.cache
def openai_reasoning_config(name: str) -> Any:
    """litellm's config of OpenAI's reasoning model `name` (o-series, gpt-5), which maps the knobs it
    refuses; None for any other model (a self-hosted one under `openai/`)."""
    litellm = litellm_module()
    config = litellm.utils.ProviderConfigManager.get_provider_chat_config(name, litellm.types.utils.LlmProviders.OPENAI)
    return config if isinstance(config, (litellm.OpenAIOSeriesConfig, litellm.OpenAIGPT5Config)) else None


def claude_thinking(params: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The thinking a call to Claude model `name` turns on: its own `thinking` block, else what litellm
    makes of its `reasoning_effort` (litellm sends that budget whatever the call's max_tokens, and
    Anthropic refuses one that is not below it)."""
    if isinstance(params.get("thinking"), dict):
        return params["thinking"]
    effort = params.get("reasoning_effort")
    if not isinstance(effort, str):
        return None
    try:
        return litellm_module().AnthropicConfig.map_reasoning_effort(effort, name, "anthropic")
    except Exception:  # a level litellm does not know: the call fails with litellm's own error
        return None


# -- its errors -----------------------------------------------------------------------------------
def litellm_error(backend: str, exc: Exception) -> UpstreamError:
    """A litellm exception (litellm maps every provider's errors onto its own classes) as an UpstreamError."""
    status = int(getattr(exc, "status_code", 0) or 0)
    message = str(getattr(exc, "message", None) or exc)[:500]
    if "Timeout" in type(exc).__name__:
        return UpstreamError(backend, 504, f"{backend}: upstream timed out", retryable=True, cut=True)
    retryable = status in (0, 408, 429) or status >= 500
    client_status = status if status in REQUEST_ERRORS or status == 429 else 502
    # litellm keeps the upstream's error body only as text in its message (Google's RetryInfo with it)
    retry_after = upstream_wait(_litellm_headers(exc)) or google_retry_delay(str(exc))
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
