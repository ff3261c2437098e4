"""litellm, the transport for every provider the fast path does not call (Anthropic, Gemini, Bedrock, ...):
imported once, offline and only when a backend needs it; what it knows of a model (the parameters it
sends it), asked once per model; and its exceptions mapped onto UpstreamError. The calls themselves, and
the rules that use what litellm knows, are the backend's (gateway/litellm_path.py)."""

from __future__ import annotations

import functools
import os
from typing import Any

from gateway.upstream_errors import (
    REQUEST_ERRORS, UpstreamError, google_retry_delay, out_of_files_error, passed_on, upstream_wait,
)

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
        # No retries of litellm's own (gateway/calls.py decides those): its OpenAI embeddings read an
        # explicit `max_retries=0` as "unset" (`max_retries or DEFAULT_MAX_RETRIES`), and retried twice
        litellm.DEFAULT_MAX_RETRIES = 0
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


# -- how its streams end ----------------------------------------------------------------------------
# Providers whose raw stream events StreamEnd reads (Anthropic's Messages events, Gemini's
# GenerateContentResponses; Vertex serves both). Others keep litellm's own judgement.
STREAM_END_PROVIDERS = frozenset({"anthropic", "gemini", "vertex_ai"})


class StreamEnd:
    """Whether a litellm stream ended with the provider's own end of the answer, read from the
    provider's raw events. litellm's stream wrapper cannot tell: it marks every Gemini chunk "stop"
    (a candidate's finishReason or none), so a Gemini stream cut cleanly between two events was
    relayed as a complete answer, with a finish_reason and [DONE]. The end markers: Anthropic's
    `message_stop`, or a `message_delta` with its `stop_reason`; a `finishReason` on each of
    Gemini's candidates, or a `promptFeedback.blockReason` (a prompt its filters blocked: no
    candidate follows, and litellm answers finish_reason "content_filter").

    The raw events are reached where litellm parses them, its provider iterator's `chunk_parser`
    (opened by the wrapper's `make_call` where it opens the stream lazily). Where litellm has none,
    or the events are OpenAI's chunks (Vertex's partner models: Llama, DeepSeek, Qwen, Mistral...,
    which have no such end marker), `watched` is False and litellm's own judgement stands."""

    def __init__(self, stream: Any, model: str) -> None:
        self.watched = False
        self._stopped = False  # Anthropic's end, or Gemini's blocked prompt
        self._candidates: set[int] = set()  # Gemini's candidates seen, and those finished
        self._finished: set[int] = set()
        if _provider_and_name(model)[0] not in STREAM_END_PROVIDERS:
            return
        if getattr(stream, "completion_stream", None) is not None:
            self._tap(stream.completion_stream)
        elif callable(open_stream := getattr(stream, "make_call", None)):
            async def make_call(*args: Any, **kwargs: Any) -> Any:
                source = await open_stream(*args, **kwargs)
                self._tap(source)
                return source

            stream.make_call = make_call

    @property
    def cut(self) -> bool:
        """The stream ended (or is ending) without the provider's end of the answer."""
        return self.watched and not (self._stopped or (self._candidates and self._candidates <= self._finished))

    def _tap(self, source: Any) -> None:
        parse = getattr(source, "chunk_parser", None)
        if not callable(parse):
            return

        def chunk_parser(chunk: Any) -> Any:
            if isinstance(chunk, dict):
                self._read(chunk)
            return parse(chunk=chunk)

        source.chunk_parser = chunk_parser
        self.watched = True

    def _read(self, event: dict[str, Any]) -> None:
        if "choices" in event:  # an OpenAI chunk: not a format read here (every answer would look cut)
            self.watched = False
            return
        kind = event.get("type")
        if kind == "message_stop" or (kind == "message_delta" and (event.get("delta") or {}).get("stop_reason")):
            self._stopped = True
        if isinstance(feedback := event.get("promptFeedback"), dict) and feedback.get("blockReason"):
            self._stopped = True
        for position, candidate in enumerate(event.get("candidates") or ()):
            if isinstance(candidate, dict):
                index = candidate.get("index", position)
                self._candidates.add(index)
                if candidate.get("finishReason"):
                    self._finished.add(index)


# -- its errors -----------------------------------------------------------------------------------
def litellm_error(backend: str, exc: Exception) -> UpstreamError:
    """A litellm exception (litellm maps every provider's errors onto its own classes) as an UpstreamError."""
    status = int(getattr(exc, "status_code", 0) or 0)
    message = str(getattr(exc, "message", None) or exc)[:500]
    if "Timeout" in type(exc).__name__:
        return UpstreamError(backend, 504, f"{backend}: upstream timed out", retryable=True, cut=True)
    if (local := out_of_files_error(backend, exc)) is not None:
        return local
    if status == 422 and UNREADABLE_ANSWER in message:
        # litellm's own 422, for a 200 answer it could not read (Gemini's or Bedrock's body cut short, or
        # not JSON): the upstream failed, not the request, which another try or backend may answer
        return UpstreamError(backend, 502, f"{backend}: upstream sent an answer that cannot be read: {message}",
                             retryable=True)
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


# How litellm's message starts where it could not read a provider's answer (its status is 422)
UNREADABLE_ANSWER = "Error converting to valid response block"
# OpenAI's codes for the errors litellm maps every provider's own onto
_LITELLM_CODES = {"ContextWindowExceededError": "context_length_exceeded",
                  "ContentPolicyViolationError": "content_filter"}
