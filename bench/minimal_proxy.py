"""The floor for a Python proxy: a Starlette pass-through with nothing but forwarding.

Same server settings as `ponder serve` (uvicorn, uvloop, httptools, no access log) and one shared
aiohttp session, so the difference between this and Ponder is what Ponder's own work costs
(parsing, classification, the decision, accounting, telemetry), not the choice of stack.

Run:  python bench/minimal_proxy.py --port P --upstream http://127.0.0.1:U/v1
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    url = upstream.rstrip("/") + "/chat/completions"
    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=256))
        yield
        await state["session"].close()

    async def chat(request: Request) -> Response:
        body = await request.body()
        headers = {"Content-Type": "application/json"}
        upstream_response = await state["session"].post(url, data=body, headers=headers)
        if upstream_response.headers.get("Content-Type", "").startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream_response.content.iter_any():
                        yield chunk
                finally:
                    upstream_response.release()

            return StreamingResponse(relay(), upstream_response.status, media_type="text/event-stream")
        data = await upstream_response.read()
        return Response(data, upstream_response.status, media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"ok": true}', media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/healthz", health, methods=["GET"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
