"""The telemetry store the gateway writes to and the learner reads from.

Two backends with one contract (`Store`): Redis (shared by gateway replicas, redis_store.py) and an
embedded in-process store persisted to sqlite under the data directory (embedded_store.py).

Hot path contract: `record()` and `snapshot()` are synchronous, never touch the network and never
raise. `record()` appends to a bounded in-memory buffer (dropping the oldest event when full); a
background task writes the buffer in batches. `snapshot()` returns an in-process cache that a second
background task refreshes every `refresh_s`, so every replica converges on the same stats. The only
awaited store calls on a request are the budget `reserve`/`settle` (and only for keys with limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from router.learner import estimated_strength, pooled_stats
from router.types import StatsSnapshot

from .aggregates import arm_stats, event_problem, format_spend, spend_periods, summary_row
from .budgets import BudgetExceeded, Reservation
from .events import Event

__all__ = ["BudgetExceeded", "FeedbackResult", "Reservation", "Store", "open_store"]

log = logging.getLogger("ponder.telemetry")

FeedbackStatus = Literal["accepted", "duplicate", "unknown_request", "expired", "forbidden", "unavailable"]
DEFAULT_FEEDBACK_WINDOW_S = 7 * 86400
DEFAULT_STREAM_MAXLEN = 100_000
BATCH_MAX = 500  # events per pipeline / transaction
MAX_BATCH_FAILURES = 3


FLUSH_LINGER_S = 0.02  # how long a flush waits for more events before writing
FLUSH_BATCH_HINT = 200  # with this many buffered, write at once


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """`unavailable` means the store could not be reached (Redis down): the client may retry."""

    status: FeedbackStatus
    request_id: str
    policy: str | None = None
    bucket: str | None = None
    arm: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


class Store(ABC):
    """What the gateway, the learner, the dashboard and the CLI may call."""

    backend: str

    @abstractmethod
    def record(self, event: Event) -> None:
        """Enqueue one outcome; sync, non-blocking, never raises."""

    @abstractmethod
    def snapshot(self, policy: str) -> StatsSnapshot:
        """bucket -> arm key -> ArmStats from the cache (read-only; replaced wholesale on refresh)."""

    @abstractmethod
    async def feedback(self, request_id: str, score: float, key_id: str | None) -> FeedbackResult:
        """Client feedback in [0, 1] for an earlier request; replaces its automatic success signal."""

    @abstractmethod
    async def reserve(self, key_id: str, amount_usd: float, limits: dict[str, float]) -> Reservation:
        """Atomically check every period's cap and charge `amount_usd`; raises BudgetExceeded."""

    @abstractmethod
    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reserved amount with the actual cost (idempotent)."""

    @abstractmethod
    async def spent(self, key_id: str, periods: Iterable[str] = ("day", "month")) -> dict[str, float]:
        """USD charged to the key in the current period of each of `periods`."""

    @abstractmethod
    async def recent_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, including events still buffered."""

    @abstractmethod
    async def summary(self, policy: str | None = None) -> dict[str, Any]:
        """Dashboard data: per policy/bucket/arm rows, spend by hour, day and key, health."""

    @abstractmethod
    def health(self) -> dict[str, Any]: ...

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Write everything buffered now; True when the buffer is empty afterwards."""

    @abstractmethod
    async def refresh(self) -> None:
        """Reload the snapshot cache now (the background task does it every refresh_s)."""

    @abstractmethod
    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the background tasks and flush what is buffered, within `timeout_s`."""


class BufferedStore(Store):
    """The machinery both backends share: the bounded buffer, the flush and refresh tasks, the cache."""

    # A batch whose write failed (or was cancelled) goes back to the head of the buffer. The embedded
    # store applies a batch to memory before it awaits the disk, so it must not see the batch twice.
    requeue_failed_batches = True

    def __init__(
        self,
        *,
        stream_maxlen: int,
        refresh_s: float,
        buffer_max: int,
        decay_half_life_s: float | None,
        feedback_window_s: float,
    ) -> None:
        self.stream_maxlen = stream_maxlen
        self.refresh_s = refresh_s
        self.buffer_max = buffer_max
        self.half_life_s = decay_half_life_s or None
        self.feedback_window_s = feedback_window_s
        self._buffer: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._started = False
        self._batch_failures = 0
        self._dropping = False  # batches are being dropped (said once, until one is written again)
        # A failed batch goes back to the head of the buffer and is retried as that same batch (not
        # merged into a larger one), so a store can tell a retry of a batch it already wrote.
        self._retry_size = 0
        # policy -> (bucket, arm) -> raw aggregate fields, and the ArmStats built from them
        self._raw: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
        self._cache: dict[str, StatsSnapshot] = {}
        self.recorded = 0
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None  # kept after recovery, with its time, for the dashboard
        self.last_error_ts: float | None = None
        self.last_flush_ts: float | None = None
        self.last_refresh_ts: float | None = None

    # --- hot path ----------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        try:
            if len(self._buffer) >= self.buffer_max:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(event)
            self.recorded += 1
            self._wake.set()
        except Exception as exc:  # never into the request path
            self.dropped += 1
            self.last_error = f"record: {exc!r}"
            self.last_error_ts = time.time()

    def snapshot(self, policy: str) -> StatsSnapshot:
        return self._cache.get(policy, {})

    # --- what a backend provides ---------------------------------------------------------------------

    @abstractmethod
    async def _write_batch(self, batch: list[Event]) -> None:
        """Write one batch; raise to have it put back at the head of the buffer."""

    @abstractmethod
    async def _load_aggregates(self) -> dict[str, dict[tuple[str, str], dict[str, float]]]: ...

    @abstractmethod
    async def _load_spend(self, periods: list[str]) -> dict[str, dict[str, float]]: ...

    async def _ensure_connected(self, force: bool = False) -> bool:
        """False while the backend is unreachable (the loop retries with backoff unless `force`)."""
        return True

    async def _ensure_readable(self) -> bool:
        """What the refresh needs: connected, or a backend that serves reads while it refuses writes."""
        return await self._ensure_connected()

    async def _periodic(self) -> None:
        """Housekeeping on every flush-loop turn (push budget deltas, persist dirty state)."""

    def _loop_timeout(self) -> float:
        return 1.0

    # --- background tasks ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        with contextlib.suppress(Exception):
            if await self._ensure_readable():
                await self.refresh()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="ponder-telemetry-flush"),
            asyncio.create_task(self._refresh_loop(), name="ponder-telemetry-refresh"),
        ]

    def _requeue(self, batch: list[Event]) -> None:
        self._buffer.extendleft(reversed(batch))
        while len(self._buffer) > self.buffer_max:  # drop the oldest, as record() does
            self._buffer.popleft()
            self.dropped += 1

    def _is_down(self, exc: BaseException) -> bool:
        """True for errors that mean "the backend is unreachable" (or we are shutting down): the batch is
        retried until it is back, however long that takes."""
        return isinstance(exc, asyncio.CancelledError)

    def _valid(self, batch: list[Event]) -> list[Event]:
        good = []
        for ev in batch:
            problem = event_problem(ev)
            if problem is None:
                good.append(ev)
            else:
                self.dropped += 1
                self.last_error, self.last_error_ts = f"invalid event dropped: {problem}", time.time()
        return good

    async def _flush_buffer(self, drain: bool = True) -> None:
        """Write the buffer in batches. `drain=False` (the flush loop) writes only what was buffered when
        it started: events that arrive during the write wait for the loop's next linger, so a busy
        gateway writes a few large batches per second instead of a stream of tiny ones."""
        async with self._flush_lock:
            left = len(self._buffer)
            while self._buffer and (drain or left > 0):
                size = min(self._retry_size or BATCH_MAX, len(self._buffer))
                self._retry_size = 0
                left -= size
                batch = self._valid([self._buffer.popleft() for _ in range(size)])
                if not batch:
                    continue
                try:
                    await self._write_batch(batch)
                except BaseException as exc:
                    # A batch the backend keeps refusing (not an outage) is dropped after a few tries,
                    # so it cannot block every later event.
                    self._batch_failures = 0 if self._is_down(exc) else self._batch_failures + 1
                    if self._batch_failures >= MAX_BATCH_FAILURES:
                        self._batch_failures = 0
                        self.dropped += len(batch)
                        if not self._dropping:
                            # Learned outcomes and spend rollups are lost from here: one line, not one
                            # per batch, as for an outage (this is a refusal that is none: a key of the
                            # wrong type, a script error; a full or read-only Redis is an outage).
                            self._dropping = True
                            log.error("the telemetry store refuses to write events (%s: %s): they are dropped "
                                      "(ponder_store_dropped_events) until it takes them again",
                                      type(exc).__name__, exc)
                    elif self.requeue_failed_batches:
                        self._requeue(batch)
                        self._retry_size = len(batch)
                    raise
                self._batch_failures = 0
                if self._dropping:
                    self._dropping = False
                    log.warning("the telemetry store takes events again (%d dropped since start)", self.dropped)
                self.written += len(batch)
                self.last_flush_ts = time.time()

    async def _flush_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._loop_timeout())
            self._wake.clear()
            if self._closing:
                break
            # Linger a moment so events that arrive together are written together: one write per
            # batch instead of one per request keeps the flush off the request path's event loop.
            if len(self._buffer) < FLUSH_BATCH_HINT:
                await asyncio.sleep(FLUSH_LINGER_S)
            try:
                if not await self._ensure_connected():
                    continue
                await self._periodic()
                await self._flush_buffer(drain=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_error("flush", exc)

    async def _refresh_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh_s)
            try:
                if await self._ensure_readable():
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_error("refresh", exc)

    def _on_error(self, where: str, exc: BaseException) -> None:
        self.last_error = f"{where}: {type(exc).__name__}: {exc}"
        self.last_error_ts = time.time()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self._flush_buffer(), timeout_s)
        except Exception as exc:
            self._on_error("flush", exc)
        return not self._buffer

    async def refresh(self) -> None:
        raw = await self._load_aggregates()
        now = time.time()
        cache: dict[str, StatsSnapshot] = {}
        for policy, arms in raw.items():
            snap: StatsSnapshot = {}
            for (bucket, arm), fields in arms.items():
                snap.setdefault(bucket, {})[arm] = arm_stats(fields, now, self.half_life_s)
            cache[policy] = snap
            # The learner's shared levels (each arm summed over buckets) and its bucket-level strength are
            # computed once per snapshot: here, in the refresh loop, rather than by the first request
            # that decides after it.
            pooled_stats(snap)
            estimated_strength(snap)
        self._raw, self._cache = raw, cache
        self.last_refresh_ts = now

    async def close(self, timeout_s: float = 5.0) -> None:
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(Exception):
            if await asyncio.wait_for(self._ensure_connected(force=True), timeout_s):
                await self.flush(max(0.1, deadline - time.monotonic()))
                await asyncio.wait_for(self._periodic(), max(0.1, deadline - time.monotonic()))

    # --- reads for the dashboard -----------------------------------------------------------------------

    def _buffered_dicts(self, limit: int) -> list[dict[str, Any]]:
        return [ev.to_dict() for ev in itertools.islice(reversed(self._buffer), limit)]

    async def summary(self, policy: str | None = None) -> dict[str, Any]:
        now = time.time()
        policies = {}
        for name, arms in self._raw.items():
            if policy is not None and name != policy:
                continue
            table: dict[str, dict[str, Any]] = {}
            for (bucket, arm), fields in sorted(arms.items()):
                table.setdefault(bucket, {})[arm] = summary_row(fields, now, self.half_life_s)
            policies[name] = table
        hours, days = spend_periods(now)
        try:
            rollups = await self._load_spend(hours + days)
        except Exception as exc:
            self._on_error("summary", exc)
            rollups = {}
        return {
            "generated_at": now,
            "policies": policies,
            "spend": format_spend(rollups, now),
            "health": self.health(),
        }

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "connected": True,
            "buffered": len(self._buffer),
            "buffer_max": self.buffer_max,
            "recorded": self.recorded,
            "written": self.written,
            "dropped": self.dropped,
            "last_error": self.last_error,
            "last_error_ts": self.last_error_ts,
            "last_flush_ts": self.last_flush_ts,
            "last_refresh_ts": self.last_refresh_ts,
        }


async def open_store(
    redis_url: str | None,
    data_dir: Path,
    *,
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
    refresh_s: float = 1.0,
    buffer_max: int = 10_000,
    decay_half_life_s: float | None = None,
    feedback_window_s: float = DEFAULT_FEEDBACK_WINDOW_S,
    namespace: str = "ponder",
    op_timeout_s: float = 1.0,
) -> Store:
    """A started store: Redis when `redis_url` is set (even if Redis is down right now: it keeps
    retrying; `data_dir` then only journals budget changes Redis has not confirmed), else the
    embedded store persisted under `data_dir`."""
    common = dict(
        stream_maxlen=stream_maxlen,
        refresh_s=refresh_s,
        buffer_max=buffer_max,
        decay_half_life_s=decay_half_life_s,
        feedback_window_s=feedback_window_s,
    )
    store: Store
    if redis_url:
        from .redis_store import RedisStore

        store = RedisStore(redis_url, namespace=namespace, op_timeout_s=op_timeout_s, data_dir=Path(data_dir), **common)
    else:
        from .embedded_store import EmbeddedStore

        store = EmbeddedStore(Path(data_dir), **common)
    await store.start()
    return store
