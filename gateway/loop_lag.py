"""Event-loop lag: how late a timer fires, and whether it says the process is past its CPU.

The in-flight limit (gateway/shedding.py) counts the requests the process has started. When the
process's own CPU work (votes, large prompts) or other work on the machine starves its event loop,
new requests wait where that count cannot see them: in the kernel's accept queue and in the loop's
ready queue, and every client waits seconds. A timer every TICK_S, measuring how late it fires, sees
that wait: a loop with N ms of work queued ahead of it runs the timer N ms late.

`overloaded` is one attribute the shedding middleware reads per request; the timer does the rest.
It turns on at the second tick in a row later than the bound (one stall, such as a huge body parsed
or a garbage collection, is not overload: the next tick is on time) and off once the ticks have been
within half the bound for RECOVER_S, so that the process does not flap between shedding everything
and admitting a burst that puts it straight back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

TICK_S = 0.05  # 20 wake-ups a second, ~1 µs each: nothing next to a request's ~700 µs
LATE_TICKS = 2  # ticks in a row past the bound before shedding starts
RECOVER_S = 1.0  # ticks within half the bound this long before it stops
LOG_EVERY_S = 10.0  # the start of shedding is said at once, then at most this often, with how many starts

log = logging.getLogger("ponder.loop_lag")


class EventLoopLag:
    """Started on the running loop (the app's lifespan), stopped at shutdown. A bound of 0 still measures:
    the gauge is the operators' view either way, and nothing is shed."""

    def __init__(self, max_lag_ms: float, gauge: Any) -> None:
        self.max_lag_s = max_lag_ms / 1000
        self.gauge = gauge  # ponder_event_loop_lag_seconds: the last tick's lateness
        self.lag_s = 0.0
        self.overloaded = False
        self._late_ticks = 0
        self._calm_since = 0.0  # when the ticks last went within half the bound
        self._due = 0.0
        self._unlogged = 0  # starts of shedding since the last log line
        self._logged_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + TICK_S
        self._timer = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.observe(now - self._due, now)
        self._schedule(loop)

    def observe(self, lag_s: float, now: float) -> None:
        """One tick `lag_s` late, at `now` (a separate method: the hysteresis is tested without a loop)."""
        self.lag_s = lag_s = max(lag_s, 0.0)
        self.gauge.set(lag_s)
        if not self.max_lag_s:
            return
        self._late_ticks = self._late_ticks + 1 if lag_s > self.max_lag_s else 0
        if lag_s > self.max_lag_s / 2:
            self._calm_since = now
        if not self.overloaded and self._late_ticks >= LATE_TICKS:
            self.overloaded = True
            self._unlogged += 1
            if now - self._logged_at >= LOG_EVERY_S:  # a process at its limit may start and stop every second
                log.warning("overloaded: the event loop runs %.0f ms late (max_event_loop_lag_ms: %.0f); new chat, "
                            "responses and embeddings requests are answered 503 until it is back within %.0f ms "
                            "for %.0f s (%d time(s) since the last report)", lag_s * 1000, self.max_lag_s * 1000,
                            self.max_lag_s * 500, RECOVER_S, self._unlogged)
                self._unlogged, self._logged_at = 0, now
        elif self.overloaded and now - self._calm_since >= RECOVER_S:
            self.overloaded = False
            log.info("the event loop is on time again (%.0f ms late): requests are admitted", lag_s * 1000)
