"""Backends: one callable model endpoint each, with exact accounting and a health record.

Two transports behind one interface:
- the fast path: OpenAI-compatible endpoints (OpenAI, vLLM, llama.cpp, ...) called directly over a
  shared aiohttp connection pool; litellm's per-call CPU cost (several ms) would dominate our overhead;
- litellm for every other provider (Anthropic, Gemini, Bedrock, ...), imported only when needed
  (gateway/litellm_calls.py).
Both raise UpstreamError for a failed call (gateway/upstream_errors.py).

A backend never retries by itself: retries, cool-downs and fallbacks are decided in one place
(gateway/calls.py) so a request's attempts are bounded as a whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.effort import fit_claude_thinking, is_claude_api
from gateway.litellm_calls import (
    StreamEnd, claude_thinking, litellm_error, litellm_module, openai_reasoning_config, sends_embedding_dimensions,
    supported_openai_params,
)
from gateway.prices import call_cost, resolve_prices
from gateway.sse import EventTooLarge, read_events
from gateway.upstream_errors import UpstreamError, http_error
from policies.backends import BackendSpec
from policies.loader import resolve_max_context, resolve_max_output
from router.estimates import estimate_input_tokens, estimate_prompt_tokens

log = logging.getLogger("ponder.backends")

FAST_PATH_PROVIDERS = {"openai", "hosted_vllm", "llamacpp", "lm_studio"}
# Sampling knobs, and the old name of the output limit, that OpenAI's reasoning models (o-series, gpt-5)
# refuse with a 400 or take under another name: what litellm maps for them is sent (Backend._fit_openai_reasoning)
OPENAI_REASONING_KNOBS = ("max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty")
# What a client asks to get back in the answer, by the litellm parameters that carry it to a provider
ANSWER_PARAMS = {"logprobs": ("logprobs",), "audio": ("audio", "modalities")}
# litellm takes a keyword argument it knows as its own option, however it got there: a body field
# named like one would choose where the call goes and with what key (`base_url`, `api_key`), its headers,
# an OpenAI organization to bill, retries, a mock answer. Its list (all_litellm_params) has most; these are
# its call's own arguments and OpenAI client options it maps, and what it reads from its keyword arguments
# outside that list: logging callbacks (`callbacks: ["generic_api"]` registered one for every later call of
# the process), a mock answer of tool calls (made up, no upstream call), which parameters to drop; providers'
# credentials and endpoints go by prefix (Bedrock's `aws_sts_endpoint`, Vertex's `vertex_credentials`,
# Azure's `azure_ad_token`, GigaChat's `gigachat_auth_url`), as do its private switches (`_skip_mcp_handler`).
LITELLM_OPTIONS = frozenset({"base_url", "api_base", "api_key", "api_type", "api_version", "organization",
                             "extra_headers", "default_headers", "custom_llm_provider", "deployment_id",
                             "model_list", "shared_session", "client", "timeout", "max_retries", "num_retries",
                             "enable_json_schema_validation", "logger_fn", "caching", "litellm_call_id",
                             "callbacks", "success_callback", "failure_callback", "mock_tool_calls", "mock_delay",
                             "drop_params", "additional_drop_params", "original_function"})
LITELLM_OPTION_PREFIXES = ("aws_", "vertex_", "azure_", "litellm_", "gigachat_", "_")
# OpenAI's own fields that litellm also reads (its logging `metadata`): a client sends them as to OpenAI
OPENAI_FIELDS_LITELLM_READS = frozenset({"metadata", "user"})
# One streamed event, at most: a chunk with a whole long answer in it (1 MB of text, JSON-escaped) fits;
# a stream that never ends its event does not hold the gateway's memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# How a cut call's error starts (Backend.cut): telemetry and dashboards tell cut calls, billed what the
# upstream had read and written, from failed ones that cost nothing.
CUT_OFF = "cut off"
# How the error of a 200 without choices starts (Caller._call): billed as it came, yet no answer, so a
# failed call to the backend's health, the ledger and /metrics alike.
NO_CHOICES = "no choices"


@dataclass(slots=True)
class CallRecord:
    """One upstream call as billed: what telemetry stores and what `usage` sums."""

    backend: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ok: bool = True
    error: str | None = None
    # the upstream's other counts (`prompt_tokens_details.cached_tokens`, audio, predicted tokens),
    # by block and name: the client's `usage` sums them over the request's calls
    usage_details: dict[str, dict[str, int]] = field(default_factory=dict)
    usage_estimated: bool = False  # the upstream's answer had no usage: counted by the gateway's estimate

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": self.cost_usd,
            "latency_ms": round(self.latency_ms, 3),
            "ok": self.ok,
            "error": self.error,
        }


@dataclass(slots=True)
class BackendHealth:
    """Cool a failing backend down so later requests skip it at once instead of waiting on it. An
    outage is logged twice, however long it lasts: when the backend is first cooled down, and when it
    answers again (an operator reads one line per problem, not one per request)."""

    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    last_failed_request: int | None = None
    name: str = ""
    failing_since: float | None = None  # time.monotonic() of the cool-down that began this outage
    # The end of the wait the upstream itself asked for (Retry-After): calls already under way when it
    # asked (a vote's other samples) that answer or fail since must not end it sooner.
    asked_wait_until: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.cooldown_until

    def failed(self, now: float, retry_after: float | None = None, *, slow: bool = False,
               request: int | None = None, error: UpstreamError | None = None) -> None:
        # One failure may be a blip worth one quick retry; failures of two requests in a row, an
        # explicit Retry-After, or one timeout (`slow`: no answer or no first byte in time, which
        # already cost the whole timeout) mean the backend is in trouble, and waiting on it again
        # would only add latency. A request failing again counts once: a body this upstream cannot
        # take fails every attempt, and must not cool the backend down for every other client.
        if request is None or request != self.last_failed_request:
            self.consecutive_failures += 1
        self.last_failed_request = request
        if retry_after:
            self.asked_wait_until = max(self.asked_wait_until, now + min(retry_after, self.max_cooldown_s))
        if self.consecutive_failures < 2 and not retry_after and not slow:
            return
        pause = min(self.base_cooldown_s * 2 ** (self.consecutive_failures - 2), self.max_cooldown_s)
        self.cooldown_until = max(now + pause, self.asked_wait_until)
        if self.failing_since is None:
            self.failing_since = now
            log.warning("backend %s is failing (%s): cooled down, its calls are skipped or fall back until it "
                        "answers again", self.name, _failure(error))

    def restarted(self) -> None:
        """The server behind it started again (the managed local model): what it asked for before
        (a Retry-After) and its failures are forgotten with it."""
        self.asked_wait_until = 0.0
        self.succeeded()

    def succeeded(self) -> None:
        if self.failing_since is not None:
            log.warning("backend %s answers again, after %.0f s of failures", self.name,
                        time.monotonic() - self.failing_since)
        self.consecutive_failures = 0
        self.cooldown_until = self.asked_wait_until if self.asked_wait_until > time.monotonic() else 0.0
        self.last_failed_request = None
        self.failing_since = None


def _failure(error: UpstreamError | None) -> str:
    """What failed, for the log. No prompt text reaches the logs, and an upstream's message may quote the
    request: its status is told, or the gateway's own words up to their first colon ("upstream timed
    out", "ClientConnectorError", "stream broken"), never what follows them."""
    if error is None:
        return "no answer"
    if error.upstream_status is not None:
        return f"HTTP {error.upstream_status}"
    return error.message.removeprefix(f"{error.backend}: ").split(":", 1)[0][:80]


USAGE_DETAIL_BLOCKS = ("prompt_tokens_details", "completion_tokens_details")


@dataclass(slots=True)
class Admission:
    """Whether a call got one of its backend's slots (`max_concurrency`), and when. A call that ran out
    of time before that waited in the gateway's own queue: it says nothing about the backend's health."""

    admitted: bool = False
    admitted_at: float = 0.0  # time.monotonic()

    def admit(self) -> None:
        self.admitted, self.admitted_at = True, time.monotonic()


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    details: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the provider served from its prompt cache (billed at the cached price)."""
        return self.details.get("prompt_tokens_details", {}).get("cached_tokens", 0)

    @property
    def cache_write_tokens(self) -> int:
        """Prompt tokens the provider wrote to its prompt cache (billed at the cache-write price):
        litellm's `cache_creation_tokens` (Anthropic's `cache_creation_input_tokens`), else the
        `cache_write_tokens` of OpenAI-compatible routers."""
        prompt = self.details.get("prompt_tokens_details", {})
        return prompt.get("cache_creation_tokens", prompt.get("cache_write_tokens", 0))

    @classmethod
    def from_block(cls, usage: dict | None) -> Usage:
        if not usage:
            return cls()
        details = {}
        for block in USAGE_DETAIL_BLOCKS:
            counts = usage.get(block)
            if isinstance(counts, dict):
                details[block] = {name: value for name, value in counts.items()
                                  if isinstance(value, int) and not isinstance(value, bool)}
        return cls(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int(details.get("completion_tokens_details", {}).get("reasoning_tokens") or 0),
            details,
        )

    @classmethod
    def estimated(cls, prompt_tokens: int, content_chunks: int = 0, content_chars: int = 0, *,
                  output_limit: int | None = None) -> Usage:
        """A call's usage where the upstream reported none (a stream from llama.cpp's server, a call cut
        off before its end): the prompt at its estimate, and what it wrote so far: a content chunk at
        least one token (what llama.cpp sends), a long one its characters / 4 (as the prompt's
        estimate counts), but no more than the call's `output_limit` (its max_tokens), which the
        upstream did not pass."""
        written = max(content_chunks, -(-content_chars // 4))
        return cls(prompt_tokens, written if output_limit is None else min(written, output_limit))


@dataclass
class Backend:
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

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.spec.api_key_env) if self.spec.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.upstream_model}

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

    async def _complete_fast(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post_json(self.url, self._payload(body))
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError(self.name, 502, f"{self.name}: upstream answer has no choices", retryable=True)
        return data

    async def _post_json(self, url: str, payload: dict[str, Any]) -> Any:
        """POST a JSON body on the shared session; the upstream's JSON answer, or its error translated."""
        assert self.session is not None, "backend used before the gateway started"
        try:
            async with self.session.post(url, data=orjson.dumps(payload), headers=self._headers(),
                                         timeout=self._timeout) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise http_error(self.name, resp.status, raw, resp.headers)
        except aiohttp.ConnectionTimeoutError:  # never connected: nothing was sent, nothing to bill
            raise UpstreamError(self.name, 504, f"{self.name}: upstream connection timed out", retryable=True) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(self.name, 504, f"{self.name}: upstream timed out", retryable=True, cut=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(self.name, 502, f"{self.name}: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(self.name, 502, f"{self.name}: upstream sent invalid JSON", retryable=True) from None

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

    async def _embed_fast(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post_json(self.embeddings_url, self._payload(body))
        if not isinstance(data, dict):
            raise UpstreamError(self.name, 502, f"{self.name}: upstream answer has no embeddings", retryable=True)
        return data

    async def _embed_litellm(self, body: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in body.items() if k != "model"}
        self._refuse_litellm_options(params)
        if params.get("dimensions") is not None and not sends_embedding_dimensions(self.spec.model):
            raise UpstreamError(self.name, 400, f"{self.name} ({self.spec.model}) cannot shorten its vectors, which "
                                                f"'dimensions' asks for: leave 'dimensions' out, or ask a backend that can.",
                                retryable=False, code="unsupported_parameter", param="dimensions")
        # Floats are asked for whatever the client wants: litellm maps `base64` (the openai SDK's default)
        # onto each provider's own idea of it, and Bedrock's Titan then answers its binary embedding,
        # one 0 or 1 a dimension, as the vector; Gemini's and others' drop it. Encoded here as OpenAI does.
        base64_asked = params.pop("encoding_format", None) == "base64"
        try:
            # embedding() reads no `num_retries`, only `max_retries` (see also litellm_module)
            response = await litellm_module().aembedding(**self._litellm_target(), max_retries=0, **params)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            raise litellm_error(self.name, exc) from None
        data = response.model_dump(exclude_none=True)
        if base64_asked:
            for item in data.get("data") or ():
                if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                    item["embedding"] = _float32_base64(item["embedding"])
        return data

    def _litellm_params(self, body: dict[str, Any], leave_out: tuple[str, ...]) -> dict[str, Any]:
        params = {k: v for k, v in body.items() if k not in leave_out}
        self._refuse_litellm_options(params)
        self._refuse_what_would_be_dropped(params)
        if self.claude:
            params = fit_claude_thinking(params, claude_thinking(params, self.upstream_model))
        return params

    def _refuse_litellm_options(self, params: dict[str, Any]) -> None:
        """A client's field that litellm would take as its own option (LITELLM_OPTIONS) is refused, as
        OpenAI refuses a field it does not have, before any call: the backend's address and key are the
        operator's, never a client's to redirect or read."""
        for name in params:
            if name in _litellm_options() or name.startswith(LITELLM_OPTION_PREFIXES):
                raise UpstreamError(self.name, 400, f"Unrecognized request argument supplied: {name}",
                                    retryable=False, code="unknown_parameter", param=name)

    def _refuse_what_would_be_dropped(self, params: dict[str, Any]) -> None:
        """litellm drops a parameter the provider does not have (`drop_params`: a sampling knob one
        provider lacks must not fail the call), but an answer asked for logprobs or audio would come
        back without them, and without a word: refused instead, with OpenAI's code for it, before
        any call (Claude, Mistral and Bedrock give no logprobs, and speak no audio)."""
        asked = {"logprobs": params.get("logprobs") or params.get("top_logprobs"),
                 "audio": params.get("audio") or "audio" in (params.get("modalities") or ())}
        if not any(asked.values()):
            return
        supported = supported_openai_params(self.spec.model)
        for name, wanted in asked.items():
            # what litellm sends the provider for it: `logprobs`; `audio` or output `modalities`. A provider
            # litellm has no list for (None) is sent what it is asked, and answers for it.
            if wanted and supported is not None and supported.isdisjoint(ANSWER_PARAMS[name]):
                raise UpstreamError(self.name, 400, f"{self.name} ({self.spec.model}) cannot give {name}, which the "
                                                    f"request asks for: leave '{name}' out, or ask a backend that can.",
                                    retryable=False, code="unsupported_parameter", param=name)

    async def _complete_litellm(self, body: dict[str, Any]) -> dict[str, Any]:
        litellm = litellm_module()
        params = self._litellm_params(body, ("model", "stream", "stream_options"))
        try:
            response = await litellm.acompletion(**self._litellm_target(), **params)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            raise litellm_error(self.name, exc) from None
        return response.model_dump(exclude_none=True)

    def _litellm_target(self) -> dict[str, Any]:
        """What every litellm call of this backend is given: its model, endpoint and key, its timeout, and
        no retries of litellm's own (gateway/calls.py decides those)."""
        if self.spec.api_key_env:
            api_key = os.environ.get(self.spec.api_key_env)
        else:
            # A self-hosted endpoint with no key configured (as the fast path sends none): provider SDKs
            # behind litellm refuse to call without some key, and such a server ignores it.
            api_key = "no-key" if self.spec.api_base else None
        return {"model": self.spec.model, "api_base": self.spec.api_base, "api_key": api_key,
                "timeout": self.spec.timeout_s, "num_retries": 0}

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

    async def _stream_fast(self, body: dict[str, Any]) -> AsyncIterator[tuple[bytes, dict | None]]:
        assert self.session is not None, "backend used before the gateway started"
        try:
            async with self.session.post(self.url, data=orjson.dumps(self._payload(body)),
                                         headers=self._headers(), timeout=self._stream_timeout) as resp:
                if resp.status >= 400:
                    raise http_error(self.name, resp.status, await resp.read(), resp.headers)
                protocol = resp.connection.protocol if resp.connection is not None else None
                async with contextlib.aclosing(read_events(resp.content.iter_any(), MAX_EVENT_BYTES)) as events:
                    async for payload in events:
                        if payload.strip() == b"[DONE]":
                            return
                        parsed = self._stream_event(payload)
                        if b"\n" in payload:  # data of several lines: relayed as one (a data line holds no LF)
                            payload = orjson.dumps(parsed)
                        yield payload, parsed
                # The body ended without [DONE]: a server that gives up on a stream this way (llama-cpp-
                # python's, for a prompt over its context window) closes the connection a moment later,
                # and the pool, which took it back at the body's end, would hand it to the next call.
                if protocol is not None:
                    protocol.close()
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError(self.name, 504, f"{self.name}: upstream connection timed out", retryable=True) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(self.name, 504, f"{self.name}: upstream stream stalled", retryable=True,
                                cut=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(self.name, 502, f"{self.name}: stream broken: {type(exc).__name__}",
                                retryable=True) from None
        except EventTooLarge as exc:
            raise UpstreamError(self.name, 502, f"{self.name}: stream broken: {exc}", retryable=True) from None
        raise UpstreamError(self.name, 502, f"{self.name}: stream ended without [DONE]", retryable=True)

    def _stream_event(self, payload: bytes) -> Any:
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError(self.name, 502, f"{self.name}: invalid JSON in stream", retryable=True) from None
        if isinstance(parsed, dict) and "error" in parsed:
            raise UpstreamError(self.name, 502, f"{self.name}: stream error: {parsed['error']}", retryable=True)
        return parsed

    async def _stream_litellm(self, body: dict[str, Any]) -> AsyncIterator[tuple[bytes, dict | None]]:
        litellm = litellm_module()
        params = self._litellm_params(body, ("model",))
        try:
            response = await litellm.acompletion(**self._litellm_target(), **params)
            end = StreamEnd(response, self.spec.model)
            async for chunk in response:
                parsed = chunk.model_dump(exclude_none=True)
                # litellm writes its finish_reason chunk once the provider's body has ended: the answer
                # is complete only if the provider said so (StreamEnd), as [DONE] says it on the fast path
                if end.cut and any(choice.get("finish_reason") for choice in parsed.get("choices") or ()):
                    raise self._stream_ended_early()
                yield orjson.dumps(parsed), parsed
            if end.cut:
                raise self._stream_ended_early()
        except UpstreamError:
            raise
        except Exception as exc:
            raise litellm_error(self.name, exc) from None

    def _stream_ended_early(self) -> UpstreamError:
        return UpstreamError(self.name, 502, f"{self.name}: stream ended early, without the provider's end of the "
                                             f"answer", retryable=True)


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


def output_limit(body: dict[str, Any]) -> int | None:
    """The most tokens a call with this body may write (its max_tokens or max_completion_tokens)."""
    limits = [v for k in ("max_tokens", "max_completion_tokens")
              if isinstance(v := body.get(k), int) and not isinstance(v, bool)]
    return min(limits) if limits else None


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


def _float32_base64(vector: list[float]) -> str:
    """A vector as OpenAI's `encoding_format: "base64"` writes it: little-endian float32s, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@functools.cache
def _litellm_options() -> frozenset[str]:
    """The names litellm takes as its own call options, less OpenAI's fields it also reads."""
    return frozenset(LITELLM_OPTIONS | set(litellm_module().types.utils.all_litellm_params)) - OPENAI_FIELDS_LITELLM_READS
