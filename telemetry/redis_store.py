"""The Redis store: one events stream, per-arm aggregate hashes, budget counters, shared by replicas.

What lives where, and the scripts that change it atomically: redis_schema.py. The store's connection,
and when Redis counts as away, are redis_connection.py's; its budgets are redis_budgets.py's; this
module writes the events and reads back the stats, spend and feedback they make.

Failure behaviour: see docs/telemetry.md. In short, a Redis that is away or takes no writes (full, a
replica) marks the store disconnected; the flush loop pings with backoff (at most 1 s apart) and
flushes the buffer as soon as PING answers and a write probe is taken;
budgets fall back to the in-process ledger and push their deltas when Redis is back (deltas Redis has
not confirmed are journaled under data_dir as they are made, and the next start pushes what a
stopped or crashed process left there). Settles and pushes are applied at most once, so one whose
reply was lost is simply sent again. Events still buffered at shutdown are saved under data_dir too
(unwritten_events.py), and written by the next start or a running replica once Redis takes writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson

from .aggregates import SPEND_DAYS, SPEND_HOURS, add_spend, group_deltas, spend_deltas, spend_periods
from .budget_journal import BudgetJournal
from .budgets import LocalBudgets
from .events import Event
from . import unwritten_events
from .redis_budgets import RedisBudgets
from .redis_connection import RedisConnection, make_client
from .redis_schema import AGG_UPDATE_LUA, APPLY_ONCE_LUA, BATCH_LUA, BATCH_MARK_TTL_S, RESERVE_LUA, RedisKeys
from .store import BATCH_MAX, FeedbackResult

log = logging.getLogger("ponder.telemetry")
OTHER_REPLICA_WAIT_S = 0.5  # feedback for an id not written yet: how long to look again (polls)
OTHER_REPLICA_POLL_S = 0.05
SPEND_TTL_S = {"h": 2 * 86400, "d": 35 * 86400}
# How often a running replica looks in data_dir for journals that dead replicas left (killed while Redis
# was away, and not restarted: scaled down): their spend is pushed without waiting for a start. Events
# that stopped replicas saved are looked for as often.
TAKE_OVER_EVERY_S = 5.0


class RedisStore(RedisBudgets, RedisConnection):
    backend = "redis"

    def __init__(self, url: str, *, namespace: str = "ponder", op_timeout_s: float = 1.0,
                 data_dir: Path | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.url = url
        self.data_dir = data_dir  # where budget changes Redis has not confirmed are journaled
        self.op_timeout_s = op_timeout_s
        self.keys = RedisKeys(namespace)
        self._client, self._cluster = make_client(url, op_timeout_s)
        self._agg_script = self._client.register_script(AGG_UPDATE_LUA)
        self._reserve_script = self._client.register_script(RESERVE_LUA)
        self._apply_once_script = self._client.register_script(APPLY_ONCE_LUA)
        self._batch_script = self._client.register_script(BATCH_LUA)
        self._budgets = LocalBudgets(BudgetJournal(data_dir) if data_dir is not None else None, RedisKeys.push_mark)
        # Redis refused or did not answer the last reservation (down, or refusing writes: OOM at
        # maxmemory), so reservations are checked in the in-process ledger until it takes one again.
        self._budgets_fallback = False
        self._next_take_over = 0.0  # time.monotonic() of the next look for dead replicas' journals
        # The spend rollups as last read, plus this replica's batches written since: what the spend views
        # show while Redis is away (with the buffered events' spend), rather than nothing spent.
        self._spend_seen: dict[str, dict[str, float]] = {}
        self._connected = False
        self._marked: set[str] = set()  # policies whose data-loss marker this replica has seen in Redis
        # Not connected, but the server answers reads (it refuses writes: full, a replica): the refresh
        # goes on reading the stats, so they do not go stale for as long as Redis is full.
        self._answers_reads = False
        self._outage_since: float | None = None  # time.monotonic() of the error that began the outage
        self._backoff = 0.0
        self._next_attempt = 0.0
        self.reconnects = 0
        self.restores = 0
        self._refused_commands: set[str] = set()  # NOPERM errors logged already


    # --- writes ----------------------------------------------------------------------------------------

    async def _queue_agg(self, pipe, later: list, policy: str, bucket: str, arm: str, t: float, delta: dict[str, float],
                         once: tuple[str, int] | None = None) -> None:
        """Queue one aggregate update on `pipe`; on Redis Cluster, where redis-py refuses scripts in
        pipelines, append the call to `later` instead (run with `_execute`, after the pipeline).
        `once`: (mark key, seconds) that make the update apply at most once however often it is sent."""
        args: list[Any] = [repr(t), repr(float(self.half_life_s or 0)), f"{bucket}|{arm}", once[1] if once else 0]
        for name, value in delta.items():
            args += [name, repr(float(value))]
        keys = [self.keys.agg(policy, bucket, arm), self.keys.arms(policy), *([once[0]] if once else [])]
        if self._cluster:
            later.append((keys, args))
        else:
            await self._agg_script(keys=keys, args=args, client=pipe)

    async def _execute(self, pipe, later: list | None = None, raise_on_error: bool = True) -> list:
        try:
            results = await pipe.execute(raise_on_error=raise_on_error)
        finally:
            # redis-py checks a pipeline's scripts (SCRIPT EXISTS) on a pooled connection before the part
            # of execute() that gives the connection back: an error there (an ACL without scripting, a
            # timeout) leaked it, and 32 such errors left the store no connection for good.
            await pipe.reset()
        if later:
            await asyncio.gather(*(self._agg_script(keys=keys, args=args) for keys, args in later))
        return results

    async def _write_batch(self, batch: list[Event]) -> None:
        k = self.keys
        bodies: list[bytes] = []
        metas: list[tuple[str, str]] = []
        for ev in batch:
            try:
                bodies.append(ev.to_json())
            except Exception as exc:
                self.dropped += 1
                self._on_error("serialise", exc)
                continue
            if ev.request_id and ev.arm_outcome:  # feedback scores an arm's answer
                meta = {"p": ev.policy, "b": ev.bucket, "a": ev.arm, "ts": ev.ts, "k": ev.key_id}
                meta.update(s=ev.success, w=ev.success_weight)
                metas.append((k.meta(ev.request_id), orjson.dumps(meta).decode()))
        aggs = group_deltas(batch, self.half_life_s)
        policies = sorted({ev.policy for ev in batch})
        spend = spend_deltas(batch)
        meta_ttl = int(self.feedback_window_s + 86400)
        if not self._cluster:
            # One script call: once Redis starts it, it runs to the end with nothing interleaved, so a
            # dropped connection never leaves half a batch behind (events are validated beforehand so
            # the script itself does not fail half way). A batch whose reply was lost (a timeout after
            # Redis ran it) is retried as the same batch, which its mark makes Redis skip.
            control = {
                "mark": k.batch_mark(bodies), "mark_ttl": BATCH_MARK_TTL_S,
                "stream": k.stream, "maxlen": self.stream_maxlen, "ttl": meta_ttl,
                "hl": float(self.half_life_s or 0), "policies_key": k.policies, "policies": policies,
                "meta": metas,
                "aggs": [[k.agg(p, b, a), k.arms(p), f"{b}|{a}", t, [x for kv in delta.items() for x in kv]]
                         for (p, b, a), (t, delta) in aggs.items()],
                "spend": [[k.spend(period), SPEND_TTL_S[period[0]], [x for kv in fields.items() for x in kv]]
                          for period, fields in spend.items()],
            }
            await self._batch_script(keys=[], args=[orjson.dumps(control), *bodies])
            self._saw_spend(spend)
            return
        # Redis Cluster: the keys live in many slots, so a non-transactional pipeline (at-least-once: a
        # batch that failed half way is retried whole).
        pipe, later = self._client.pipeline(transaction=False), []
        for body in bodies:
            pipe.xadd(k.stream, {"e": body}, maxlen=self.stream_maxlen, approximate=True)
        for key, meta in metas:
            pipe.set(key, meta, ex=meta_ttl)
        for (policy, bucket, arm), (t, delta) in aggs.items():
            await self._queue_agg(pipe, later, policy, bucket, arm, t, delta)
        pipe.sadd(k.policies, *policies)
        for period, fields in spend.items():
            for name, value in fields.items():
                pipe.hincrbyfloat(k.spend(period), name, value)
            pipe.expire(k.spend(period), SPEND_TTL_S[period[0]])
        await self._execute(pipe, later)
        self._saw_spend(spend)

    def _saw_spend(self, spend: dict[str, dict[str, float]]) -> None:
        add_spend(self._spend_seen, spend)
        if len(self._spend_seen) > 2 * (SPEND_HOURS + SPEND_DAYS):  # hours went by with no read: drop the old
            hours, days = spend_periods(time.time())
            self._spend_seen = {p: self._spend_seen[p] for p in hours + days if p in self._spend_seen}

    async def _periodic(self) -> None:
        """Push budget changes made while Redis was down (or settled locally) back to Redis, and send
        again the changes whose reply was lost (each under its token: applied at most once); now and
        then, take over what replicas gone from a shared data_dir left there: budget changes
        (`_take_saved_budgets`), then events (`_write_saved_events`)."""
        take_over = time.monotonic() >= self._next_take_over
        if take_over:
            self._next_take_over = time.monotonic() + TAKE_OVER_EVERY_S
            self._take_saved_budgets()
        await self._push_budget_changes()
        if take_over:
            try:  # a file Redis does not take must not hold up this replica's own events
                await self._write_saved_events()
            except Exception as exc:
                self._on_error("saved events", exc)

    # --- reads -----------------------------------------------------------------------------------------

    async def _load_aggregates(self, *, read_only: bool = False) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
        """Every policy's aggregates. A replica also re-creates each policy's marker, and restores its
        cached aggregates where the marker was gone; `read_only` (`ponder stats`) writes nothing: a
        reader must work on a read replica, and must not take a marker a replica's restore needs."""
        k = self.keys
        names = sorted(set(await self._client.smembers(k.policies)) | set(self._raw))
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for p in names:
            pipe.smembers(k.arms(p))
            if not read_only:
                pipe.set(k.alive(p), "1", nx=True)
                pipe.exists(k.alive(p))  # a read: says whether it is there when Redis refuses the SET
        # A marker Redis refuses to write (OOM at maxmemory with noeviction) must not stop the reads:
        # the stats would go stale for as long as Redis is full. Nothing could be restored then anyway.
        res = await self._execute(pipe, raise_on_error=False)
        step = 1 if read_only else 3
        members = {p: res[step * i] for i, p in enumerate(names)}
        for value in members.values():
            if isinstance(value, Exception):
                raise value
        markers, in_place = ([], []) if read_only else (res[1::3], res[2::3])  # created (True) by this SET NX
        refused = next((v for v in markers if isinstance(v, Exception)), None)
        if refused is not None:
            self._on_error("refresh marker", refused)
        # A missing marker next to a policy we hold stats for means Redis restarted without its data:
        # the replica that re-created the marker adds its cached aggregates back (additively, so events
        # other replicas flushed since the restart are kept). Only a marker this replica has seen in place
        # was lost: one Redis refused to write (full, a replica) when the policy's first stats came was
        # never there, and those stats are in Redis still (adding them back doubled them).
        lost = [p for p, created in zip(names, markers) if created is True and p in self._marked and self._raw.get(p)]
        self._marked.update(p for p, n in zip(names, in_place) if n == 1)
        if lost:
            pipe, later = self._client.pipeline(transaction=False), []
            for p in lost:
                for (bucket, arm), fields in self._raw[p].items():
                    delta = {n: v for n, v in fields.items() if n != "t"}
                    await self._queue_agg(pipe, later, p, bucket, arm, fields.get("t", time.time()), delta)
                pipe.sadd(k.policies, p)
            await self._execute(pipe, later)
            self.restores += len(lost)
            for p in lost:
                members[p] = await self._client.smembers(k.arms(p))
        order = [(p, m) for p in names for m in sorted(members[p])]
        pipe = self._client.pipeline(transaction=False)
        for p, m in order:
            bucket, _, arm = m.partition("|")
            pipe.hgetall(k.agg(p, bucket, arm))
        hashes = await self._execute(pipe) if order else []
        out: dict[str, dict[tuple[str, str], dict[str, float]]] = {p: {} for p in names}
        for (p, m), h in zip(order, hashes):
            if h:
                bucket, _, arm = m.partition("|")
                out[p][(bucket, arm)] = {n: float(v) for n, v in h.items()}
        return out

    async def _load_spend(self, periods: list[str]) -> dict[str, dict[str, float]]:
        if self._connected:
            try:
                pipe = self._client.pipeline(transaction=False)
                for period in periods:
                    pipe.hgetall(self.keys.spend(period))
                res = await self._execute(pipe)
                self._spend_seen = {p: {n: float(v) for n, v in h.items()} for p, h in zip(periods, res) if h}
                return {p: dict(fields) for p, fields in self._spend_seen.items()}
            except Exception as exc:
                self._on_error("summary", exc)
        # Redis away: the spend as last seen, and what the events waiting in the buffer cost
        rollups = {p: dict(self._spend_seen[p]) for p in periods if p in self._spend_seen}
        add_spend(rollups, {p: f for p, f in spend_deltas(self._buffer).items() if p in periods})
        return rollups

    async def recent_events(self, limit: int = 100) -> list[dict[str, Any]]:
        out = self._buffered_dicts(limit)
        if len(out) < limit and (self._connected or self._answers_reads):  # none of the buffered is written
            try:
                entries = await self._client.xrevrange(self.keys.stream, count=limit - len(out))
                out += [orjson.loads(fields["e"]) for _, fields in entries if "e" in fields]
            except Exception as exc:
                self._on_error("recent_events", exc)
        return out

    # --- feedback --------------------------------------------------------------------------------------

    async def feedback(self, request_id: str, score: float, key_id: str | None) -> FeedbackResult:
        score = min(1.0, max(0.0, float(score)))
        if not await self._ensure_connected():
            return FeedbackResult("unavailable", request_id)
        k = self.keys
        claimed = False
        try:
            raw = await self._client.get(k.meta(request_id))
            if raw is None and (self._buffer or self._flush_lock.locked()):
                # feedback may arrive before the request's event was written
                if not await self.flush() and any(ev.request_id == request_id for ev in self._buffer):
                    # Redis refused the write (full: OOM under noeviction) and the event waits in the
                    # buffer: the request is known, its feedback is to be sent again, not a 404
                    return FeedbackResult("unavailable", request_id)
                raw = await self._client.get(k.meta(request_id))
            waited = 0.0
            while raw is None and waited < OTHER_REPLICA_WAIT_S:
                # Answered by another replica a moment ago: its event is written tens of ms after the
                # answer went out (linger + round trip). A 404 would tell the client not to retry.
                await asyncio.sleep(OTHER_REPLICA_POLL_S)
                waited += OTHER_REPLICA_POLL_S
                raw = await self._client.get(k.meta(request_id))
            if raw is None:
                return FeedbackResult("unknown_request", request_id)
            m = orjson.loads(raw)
            found = dict(policy=m["p"], bucket=m["b"], arm=m["a"])
            if key_id is not None and m.get("k") is not None and m["k"] != key_id:
                return FeedbackResult("forbidden", request_id)
            now = time.time()
            if now - float(m["ts"]) > self.feedback_window_s:
                return FeedbackResult("expired", request_id, **found)
            record = orjson.dumps({"request_id": request_id, "score": score, "ts": now, "key_id": key_id})
            keep_s = int(self.feedback_window_s + 86400)
            claimed = bool(await self._client.set(k.claim(request_id), record, nx=True, ex=keep_s))
            if not claimed:
                return FeedbackResult("duplicate", request_id, **found)
            # Replace the automatic signal (weight w, score s) with the feedback at full weight. The
            # delta is expressed at the request's time so decay ages it like the original outcome.
            # Applied at most once: a reply lost to a timeout frees the claim below for the client's
            # retry, and the update may have happened all the same.
            weight, auto = float(m.get("w") or 0.0), float(m.get("s") or 0.0)
            delta = {"successes": score - weight * auto, "weight": 1.0 - weight}
            pipe, later = self._client.pipeline(transaction=False), []
            await self._queue_agg(pipe, later, m["p"], m["b"], m["a"], float(m["ts"]), delta,
                                  once=(k.feedback_applied(m["p"], request_id), keep_s))
            pipe.xadd(k.feedback_stream, {"f": record}, maxlen=self.stream_maxlen, approximate=True)
            await self._execute(pipe, later)
            return FeedbackResult("accepted", request_id, **found)
        except Exception as exc:
            self._on_error("feedback", exc)
            if claimed:  # let the client retry: the aggregate update may not have happened
                try:
                    await self._client.delete(k.claim(request_id))
                except Exception:
                    pass
            return FeedbackResult("unavailable", request_id)

    # --- lifecycle -------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(
            connected=self._connected,
            answers_reads=self._answers_reads,  # refusing writes (OOM), still readable: the dashboard's lists
            budget_mode="redis" if self._connected and not self._budgets_fallback else "local",
            unsynced_budget_usd=self._budgets.unpushed_usd(),
            reconnects=self.reconnects,
            restores=self.restores,
        )
        return h

    async def start(self) -> None:
        if self._started:
            return
        self._take_saved_budgets()
        await super().start()
        if self._connected:
            await self._warn_if_evicting()
        if self._connected:  # what the spend views show should Redis be away before anyone looked
            hours, days = spend_periods(time.time())
            await self._load_spend(hours + days)
        if (self._budgets.unsynced or self._budgets.pending) and self._connected:
            try:  # now, before the first request reserves against counters that lack them
                await self._periodic()
            except Exception as exc:
                self._on_error("budget push", exc)
        if self._connected:  # before feedback comes for the requests they record
            try:
                await self._write_saved_events()
            except Exception as exc:
                self._on_error("saved events", exc)

    async def close(self, timeout_s: float = 5.0) -> None:
        await super().close(timeout_s)
        self._save_unpushed_budgets()
        self._save_unwritten_events()
        try:
            await self._client.aclose()
        except Exception:
            pass

    async def _write_saved_events(self) -> None:
        """Write the events that processes stopped while Redis was away saved in `data_dir`
        (`_save_unwritten_events`), each file in the batches it was saved in; raises (the file stays)
        when Redis does not take one."""
        if self.data_dir is None or not self.data_dir.is_dir():
            return

        async def write(batch: list[Event]) -> None:
            batch = self._valid(batch)
            if batch:
                await self._write_batch(batch)

        written, problems = await unwritten_events.take_over(self.data_dir, write)
        for problem in problems:
            log.error("unreadable saved events, not written: %s", problem)
        if written:
            log.info("wrote %d events a process gone from %s saved unwritten", written, self.data_dir)

    def _save_unwritten_events(self) -> None:
        """Events still buffered at shutdown (Redis away or taking no writes) would be lost: learned
        stats, request records (feedback for those requests would be a 404), spend rollups. Saved under
        `data_dir` in the batches they were (or were to be) written in, for the next start there or a
        replica running beside it."""
        if not self._buffer:
            return
        events = list(self._buffer)
        # A batch whose write failed (its reply lost, it may be in Redis) stays that batch, so its mark
        # tells Redis it has it; the rest in the batches the flush would make.
        first = self._retry_size or BATCH_MAX
        batches = [events[:first]] + [events[i:i + BATCH_MAX] for i in range(first, len(events), BATCH_MAX)]
        if self.data_dir is None:
            log.error("Redis did not take %d buffered events by shutdown: they are lost", len(events))
            return
        try:
            path = unwritten_events.save(self.data_dir, batches)
        except OSError as exc:
            log.error("Redis did not take %d buffered events by shutdown, and they could not be saved in %s: "
                      "%s; they are lost", len(events), self.data_dir, exc)
            return
        self._buffer.clear()
        log.warning("Redis did not take %d buffered events by shutdown: saved to %s; the next start on that "
                    "directory, or a replica running there, writes them once Redis takes writes", len(events), path)
