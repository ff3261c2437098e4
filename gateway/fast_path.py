"""The fast path: a backend's calls to an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...) made
directly over the gateway's shared aiohttp connection pool, where litellm's per-call CPU cost (several
ms) would dominate the gateway's overhead. HTTP errors become UpstreamError (gateway/upstream_errors.py).

`FastPath` is that part of gateway/backends.py's Backend (its session, URLs and timeouts are set up there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from gateway.sse import EventTooLarge, read_events
from gateway.upstream_errors import UpstreamError, http_error, out_of_files_error

# One streamed event, at most: a chunk with a whole long answer in it (1 MB of text, JSON-escaped) fits;
# a stream that never ends its event does not hold the gateway's memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class FastPath:
    """Backend's calls over its aiohttp session: chat, streamed chat and embeddings."""

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.spec.api_key_env) if self.spec.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.upstream_model}

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
            raise out_of_files_error(self.name, exc) or UpstreamError(
                self.name, 502, f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(self.name, 502, f"{self.name}: upstream sent invalid JSON", retryable=True) from None

    async def _embed_fast(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post_json(self.embeddings_url, self._payload(body))
        if not isinstance(data, dict):
            raise UpstreamError(self.name, 502, f"{self.name}: upstream answer has no embeddings", retryable=True)
        return data

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
            raise out_of_files_error(self.name, exc) or UpstreamError(
                self.name, 502, f"{self.name}: stream broken: {type(exc).__name__}", retryable=True) from None
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
