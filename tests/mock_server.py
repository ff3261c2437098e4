"""What the mock servers (tests/mock_upstream.py, mock_anthropic.py, mock_gemini.py) share besides the
API each imitates: a test's handles on the mock's state, and running it on a loopback port.

    POST /control {...}   sets the state keys the mock names as settable (the others are ignored)
    GET  /calls           {"count": N, and each recorded list: the last 200 requests' bodies, ...}
    POST /reset           the state as the mock started, nothing recorded

Each mock's `raw` behaviour (raw_stream) answers a 200 text/event-stream written byte for byte as a test says.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import orjson
from aiohttp import web

KEPT_CALLS = 200  # the latest requests each /calls list keeps


def record(state: dict, **seen) -> None:
    """Count a request and keep what it sent (`bodies=body`, `headers=...`) for /calls."""
    state["count"] += 1
    for key, value in seen.items():
        state[key] = (state[key] + [value])[-KEPT_CALLS:]


def control_app(state: dict, initial: Callable[[], dict], settable: tuple[str, ...],
                recorded: tuple[str, ...]) -> web.Application:
    """An app serving /control, /calls and /reset over `state` (reset to `initial()`, a fresh dict each
    time, with the count and the `recorded` lists emptied); the mock adds its API's routes."""
    def reset() -> None:
        state.clear()
        state.update(initial(), count=0, **{key: [] for key in recorded})

    async def control(request: web.Request) -> web.Response:
        update = await request.json()
        state.update({key: update[key] for key in settable if key in update})
        return web.json_response({"ok": True})

    async def calls(request: web.Request) -> web.Response:
        return web.json_response({"count": state["count"], **{key: state[key] for key in recorded}})

    async def do_reset(request: web.Request) -> web.Response:
        reset()
        return web.json_response({"ok": True})

    reset()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/control", control)
    app.router.add_get("/calls", calls)
    app.router.add_post("/reset", do_reset)
    return app


def serve(app: web.Application) -> None:
    """Run the mock as tests/servers.py starts it: `python tests/mock_X.py --port P`, on 127.0.0.1."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, print=None, access_log=None)


async def cut_json(request: web.Request, answer: dict, behaviour: str) -> web.StreamResponse:
    """A JSON answer whose body stops half way: `truncate` ends it cleanly there (a chunked body's last
    chunk), `break_mid` closes the connection short of its Content-Length."""
    body = orjson.dumps(answer)
    half = body[:len(body) // 2]
    if behaviour == "truncate":
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(half)
        await response.write_eof()
        return response
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(half)
    request.transport.close()
    return response


async def raw_stream(request: web.Request, pieces: list) -> web.StreamResponse:
    """A 200 text/event-stream whose body is `pieces`: hex strings, each sent as one write, and numbers,
    seconds to sleep between them (a test says byte for byte how an upstream writes its stream)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in pieces:
        if isinstance(piece, (int, float)):
            await asyncio.sleep(piece)
        else:
            await response.write(bytes.fromhex(piece))
    await response.write_eof()
    return response
