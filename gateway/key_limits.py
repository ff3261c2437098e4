"""Per-key request limits: `max_requests_in_flight` (concurrency) and `requests_per_minute` (a token
bucket) of an `api_keys` entry, so that one key cannot fill every slot of the process and starve the
others. Past either: a 429 in the OpenAI schema (`type: requests`, `code: rate_limit_exceeded`).

Checked by the handlers right after authentication, before the body is read or anything is planned,
so a refused request is neither recorded nor billed nor held against a budget. Counted per process,
as load shedding is (gateway/shedding.py): with N replicas a key gets N times its limits.

A request's slot is taken by `KeyLimits.admit` and given back by the `KeySlots` middleware as its
answer's last byte is sent, or when the app returns without one (a client gone, an error), exactly
once. The keys' ids are what is limited: an id's keys (a rotation) share its limits, as they share
its budget.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ApiKey
from gateway.errors import ApiError, retry_after
from gateway.metrics import Metrics
from gateway.shedding import RETRY_AFTER_MS, SHED_PATHS

# Where the request's admission lives between the middleware and the handler.
SCOPE_KEY = "ponder.key_admission"
RATE_LIMITED = {"type": "requests", "code": "rate_limit_exceeded"}  # OpenAI's 429 for a requests limit


@dataclass(slots=True)
class KeyLimit:
    """One key id's limits and counts (requests_per_minute: a bucket of that many tokens, refilled
    continuously: a burst of a minute's worth, then one every 60/rpm s)."""

    key_id: str
    max_in_flight: int | None
    per_minute: int | None
    on_refused: Callable[[str, str], None]  # told (key id, the limit's config name) of each refusal
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = float(self.per_minute or 0)
        self.refilled_at = self.clock()

    def _refill(self, now: float) -> None:
        assert self.per_minute is not None
        self.tokens = min(float(self.per_minute), self.tokens + (now - self.refilled_at) * self.per_minute / 60.0)
        self.refilled_at = now

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-*-requests: the bucket's size, its whole tokens left, and the time until it
        is full again. Only for a requests_per_minute limit (a concurrency limit has no window to tell)."""
        if self.per_minute is None:
            return {}
        missing_s = (self.per_minute - self.tokens) * 60.0 / self.per_minute
        return {"x-ratelimit-limit-requests": str(self.per_minute),
                "x-ratelimit-remaining-requests": str(math.floor(self.tokens)),
                "x-ratelimit-reset-requests": duration(missing_s)}

    def take(self) -> dict[str, str]:
        """Admit one request (a slot and a token) and return its x-ratelimit headers, or raise the 429."""
        now = self.clock()
        if self.per_minute is not None:
            self._refill(now)
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            raise self._refused("max_requests_in_flight", f"requests in flight (max_requests_in_flight): limit "
                                f"{self.max_in_flight}, in flight {self.in_flight}; send it again when one of "
                                "them has finished", random.randint(*RETRY_AFTER_MS) / 1000)
        if self.per_minute is not None:
            if self.tokens < 1.0:
                wait_s = (1.0 - self.tokens) * 60.0 / self.per_minute
                raise self._refused("requests_per_minute", f"requests per minute (requests_per_minute): limit "
                                    f"{self.per_minute}; try again in {duration(wait_s)}", wait_s)
            self.tokens -= 1.0
        if self.max_in_flight is not None:
            self.in_flight += 1
        return self.headers()

    def _refused(self, limit: str, said: str, wait_s: float) -> ApiError:
        self.on_refused(self.key_id, limit)
        waits = {**retry_after(wait_s), "retry-after-ms": str(math.ceil(wait_s * 1000))}
        return ApiError(429, f"Rate limit reached for key `{self.key_id}` on {said}.", **RATE_LIMITED,
                        headers={**self.headers(), **waits})


def duration(seconds: float) -> str:
    """As OpenAI writes x-ratelimit-reset-*: `120ms`, `8.64s`, `6m0s`."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


@dataclass(slots=True)
class Admission:
    """One request's standing with its key's limits: the slot it holds (given back once) and the headers
    its answer carries."""

    limit: KeyLimit | None = None
    holds_slot: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def release(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            assert self.limit is not None
            self.limit.in_flight -= 1


class KeyLimits:
    def __init__(self, keys: list[ApiKey], metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_id = {key.id: KeyLimit(key.id, key.max_requests_in_flight, key.requests_per_minute,
                                        metrics.key_limited, clock)
                       for key in keys
                       if key.max_requests_in_flight is not None or key.requests_per_minute is not None}
        for limit in self._by_id.values():  # exported as 0 from the start: alerts need the series before a refusal
            for name, value in (("max_requests_in_flight", limit.max_in_flight),
                                ("requests_per_minute", limit.per_minute)):
                if value is not None:
                    metrics.rate_limited.labels(limit.key_id, name)

    @property
    def enabled(self) -> bool:
        return bool(self._by_id)

    def admit(self, key_id: str, scope: Any) -> None:
        """Count the request against its key's limits, or raise the 429. A key without limits: one dict
        lookup. The slot is given back by the KeySlots middleware (its Admission in the scope)."""
        limit = self._by_id.get(key_id)
        if limit is None:
            return
        headers = limit.take()
        admission = scope.get(SCOPE_KEY) or Admission()
        admission.limit, admission.holds_slot = limit, limit.max_in_flight is not None
        admission.headers = [(name.encode(), value.encode()) for name, value in headers.items()]
        if SCOPE_KEY not in scope:  # not under KeySlots (no path of its): nothing would give the slot back
            admission.release()


class KeySlots:
    """Pure ASGI middleware on the model paths (those load shedding counts): gives a request's key slot
    back at its answer's last byte or when the app returns, and puts its key's x-ratelimit headers on its
    answer. Installed only where some key has limits."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in SHED_PATHS:
            return await self.app(scope, receive, send)
        admission = scope[SCOPE_KEY] = Admission()

        async def with_limit_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and admission.headers:
                message = {**message, "headers": [*message.get("headers", ()), *admission.headers]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # given back before the last byte goes: a client that sends its next request as soon as its
                # answer has ended must find the slot free (the request still settles in the background)
                admission.release()
            await send(message)

        try:
            await self.app(scope, receive, with_limit_headers)
        finally:
            admission.release()
