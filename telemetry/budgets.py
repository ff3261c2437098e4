"""Per-key spend budgets: period keys, the reservation record, and the in-process ledger.

A request reserves its maximum expected cost before calling any backend and settles the actual cost
afterwards, so concurrent requests cannot overspend: the check and the increment happen in one atomic
step (a Lua script on Redis, a synchronous section with no await in-process).

`LocalBudgets` is the embedded store's ledger and the Redis store's fallback while Redis is down: it
mirrors the last values Redis returned and keeps local changes as `unsynced` deltas that are pushed to
Redis when it comes back, and changes whose reply was lost (a timeout after Redis may have applied them)
as `pending` `BudgetChange`s, sent again under the same token so Redis applies each at most once.
Every such change is written to the ledger's journal (budget_journal.py) as it is made, so a crash
does not lose it: the next start on the same data directory pushes it.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .redis_schema import RedisKeys

if TYPE_CHECKING:
    from .budget_journal import BudgetJournal

# period -> (strftime pattern of the UTC period id, seconds the counter is kept after it starts)
PERIODS: dict[str, tuple[str, int]] = {
    "hour": ("%Y%m%d%H", 3600 + 86400),
    "day": ("%Y%m%d", 2 * 86400),
    "week": ("%G-W%V", 8 * 86400),
    "month": ("%Y%m", 32 * 86400),
    "total": ("", 0),  # never expires
}


def period_id(period: str, now: float) -> tuple[str, int]:
    """The UTC id of the period containing `now` (e.g. day -> "20250301") and the counter's TTL."""
    try:
        pattern, ttl = PERIODS[period]
    except KeyError:
        raise ValueError(f"unknown budget period {period!r}; expected one of {sorted(PERIODS)}") from None
    return (time.strftime(pattern, time.gmtime(now)) if pattern else "all"), ttl


def seconds_until_reset(period: str, now: float) -> float | None:
    """Seconds until the UTC period containing `now` ends (None for `total`, which never does)."""
    t = time.gmtime(now)
    start_of_day = now - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + now % 1)
    if period == "hour":
        return 3600 - (t.tm_min * 60 + t.tm_sec + now % 1)
    if period == "day":
        return start_of_day + 86400 - now
    if period == "week":  # ISO weeks start on Monday
        return start_of_day + 86400 * (7 - t.tm_wday) - now
    if period == "month":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now
    return None


class BudgetExceeded(Exception):
    """A reservation that does not fit: `spent` (settled and held by requests in flight) plus `amount`
    (this request's hold) would pass `limit`. `failures` holds (period, limit, spent) of every period it
    does not fit; the one named is the one that frees it last (see `exceeded`)."""

    def __init__(self, period: str, limit: float, spent: float, amount: float = 0.0,
                 failures: tuple[tuple[str, float, float], ...] = ()):
        super().__init__(f"{period} budget ${limit:.6f}: ${spent:.6f} spent or held, this request holds up to "
                         f"${amount:.6f}")
        self.period = period
        self.limit = limit
        self.spent = spent
        self.amount = amount
        self.failures = failures or ((period, limit, spent),)


def latest_reset(periods: list[str], now: float) -> str:
    """Of the periods a request does not fit, the one it has to wait for: the one that resets last
    (`total` never does). Waiting for the first to reset (a day) is no use when a month is spent too."""
    def reset(period: str) -> float:
        seconds = seconds_until_reset(period, now)
        return math.inf if seconds is None else seconds

    return max(periods, key=reset)


def exceeded(failures: list[tuple[str, float, float]], amount: float, now: float) -> BudgetExceeded:
    """The error for a reservation of `amount` that fails in every (period, limit, spent) of `failures`,
    naming the period that frees it last: one whose whole cap is less than `amount` (never), else the
    one that resets last."""
    never = [f for f in failures if amount > f[1] + 1e-9]
    binding = latest_reset([f[0] for f in never or failures], now)
    period, limit, spent = next(f for f in failures if f[0] == binding)
    return BudgetExceeded(period, limit, spent, amount, tuple(failures))


@dataclass(slots=True)
class Reservation:
    """Handed back by `reserve` and passed to `settle`. `keys` are the counters it was charged to, so a
    request that crosses midnight settles in the period it reserved in."""

    key_id: str
    amount_usd: float
    periods: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    ttls: tuple[int, ...] = ()
    mode: Literal["redis", "local", "none"] = "none"  # none: no limits, nothing was charged
    settled: bool = False
    hold: str = ""  # on Redis: the key of the hold the reservation left, consumed by its settle

    def close(self, actual_usd: float) -> float | None:
        """Mark it settled and return what the counters still need (actual - reserved), or None when
        there is nothing to do: settled before, or nothing was charged. Settling twice is harmless."""
        if self.settled or self.mode == "none":
            return None
        self.settled = True
        return max(0.0, float(actual_usd)) - self.amount_usd


@dataclass(slots=True)
class BudgetChange:
    """A delta to some counters that Redis has not confirmed, applied there at most once however often it
    is sent. `token` names it in Redis: with `consumes_hold`, the reservation's hold, which the change
    deletes (a settle, or the release of a reservation whose reply was lost); else a mark the change
    leaves behind (a push of the ledger's deltas). `expires`: each counter's expiry (0 = never).
    `counted`: part of the ledger's view of spend; a release is not (the reservation may never have
    reached Redis, and the ledger must not under-count)."""

    token: str
    consumes_hold: bool
    keys: tuple[str, ...]
    expires: tuple[float, ...]
    delta: float
    counted: bool = True

    def ttls(self, now: float) -> list[int]:
        """The TTL each counter gets if the change creates it (0: none)."""
        return [max(1, math.ceil(exp - now)) if exp else 0 for exp in self.expires]

    def stale(self, now: float) -> bool:
        """Every counter's period is over: nothing left to correct."""
        return all(exp and exp < now for exp in self.expires)


class LocalBudgets:
    """An in-process ledger: counter key -> spent USD, with expiry.

    As the Redis store's fallback it is deliberately pessimistic: replies to concurrent reservations
    can arrive out of order, so a reservation reply only ever raises the mirrored value, and amounts
    of reservations still in flight to Redis count as spent (they may well be applied)."""

    def __init__(self, journal: BudgetJournal | None = None,
                 token_for: Callable[[str], str] = RedisKeys.push_mark) -> None:
        self.spent: dict[str, float] = {}
        self.expires: dict[str, float] = {}  # 0 = never
        self.unsynced: dict[str, float] = {}  # changes not yet written to Redis
        # The token each counter's unsynced delta will be pushed under (`token_for(counter)`), named
        # when the delta starts so the journal can record it under that name from the first cent.
        self.unsynced_tokens: dict[str, str] = {}
        self.pending: dict[str, BudgetChange] = {}  # token -> change sent to Redis, outcome unknown
        self.inflight: dict[str, float] = {}  # reservations sent to Redis, not answered yet
        self.journal = journal
        self.token_for = token_for

    def get(self, key: str, now: float) -> float:
        exp = self.expires.get(key, 0.0)
        local = self.unsynced.get(key, 0.0) + sum(c.delta for c in self.pending.values() if c.counted and key in c.keys)
        if exp and exp < now:
            return local
        return self.spent.get(key, 0.0) + local

    def reserve(self, res: Reservation, limits: list[float], now: float, *, track_unsynced: bool) -> None:
        """Check every period, then charge every period; raises BudgetExceeded and charges nothing."""
        failures = []
        for period, key, limit in zip(res.periods, res.keys, limits, strict=True):
            spent = self.get(key, now) + self.inflight.get(key, 0.0)
            if spent + res.amount_usd > limit + 1e-9:
                failures.append((period, limit, spent))
        if failures:
            raise exceeded(failures, res.amount_usd, now)
        self.charge(res.keys, res.ttls, res.amount_usd, now, track_unsynced=track_unsynced)

    def add(self, key: str, delta: float, ttl: int, now: float, *, track_unsynced: bool) -> None:
        self.charge((key,), (ttl,), delta, now, track_unsynced=track_unsynced)

    def charge(self, keys: tuple[str, ...], ttls: tuple[int, ...], delta: float, now: float, *,
               track_unsynced: bool) -> None:
        """Add `delta` to each counter; `track_unsynced`: as a change Redis has yet to get (journaled,
        all counters in one write)."""
        added = []
        for key, ttl in zip(keys, ttls, strict=True):
            if track_unsynced:
                self.unsynced[key] = self.unsynced.get(key, 0.0) + delta
            else:
                self.spent[key] = self.get(key, now) + delta
            if key not in self.expires or (self.expires[key] and self.expires[key] < now):
                self.expires[key] = now + ttl if ttl else 0.0
            if track_unsynced:
                token = self.unsynced_tokens.get(key) or self.unsynced_tokens.setdefault(key, self.token_for(key))
                added.append((token, key, self.expires[key], delta))
        if added:
            self._journal(added=added)

    def hold_pending(self, change: BudgetChange) -> None:
        """A change Redis may or may not have applied: sent again (under its token) until it answers."""
        self.pending[change.token] = change
        self._journal(put=[change])

    def confirm(self, token: str) -> None:
        """Redis answered the change of `token`: it is done (applied now or before)."""
        if self.pending.pop(token, None) is not None:
            self._journal(done=[token])

    def observe(self, key: str, value: float, ttl: int, now: float, *, at_least: bool = False) -> None:
        """Record a value Redis returned (it excludes our unsynced deltas). `at_least`: a reservation
        reply, which may be older than one already seen, so keep the higher value."""
        if at_least and key in self.spent:
            value = max(value, self.spent[key])
        self.spent[key] = value
        if key not in self.expires:
            self.expires[key] = now + ttl if ttl else 0.0

    def track_inflight(self, keys: tuple[str, ...], amount: float) -> None:
        for key in keys:
            left = self.inflight.get(key, 0.0) + amount
            if abs(left) < 1e-12:
                self.inflight.pop(key, None)
            else:
                self.inflight[key] = left

    def stage_unsynced(self) -> None:
        """Turn each counter's unsynced delta into a pending change under its token: from now on it is
        sent under that token until Redis answers, so a push whose reply is lost cannot be applied
        twice. (The journal already has it under that token: nothing to write.)"""
        for key, delta in self.unsynced.items():
            token = self.unsynced_tokens.pop(key, None) or self.token_for(key)
            if abs(delta) > 1e-12:
                self.pending[token] = BudgetChange(token, False, (key,), (self.expires.get(key, 0.0),), delta)
        self.unsynced.clear()
        self.unsynced_tokens.clear()

    def unconfirmed(self) -> list[BudgetChange]:
        """Every change Redis has not confirmed: the pending ones and the unsynced deltas, each under the
        token it is (or will be) sent under."""
        return [*self.pending.values(), *(
            BudgetChange(self.unsynced_tokens[key], False, (key,), (self.expires.get(key, 0.0),), delta)
            for key, delta in self.unsynced.items() if key in self.unsynced_tokens)]

    def unpushed_usd(self) -> float:
        """The changes Redis has not confirmed, summed over counters (a settle in doubt counts in each)."""
        return sum(self.unsynced.values()) + sum(c.delta * len(c.keys) for c in self.pending.values() if c.counted)

    def add_unsynced(self, changes: list[BudgetChange], now: float) -> bool:
        """Take over changes an earlier process left (its journal); those whose counters have expired
        since are dropped (there is nothing left to correct), and one this ledger has under the same
        token already is the same change. True when they are journaled here too."""
        taken = []
        for change in changes:
            if change.stale(now) or change.token in self.pending:
                continue
            self.pending[change.token] = change
            taken.append(change)
            for key, exp in zip(change.keys, change.expires, strict=True):
                self.expires.setdefault(key, exp)
        return self._journal(put=taken) if taken else True

    def purge(self, now: float) -> None:
        for token in [t for t, change in self.pending.items() if change.stale(now)]:
            del self.pending[token]
        for key in [k for k, exp in self.expires.items() if exp and exp < now and not self.unsynced.get(k)]:
            self.spent.pop(key, None)
            self.expires.pop(key, None)
            self.unsynced.pop(key, None)
            self.unsynced_tokens.pop(key, None)
        self._journal()

    def _journal(self, **lines) -> bool:
        """Write `lines` to the journal, then drop its file when Redis has everything, or rewrite it
        when it has grown long. False when a line could not be written."""
        if self.journal is None:
            return True
        if lines and self.journal.path is None:
            # A new file (the first change since Redis had everything, or one after shutdown) starts
            # with every change not confirmed, so no file depends on another.
            lines = {"put": self.unconfirmed()}
        ok = self.journal.append(**lines) if lines else True
        if not self.unsynced and not self.pending:
            self.journal.discard()
        elif self.journal.due(len(self.unsynced) + len(self.pending)) or not self.journal.ok:
            ok = self.journal.rewrite(self.unconfirmed()) and ok
        return ok


def make_reservation(key_id: str, amount_usd: float, limits: dict[str, float], now: float, counter_key) -> Reservation:
    """A reservation charged to one counter per limited period; `counter_key(key_id, period, id)`
    names the counter. Periods are sorted so every caller touches counters in the same order."""
    periods = tuple(sorted(p for p, cap in limits.items() if cap is not None))
    ids = [period_id(p, now) for p in periods]
    return Reservation(
        key_id=key_id,
        amount_usd=max(0.0, float(amount_usd)),
        periods=periods,
        keys=tuple(counter_key(key_id, p, pid) for p, (pid, _) in zip(periods, ids)),
        ttls=tuple(ttl for _, ttl in ids),
        mode="local" if periods else "none",
    )
