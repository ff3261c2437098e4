"""Server-sent events for streaming clients.

Two shapes:
- pass-through (`single`): upstream chunks are forwarded as they arrive, under our request id. The
  first chunk is fetched before the response starts, so a backend that fails before sending anything is
  replaced by the next arm invisibly (and a request no arm can serve still gets a proper HTTP error). A
  stream that breaks after bytes reached the client ends with an explicit SSE error event and no
  [DONE]: a truncated answer is never passed off as complete.
- synthesized (multi-sample strategies, n > 1): the headers wait for the answer (gateway/request_path.py), so a
  failure is an HTTP error; sampling that outlasts that wait is kept alive with SSE comments; then the
  winning answer is sent as chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from gateway.backends import Admission, Backend, UpstreamError, text_content
from gateway.calls import CLIENT_LEFT, Caller
from gateway.connections import CLIENT_CONNECTION, ClientConnection
from gateway.errors import ApiError, internal_error
from gateway.usage import CallRecord, Usage, output_limit
from router.estimates import may_exceed_context

log = logging.getLogger("ponder.streaming")

DONE = b"data: [DONE]\n\n"
# Where reasoning servers put the chain of thought: `reasoning_content` (DeepSeek, vLLM's reasoning
# parsers until 0.11, litellm), `reasoning` (vLLM since, OpenRouter)
REASONING_FIELDS = ("reasoning_content", "reasoning")
KEEPALIVE = b": ponder is sampling\n\n"
CLIENT_LEFT_MID_ANSWER = "the client left mid-answer"


def sse(payload: bytes | dict[str, Any]) -> bytes:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def sse_error(message: str, code: str = "upstream_stream_error") -> bytes:
    return sse({"error": {"message": message, "type": "upstream_error", "param": None, "code": code}})


class PassThrough:
    """An upstream stream whose first event has already arrived."""

    def __init__(self, backend: Backend, source: AsyncIterator[tuple[bytes, dict | None]],
                 first: tuple[bytes, dict | None], started: float, prompt_tokens_estimate: int = 0,
                 output_limit: int | None = None) -> None:
        self.backend = backend
        self.source = source
        self.first = first
        self.started = started
        self.prompt_tokens_estimate = prompt_tokens_estimate
        self.output_limit = output_limit  # the call's max_tokens: the upstream wrote no more
        self.usage_estimated = False
        self.client_left = False
        self.relaying = False  # events() has started: from then on it closes the source and bills the call

    @classmethod
    async def open(cls, backend: Backend, body: dict[str, Any], caller: Caller, prompt_tokens: int = 0) -> PassThrough:
        """The stream, once its first event is in. `prompt_tokens`: the prompt's estimate."""
        started = time.perf_counter()
        admission = Admission()
        source = backend.stream(body, admission)  # it bounds the wait for the first byte itself
        probe = backend.health.probe(time.monotonic(), caller.remaining())
        try:
            try:
                first = await asyncio.wait_for(anext(source), timeout=max(0.01, caller.remaining()))
            finally:
                if probe:  # a first event, or none: what it says is marked below
                    backend.health.probe_ended()
        except StopAsyncIteration:
            error = UpstreamError(backend.name, 502, f"{backend.name}: empty stream", retryable=True)
        except asyncio.TimeoutError:
            await source.aclose()
            raise caller.deadline_reached(backend, body, started, admission) from None
        except UpstreamError as exc:
            error = exc
        except asyncio.CancelledError:
            caller.cancelled_call(backend, body, started, admission)
            await source.aclose()
            raise
        else:
            backend.health.answered()  # its first event is the proof: no wait for the stream's end
            return cls(backend, source, first, started, prompt_tokens, output_limit(body))
        await source.aclose()
        if error.status == 502 and error.upstream_status is None and may_exceed_context(prompt_tokens,
                                                                                         backend.max_context):
            # llama-cpp-python's server starts the stream (200) and then drops it for a prompt over its
            # context window: no mark against the backend before one call without streaming says whose
            # fault it is (a 400 `context_length_exceeded` is the client's, passed on as it is). A stream
            # refused with a 5xx is the backend's failure, whatever the prompt: no probe for it.
            caller.calls.append(backend.record(Usage(), started, ok=False, error=error.message[:300]))
            await caller.complete(backend.name, _probe_body(body, reasoning=backend.spec.reasoning))
            raise error  # the prompt fits: a stream broken for another reason, worth a retry
        caller._failed(backend, body, started, error)
        raise error

    async def abandon(self, caller: Caller) -> None:
        """The client left before the relay started: the call is cut off with its first event in (its
        content, if any, received), and the upstream let go."""
        if self.relaying:
            return
        self.relaying = self.client_left = True
        chars = _content_chars(self.first[1]) if self.first[1] else 0
        caller.calls.append(self.backend.cut(self._estimated(1 if chars else 0, chars), self.started, CLIENT_LEFT))
        await self.source.aclose()

    def _estimated(self, content_chunks: int, content_chars: int = 0) -> Usage:
        """Some servers (llama.cpp's) never send usage on a stream, and a stream cut off has sent none
        yet: then the prompt's estimate and the content streamed so far (Usage.estimated), never more
        than the call's max_tokens (short words made a capped answer's estimate exceed it); the call
        says it was estimated."""
        self.usage_estimated = True
        return Usage.estimated(self.prompt_tokens_estimate, content_chunks, content_chars,
                               output_limit=self.output_limit)

    async def chunks(self, caller: Caller) -> AsyncIterator[tuple[bytes, dict | None]]:
        """The upstream's events as they arrive, `(payload, parsed)`, its usage-only chunk kept back.
        The call is billed however the stream ends: from the upstream's usage chunk, else (or if the
        client leaves first) from what was streamed so far. An upstream that breaks mid-answer is
        billed, marked as failing, and its UpstreamError raised here; each API writes that its way."""
        usage: Usage | None = None
        content_chunks = content_chars = 0
        self.relaying = True
        call_heads = ToolCallHeads()
        item: tuple[bytes, dict | None] | None = self.first
        try:
            while item is not None:
                parsed = item[1]
                # both edit the chunk in place (`|`: each must run), and then it is written anew
                if parsed and (call_heads.drop_repeats(parsed) | _text_deltas(parsed)):
                    item = (orjson.dumps(parsed), parsed)
                if parsed and parsed.get("usage"):
                    usage = Usage.from_block(parsed["usage"])
                    if not parsed.get("choices"):
                        item = await anext(self.source, None)
                        continue  # the usage-only chunk: each API sends the whole request's usage its way
                elif parsed and (chars := _content_chars(parsed)):
                    content_chunks += 1
                    content_chars += chars
                yield item
                item = await anext(self.source, None)
        except UpstreamError as exc:
            usage = usage or self._estimated(content_chunks, content_chars)
            caller.calls.append(self.backend.cut(usage, self.started, exc.message))
            self.backend.health.failed(time.monotonic(), exc.retry_after, request=caller.ident, error=exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away mid-answer: the tokens written so far are billed all the same,
            # and the backend did nothing wrong (no mark against its health).
            self.client_left = True
            usage = usage or self._estimated(content_chunks, content_chars)
            caller.calls.append(self.backend.cut(usage, self.started, CLIENT_LEFT_MID_ANSWER))
            raise
        finally:
            await self.source.aclose()
        self.backend.health.succeeded()
        caller.calls.append(self.backend.record(usage or self._estimated(content_chunks, content_chars), self.started))

    async def events(self, caller: Caller, *, request_id: str, include_usage: bool,
                     extension: Callable[[], dict]) -> AsyncIterator[bytes]:
        """The chat-completions stream: every event under our request id, then (if asked) the whole
        request's usage and our extension, then [DONE]; a broken upstream ends it with an error event."""
        relabel = _relabeller(request_id, self.first[1])
        async with contextlib.aclosing(self.chunks(caller)) as chunks:
            try:
                async for payload, parsed in chunks:
                    yield sse(relabel(payload, parsed))
            except UpstreamError as exc:
                yield sse_error(f"The upstream stream broke before the answer was complete: {exc.message}")
                return
        if include_usage:
            first = self.first[1] or {}
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": first.get("created", 0),
                       "model": first.get("model", ""), "choices": [], "usage": usage_block(caller.calls),
                       "ponder": extension()})
        yield DONE


class EventStream(StreamingResponse):
    """An SSE response whose `finish` (settle the request) runs once, however it ends, after its body
    is closed: normally, on an upstream error, when the client leaves while a send is blocked (the body
    then sits paused at a `yield`) or before the body started (Starlette then never starts it)."""

    def __init__(self, body: AsyncIterator[bytes], finish: Callable[[], Awaitable[None]],
                 headers: dict[str, str], stall_timeout_s: float = 60.0,  # config's default
                 render_error: Callable[[ApiError], bytes] = lambda error: sse(error.body())) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._finish = finish
        self._stall_timeout_s = stall_timeout_s
        self._render_error = render_error  # a failure after the headers, as the API's error event
        # what ended the body, if it raised (a bug): `finish` records the request as failed (a 500)
        self.failure: Exception | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """A client that stops reading (but keeps its connection) blocks the send once the socket's
        buffers are full, and held the stream, its upstream call, its backend slot and its place under
        max_requests_in_flight for good: a send under way for `stall_timeout_s` ends it as a client
        that left. Watched by one timer a stream, not a timeout a chunk (~10 µs each). A client that
        reads, however slowly, is no stalled one: a send waits until it has taken some 48 KB (uvicorn's
        buffer from its high-water mark to its low one), more than a minute below 800 B/s, so the
        wait starts again whenever it has taken anything (`ponder serve`'s connections tell how much
        is left: gateway/connections.py). Its connection is dropped, not closed: a close waited for
        it to take what was buffered, for ever, and held the socket and its buffers meanwhile.

        A client that hangs up is seen by its `http.disconnect`, and the next send ends the stream: uvicorn
        drops sends to a gone client silently, and Starlette's cancel never reaches a relay whose upstream
        events are already buffered (anyio cancels only a task that waits), so the relay ran to the end
        and the request was recorded as a whole answer.

        A body that raises (a bug in a translation or a render) after the headers went out cannot become a
        500: the stream ends with the API's error event (`internal_error`, as an upstream that broke ends
        it with its own), the traceback is logged once, and `failure` tells `finish`. One that raises
        before its headers is left to errors.AnswerEveryRequest, which answers it a 500."""
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        client: ClientConnection | None = scope.get("extensions", {}).get(CLIENT_CONNECTION)
        sending_since: float | None = None
        unsent: int | None = None  # what the client had not taken at the last look during this send
        stalled = left = started = False

        async def listened() -> dict[str, Any]:
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal sending_since, unsent, started
            if left:
                raise ClientDisconnect
            sending_since, unsent, started = loop.time(), None, True
            await send(message)
            sending_since = None

        def watch() -> None:
            nonlocal stalled, timer, sending_since, unsent
            if sending_since is not None and client is not None:
                now_unsent = client.unsent_bytes()
                if unsent is not None and now_unsent < unsent:  # it took some since the last look
                    sending_since = loop.time()
                unsent = now_unsent
            if sending_since is not None and loop.time() - sending_since >= self._stall_timeout_s:
                stalled = True
                task.cancel()
            else:
                timer = loop.call_later(self._stall_timeout_s / 2, watch)

        timer = loop.call_later(self._stall_timeout_s / 2, watch)
        try:
            await super().__call__(scope, listened, watched)
        except ClientDisconnect:
            pass  # the body is closed below, as the client's leaving
        except Exception as exc:
            self.failure = exc
            if not started:
                raise
            log.exception("a stream's body failed after its headers: ended with an error event")
            error = exc if isinstance(exc, ApiError) else internal_error()
            with contextlib.suppress(Exception):  # the client gone meanwhile: nothing to tell
                await watched({"type": "http.response.body", "body": self._render_error(error), "more_body": False})
        except asyncio.CancelledError:
            if not stalled:
                raise
            task.uncancel()
            log.warning("a client read nothing of its stream for %g s: the stream is ended as the client's leaving "
                        "and its connection closed", self._stall_timeout_s)
            if client is not None:
                client.abort()
        finally:
            timer.cancel()
            await asyncio.shield(self._close_and_finish())  # a server shutting down must not cut it short

    async def _close_and_finish(self) -> None:
        # Closing the body runs its own ending first (a relayed call billed, sampling stopped)
        with contextlib.suppress(RuntimeError):  # a body still running elsewhere
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        await self._finish()


def _probe_body(body: dict[str, Any], *, reasoning: bool) -> dict[str, Any]:
    """The request without streaming, for one token: enough for the upstream to check the prompt.
    OpenAI's reasoning models refuse `max_tokens` (a 400 that would read as the prompt's fault)."""
    limit = "max_completion_tokens" if reasoning else "max_tokens"
    probe = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_tokens",
                                                        "max_completion_tokens")}
    probe[limit] = 1
    return probe


def _relabeller(request_id: str, first: dict | None) -> Callable[[bytes, dict | None], bytes]:
    """Relayed chunks with `id` set to the gateway's request id (the id feedback takes). The upstream's
    id is swapped in the bytes as they came: 2x (8x with logprobs) cheaper than re-serialising, which
    is left for a chunk written otherwise (a space after the colon, another id or none)."""
    upstream_id = (first or {}).get("id")
    theirs = b'"id":' + orjson.dumps(upstream_id) if isinstance(upstream_id, str) else None
    ours = b'"id":' + orjson.dumps(request_id)

    def relabel(payload: bytes, parsed: dict | None) -> bytes:
        if not isinstance(parsed, dict):
            return payload
        if theirs is not None and parsed.get("id") == upstream_id and theirs in payload:
            # the first match is the chunk's own id: a string value holds no unescaped quote, and a
            # nested id (a tool call's) is not the completion's
            return payload.replace(theirs, ours, 1)
        return orjson.dumps({**parsed, "id": request_id})

    return relabel


class ToolCallHeads:
    """A streamed tool call's id, type and name come once, in its first delta, then only pieces of its
    arguments: clients join every string a delta brings (the openai SDK's stream helper, agent
    frameworks). llama-cpp-python's server (the local model) repeats them in every delta, which joined
    make a call to 'get_weatherget_weather...' with an id as long: a repeat of what the call's first
    delta said is dropped (as it is of a legacy function_call's name). Some servers stream parallel
    calls each whole under one index (0, or none): a delta with a new id is a new call, given the next
    index, as are the pieces after it (clients joined them all into the first call). Compliant streams
    pass as sent."""

    __slots__ = ("_heads", "_slots", "_calls")

    def __init__(self) -> None:
        self._heads: dict[tuple, dict[str, Any]] = {}  # (choice, tool call index | "function_call") -> first fields
        self._slots: dict[tuple, int] = {}  # (choice, the upstream's index) -> the index the client is sent
        self._calls: dict[Any, int] = {}  # choice -> its calls so far

    def drop_repeats(self, chunk: dict) -> bool:
        """Remove repeated heads from the chunk in place, and number calls apart; whether it changed."""
        dropped = False
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            calls = [((choice.get("index"), call.get("index")), call, call.get("function"))
                     for call in delta.get("tool_calls") or () if isinstance(call, dict)]
            if isinstance(delta.get("function_call"), dict):
                calls.append(((choice.get("index"), "function_call"), {}, delta["function_call"]))
            for key, call, function in calls:
                function = function if isinstance(function, dict) else {}
                head = {"id": call.get("id"), "type": call.get("type"), "name": function.get("name")}
                first = self._heads.setdefault(key, head)
                if key[1] != "function_call" and (first is head or (head["id"] and first["id"] and head["id"] != first["id"])):
                    self._heads[key] = head  # a call of its own: the next index
                    self._slots[key] = self._calls.get(key[0], 0)
                    self._calls[key[0]] = self._slots[key] + 1
                if key[1] != "function_call" and call.get("index") != (slot := self._slots[key]):
                    call["index"] = slot
                    dropped = True
                if first is head or self._heads[key] is head:
                    continue
                for field, holder in (("id", call), ("type", call), ("name", function)):
                    if holder.get(field) is not None and holder[field] == first[field]:
                        del holder[field]
                        dropped = True
        return dropped


def _text_deltas(chunk: dict) -> bool:
    """A chunk whose deltas carry content as a list of parts (Mistral's reasoning models stream so) as
    text and `reasoning_content`, in place (`text_content`); whether any did. Relayed as it came, a list
    reached clients that read a string and broke the Responses API's translation mid-stream."""
    changed = False
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and text_content(choice.get("delta")):
            changed = True
    return changed


def _content_chars(chunk: dict) -> int:
    """Characters of answer in a chunk (text, reasoning, tool-call arguments); 0: no content."""
    chars = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        # one reasoning text: a vLLM that writes it under both names (during the rename) bills it once
        chars += max((len(delta[key]) for key in REASONING_FIELDS if isinstance(delta.get(key), str)), default=0)
        if isinstance(delta.get("content"), str):
            chars += len(delta["content"])
        for call in delta.get("tool_calls") or ():
            arguments = ((call or {}).get("function") or {}).get("arguments")
            chars += len(arguments) if isinstance(arguments, str) else 1
    return chars


def usage_block(calls: list[CallRecord]) -> dict[str, Any]:
    """The request's usage: every call's tokens, and every detail count an upstream reported
    (`prompt_tokens_details.cached_tokens`, ...), summed exactly."""
    prompt = sum(c.prompt_tokens for c in calls)
    completion = sum(c.completion_tokens for c in calls)
    details: dict[str, dict[str, int]] = {}
    for call in calls:
        for block, counts in call.usage_details.items():
            sums = details.setdefault(block, {})
            for name, value in counts.items():
                sums[name] = sums.get(name, 0) + value
    completion_details = details.setdefault("completion_tokens_details", {})
    completion_details["reasoning_tokens"] = sum(c.reasoning_tokens for c in calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, **details}


async def synthesized(work: asyncio.Task, *, keepalive_s: float, render: Callable[[Any], list[bytes]],
                      render_error: Callable[[ApiError], bytes],
                      written: Callable[[], None] = lambda: None) -> AsyncIterator[bytes]:
    """Keep the client's connection alive while `work` runs, then stream its answer (`render`: the
    result as this API's SSE frames; `render_error`: a failure as its error event). `written` is called
    right after the last frame was sent (in the same loop turn: no disconnect is read in between): a
    body closed before it is a client that left mid-answer."""
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=keepalive_s)
            if done:
                break
            yield KEEPALIVE
        try:
            result = work.result()
        except ApiError as exc:
            yield render_error(exc)
            return
        for frame in render(result):
            yield frame
        written()
    finally:
        if not work.done():
            work.cancel()  # the client went away: stop sampling for it


def completion_to_chunks(response: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A finished chat.completion as the chunk sequence a streaming client expects."""
    base = {"id": response["id"], "object": "chat.completion.chunk", "created": response.get("created", 0),
            "model": response.get("model", "")}
    if response.get("system_fingerprint"):
        base["system_fingerprint"] = response["system_fingerprint"]
    chunks = []
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        index = choice.get("index", 0)
        # null content stays null (a tool call's, a refusal's), as OpenAI streams it and as the JSON answer has it
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        # what the answer says besides its content: a search model's citations (`web_search_options`) and a
        # spoken answer's audio come in deltas too, as OpenAI streams them
        for extra in ("refusal", *REASONING_FIELDS, "function_call", "annotations", "audio"):
            if message.get(extra):
                delta[extra] = message[extra]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
        content = {"index": index, "delta": delta, "finish_reason": None}
        if choice.get("logprobs"):  # asked for (`logprobs`): the choice's whole, in its one content chunk
            content["logprobs"] = choice["logprobs"]
        chunks.append({**base, "choices": [content]})
        chunks.append({**base, "choices": [{"index": index, "delta": {},
                                            "finish_reason": choice.get("finish_reason") or "stop"}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": response["usage"], "ponder": response["ponder"]})
    return chunks
