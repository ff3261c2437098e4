"""A real HTTP server on loopback that speaks Anthropic's Messages API, for backends called through
litellm with a provider protocol other than OpenAI's (`model: anthropic/claude-...`, `api_base` here).

Run: `python tests/mock_anthropic.py --port P`. `POST /v1/messages` answers as Anthropic does, JSON or
SSE (message_start, content_block_start/delta/stop with text_delta, thinking_delta + signature_delta,
input_json_delta for tool_use, message_delta with stop_reason and usage, message_stop), with exact
usage (1 token per whitespace-separated word of the messages' text; cache counts as set), and refuses
what Anthropic refuses (no max_tokens, a field the Messages API does not have, a `system` role in
messages; with thinking: budget_tokens under 1024 or not below max_tokens, a temperature other than 1,
top_k, top_p under 0.95, a forced tool call, a final assistant turn whose tool calls come without the
thinking that led to them) with its 400.

    POST /control {"script": [...], "answers": [...], "cache_read": 0, "cache_creation": 0,
                   "thinking": "...", "hang_s": 30}
        script: behaviours for the next requests, in order, then "ok".
        behaviours: ok | tool_use | 400 | too_long | 401 | 429 | 500 | 529 | hang | break_mid | truncate | error_event
                    | stall | raw
        (tool_use: a call of the request's first tool with the answer, a JSON object text, as its input;
        break_mid: the stream's connection closes after its first text delta; stall: the stream pauses
        hang_s there, silent, then goes on; truncate: the body ends
        there, cleanly, with no message_delta nor message_stop; error_event: the stream
        sends Anthropic's `event: error` overloaded_error after its first text delta; without streaming,
        break_mid and truncate cut the JSON answer half way, tests/mock_server.py `cut_json`)
        thinking: with `thinking` enabled in the request, a thinking block with this text comes first.
    GET  /calls     {"count": N, "bodies": [...], "headers": [...]}
    POST /reset     forget everything
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from mock_server import control_app, cut_json, raw_stream, record, serve  # a sibling: run as a script, tests/ is on sys.path

STATE: dict = {}


def initial_state() -> dict:
    return dict(script=[], answers=["Hello from the mock Anthropic."], cache_read=0, cache_creation=0,
                thinking="Let me think step by step.", hang_s=30.0, raw=[], turn=0)


def words(text: str) -> int:
    return len(text.split())


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append(text_of(block.get("content")))
        elif block.get("type") == "tool_use":
            parts.append(orjson.dumps(block.get("input")).decode())
    return " ".join(parts)


def input_tokens(body: dict) -> int:
    system = body.get("system")
    total = words(system if isinstance(system, str) else text_of(system))
    return total + sum(words(text_of(m.get("content"))) for m in body.get("messages") or [])


def error(status: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message},
                              "request_id": "req_mock"}, status=status, headers=headers)


# the Messages API's request fields: any other is refused
MESSAGES_FIELDS = {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
                   "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
                   "context_management", "output_config", "output_format"}


def refusal(body: dict) -> str | None:
    """What Anthropic's API answers 400 for (the rules litellm must satisfy)."""
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    for key in body:
        if key not in MESSAGES_FIELDS:
            return f"{key}: Extra inputs are not permitted"
    for message in body.get("messages") or []:
        if message.get("role") not in ("user", "assistant"):
            return f"messages: Unexpected role \"{message.get('role')}\""
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`."
        if body.get("temperature") not in (None, 1):
            return "`temperature` may only be set to 1 when thinking is enabled."
        if body.get("top_k") is not None:
            return "`top_k` is not supported when thinking is enabled."
        if body.get("top_p") is not None and not 0.95 <= body["top_p"] <= 1:
            return "`top_p` must be between 0.95 and 1 when thinking is enabled."
        if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        # a tool loop's turn is continued with its thinking: the final assistant turn that called tools
        # must start with the thinking blocks the model wrote before those calls (with their signature)
        assistant = [(i, m) for i, m in enumerate(body.get("messages") or []) if m.get("role") == "assistant"]
        if assistant:
            i, last = assistant[-1]
            blocks = last.get("content") if isinstance(last.get("content"), list) else []
            if any(b.get("type") == "tool_use" for b in blocks) and \
                    blocks[0].get("type") not in ("thinking", "redacted_thinking"):
                return (f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                        f"`{blocks[0].get('type')}`. When `thinking` is enabled, a final `assistant` message must "
                        "start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` "
                        "blocks).")
    return None


def next_answer() -> str:
    STATE["turn"] += 1
    return STATE["answers"][(STATE["turn"] - 1) % len(STATE["answers"])]


async def messages(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    record(STATE, bodies=body, headers=dict(request.headers))
    behaviour = STATE["script"].pop(0) if STATE["script"] else "ok"
    if behaviour == "raw":  # a stream written byte for byte as the test says (tests/mock_server.py)
        return await raw_stream(request, STATE["raw"])
    if behaviour == "400" or (problem := refusal(body)):
        return error(400, "invalid_request_error", "mock refused the request" if behaviour == "400" else problem)
    if behaviour == "too_long":
        return error(400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum")
    if behaviour == "401":
        return error(401, "authentication_error", "invalid x-api-key")
    if behaviour == "429":
        return error(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                     {"retry-after": "7"})
    if behaviour == "500":
        return error(500, "api_error", "Internal server error")
    if behaviour == "529":
        return error(529, "overloaded_error", "Overloaded")
    if behaviour == "hang":
        await asyncio.sleep(STATE["hang_s"])
    answer = next_answer()
    blocks: list[dict] = []
    if (body.get("thinking") or {}).get("type") in ("enabled", "adaptive") and STATE["thinking"]:
        blocks.append({"type": "thinking", "thinking": STATE["thinking"], "signature": "sig-mock"})
    if behaviour == "tool_use":
        tool = (body.get("tools") or [{"name": "f"}])[0]["name"]
        blocks.append({"type": "tool_use", "id": f"toolu_mock_{STATE['count']}", "name": tool,
                       "input": orjson.loads(answer)})
        stop_reason = "tool_use"
    else:
        text = answer
        if words(text) > body["max_tokens"]:
            text, stop_reason = " ".join(text.split()[:body["max_tokens"]]), "max_tokens"
        else:
            stop_reason = "end_turn"
        blocks.append({"type": "text", "text": text})
    output = sum(words(b.get("text") or b.get("thinking") or "") for b in blocks) + sum(
        len(orjson.dumps(b["input"])) // 4 for b in blocks if b["type"] == "tool_use")
    usage = {"input_tokens": input_tokens(body), "output_tokens": output,
             "cache_read_input_tokens": STATE["cache_read"], "cache_creation_input_tokens": STATE["cache_creation"]}
    message = {"id": f"msg_mock_{STATE['count']}", "type": "message", "role": "assistant",
               "model": body.get("model"), "content": blocks, "stop_reason": stop_reason, "stop_sequence": None,
               "usage": usage}
    if not body.get("stream"):
        if behaviour in ("truncate", "break_mid"):
            return await cut_json(request, message, behaviour)
        return web.json_response(message)
    return await stream(request, message, behaviour)


async def stream(request: web.Request, message: dict, behaviour: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def send(kind: str, data: dict) -> None:
        await response.write(f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **data}) + b"\n\n")

    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    await send("message_start", {"message": start})
    await send("ping", {})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            await send("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
            for i, piece in enumerate(block["text"].split(" ")):
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "text_delta", "text": piece if i == 0 else " " + piece}})
                if i == 0 and behaviour == "break_mid":
                    request.transport.close()
                    return response
                if i == 0 and behaviour == "stall":
                    await asyncio.sleep(STATE["hang_s"])
                if i == 0 and behaviour == "truncate":
                    await response.write_eof()  # a clean end of the body, but no message_stop
                    return response
                if i == 0 and behaviour == "error_event":
                    await send("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                    await response.write_eof()
                    return response
        elif block["type"] == "thinking":
            await send("content_block_start", {"index": index, "content_block": {"type": "thinking", "thinking": ""}})
            await send("content_block_delta", {"index": index, "delta": {"type": "thinking_delta",
                                                                         "thinking": block["thinking"]}})
            await send("content_block_delta", {"index": index, "delta": {"type": "signature_delta",
                                                                         "signature": block["signature"]}})
        else:  # tool_use: the input as JSON text in pieces
            await send("content_block_start", {"index": index, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
            arguments = orjson.dumps(block["input"]).decode()
            for at in range(0, len(arguments), 5):
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": arguments[at:at + 5]}})
        await send("content_block_stop", {"index": index})
    await send("message_delta", {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                 "usage": {"output_tokens": usage["output_tokens"]}})
    await send("message_stop", {})
    await response.write_eof()
    return response


def make_app() -> web.Application:
    app = control_app(STATE, initial_state, recorded=("bodies", "headers"),
                      settable=("raw", "script", "answers", "cache_read", "cache_creation", "thinking", "hang_s"))
    app.router.add_post("/v1/messages", messages)
    return app


if __name__ == "__main__":
    serve(make_app())
