"""A real HTTP server on loopback that speaks Amazon Bedrock's InvokeModel for Titan Text Embeddings V2,
for backends called through litellm as `model: bedrock/amazon.titan-embed-text-v2:0` with `api_base`
here (any AWS credentials: the signature is not checked).

Run: `python tests/mock_bedrock.py --port P`. `POST /model/{model}/invoke` with `{"inputText", "dimensions",
"embeddingTypes"}` answers as Titan does: `embedding` (floats), `embeddingsByType` with the types asked
for (`float`, and `binary`: one 0 or 1 a dimension, 1 where the float is positive), and
`inputTextTokenCount` (1 per whitespace-separated word); an `inputText` that is no text (token ids) is
Bedrock's 400 ValidationException. The floats are the mock upstream's vector of
the text (tests/mock_upstream.py `embedding_vector`, centred on 0 so that `binary` differs from them).

`POST /model/{model}/converse-stream` streams Converse's events (AWS's binary event stream) for chat:
the `answer` a word a delta, then messageStop and metadata with the usage.

    POST /control   {"script": [...], "answer": "..."}: converse-stream behaviours for the next requests,
                    then "ok"; `truncate`: the body ends cleanly after the first delta, with no messageStop
    GET  /calls     {"count": N, "bodies": [...]}
    POST /reset     forget everything
"""

from __future__ import annotations

import struct
import zlib

import orjson
from aiohttp import web

from mock_server import control_app, record, serve  # a sibling: run as a script, tests/ is on sys.path
from mock_upstream import embedding_vector

STATE: dict = {}


def titan_vector(text: str, dimensions: int) -> list[float]:
    return [v - 0.5 for v in embedding_vector(text, dimensions)]


async def invoke(request: web.Request) -> web.Response:
    body = await request.json()
    record(STATE, bodies=body)
    if not isinstance(body.get("inputText"), str) or not body["inputText"]:  # Bedrock's answer to such a body
        return web.json_response({"message": "Malformed input request: #/inputText: expected a non-empty string"},
                                 status=400, headers={"x-amzn-ErrorType": "ValidationException"})
    vector = titan_vector(body["inputText"], body.get("dimensions", 8))
    kinds = {"float": vector, "binary": [int(v > 0) for v in vector]}
    by_type = {kind: kinds[kind] for kind in body.get("embeddingTypes") or ["float"]}
    return web.json_response({"embedding": vector, "embeddingsByType": by_type,
                              "inputTextTokenCount": len(body["inputText"].split())})


def event_message(kind: str, payload: dict) -> bytes:
    """One message of AWS's event stream (application/vnd.amazon.eventstream): a prelude (total and
    headers length, its CRC32), string headers, the JSON payload, the message's CRC32."""
    headers = b"".join(bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value for name, value in (
        (b":event-type", kind.encode()), (b":content-type", b"application/json"), (b":message-type", b"event")))
    body = orjson.dumps(payload)
    prelude = struct.pack(">II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


async def converse_stream(request: web.Request) -> web.StreamResponse:
    """Converse's stream: messageStart, one contentBlockDelta a word, contentBlockStop, messageStop with
    its stopReason, metadata with the usage. `truncate`: the body ends cleanly after the first delta."""
    body = await request.json()
    record(STATE, bodies=body)
    behaviour = STATE["script"].pop(0) if STATE["script"] else "ok"
    words = STATE["answer"].split(" ")
    response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
    await response.prepare(request)
    await response.write(event_message("messageStart", {"role": "assistant"}))
    for i, word in enumerate(words):
        await response.write(event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {
            "text": word if i == 0 else " " + word}}))
        if behaviour == "truncate":
            await response.write_eof()
            return response
    await response.write(event_message("contentBlockStop", {"contentBlockIndex": 0}))
    await response.write(event_message("messageStop", {"stopReason": "end_turn"}))
    await response.write(event_message("metadata", {"usage": {"inputTokens": 3, "outputTokens": len(words),
                                                              "totalTokens": 3 + len(words)},
                                                    "metrics": {"latencyMs": 1}}))
    await response.write_eof()
    return response


def make_app() -> web.Application:
    app = control_app(STATE, lambda: {"script": [], "answer": "Hello from the mock Bedrock."},
                      settable=("script", "answer"), recorded=("bodies",))
    app.router.add_post("/model/{model}/invoke", invoke)
    app.router.add_post("/model/{model}/converse-stream", converse_stream)
    return app


if __name__ == "__main__":
    serve(make_app())
