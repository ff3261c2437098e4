"""A real HTTP server on loopback that speaks the Gemini API (Google AI Studio's `generateContent`), for
backends called through litellm as `model: gemini/gemini-2.5-flash` with `api_base` here.

Run: `python tests/mock_gemini.py --port P`. `POST /v1beta/models/{model}:generateContent` and
`:streamGenerateContent?alt=sse` answer as Gemini does (candidates of content parts, thought parts
when `includeThoughts`, functionCall parts, usageMetadata with promptTokenCount, candidatesTokenCount,
thoughtsTokenCount, cachedContentTokenCount and totalTokenCount; a stream is `data:` events, each a
GenerateContentResponse, with no end marker), with exact usage (1 token per whitespace-separated word
of the contents' and systemInstruction's text; tools and responseSchema 1 per 4 characters of their
JSON). It takes fields by their proto names too (`system_instruction`), and refuses what Gemini
refuses with its 400 INVALID_ARGUMENT: a field the API does not have, a role other than user/model,
no API key, a thinkingBudget the model does not take (0 on 2.5 Pro, above 24576 on Flash or 32768
on Pro), a candidateCount over 8.

Thinking: a 2.5 model thinks unless its thinkingBudget is 0 (Flash thinks by default): the thought
(the `thinking` text, cut to the budget) is billed as thoughtsTokenCount, and counts against
maxOutputTokens as Gemini counts it; its text is sent only with `includeThoughts`.

    POST /control {"script": [...], "answers": [...], "cached": 0, "thinking": "...", "hang_s": 30}
        script: behaviours for the next requests, in order, then "ok".
        behaviours: ok | function_call | 400 | too_long | bad_key | 429 | 500 | 503 | hang | break_mid | truncate | raw
                    | truncate_at_start | blocked
        (function_call: a call of the request's first function with the answer, a JSON object text,
        as its args; break_mid: the stream's connection closes after its first chunk; truncate: the
        body ends there, cleanly, with no finishReason and no final usage; truncate_at_start: the
        stream's body ends before its first chunk; without streaming, break_mid and truncate cut the
        JSON answer half way, tests/mock_server.py `cut_json`; blocked: the prompt is blocked, as Gemini's
        safety filters answer one, a 200 with promptFeedback's blockReason and no candidates, a stream's
        one event)
    GET  /calls     {"count": N, "bodies": [...], "paths": [...], "headers": [...]}
    POST /reset     forget everything
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from mock_server import control_app, cut_json, raw_stream, record, serve  # a sibling: run as a script, tests/ is on sys.path

STATE: dict = {}

REQUEST_FIELDS = {"contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig",
                  "cachedContent"}
GENERATION_FIELDS = {"stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
                     "_responseJsonSchema", "responseModalities", "candidateCount", "maxOutputTokens", "temperature",
                     "topP", "topK", "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
                     "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "mediaResolution"}
THINKING_FIELDS = {"includeThoughts", "thinkingBudget", "thinkingLevel"}


def camel(name: str) -> str:
    """Gemini's JSON takes a field by its proto name too (`system_instruction`, `generation_config`)."""
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def camel_keys(value: dict | None, nested: tuple[str, ...] = ()) -> dict:
    """The object's keys (and those of its `nested` objects) as lowerCamelCase."""
    out = {camel(k): v for k, v in (value or {}).items()}
    for key in nested:
        if isinstance(out.get(key), dict):
            out[key] = camel_keys(out[key])
    return out


def normalized(body: dict) -> dict:
    body = camel_keys(body)
    body["generationConfig"] = camel_keys(body.get("generationConfig"), ("thinkingConfig",))
    body["contents"] = [{**content, "parts": [camel_keys(p) for p in content.get("parts") or []]}
                        for content in body.get("contents") or []]
    if isinstance(body.get("systemInstruction"), dict):
        body["systemInstruction"] = {**body["systemInstruction"], "parts": [
            camel_keys(p) for p in body["systemInstruction"].get("parts") or []]}
    body["tools"] = [camel_keys(tool) for tool in body.get("tools") or []]
    return body


def initial_state() -> dict:
    return dict(script=[], answers=["Hello from the mock Gemini."], cached=0,
                thinking="Let me think this through step by step before answering.", hang_s=30.0, turn=0,
                raw=[])


def words(text: str) -> int:
    return len(text.split())


def text_of(content: dict | None) -> str:
    parts = []
    for part in (content or {}).get("parts") or []:
        if "text" in part:
            parts.append(part["text"])
        for key in ("functionCall", "functionResponse"):
            if key in part:
                parts.append(orjson.dumps(part[key]).decode())
    return " ".join(parts)


def prompt_tokens(body: dict) -> int:
    total = words(text_of(body.get("systemInstruction")))
    total += sum(words(text_of(c)) for c in body.get("contents") or [])
    config = body.get("generationConfig") or {}
    for value in (body.get("tools"), config.get("responseSchema"), config.get("responseJsonSchema")):
        if value:
            total += len(orjson.dumps(value)) // 4
    return total


def error(status: int, kind: str, message: str, details: list | None = None) -> web.Response:
    """Google's error body, pretty-printed as Google's servers print it (no Retry-After header: a
    429's wait is its RetryInfo's retryDelay)."""
    body = {"error": {"code": status, "message": message, "status": kind, **({"details": details} if details else {})}}
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


def refusal(model: str, body: dict, key: str | None) -> str | None:
    """What Gemini's API answers 400 INVALID_ARGUMENT for (the rules litellm must satisfy)."""
    if not key:
        return "API key not valid. Please pass a valid API key."
    for name in body:
        if name not in REQUEST_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
    config = body.get("generationConfig") or {}
    for name in config:
        if name not in GENERATION_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}" at \'generation_config\': Cannot find field.'
    for name in config.get("thinkingConfig") or {}:
        if name not in THINKING_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}" at \'generation_config.thinking_config\'.'
    for content in body.get("contents") or []:
        if content.get("role") not in ("user", "model", "function", None):
            return f"Please use a valid role: user, model. Got {content.get('role')!r}."
    if not body.get("contents"):
        return "* GenerateContentRequest.contents: contents is not specified"
    budget = (config.get("thinkingConfig") or {}).get("thinkingBudget")
    if budget is not None:
        if "pro" in model and budget == 0:
            return "Budget 0 is invalid. This model only works in thinking mode."
        top = 32768 if "pro" in model else 24576
        if budget != -1 and not 0 <= budget <= top:
            return f"The thinking budget {budget} is invalid. Please choose a value between 0 and {top}."
    if not 1 <= int(config.get("candidateCount") or 1) <= 8:
        return "* GenerateContentRequest.generation_config.candidate_count: must be in [1, 8]"
    return None


def next_answer() -> str:
    STATE["turn"] += 1
    return STATE["answers"][(STATE["turn"] - 1) % len(STATE["answers"])]


def thought_words(model: str, config: dict) -> int:
    """Tokens the model thinks: the mock's thinking text, cut to the thinkingBudget; none at 0."""
    budget = (config.get("thinkingConfig") or {}).get("thinkingBudget")
    if budget == 0 or not STATE["thinking"] or "2.5" not in model:
        return 0
    thought = words(STATE["thinking"])
    return thought if budget in (None, -1) else min(thought, budget)


def candidate(body: dict, index: int, behaviour: str, thoughts: int, limit: int | None) -> tuple[dict, int]:
    """One candidate and its billed output tokens (not counting thoughts)."""
    answer = next_answer()
    parts: list[dict] = []
    config = body.get("generationConfig") or {}
    if thoughts and (config.get("thinkingConfig") or {}).get("includeThoughts"):
        parts.append({"text": " ".join(STATE["thinking"].split()[:thoughts]), "thought": True})
    if behaviour == "function_call":
        declarations = [d for tool in body.get("tools") or [] for d in tool.get("functionDeclarations") or []]
        name = declarations[0]["name"] if declarations else "f"
        call = {"name": name, "args": orjson.loads(answer)}
        parts.append({"functionCall": call, "thoughtSignature": "c2lnLW1vY2s="})
        return {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": index}, \
            1 + len(orjson.dumps(call["args"])) // 4
    finish = "STOP"
    room = None if limit is None else max(0, limit - thoughts)
    if room is not None and words(answer) > room:
        answer, finish = " ".join(answer.split()[:room]), "MAX_TOKENS"
    if answer:
        parts.append({"text": answer})
    return {"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": index}, words(answer)


async def generate(request: web.Request) -> web.StreamResponse:
    model, _, method = request.match_info["target"].partition(":")
    body = normalized(orjson.loads(await request.read()))
    record(STATE, bodies=body, paths=request.path_qs, headers=dict(request.headers))
    behaviour = STATE["script"].pop(0) if STATE["script"] else "ok"
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if behaviour == "raw":  # a stream written byte for byte as the test says (tests/mock_server.py)
        return await raw_stream(request, STATE["raw"])
    if behaviour == "bad_key":
        return error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    if behaviour == "400" or (problem := refusal(model, body, key)):
        return error(400, "INVALID_ARGUMENT", "mock refused the request" if behaviour == "400" else problem)
    if behaviour == "too_long":
        return error(400, "INVALID_ARGUMENT",
                     "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).")
    if behaviour == "429":
        return error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and "
                     "billing details.", [
                         {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                             {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                              "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                         {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}])
    if behaviour == "500":
        return error(500, "INTERNAL", "An internal error has occurred. Please retry or report in "
                     "https://developers.generativeai.google/guide/troubleshooting")
    if behaviour == "503":
        return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    if behaviour == "hang":
        await asyncio.sleep(STATE["hang_s"])
    if behaviour == "blocked":
        prompt = prompt_tokens(body)
        answer = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "modelVersion": model,
                  "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt}}
        if method == "generateContent":
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + orjson.dumps(answer) + b"\r\n\r\n")
        await response.write_eof()
        return response
    config = body.get("generationConfig") or {}
    limit = config.get("maxOutputTokens")
    thoughts = thought_words(model, config)
    if limit is not None:
        thoughts = min(thoughts, limit)
    candidates, output = [], 0
    for index in range(int(config.get("candidateCount") or 1)):
        one, tokens = candidate(body, index, behaviour, thoughts, limit)
        candidates.append(one)
        output += tokens
    prompt = prompt_tokens(body)
    total_thoughts = thoughts * len(candidates)
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": output,
             "totalTokenCount": prompt + output + total_thoughts,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    if total_thoughts:
        usage["thoughtsTokenCount"] = total_thoughts
    if STATE["cached"]:
        usage["cachedContentTokenCount"] = STATE["cached"]
    answer = {"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
              "responseId": f"mock-{STATE['count']}"}
    if method == "generateContent":
        if behaviour in ("truncate", "break_mid"):
            return await cut_json(request, answer, behaviour)
        return web.json_response(answer)
    return await stream(request, answer, behaviour)


async def stream(request: web.Request, answer: dict, behaviour: str) -> web.StreamResponse:
    """As Gemini streams: each event a GenerateContentResponse with the next parts; the last has the
    finishReason and the whole usage; the body then ends (no [DONE])."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    usage = answer["usageMetadata"]
    early_usage = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
    if behaviour == "truncate_at_start":
        await response.write_eof()
        return response
    chunks = []
    for one in answer["candidates"]:
        parts = one["content"]["parts"]
        pieces = []
        for part in parts:
            if "text" in part and not part.get("thought"):
                text = part["text"].split(" ")
                pieces += [{"text": w if i == 0 else " " + w} for i, w in enumerate(text)]
            else:
                pieces.append(part)
        for i, piece in enumerate(pieces or [{"text": ""}]):
            last = i == len(pieces or [{}]) - 1
            candidate = {"content": {"parts": [piece], "role": "model"}, "index": one["index"]}
            if last:
                candidate["finishReason"] = one["finishReason"]
            chunks.append(candidate)
    for i, candidate in enumerate(chunks):
        last = i == len(chunks) - 1
        event = {"candidates": [candidate], "usageMetadata": usage if last else early_usage,
                 "modelVersion": answer["modelVersion"], "responseId": answer["responseId"]}
        await response.write(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
        if i == 0 and behaviour == "break_mid":
            request.transport.close()
            return response
        if i == 0 and behaviour == "truncate":
            await response.write_eof()
            return response
    await response.write_eof()
    return response


def make_app() -> web.Application:
    app = control_app(STATE, initial_state, recorded=("bodies", "paths", "headers"),
                      settable=("raw", "script", "answers", "cached", "thinking", "hang_s"))
    app.router.add_post("/v1beta/models/{target}", generate)
    return app


if __name__ == "__main__":
    serve(make_app())
