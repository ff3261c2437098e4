"""A real OpenAI-compatible HTTP server on loopback, for backends that would cost money.

Run: `python tests/mock_upstream.py --port P`. It answers `/v1/chat/completions` (JSON and SSE) and
`/v1/embeddings` (a deterministic vector per input: `embeddings`) with exact, predictable usage (1 token
per whitespace-separated word), and can misbehave on demand:

    POST /control {"script": ["500", "ok", ...], "fail_rate": 0.5, "answers": [...], "delay_ms": 0,
                   "cached_tokens": 0}
        script: behaviours for the next requests, in order; then fail_rate picks "500" at random.
        cached_tokens: reported in every answer's `usage.prompt_tokens_details` (a prompt cache hit).
        behaviours: ok | 500 | 429 | 429_ms | 429_date | 429_google | 401 | too_long | too_long_vllm | echo_400 | empty | hang | reset | truncate | reset_mid | stall | slow_first | hold
                    | raw | tool_call | length | no_usage | error
        (tool_call: the answer is a call of the request's first tool, the picked answer its arguments,
        streamed a word at a time; length: the answer cut at max_tokens/max_completion_tokens words,
        finish_reason "length"; no_usage: a JSON answer without its `usage` block, as some servers write it)
        (hold: a stream pauses hang_s after its first chunk; raw: a 200 text/event-stream whose body is
        `raw`, a list of hex strings, each sent as one write, and numbers, seconds to sleep between them,
        so a test says byte for byte how an upstream writes its SSE; error: the answer `error` says,
        {"status": 503, "headers": {...}, "body": "..."}, so a test says what an upstream's failure carries)
    GET  /calls     {"count": N, "bodies": [...last 200 bodies], "raw_bodies": [...the same, as the bytes sent],
                     "times": [...when each arrived, time.monotonic() seconds]}
    POST /reset     forget everything

`answers` are picked by the request's `seed` (seed % len), else in turn, so voting can be tested.
An answer is a text, or a message object (`{"content": null, "tool_calls": [...]}`, `{"refusal": ...}`,
`{"content": ..., "reasoning_content": ...}` as vLLM's reasoning parsers answer, or `"reasoning"` as newer
vLLM names it: its words are output tokens, and it streams first):
its tool calls stream as OpenAI streams them (the call's id, type and name with empty arguments, then
the arguments in pieces of a few characters, under the call's index) and finish with "tool_calls".
A text answer longer than the request's `max_tokens` / `max_completion_tokens` is cut there (its
reasoning tokens counted in: 10 for a request with a `reasoning_effort` other than `none`), with
finish_reason `length`, as a real upstream cuts it; one holding
a `stop` sequence of the request ends before it.

A request for one of OpenAI's reasoning models (`model` o1, o3, o4-mini, gpt-5, gpt-5-mini, ...) is refused
as OpenAI refuses it, with its 400: `max_tokens` (`unsupported_parameter`), a `temperature` or `top_p`
other than 1 (`unsupported_value`), `presence_penalty`, `frequency_penalty` or `logprobs` (`unsupported_parameter`).
One for its chat models (`gpt-4o`, `gpt-4.1-mini`, ...) is refused a `verbosity` other than `medium`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import random
import re
import struct
import time

import orjson
from aiohttp import web

from mock_server import control_app, raw_stream, record, serve  # a sibling: run as a script, tests/ is on sys.path

STATE: dict = {}


def initial_state() -> dict:
    return dict(script=[], fail_rate=0.0, answers=["Hello from the mock upstream."], delay_ms=0, turn=0,
                hang_s=30.0, rng=random.Random(7), cached_tokens=0, raw=[],
                error={"status": 503, "headers": {}, "body": '{"error": {"message": "overloaded"}}'})


def words(text: str) -> int:
    return len(text.split())


def as_message(answer: str | dict) -> dict:
    message = {"role": "assistant", "content": answer} if isinstance(answer, str) else \
        {"role": "assistant", "content": None, **answer}
    return message


def answer_tokens(answer: str | dict) -> int:
    """Words of the text, and of each tool call's name and arguments (the arguments' characters / 4)."""
    message = as_message(answer)
    calls = message.get("tool_calls") or []
    content = message.get("content") or message.get("refusal") or ""
    if isinstance(content, list):  # parts, as Mistral's reasoning models answer: their text counts
        content = " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    # a reasoning server's chain of thought (vLLM's `reasoning_content`, or `reasoning`) is output too
    thought = message.get("reasoning_content") or message.get("reasoning") or ""
    return words(content) + words(thought) + sum(
        1 + len(str(call["function"].get("arguments", ""))) // 4
        for call in calls if isinstance(call.get("function"), dict))  # a malformed call (a test's) counts 0


def finish_reason(answer: str | dict) -> str:
    message = as_message(answer)
    return "tool_calls" if message.get("tool_calls") else "function_call" if message.get("function_call") else "stop"


def prompt_tokens(body: dict) -> int:
    """Words of the messages; tool definitions, a response_format and an assistant turn's tool calls
    count as providers bill them, 1 token per 4 characters of their JSON."""
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            total += words(content)
        elif isinstance(content, list):
            total += sum(words(p.get("text", "")) for p in content if isinstance(p, dict))
        if message.get("tool_calls"):
            total += len(orjson.dumps(message["tool_calls"])) // 4
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            total += len(orjson.dumps(body[key])) // 4
    return total


# OpenAI's reasoning models, by name: the o-series and the gpt-5 family (not gpt-5-chat, which samples)
OPENAI_REASONING_MODEL = re.compile(r"^(o\d+(-mini|-pro)?|gpt-5(\.\d+)?(-mini|-nano|-pro)?)(-\d{4}-\d{2}-\d{2})?$")


def reasoning_model_refusal(body: dict) -> dict | None:
    """What OpenAI's reasoning models (and its chat models) refuse of a chat request, as its 400's error
    object, or None."""
    if str(body.get("model")).startswith("gpt-4") and body.get("verbosity") not in (None, "medium"):
        return {"message": f"Unsupported value: 'verbosity' does not support '{body['verbosity']}' with this model. "
                           "Supported values are: 'medium'.", "type": "invalid_request_error", "param": "verbosity",
                "code": "unsupported_value"}
    if not OPENAI_REASONING_MODEL.match(str(body.get("model"))):
        return None
    if "max_tokens" in body:
        return {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens",
                "code": "unsupported_parameter"}
    for knob in ("temperature", "top_p"):
        if body.get(knob) not in (None, 1):
            return {"message": f"Unsupported value: '{knob}' does not support {body[knob]} with this model. Only "
                               "the default (1) value is supported.", "type": "invalid_request_error",
                    "param": knob, "code": "unsupported_value"}
    for knob in ("presence_penalty", "frequency_penalty", "logprobs"):
        if knob in body:
            return {"message": f"Unsupported parameter: '{knob}' is not supported with this model.",
                    "type": "invalid_request_error", "param": knob, "code": "unsupported_parameter"}
    return None


def pick_answer(body: dict, index: int) -> str:
    answers = STATE["answers"]
    if body.get("seed") is not None:
        return answers[(int(body["seed"]) + index) % len(answers)]
    STATE["turn"] += 1
    return answers[(STATE["turn"] - 1) % len(answers)]


def until_stop(answer: str | dict, stop: str | list[str] | None) -> str | dict:
    """A text answer ended before the first of the request's stop sequences, as a real upstream ends it."""
    if not isinstance(answer, str) or not stop:
        return answer
    cuts = [i for i in (answer.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s) if i >= 0]
    return answer[:min(cuts)] if cuts else answer


def next_behaviour() -> str:
    if STATE["script"]:
        return STATE["script"].pop(0)
    if STATE["fail_rate"] and STATE["rng"].random() < STATE["fail_rate"]:
        return "500"
    return "ok"


async def delayed_behaviour() -> tuple[str, web.Response | None]:
    """The next request's behaviour, once `delay_ms` has passed, with what every endpoint does alike for
    it: the error answer of a 500 or a 429, or `hang_s` waited for a hang (then answered as usual)."""
    behaviour = next_behaviour()
    if STATE["delay_ms"]:
        await asyncio.sleep(STATE["delay_ms"] / 1000)
    if behaviour == "500":
        return behaviour, web.json_response({"error": {"message": "mock upstream failure", "type": "server_error"}},
                                            status=500)
    if behaviour == "429":
        return behaviour, web.json_response({"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                                            headers={"Retry-After": "1"})
    if behaviour == "hang":
        await asyncio.sleep(STATE["hang_s"])
    if behaviour == "error":
        error = STATE["error"]
        return behaviour, web.Response(status=error["status"], headers=error.get("headers") or {},
                                       body=error.get("body", ""), content_type="application/json")
    return behaviour, None


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    record(STATE, bodies=body, raw_bodies=raw.decode(), times=time.monotonic())
    if (refusal := reasoning_model_refusal(body)) is not None:
        return web.json_response({"error": refusal}, status=400)
    behaviour, failure = await delayed_behaviour()
    if failure is not None:
        return failure
    if behaviour in ("429_ms", "429_date"):  # the wait as Azure OpenAI writes it, or as an HTTP-date (RFC 9110)
        wait = {"retry-after-ms": "7000"} if behaviour == "429_ms" else \
            {"Retry-After": email.utils.formatdate(time.time() + 7, usegmt=True)}
        return web.json_response({"error": {"code": "429", "message": "Rate limit reached. Please retry after 7 "
                                                                      "seconds."}}, status=429, headers=wait)
    if behaviour == "429_google":  # Gemini's OpenAI-compatible endpoint: no Retry-After, the wait in RetryInfo
        return web.json_response([{"error": {
            "code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}], status=429)
    if behaviour == "401":  # OpenAI's answer to a key it does not know (revoked, or another provider's)
        return web.json_response({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                            "param": None, "code": "invalid_api_key"}}, status=401)
    if behaviour == "too_long":  # OpenAI's answer to a prompt over the model's context window
        return web.json_response({"error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in "
                       "9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}, status=400)
    if behaviour == "too_long_vllm":  # vLLM's answer to a prompt over --max-model-len: `code` is the status
        return web.json_response({"error": {
            "message": "This model's maximum context length is 32768 tokens. However, your request has 40000 input "
                       "tokens. Please reduce the length of the input messages. None",
            "type": "BadRequestError", "param": None, "code": 400}}, status=400)
    if behaviour == "echo_400":  # OpenAI's answer to a value it does not know: it quotes the value
        text = str((body.get("messages") or [{}])[-1].get("content"))
        return web.json_response({"error": {
            "message": f"Invalid value: '{text}'. Supported values are: 'a' and 'b'.",
            "type": "invalid_request_error", "param": "messages", "code": "invalid_value"}}, status=400)
    if behaviour == "empty":  # a 200 with no choices at all: some servers answer so under load
        return web.json_response({"id": "mock-empty", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0,
                                                           "total_tokens": 1}})
    if behaviour == "reset":
        request.transport.close()
        return web.Response()
    if behaviour == "raw":
        return await raw_stream(request, STATE["raw"])
    n = int(body.get("n") or 1)
    limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int)]
    # a reasoning model thinks 10 tokens at any effort but `none`, which turns its thinking off
    reasoning = min([10, *limits]) if body.get("reasoning_effort") not in (None, "none") else 0
    answers = [until_stop(pick_answer(body, i), body.get("stop")) for i in range(n)]
    cut = [bool(limits) and isinstance(a, str) and words(a) + reasoning > min(limits) for a in answers]
    answers = [" ".join(a.split()[:min(limits) - reasoning]) if c else a for a, c in zip(answers, cut)]
    finish = ["length" if c or behaviour == "length" else "tool_calls" if behaviour == "tool_call" else finish_reason(a)
              for a, c in zip(answers, cut)]
    usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": sum(answer_tokens(a) for a in answers)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if STATE["cached_tokens"]:
        usage["prompt_tokens_details"] = {"cached_tokens": STATE["cached_tokens"], "audio_tokens": 0}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        usage["completion_tokens"] += reasoning
        usage["total_tokens"] += reasoning
    base = {"id": f"mock-{STATE['count']}", "created": int(time.time()), "model": body.get("model", "mock"),
            "system_fingerprint": "fp_mock"}
    if not body.get("stream"):
        choices = [{"index": i, "message": message(body, a, behaviour), "finish_reason": f}
                   for i, (a, f) in enumerate(zip(answers, finish))]
        if body.get("logprobs"):  # one entry per word
            for choice, a in zip(choices, answers):
                a = as_message(a).get("content") or ""
                choice["logprobs"] = {"content": [{"token": w, "logprob": -0.5, "bytes": list(w.encode()),
                                                   "top_logprobs": []} for w in a.split()]}
        if behaviour == "no_usage":
            return web.json_response({**base, "object": "chat.completion", "choices": choices})
        return web.json_response({**base, "object": "chat.completion", "choices": choices, "usage": usage})
    return await stream(request, body, base, answers[0], usage, behaviour, finish[0])


EMBEDDING_DIMENSIONS = 8  # a vector's length when the request sets no `dimensions`


def embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """The same input always gets the same vector: its sha256's bytes, scaled to [0, 1)."""
    digest = hashlib.sha256(item.encode() if isinstance(item, str) else orjson.dumps(item)).digest()
    return [digest[i % len(digest)] / 256 for i in range(dimensions)]


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI's embeddings: a vector per input (embedding_vector), float or base64 (little-endian float32,
    as OpenAI encodes it), usage = the inputs' words (token ids: one each). Behaviours: ok | 500 | 429 |
    hang | no_usage."""
    raw = await request.read()
    body = orjson.loads(raw)
    record(STATE, bodies=body, raw_bodies=raw.decode(), times=time.monotonic())
    behaviour, failure = await delayed_behaviour()
    if failure is not None:
        return failure
    inputs = body["input"]
    items = [inputs] if isinstance(inputs, str) or isinstance(inputs[0], int) else inputs
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(words(item) if isinstance(item, str) else len(item) for item in items)
    answer = {"object": "list", "data": data, "model": body.get("model", "mock")}
    if behaviour != "no_usage":
        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response(answer)


def tool_name(body: dict) -> str:
    return ((body.get("tools") or [{}])[0].get("function") or {}).get("name", "f")


def message(body: dict, answer: str | dict, behaviour: str) -> dict:
    if behaviour == "tool_call" and isinstance(answer, str):  # the answer's text as a call of the first tool
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_mock_{STATE['count']}", "type": "function",
             "function": {"name": tool_name(body), "arguments": answer}}]}
    return as_message(answer)


async def stream(request: web.Request, body: dict, base: dict, answer: str | dict, usage: dict,
                 behaviour: str, finish: str = "stop") -> web.StreamResponse:
    if behaviour == "stall":
        await asyncio.sleep(STATE["hang_s"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**base, "object": "chat.completion.chunk"}
    if not isinstance(answer, str):
        return await stream_message(request, response, body, chunk, as_message(answer), usage, behaviour)
    pieces = answer.split(" ")
    for i, piece in enumerate(pieces):
        delta = {"content": piece if i == 0 else " " + piece}
        if behaviour == "tool_call":
            call = {"index": 0, "function": {"arguments": delta.pop("content")}}
            if i == 0:
                call.update(id=f"call_mock_{STATE['count']}", type="function")
                call["function"]["name"] = tool_name(body)
            delta["tool_calls"] = [call]
        if i == 0:
            delta["role"] = "assistant"
        await response.write(b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": delta,
                                                                               "finish_reason": None}]}) + b"\n\n")
        if behaviour == "slow_first" and i == 0:
            await asyncio.sleep(0.2)
        if behaviour == "hold" and i == 0:
            await asyncio.sleep(STATE["hang_s"])
        if i == len(pieces) // 2 and behaviour in ("truncate", "reset_mid"):
            if behaviour == "reset_mid":
                request.transport.close()
                return response
            await response.write_eof()  # clean end, but no finish_reason and no [DONE]
            return response
    await response.write(b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": {},
                                                                           "finish_reason": finish}]}) + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def stream_message(request: web.Request, response: web.StreamResponse, body: dict, chunk: dict,
                         message: dict, usage: dict, behaviour: str = "ok") -> web.StreamResponse:
    """A message answer as OpenAI streams it: role first, tool calls as id/name then argument pieces."""
    async def send(delta: dict, finish: str | None = None) -> None:
        await response.write(b"data: " + orjson.dumps(
            {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n")

    for field in ("reasoning_content", "reasoning"):  # as vLLM streams it: the thought first, a word at a time
        for i, piece in enumerate((message.get(field) or "").split(" ") if message.get(field) else ()):
            await send({"role": "assistant", field: piece if i == 0 else " " + piece})
    if behaviour == "reset_mid" and (message.get("reasoning_content") or message.get("reasoning")):
        request.transport.close()  # broken after the thought, before the answer
        return response
    first = {"role": "assistant", "content": None}
    if message.get("refusal"):
        first["refusal"] = message["refusal"]
    if message.get("content"):
        first["content"] = message["content"]
    await send(first)
    for index, call in enumerate(message.get("tool_calls") or []):
        await send({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]})
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 5):
            await send({"tool_calls": [{"index": index, "function": {"arguments": arguments[start:start + 5]}}]})
    await send({}, "tool_calls" if message.get("tool_calls") else "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def make_app() -> web.Application:
    app = control_app(STATE, initial_state, recorded=("bodies", "raw_bodies", "times"),
                      settable=("script", "fail_rate", "answers", "delay_ms", "hang_s", "cached_tokens", "raw",
                                "error"))
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": []}))
    return app


if __name__ == "__main__":
    serve(make_app())
