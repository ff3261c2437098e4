"""A deliberately minimal OpenAI-compatible upstream for benchmarks: raw asyncio protocol on uvloop.

The overhead benchmark must measure the proxies, not the mock behind them, so this server does no
JSON parsing and no routing beyond the request line: every POST gets the same pre-encoded
chat.completion (or, if the body asks for `"stream": true`, the same pre-encoded SSE stream of
`--chunks` chunks, sent as HTTP/1.1 chunked encoding). Keep-alive; any GET answers `{"ok": true}`.

Run:  python bench/fast_upstream.py --port P [--delay-ms D] [--chunks K]
`--delay-ms` holds every completion that long before answering (the fan-out bench uses it); the
server stays concurrent while it waits. A streamed answer has as many content chunks as the request's
`max_tokens` (else `--chunks`), so one server serves short and long streams.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import orjson

ANSWER = "The answer is 42."
STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def _http(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body)


def completion_response() -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": "bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": USAGE}
    return _http("200 OK", orjson.dumps(body))


def stream_frames(chunks: int) -> list[bytes]:
    """The SSE events of one streamed answer, each as one HTTP chunk (so each is one write)."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": "bench"}
    events = []
    for i in range(chunks):
        delta = {"content": f"tok{i} "} if i else {"role": "assistant", "content": "tok0 "}
        events.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**base, "choices": [], "usage": {**USAGE, "completion_tokens": chunks}})
    payloads = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    return [f"{len(p):x}".encode() + b"\r\n" + p + b"\r\n" for p in payloads] + [b"0\r\n\r\n"]


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
HEALTH = _http("200 OK", b'{"ok": true}')


class Upstream(asyncio.Protocol):
    def __init__(self, completion: bytes, frames: dict[int, list[bytes]], chunks: int, delay_s: float) -> None:
        self.completion = completion
        self.frames = frames  # chunk count -> pre-encoded stream, shared by every connection
        self.chunks = chunks
        self.delay_s = delay_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = self.buffer[head_end + 4:end]
            self.buffer = self.buffer[end:]
            self.respond(head.startswith(b"POST"), body)

    def respond(self, is_post: bool, body: bytes) -> None:
        if not is_post:
            self.write([HEALTH])
        elif self.delay_s:
            # Requests on one connection are answered in order, so a delayed answer is never
            # overtaken; concurrent requests come on separate connections and wait in parallel.
            asyncio.get_running_loop().call_later(self.delay_s, self.write, self.payload(body))
        else:
            self.write(self.payload(body))

    def payload(self, body: bytes) -> list[bytes]:
        if STREAM_FLAG.search(body) is None:
            return [self.completion]
        asked = MAX_TOKENS.search(body)
        chunks = min(4096, max(1, int(asked.group(1)))) if asked else self.chunks
        if chunks not in self.frames:
            self.frames[chunks] = stream_frames(chunks)
        return [STREAM_HEAD, *self.frames[chunks]]

    def write(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            for part in parts:  # one write per SSE event, as a real token-by-token server does
                self.transport.write(part)


async def serve(port: int, delay_ms: float, chunks: int) -> None:
    loop = asyncio.get_running_loop()
    completion, frames = completion_response(), {chunks: stream_frames(chunks)}
    server = await loop.create_server(lambda: Upstream(completion, frames, chunks, delay_ms / 1000), "127.0.0.1", port,
                                      backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=32)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.delay_ms, args.chunks))


if __name__ == "__main__":
    main()
