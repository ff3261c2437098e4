"""Per-key budgets in Redis: reservations and settles against the counters every replica shares
(RESERVE_LUA, APPLY_ONCE_LUA), and the in-process ledger (budgets.py) while Redis is away. The
ledger's changes are pushed once Redis takes writes again, journaled under data_dir meanwhile, and
taken over from the journals of processes gone from there. Settles and pushes are applied at most
once, so one whose reply was lost is simply sent again.

`RedisBudgets` is the part of RedisStore that does this; its state (the ledger, the scripts, the
connection) is set up in RedisStore.__init__.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .budget_journal import take_over
from .budgets import BudgetChange, Reservation, exceeded, make_reservation, period_id
from .redis_schema import ONCE_TTL_S, RedisKeys

log = logging.getLogger("ponder.telemetry")


class RedisBudgets:
    """RedisStore's budgets: the Store methods `reserve`, `settle` and `spent`, and the ledger's pushes."""

    async def reserve(self, key_id: str, amount_usd: float, limits: dict[str, float]) -> Reservation:
        now = time.time()
        res = make_reservation(key_id, amount_usd, limits, now, self.keys.budget)
        if not res.keys:
            return res
        caps = [float(limits[p]) for p in res.periods]
        if self._connected:
            self._budgets.track_inflight(res.keys, res.amount_usd)
            hold = self.keys.hold(key_id)
            try:
                out = await self._reserve_script(keys=[*res.keys, hold],
                                                 args=[repr(res.amount_usd), *map(repr, caps), *res.ttls, ONCE_TTL_S])
            except Exception as exc:
                self._on_error("reserve", exc)  # fall through to the local ledger
                self._budgets_fallback = True
                # Redis may have charged it all the same (a timeout after it ran): when it answers
                # again, give the amount back if the hold is there. Not counted meanwhile (pessimistic).
                expires = tuple(now + ttl if ttl else 0.0 for ttl in res.ttls)
                release = BudgetChange(hold, True, res.keys, expires, -res.amount_usd, counted=False)
                self._budgets.hold_pending(release)
            else:
                self._budgets_fallback = False
                if int(out[0]) == 0:
                    failures = []
                    for i, spent in zip(map(int, out[1::2]), map(float, out[2::2])):
                        self._budgets.observe(res.keys[i - 1], spent, res.ttls[i - 1], now, at_least=True)
                        failures.append((res.periods[i - 1], caps[i - 1], spent))
                    raise exceeded(failures, res.amount_usd, now)
                for key, ttl, value in zip(res.keys, res.ttls, out[1:]):
                    self._budgets.observe(key, float(value), ttl, now, at_least=True)
                res.mode, res.hold = "redis", hold
                return res
            finally:
                self._budgets.track_inflight(res.keys, -res.amount_usd)
        # Redis unreachable: check against the last values Redis gave plus this replica's own changes.
        self._budgets.reserve(res, caps, now, track_unsynced=True)
        res.mode = "local"
        return res

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        delta = reservation.close(actual_usd)
        if delta is None:
            return
        now = time.time()
        if reservation.mode == "local":
            if abs(delta) > 1e-12:
                self._budgets.charge(reservation.keys, reservation.ttls, delta, now, track_unsynced=True)
                self._wake.set()
            return
        # Consuming the hold applies the delta at most once: a settle whose reply is lost (a timeout
        # after Redis applied it) is sent again as it is. Sent even when the delta is 0, to free the hold.
        expires = tuple(now + ttl if ttl else 0.0 for ttl in reservation.ttls)
        change = BudgetChange(reservation.hold, True, reservation.keys, expires, delta)
        if self._connected:
            try:
                reply = await self._apply_once(change, now)
            except Exception as exc:
                self._on_error("settle", exc)
            else:
                refused = self._applied(change, reply, now)
                if refused is not None:  # Redis took the other counters' changes; the ledger pushes this one
                    self._on_error("settle", refused)
                    self._wake.set()
                return
        self._budgets.hold_pending(change)  # sent again by the flush loop
        self._wake.set()

    async def spent(self, key_id: str, periods=("day", "month")) -> dict[str, float]:
        now = time.time()
        ids = {p: period_id(p, now) for p in periods}
        keys = {p: self.keys.budget(key_id, p, pid) for p, (pid, _) in ids.items()}
        if self._connected:
            try:
                values = await self._client.mget(list(keys.values()))
                for (p, key), value in zip(keys.items(), values):
                    self._budgets.observe(key, float(value or 0.0), ids[p][1], now)
            except Exception as exc:
                self._on_error("spent", exc)
        return {p: self._budgets.get(key, now) for p, key in keys.items()}

    async def _push_budget_changes(self) -> None:
        now = time.time()
        self._budgets.purge(now)
        self._budgets.stage_unsynced()
        changes = list(self._budgets.pending.values())
        if not changes:
            return
        if self._cluster:  # redis-py refuses scripts in cluster pipelines
            replies = await asyncio.gather(*(self._apply_once(c, now) for c in changes), return_exceptions=True)
        else:
            pipe = self._client.pipeline(transaction=False)
            for change in changes:
                await self._apply_once(change, now, client=pipe)
            # Each reply on its own: a change Redis refuses (OOM at maxmemory) stays for the next turn,
            # the others are done.
            replies = await self._execute(pipe, raise_on_error=False)
        refused = None
        for change, reply in zip(changes, replies):
            if isinstance(reply, BaseException):
                refused = reply
                continue
            # What a counter refused goes back to the ledger (journaled) before the change is marked done.
            refused = self._applied(change, reply, now) or refused
            self._budgets.confirm(change.token)
        if refused is not None:
            self._on_error("budget push", refused)
        else:
            self._budgets_fallback = False  # Redis takes writes again

    def _apply_once(self, change: BudgetChange, now: float, client=None):
        args = ["hold" if change.consumes_hold else "mark", repr(change.delta), ONCE_TTL_S, *change.ttls(now)]
        return self._apply_once_script(keys=[change.token, *change.keys], args=args, client=client)

    def _applied(self, change: BudgetChange, reply: list, now: float) -> Exception | None:
        """Mirror the counters an `APPLY_ONCE_LUA` reply gives; a counter that refused the change (e.g.
        WRONGTYPE) never got it, so its delta goes back to the ledger. Returns the last refusal."""
        refused = None
        for key, exp, value in zip(change.keys, change.expires, reply[1:]):
            if isinstance(value, Exception):
                refused = value
                if int(reply[0]) == 1:
                    self._budgets.add(key, change.delta, max(0, int(exp - now)) if exp else 0, now, track_unsynced=True)
            elif value is not None:
                self._budgets.observe(key, float(value), 0, now)
        return refused

    def _take_saved_budgets(self) -> None:
        """Take over the budget changes that processes gone from `data_dir` (stopped, or killed before
        Redis had them) left in their journals: into this one's journal first, then off theirs."""
        if self.data_dir is None or not self.data_dir.is_dir():
            return
        journal = self._budgets.journal
        assert journal is not None
        adopted: list[BudgetChange] = []

        def adopt(changes: list[BudgetChange]) -> bool:
            if not (self._budgets.add_unsynced(changes, time.time()) and journal.rewrite(self._budgets.unconfirmed())):
                return False
            adopted.extend(changes)
            return True

        try:
            problems = take_over(self.data_dir, adopt, RedisKeys.push_mark)
        except OSError as exc:
            self._on_error("budget load", exc)
            return
        for problem in problems:
            log.error("unreadable saved budget changes, not pushed: %s", problem)
        if adopted:
            log.info("pushing $%.6f of budget changes a process gone from %s left unpushed",
                     sum(change.delta for change in adopted if change.counted), self.data_dir)

    def _save_unpushed_budgets(self) -> None:
        """Budget changes made while Redis was away (or refusing writes) and still not pushed at shutdown
        would be lost, and the keys could overspend by them after a restart: the journal keeps them for
        the next start (rewritten whole, synced). Staged first: a change a late settle makes after this
        goes to a new journal under a new token, not onto a token this file has closed."""
        self._budgets.stage_unsynced()
        changes = self._budgets.unconfirmed()
        journal = self._budgets.journal
        if not changes:
            if journal is not None:
                journal.discard()
            return
        total = self._budgets.unpushed_usd()
        if journal is None:
            log.error("Redis did not take $%.6f of budget changes by shutdown: they are lost", total)
            return
        if not journal.rewrite(changes):
            log.error("Redis did not take $%.6f of budget changes by shutdown, and they could not be saved "
                      "(see the error above)", total)
        else:
            log.warning("Redis did not take $%.6f of budget changes by shutdown: saved to %s; the next start "
                        "pushes them", total, journal.path)
        journal.close()
