"""A real HTTP server on loopback that speaks Amazon Bedrock's InvokeModel for Titan Text Embeddings V2,
for backends called through litellm as `model: bedrock/amazon.titan-embed-text-v2:0` with `api_base`
here (any AWS credentials: the signature is not checked).

Run: `python tests/mock_bedrock.py --port P`. `POST /model/{model}/invoke` with `{"inputText", "dimensions",
"embeddingTypes"}` answers as Titan does: `embedding` (floats), `embeddingsByType` with the types asked
for (`float`, and `binary`: one 0 or 1 a dimension, 1 where the float is positive), and
`inputTextTokenCount` (1 per whitespace-separated word); an `inputText` that is no text (token ids) is
Bedrock's 400 ValidationException. The floats are the mock upstream's vector of
the text (tests/mock_upstream.py `embedding_vector`, centred on 0 so that `binary` differs from them).

    GET  /calls     {"count": N, "bodies": [...]}
    POST /reset     forget everything
"""

from __future__ import annotations

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


def make_app() -> web.Application:
    app = control_app(STATE, dict, settable=(), recorded=("bodies",))
    app.router.add_post("/model/{model}/invoke", invoke)
    return app


if __name__ == "__main__":
    serve(make_app())
