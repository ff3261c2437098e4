"""Backends: one callable model endpoint each, with exact accounting and a health record.

Two transports behind one interface:
- the fast path: OpenAI-compatible endpoints (OpenAI, vLLM, llama.cpp, ...) called directly over a
  shared aiohttp connection pool; litellm's per-call CPU cost (several ms) would dominate our overhead
  (gateway/fast_path.py);
- litellm for every other provider (Anthropic, Gemini, Bedrock, ...), imported only when needed
  (gateway/litellm_path.py, gateway/litellm_calls.py).
Both raise UpstreamError for a failed call (gateway/upstream_errors.py). Here: what both share (the
backend's slots, the body as its upstream takes it, billing each call: gateway/usage.py), and the
transport each call takes. Its health record is gateway/backend_health.py's.

A backend never retries by itself: retries, cool-downs and fallbacks are decided in one place
(gateway/calls.py) so a request's attempts are bounded as a whole.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.backend_health import BackendHealth
from gateway.effort import is_claude_api
from gateway.fast_path import FastPath
from gateway.litellm_calls import openai_reasoning_config
from gateway.litellm_path import LitellmPath
from gateway.prices import call_cost, resolve_prices
from gateway.upstream_errors import UpstreamError
from gateway.usage import CUT_OFF, CallRecord, Usage, output_limit
from policies.backends import BackendSpec
from policies.loader import resolve_max_context, resolve_max_output
from router.estimates import estimate_input_tokens, estimate_prompt_tokens

FAST_PATH_PROVIDERS = {"openai", "hosted_vllm", "llamacpp", "lm_studio"}
# Sampling knobs, and the old name of the output limit, that OpenAI's reasoning models (o-series, gpt-5)
# refuse with a 400 or take under another name: what litellm maps for them is sent (Backend._fit_openai_reasoning)
OPENAI_REASONING_KNOBS = ("max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty")


@dataclass(slots=True)
class Admission:
    """Whether a call got one of its backend's slots (`max_concurrency`), and when. A call that ran out
    of time before that waited in the gateway's own queue: it says nothing about the backend's health."""

    admitted: bool = False
    admitted_at: float = 0.0  # time.monotonic()

    def admit(self) -> None:
        self.admitted, self.admitted_at = True, time.monotonic()


@dataclass
class Backend(FastPath, LitellmPath):
    spec: BackendSpec
    session: aiohttp.ClientSession | None = None
    health: BackendHealth = field(default_factory=BackendHealth)
    # The server writes a non-streamed answer to its end even once the gateway stopped waiting for it
    # (llama-cpp-python's cannot stop one): the call keeps its slot until then, so the next call waits
    # in the gateway's queue, not inside a busy server with its first-byte timeout running.
    finishes_abandoned_calls: bool = False

    def __post_init__(self) -> None:
        self.name = self.spec.name
        self.health.name = self.name
        self.prices = resolve_prices(self.spec)
        self.max_context = resolve_max_context(self.spec)[0]  # tokens; None: no known limit
        self.max_output = resolve_max_output(self.spec)[0]  # tokens one call can write; None: unknown
        provider, _, upstream_model = self.spec.model.partition("/")
        self.upstream_model = upstream_model or provider
        self.fast_path = (
            self.spec.fast_path
            if self.spec.fast_path is not None
            else (provider in FAST_PATH_PROVIDERS or (not upstream_model and self.spec.api_base is not None))
        )
        base = (self.spec.api_base or "https://api.openai.com/v1").rstrip("/")
        self.url = f"{base}/chat/completions"
        self.embeddings_url = f"{base}/embeddings"
        self.semaphore = asyncio.Semaphore(self.spec.max_concurrency)
        self.basic_messages = self.spec.message_format == "basic"
        self.claude = is_claude_api(self.spec) and not self.fast_path
        # OpenAI's API called directly for a reasoning model: litellm's knowledge of which of them refuse
        # which knobs is applied on the fast path too (litellm applies it on its own path)
        self.openai_reasoning = self.fast_path and provider == "openai" and bool(self.spec.reasoning)
        # Built once: aiohttp timeouts are immutable, and per-call construction shows on the hot path.
        self._timeout = aiohttp.ClientTimeout(total=self.spec.timeout_s, sock_connect=self.spec.connect_timeout_s)
        # A stream has no whole-call limit: a long answer that keeps flowing is not cut at timeout_s
        # (nor is one a slow client reads slowly, which would count against the backend); it is cut
        # when it stalls, first_byte_timeout_s between two reads, as its first event is.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.spec.connect_timeout_s,
                                                     sock_read=self.spec.first_byte_timeout_s)

    # -- accounting -------------------------------------------------------------------------
    def record(self, usage: Usage, started: float, *, ok: bool = True, error: str | None = None,
               estimated: bool = False) -> CallRecord:
        return CallRecord(
            backend=self.name,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost_usd=call_cost(self.prices, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                               usage.cache_write_tokens),
            latency_ms=(time.perf_counter() - started) * 1000,
            ok=ok,
            error=error,
            usage_details=usage.details,
            usage_estimated=estimated,
        )

    def cut(self, usage: Usage, started: float, why: str) -> CallRecord:
        """A call cut off before its end: by the request's deadline, the backend's timeout, the client
        leaving (or the server stopping), a stream broken mid-answer. The upstream had read the prompt
        and written what reached the gateway, and the provider bills both, so every cut is billed by
        this one rule: `usage` is the upstream's own if it sent one, else the prompt at its estimate plus
        the output received so far (Usage.estimated), priced as usual. The call is not ok, and its error
        says it was cut (CUT_OFF)."""
        return self.record(usage, started, ok=False, error=f"{CUT_OFF}: {why}"[:300])

    @property
    def needs_litellm(self) -> bool:
        """Whether its calls use litellm (imported at startup, not by the first call: Gateway.start)."""
        return not self.fast_path or self.openai_reasoning

    def _adapt(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as this upstream can take it (see BackendSpec.message_format)."""
        if self.openai_reasoning:
            body = self._fit_openai_reasoning(body)
        if not self.basic_messages:
            return body
        if any(_needs_basic(m) for m in body["messages"]):
            body = {**body, "messages": [_basic_message(self.name, m) for m in body["messages"]]}
        if "max_completion_tokens" in body:
            # basic servers know only max_tokens: llama-cpp-python ignores the other, and writes on
            limit = min(body[k] for k in ("max_tokens", "max_completion_tokens") if k in body)
            body = {**{k: v for k, v in body.items() if k != "max_completion_tokens"}, "max_tokens": limit}
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            # structured outputs as basic servers take them (llama-cpp-python fails on json_schema)
            schema = (response_format.get("json_schema") or {}).get("schema")
            body = {**body, "response_format": {"type": "json_object", **({"schema": schema} if schema else {})}}
        tools = body.get("tools")
        if body.get("tool_choice") == "required" and isinstance(tools, list) and len(tools) == 1 \
                and isinstance(name := (tools[0].get("function") or {}).get("name"), str):
            # llama-cpp-python ignores "required" (it answers text) but forces a named tool: with one
            # tool, naming it is the same demand
            body = {**body, "tool_choice": {"type": "function", "function": {"name": name}}}
        return body

    def _fit_openai_reasoning(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as OpenAI's reasoning models take it (the input is not modified): `max_tokens` sent
        as `max_completion_tokens`, and a temperature, top_p or penalty they refuse (every level but
        the default, 1; gpt-5.1 takes them at effort `none`) left out, as litellm maps them. A vote's
        sampling temperature, a routed client's own `max_tokens` or `temperature`: a 400 for a knob
        the request never chose this model for. Other fields pass as sent (a `logprobs` they do not
        give is refused upstream, not dropped)."""
        knobs = {key: body[key] for key in OPENAI_REASONING_KNOBS if key in body}
        if not knobs:
            return body
        if "max_completion_tokens" in body:  # the limit the budget held (ChatRequest.max_output_tokens)
            knobs.pop("max_tokens", None)
        config = openai_reasoning_config(self.upstream_model)
        if config is None:
            return body  # not one of OpenAI's reasoning models (a self-hosted one under `openai/`)
        effort = {"reasoning_effort": body["reasoning_effort"]} if "reasoning_effort" in body else {}
        mapped = config.map_openai_params(knobs, dict(effort), self.upstream_model, drop_params=True)
        fitted = {key: value for key, value in body.items() if key not in OPENAI_REASONING_KNOBS}
        fitted.update({key: value for key, value in mapped.items() if key != "reasoning_effort"})
        return fitted

    # -- non-streaming ----------------------------------------------------------------------
    async def complete(self, body: dict[str, Any],
                       admission: Admission | None = None) -> tuple[dict[str, Any], CallRecord]:
        started = time.perf_counter()
        body = self._adapt(body)
        if self.finishes_abandoned_calls:
            data = await self._complete_holding_slot(body, admission)
        else:
            async with self.semaphore:
                if admission is not None:
                    admission.admit()
                data = await (self._complete_fast(body) if self.fast_path else self._complete_litellm(body))
        for choice in data.get("choices") or ():
            text_content(choice.get("message") if isinstance(choice, dict) else None)
        usage = data.get("usage")
        if usage:
            return data, self.record(Usage.from_block(usage), started)
        return data, self.record(_estimated_usage(body, data), started, estimated=True)

    async def _complete_holding_slot(self, body: dict[str, Any], admission: Admission | None) -> dict[str, Any]:
        """The call, its slot released only when the upstream is done with it: a caller that stops
        waiting (the client left, the deadline) leaves it to finish in the background."""
        await self.semaphore.acquire()
        if admission is not None:
            admission.admit()
        call = asyncio.ensure_future(self._complete_fast(body) if self.fast_path else self._complete_litellm(body))
        call.add_done_callback(self._release_slot)
        return await asyncio.shield(call)

    def _release_slot(self, call: asyncio.Future) -> None:
        self.semaphore.release()
        if not call.cancelled():
            call.exception()  # an abandoned call's failure is nobody's to report

    # -- embeddings -------------------------------------------------------------------------
    @functools.cached_property
    def for_embeddings(self) -> Backend:
        """This backend's embeddings endpoint: the same upstream, with a health (and slots) of its own.
        A chat server that does not serve embeddings answers them with a 500 (llama.cpp's without
        `embedding=True`): two clients asking it for embeddings cooled its chat down for everyone."""
        endpoint = Backend(self.spec, self.session)
        endpoint.health.name = f"{self.name} (embeddings)"  # its outages logged as its own
        return endpoint

    async def embed(self, body: dict[str, Any],
                    admission: Admission | None = None) -> tuple[dict[str, Any], CallRecord]:
        """One embeddings call, the client's body passed through (`input`, `encoding_format`,
        `dimensions`, `user`). Billed by the upstream's `usage.prompt_tokens`, else by the input's
        estimate; an embedding writes no output tokens."""
        started = time.perf_counter()
        async with self.semaphore:
            if admission is not None:
                admission.admit()
            data = await (self._embed_fast(body) if self.fast_path else self._embed_litellm(body))
        if not isinstance(data.get("data"), list):
            raise UpstreamError(self.name, 502, f"{self.name}: upstream answer has no embeddings", retryable=True)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens = usage.get("prompt_tokens")
        if not isinstance(prompt_tokens, int) or isinstance(prompt_tokens, bool):
            prompt_tokens = estimate_input_tokens(body.get("input") or [])
            data["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return data, self.record(Usage(prompt_tokens), started)

    # -- streaming --------------------------------------------------------------------------
    async def stream(self, body: dict[str, Any],
                     admission: Admission | None = None) -> AsyncIterator[tuple[bytes, dict | None]]:
        """Yield `(payload, parsed)` per SSE data event, ending only after the upstream's [DONE].

        The upstream is always asked for usage so the stream can be billed; the caller decides
        whether the client sees that chunk. A stream that ends without [DONE] raises UpstreamError,
        and one whose first event takes longer than `first_byte_timeout_s` (counted once a slot is
        free, not while queued for one), or that pauses longer than that between two, a 504 one.
        """
        body = {**self._adapt(body), "stream": True, "stream_options": {**(body.get("stream_options") or {}),
                                                                        "include_usage": True}}
        async with self.semaphore:
            if admission is not None:
                admission.admit()
            source = self._stream_fast(body) if self.fast_path else self._stream_litellm(body)
            try:
                first = await self._next_event(source, "no first byte in time")
                if first is None:
                    return
                yield first
                if self.fast_path:  # a pause between two events is cut by aiohttp's sock_read (_stream_timeout)
                    async for item in source:
                        yield item
                    return
                # litellm's read timeout is the whole call's timeout_s: the same pause, cut here
                while (item := await self._next_event(source, "upstream stream stalled")) is not None:
                    yield item
            finally:
                await source.aclose()

    async def _next_event(self, source: AsyncIterator[tuple[bytes, dict | None]],
                          late: str) -> tuple[bytes, dict | None] | None:
        """The stream's next event (None at its end), cut as a 504 (`late`) after first_byte_timeout_s."""
        try:
            async with asyncio.timeout(self.spec.first_byte_timeout_s):
                return await anext(source, None)
        except TimeoutError:
            raise UpstreamError(self.name, 504, f"{self.name}: {late}", retryable=True, cut=True) from None

def _needs_basic(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return (content is None or isinstance(content, list) or message.get("role") == "developer"
            or None in message.values())


def _basic_message(backend: str, message: dict[str, Any]) -> dict[str, Any]:
    """The message in the basic chat format: `developer` as `system`, a string `content` always
    (an assistant turn that only called tools has none), text parts joined into one string, and no
    field sent as null (an assistant turn an app kept as the SDK dumps it has `"tool_calls": null`,
    which llama.cpp's server fails on)."""
    message = {key: value for key, value in message.items() if value is not None}
    if message.get("role") == "developer":
        message["role"] = "system"
    content = message.get("content")
    if content is None:
        message["content"] = ""
        return message
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise UpstreamError(backend, 400, f"{backend} takes text only; the request has a {kind!r} content part",
                                retryable=False, code="unsupported_content")
        texts.append(str(part.get("text") or ""))
    return {**message, "content": "\n".join(texts)}


def _estimated_usage(body: dict[str, Any], data: dict[str, Any]) -> Usage:
    """An answer that came without `usage` (a server that leaves it out) is billed as a stream without
    one is (Usage.estimated): the prompt at its estimate and what was written, never $0. Each choice is
    capped at max_tokens on its own: a call asked for `n` may write n times the limit."""
    limit, written = output_limit(body), 0
    for choice in data.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            chars = sum(len(v) for k in ("content", "reasoning_content", "reasoning")
                        if isinstance(v := message.get(k), str))
            chars += sum(len(str((call.get("function") or {}).get("arguments") or ""))
                         for call in message.get("tool_calls") or () if isinstance(call, dict))
            written += Usage.estimated(0, content_chars=chars, output_limit=limit).completion_tokens
    return Usage(estimate_prompt_tokens(body.get("messages") or [], body), written)


def text_content(message: Any) -> bool:
    """A message (or a stream's delta) whose content is a list of parts (Mistral's reasoning models
    answer and stream so) as chat completions have it, in place: its text parts joined, its thinking
    parts as `reasoning_content`. Clients (the openai SDK types content as a string), the Responses
    API's translation and the strategies read text. Whether it was a list."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return False
    text, thinking = [], []
    for part in message["content"]:
        if isinstance(part, str):
            text.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "thinking":
            inner = part.get("thinking")
            inner = inner if isinstance(inner, list) else [inner]
            thinking += [p.get("text", "") if isinstance(p, dict) else p for p in inner if isinstance(p, (str, dict))]
    message["content"] = "".join(text)
    if thinking and not message.get("reasoning_content"):
        message["reasoning_content"] = "".join(str(t) for t in thinking)
    return True
