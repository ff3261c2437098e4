"""Load shedding: past `max_requests_in_flight` model requests in this process, answer 503 at once.

Past its capacity a server that takes every request only queues them: each waits longer for the CPU,
p99 grows without bound, and once the queue of connections outgrows the listen backlog the kernel
resets new ones (the client sees a connection error, not an answer). Refusing the excess early, in
the OpenAI schema with Retry-After, costs a few µs and keeps the answers that are served fast; the
openai SDKs retry a 503 after the wait it names.

Only the endpoints that plan or call a backend are counted and shed: health, readiness, metrics, the
dashboard and its admin API, models and feedback always pass, so an overloaded process still reports
its state and still learns. A request holds its slot until the app returns (a stream: after its last
byte and its settling), however it ends: answer, error, client gone or cancelled.

The count cannot see requests still waiting for a CPU-starved event loop; `lag` (gateway/loop_lag.py)
can, and while it says the loop is late new requests are shed the same way. Admitted ones finish.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from gateway.errors import ApiError, retry_after
from gateway.loop_lag import EventLoopLag
from gateway.metrics import Metrics

# The paths that do model work (chat and responses plan, classify and call; embeddings call), all POST:
# another method on them does none (the router answers it 405), so it is neither counted nor shed.
SHED_PATHS = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/embeddings"})
RETRY_AFTER_S = 1.0
# retry-after-ms, which the openai SDKs prefer to Retry-After and wait exactly: spread over a second so
# the clients shed together do not all come back in the same millisecond.
RETRY_AFTER_MS = (500, 1500)
LOG_EVERY_S = 10.0  # shedding is said in the log at once, then at most this often, with how many

log = logging.getLogger("ponder.shedding")


class LoadShedding:
    """Pure ASGI middleware (uvicorn's `limit_concurrency` answers plain text and counts every path).
    A `limit` of 0 sheds nothing and still counts: the in-flight gauge is the operators' view either way."""

    def __init__(self, app: Any, limit: int, metrics: Metrics, lag: EventLoopLag | None = None) -> None:
        self.app = app
        self.limit = limit
        self.lag = lag
        self.metrics = metrics
        self.in_flight = 0
        self._gauge = metrics.in_flight
        for path in SHED_PATHS:  # exported as 0 from the start: alerts and rate() need the series before any shed
            for reason in ("in_flight", "event_loop_lag"):
                metrics.shed_requests.labels(path, reason)
        self._unlogged = 0  # shed since the last log line
        self._logged_at = float("-inf")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in SHED_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.limit and self.in_flight >= self.limit:  # 0: no limit, but the count is still kept
            return await self._shed(scope, receive, send)
        if self.lag is not None and self.lag.overloaded:
            return await self._shed_for_lag(scope, receive, send)
        self.in_flight += 1
        self._gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self._gauge.dec()

    async def _shed(self, scope: Any, receive: Any, send: Any) -> None:
        """Refused before its body is read (uvicorn drops the unread rest and keeps the connection)."""
        self.metrics.shed(scope["path"])
        self._unlogged += 1
        if (now := time.monotonic()) - self._logged_at >= LOG_EVERY_S:
            log.warning("overloaded: %d request(s) answered 503 at max_requests_in_flight (%d) since the last report; "
                        "raise it if this process has CPU to spare (its upstreams are slow), else add processes",
                        self._unlogged, self.limit)
            self._unlogged, self._logged_at = 0, now
        await overloaded(f"The gateway is at its limit of {self.limit} requests in flight and cannot serve this "
                         "one in time; send it again after the time in Retry-After.")(scope, receive, send)

    async def _shed_for_lag(self, scope: Any, receive: Any, send: Any) -> None:
        """As `_shed`; loop_lag logs when this starts and stops."""
        self.metrics.shed(scope["path"], "event_loop_lag")
        await overloaded(f"The gateway is busier than it can serve in time (its event loop runs "
                         f"{self.lag.lag_s * 1000:.0f} ms late); send it again after the time in Retry-After."
                         )(scope, receive, send)


def overloaded(message: str) -> Any:
    """The 503 `overloaded` answer (an ASGI app), with the waits the openai SDKs read."""
    return ApiError(503, message, code="overloaded", headers={
        **retry_after(RETRY_AFTER_S), "retry-after-ms": str(random.randint(*RETRY_AFTER_MS))}).response()
