"""The embedded store: the Redis store's semantics in one process, persisted to sqlite in data_dir.

Memory is authoritative (aggregates, budget ledger); sqlite (stdlib, WAL) is written behind it on the
flush task, in one transaction per turn, from a single worker thread so the event loop never waits on
disk. A crash loses at most the last turn (milliseconds); a clean close() writes everything. Disk use is
bounded: the events table keeps the newest `stream_maxlen` rows, request records are purged after the
feedback window, spend rollups after 35 days, budget counters when their period ends.

One process per data_dir: an exclusive lock file says so early instead of letting two processes
each think they own the budgets.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from .aggregates import apply_delta, group_deltas, spend_deltas
from .budget_journal import FILE_PREFIX as JOURNAL_PREFIX
from .unwritten_events import FILE_PREFIX as EVENTS_PREFIX
from .budgets import LocalBudgets, Reservation, make_reservation, period_id
from .events import Event
from .store import BufferedStore, FeedbackResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT, ts REAL, body BLOB);
CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT, ts REAL, body BLOB);
CREATE TABLE IF NOT EXISTS aggregates (policy TEXT, bucket TEXT, arm TEXT, fields TEXT,
                                       PRIMARY KEY (policy, bucket, arm));
-- requests.ts is when the row was written (purge); the request's own time is in meta
CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, ts REAL, meta TEXT, feedback TEXT);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS budgets (key TEXT PRIMARY KEY, spent REAL, expires REAL);
CREATE TABLE IF NOT EXISTS spend (period TEXT, name TEXT, value REAL, PRIMARY KEY (period, name));
"""
PURGE_EVERY_S = 60.0
SPEND_KEEP_S = 35 * 86400


def _budget_key(key_id: str, period: str, pid: str) -> str:
    return f"{key_id}|{period}|{pid}"


def lock_data_dir(data_dir: Path) -> int:
    """Create `data_dir` and take its exclusive lock: the returned fd holds it (closing it lets go).
    RuntimeError, with what is wrong, when the directory cannot be used or another store holds it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "telemetry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise RuntimeError(f"cannot create {data_dir} or write in it ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"{data_dir} is in use by another Ponder store (telemetry.lock)") from None
    return fd


def check_data_dir(data_dir: Path) -> None:
    """Raise the RuntimeError that opening a store on `data_dir` would, before a server is started for it.
    The lock is taken and let go at once, so the store that starts next can take it."""
    os.close(lock_data_dir(data_dir))
    if not os.access(data_dir, os.W_OK | os.X_OK):  # sqlite creates its files next to the lock file
        raise RuntimeError(f"cannot create {data_dir} or write in it (Permission denied)")


def holds_store(data_dir: Path) -> bool:
    """Whether a gateway kept telemetry in `data_dir`: an embedded store, or budget changes journaled
    (or events saved) while Redis was away."""
    return (data_dir / "telemetry.sqlite3").exists() or any(data_dir.glob(f"{JOURNAL_PREFIX}*")) or any(
        data_dir.glob(f"{EVENTS_PREFIX}*"))


class EmbeddedStore(BufferedStore):
    backend = "embedded"
    requeue_failed_batches = False

    def __init__(self, data_dir: Path, **common: Any) -> None:
        super().__init__(**common)
        self.data_dir = data_dir
        self.path = data_dir / "telemetry.sqlite3"
        self._aggs: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
        self._dirty_aggs: set[tuple[str, str, str]] = set()
        self._budgets = LocalBudgets()
        self._budgets_dirty = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponder-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._last_purge = 0.0

    # --- the sqlite worker thread ------------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open_db(self) -> None:
        self._lock_fd = lock_data_dir(self.data_dir)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    def _load_state(self) -> tuple[list, list]:
        assert self._db is not None
        now = time.time()
        aggs = self._db.execute("SELECT policy, bucket, arm, fields FROM aggregates").fetchall()
        budgets = self._db.execute("SELECT key, spent, expires FROM budgets WHERE expires = 0 OR expires > ?", (now,)).fetchall()
        return aggs, budgets

    def _persist(self, events: list, requests: list, aggs: list, spend: dict, budgets: list | None, feedback: list) -> None:
        db = self._db
        assert db is not None
        now = time.time()
        db.execute("BEGIN")
        try:
            if events:
                db.executemany("INSERT INTO events (request_id, ts, body) VALUES (?, ?, ?)", events)
                db.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (self.stream_maxlen,))
            if feedback:
                db.executemany("INSERT INTO feedback (request_id, ts, body) VALUES (?, ?, ?)", feedback)
                db.execute("DELETE FROM feedback WHERE id <= (SELECT MAX(id) FROM feedback) - ?", (self.stream_maxlen,))
            if requests:
                db.executemany(
                    "INSERT INTO requests (request_id, ts, meta) VALUES (?, ?, ?) "
                    "ON CONFLICT (request_id) DO UPDATE SET ts = excluded.ts, meta = excluded.meta",
                    requests,
                )
            if aggs:
                db.executemany("INSERT OR REPLACE INTO aggregates (policy, bucket, arm, fields) VALUES (?, ?, ?, ?)", aggs)
            for period, fields in spend.items():
                db.executemany(
                    "INSERT INTO spend (period, name, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (period, name) DO UPDATE SET value = value + excluded.value",
                    [(period, name, value) for name, value in fields.items()],
                )
            if budgets is not None:
                db.execute("DELETE FROM budgets")
                db.executemany("INSERT INTO budgets (key, spent, expires) VALUES (?, ?, ?)", budgets)
            if now - self._last_purge > PURGE_EVERY_S:
                self._last_purge = now
                db.execute("DELETE FROM requests WHERE ts < ?", (now - self.feedback_window_s - 86400,))
                cutoff = time.gmtime(now - SPEND_KEEP_S)
                db.execute("DELETE FROM spend WHERE (period LIKE 'd:%' AND period < ?) OR (period LIKE 'h:%' AND period < ?)",
                           (time.strftime("d:%Y%m%d", cutoff), time.strftime("h:%Y%m%d%H", cutoff)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _claim_feedback(self, request_id: str, key_id: str | None, score: float, now: float):
        """Look the request up and claim its feedback slot in one step (the worker thread serialises)."""
        assert self._db is not None
        row = self._db.execute("SELECT ts, meta, feedback FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return "unknown_request", None
        _, meta, previous = row
        m = orjson.loads(meta)
        if key_id is not None and m.get("k") is not None and m["k"] != key_id:
            return "forbidden", None
        if now - float(m["ts"]) > self.feedback_window_s:
            return "expired", m
        if previous is not None:
            return "duplicate", m
        record = orjson.dumps({"request_id": request_id, "score": score, "ts": now, "key_id": key_id})
        self._db.execute("UPDATE requests SET feedback = ? WHERE request_id = ?", (record, request_id))
        return "accepted", m

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        await self._run(self._open_db)
        aggs, budgets = await self._run(self._load_state)
        for policy, bucket, arm, fields in aggs:
            self._aggs.setdefault(policy, {})[(bucket, arm)] = {k: float(v) for k, v in orjson.loads(fields).items()}
        for key, spent, expires in budgets:
            self._budgets.spent[key] = spent
            self._budgets.expires[key] = expires
        await super().start()

    async def close(self, timeout_s: float = 5.0) -> None:
        await super().close(timeout_s)
        try:
            await self._run(self._close_db)
        finally:
            self._executor.shutdown(wait=False)

    # --- writes ---------------------------------------------------------------------------------------------

    def _dirty_rows(self) -> tuple[list, list | None]:
        aggs = []
        for policy, bucket, arm in self._dirty_aggs:
            fields = self._aggs.get(policy, {}).get((bucket, arm))
            if fields is not None:
                aggs.append((policy, bucket, arm, orjson.dumps(fields).decode()))
        self._dirty_aggs.clear()
        budgets = None
        if self._budgets_dirty:
            now = time.time()
            self._budgets.purge(now)
            budgets = [(k, self._budgets.get(k, now), self._budgets.expires.get(k, 0.0)) for k in self._budgets.spent]
            self._budgets_dirty = False
        return aggs, budgets

    async def _write_batch(self, batch: list[Event]) -> None:
        # Applied to memory first and never retried: a failed disk write must not count events twice.
        for (policy, bucket, arm), (t, delta) in group_deltas(batch, self.half_life_s).items():
            apply_delta(self._aggs.setdefault(policy, {}).setdefault((bucket, arm), {}), delta, t, self.half_life_s)
            self._dirty_aggs.add((policy, bucket, arm))
        events, requests = [], []
        for ev in batch:
            try:
                events.append((ev.request_id, ev.ts, ev.to_json()))
            except Exception as exc:
                self._on_error("serialise", exc)
                continue
            if ev.request_id and ev.arm_outcome:  # feedback scores an arm's answer
                meta = {"p": ev.policy, "b": ev.bucket, "a": ev.arm, "ts": ev.ts, "k": ev.key_id}
                meta.update(s=ev.success, w=ev.success_weight)
                # Purged by the time it was written, like the Redis key's TTL, not by the request's time.
                requests.append((ev.request_id, time.time(), orjson.dumps(meta).decode()))
        try:
            await self._persist_dirty(events, requests, spend_deltas(batch), [])
        except Exception as exc:
            self._on_error("persist", exc)

    async def _persist_dirty(self, events: list, requests: list, spend: dict, feedback: list) -> None:
        dirty = set(self._dirty_aggs)
        aggs, budgets = self._dirty_rows()
        try:
            await self._run(self._persist, events, requests, aggs, spend, budgets, feedback)
        except BaseException:
            self._dirty_aggs |= dirty  # written on the next turn
            self._budgets_dirty = self._budgets_dirty or budgets is not None
            raise

    async def _periodic(self) -> None:
        if self._dirty_aggs or self._budgets_dirty:
            await self._persist_dirty([], [], {}, [])

    # --- reads ----------------------------------------------------------------------------------------------

    async def _load_aggregates(self) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
        return {p: {key: dict(fields) for key, fields in arms.items()} for p, arms in self._aggs.items()}

    async def _load_spend(self, periods: list[str]) -> dict[str, dict[str, float]]:
        await self.flush()

        def query() -> list:
            assert self._db is not None
            marks = ",".join("?" * len(periods))
            return self._db.execute(f"SELECT period, name, value FROM spend WHERE period IN ({marks})", periods).fetchall()

        out: dict[str, dict[str, float]] = {}
        for period, name, value in await self._run(query):
            out.setdefault(period, {})[name] = value
        return out

    async def recent_events(self, limit: int = 100) -> list[dict[str, Any]]:
        out = self._buffered_dicts(limit)
        if len(out) < limit:

            def query() -> list:
                assert self._db is not None
                return self._db.execute("SELECT body FROM events ORDER BY id DESC LIMIT ?", (limit - len(out),)).fetchall()

            out += [orjson.loads(body) for (body,) in await self._run(query)]
        return out

    # --- feedback and budgets --------------------------------------------------------------------------------

    async def feedback(self, request_id: str, score: float, key_id: str | None) -> FeedbackResult:
        score = min(1.0, max(0.0, float(score)))
        await self.flush()  # the request's record may still be in the buffer
        status, m = await self._run(self._claim_feedback, request_id, key_id, score, time.time())
        found = dict(policy=m["p"], bucket=m["b"], arm=m["a"]) if m else {}
        if status == "accepted":
            weight, auto = float(m.get("w") or 0.0), float(m.get("s") or 0.0)
            delta = {"successes": score - weight * auto, "weight": 1.0 - weight}
            fields = self._aggs.setdefault(m["p"], {}).setdefault((m["b"], m["a"]), {})
            apply_delta(fields, delta, float(m["ts"]), self.half_life_s)
            self._dirty_aggs.add((m["p"], m["b"], m["a"]))
            record = orjson.dumps({"request_id": request_id, "score": score, "ts": time.time(), "key_id": key_id})
            try:
                await self._persist_dirty([], [], {}, [(request_id, time.time(), record)])
            except Exception as exc:
                self._on_error("persist", exc)
        return FeedbackResult(status, request_id, **found)

    async def reserve(self, key_id: str, amount_usd: float, limits: dict[str, float]) -> Reservation:
        now = time.time()
        res = make_reservation(key_id, amount_usd, limits, now, _budget_key)
        if res.keys:
            # No await between check and charge: atomic on the event loop.
            self._budgets.reserve(res, [float(limits[p]) for p in res.periods], now, track_unsynced=False)
            self._budgets_dirty = True
            self._wake.set()
        return res

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        delta = reservation.close(actual_usd)
        if delta is None:
            return
        now = time.time()
        for key, ttl in zip(reservation.keys, reservation.ttls):
            self._budgets.add(key, delta, ttl, now, track_unsynced=False)
        self._budgets_dirty = True
        self._wake.set()

    async def spent(self, key_id: str, periods=("day", "month")) -> dict[str, float]:
        now = time.time()
        return {p: self._budgets.get(_budget_key(key_id, p, period_id(p, now)[0]), now) for p in periods}

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(connected=self._db is not None, budget_mode="local", path=str(self.path))
        return h


def read_aggregates(data_dir: Path) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
    """Read an embedded store's persisted aggregates without opening it (read-only, no lock), so
    `ponder stats` works while a gateway holds the store."""
    path = Path(data_dir) / "telemetry.sqlite3"
    if not path.exists():
        # Not "nothing recorded": a directory no gateway wrote to (a typo, the default .ponder where the
        # gateway's config names another) read as an empty store, as if its telemetry had been lost.
        raise FileNotFoundError(f"no embedded store in {data_dir} ({path.name} is not there): give the gateway's "
                                "--config, or its telemetry.data_dir as --data-dir (or --redis-url)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT policy, bucket, arm, fields FROM aggregates").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        db.close()
    out: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    for policy, bucket, arm, fields in rows:
        out.setdefault(policy, {})[(bucket, arm)] = {k: float(v) for k, v in orjson.loads(fields).items()}
    return out
