"""The on-disk journal of budget changes Redis has not confirmed, so that a crash cannot lose them.

While Redis is away a replica admits spend from its in-process ledger (budgets.py). Each change is
appended to this process's journal in the data directory as it is made, before the request that made
it calls a backend, and the journal is dropped once Redis has confirmed every change in it. A replica
that dies (SIGKILL, OOM kill, a crash) leaves its journal behind, and the next start in that directory
takes it over: it copies the changes into its own journal (synced to disk) before it deletes the dead
one, and pushes them when Redis answers. Every change carries the token Redis applies it under at most
once (a push's mark, a settle's hold), so a change copied twice, or pushed just before a crash that
kept it from being marked done, is still counted once.

Appends are one `write` each, not synced: they survive the death of the process, not of the machine.
Rewrites (compaction, shutdown, taking over a dead journal) are synced.

A journal is alive while its process holds an exclusive `flock` on it (the kernel drops the lock when
the process dies, however it dies), so replicas sharing a directory never take each other's. Files
an older version saved at shutdown (`*.json`, one JSON array) are taken over the same way.

Lines (JSON arrays): ["add", token, counter, expiry, delta] adds to the change of that token (a
ledger's unsynced delta, accumulated); ["put", token, consumes_hold, counters, expiries, delta,
counted] records a whole change; ["done", token] says Redis confirmed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from .budgets import BudgetChange

log = logging.getLogger("ponder.telemetry")

FILE_PREFIX = "budget-unsynced-"
COMPACT_AFTER = 10_000  # lines; the journal is rewritten with the live changes alone past this


def put_record(change: BudgetChange) -> list:
    return ["put", change.token, change.consumes_hold, list(change.keys), list(change.expires), change.delta,
            change.counted]


def _locked_new_file(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written != len(data):  # a regular file writes short only when the disk is full
        raise OSError(f"journal write cut short: {written} of {len(data)} bytes")


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BudgetJournal:
    """This process's journal. The file is made on the first change and removed when nothing in it is
    left to push; until then the process holds its lock. Write errors are logged, never raised into
    a request; `ok` says whether every line so far reached the file."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path: Path | None = None
        self.lines = 0  # since the file was last (re)written
        self.ok = True
        self._fd: int | None = None

    def append(self, *, added: list[tuple[str, str, float, float]] = (), put: list[BudgetChange] = (),
               done: list[str] = ()) -> bool:
        """One write: `added` (token, counter, expiry, delta) of unsynced deltas, whole changes `put`, and
        the tokens Redis confirmed (`done`)."""
        records = [["add", *a] for a in added] + [put_record(c) for c in put] + [["done", t] for t in done]
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        try:
            if self._fd is None:
                self._install(b"")
            assert self._fd is not None
            _write_all(self._fd, data)
        except OSError as exc:
            self._failed("append to", exc)
            return False
        self.lines += len(records)
        return True

    def due(self, live: int) -> bool:
        """Whether the file has grown enough past the `live` changes it holds to be rewritten."""
        return self.lines > max(COMPACT_AFTER, 2 * live)

    def rewrite(self, changes: list[BudgetChange]) -> bool:
        """Replace the file with one holding just `changes` (synced), or remove it when there are none."""
        if not changes:
            self.discard()
            return True
        try:
            self._install(b"".join(orjson.dumps(put_record(c)) + b"\n" for c in changes))
        except OSError as exc:
            self._failed("rewrite", exc)
            return False
        self.ok, self.lines = True, len(changes)
        return True

    def discard(self) -> None:
        """Redis has every change: remove the file (unlinked before the lock is let go)."""
        if self._fd is None:
            return
        try:
            assert self.path is not None
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            self._failed("remove", exc)
        os.close(self._fd)
        self._fd, self.path, self.lines, self.ok = None, None, 0, True

    def close(self) -> None:
        """Let the file go as it is (for the next start); the caller has rewritten it. A change made
        after this starts a new file."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.path, self.lines = None, None, 0

    def _install(self, data: bytes) -> None:
        """Write `data` to a new locked file and rename it over the journal, so a reader sees the old
        file or the new one, each whole and each locked while it is this process's."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.path or self.data_dir / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        partial = path.with_suffix(".partial")
        fd = _locked_new_file(partial)
        try:
            if data:
                _write_all(fd, data)
                os.fsync(fd)
            os.replace(partial, path)
        except OSError:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.path = fd, path
        if data:  # the rename too, before a taken-over file is deleted
            _sync_dir(self.data_dir)

    def _failed(self, what: str, exc: OSError) -> None:
        if self.ok:  # once per failure, not once per request
            log.error("cannot %s the budget journal in %s: %s; budget changes Redis has not confirmed are "
                      "kept in memory only until it can", what, self.data_dir, exc)
        self.ok = False


def replay(data: bytes) -> tuple[list[BudgetChange], int]:
    """The changes a journal still holds, and how many of its lines could not be read."""
    changes: dict[str, BudgetChange] = {}
    bad = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            if rec[0] == "add":
                _, token, key, expires, delta = rec
                if token in changes:
                    changes[token].delta += _number(delta)
                else:
                    changes[token] = BudgetChange(str(token), False, (str(key),), (_number(expires),), _number(delta))
            elif rec[0] == "put":
                _, token, hold, keys, expires, delta, counted = rec
                changes.setdefault(token, BudgetChange(str(token), bool(hold), tuple(map(str, keys)),
                                                       tuple(map(_number, expires)), _number(delta), bool(counted)))
            elif rec[0] == "done":
                changes.pop(rec[1], None)
            else:
                raise ValueError(f"unknown line {rec[0]!r}")
        except (ValueError, TypeError, IndexError, KeyError):
            bad += 1
    # A settle with nothing to add still frees its hold; a push of nothing is nothing.
    return [c for c in changes.values() if c.consumes_hold or abs(c.delta) > 1e-12], bad


def _number(value) -> float:
    """A journal's amount or expiry: a finite JSON number, as the journal's writer writes them. Anything
    else (a string, "inf", NaN) is a line someone else wrote into data_dir: unreadable, not pushed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


def _saved_change(row, token_for) -> BudgetChange:
    if isinstance(row, list):  # [counter key, delta, expiry], written before changes carried tokens
        key, delta, expires = row
        return BudgetChange(token_for(str(key)), False, (str(key),), (float(expires),), float(delta))
    return BudgetChange(str(row["token"]), bool(row["consumes_hold"]), tuple(map(str, row["keys"])),
                        tuple(map(float, row["expires"])), float(row["delta"]), bool(row["counted"]))


def _read(path: Path, data: bytes, token_for) -> tuple[list[BudgetChange], int]:
    if path.suffix == ".jsonl":
        return replay(data)
    return [_saved_change(row, token_for) for row in orjson.loads(data)], 0  # saved by an older version


def take_over(data_dir: Path, adopt: Callable[[list[BudgetChange]], bool], token_for) -> list[str]:
    """Hand the changes of every dead journal (and older saved file) in `data_dir` to `adopt`, which
    makes them durable in this process's journal and says whether it did; only then is the file
    deleted. Returns a line per file not (wholly) readable, which is kept renamed `*.bad` for an
    operator. `token_for(counter)` names a change an older version saved without a token."""
    problems: list[str] = []
    for path in sorted([*data_dir.glob(f"{FILE_PREFIX}*.jsonl"), *data_dir.glob(f"{FILE_PREFIX}*.json")]):
        with claimed(path) as data:
            if data is None:
                continue  # its process is alive, or another took it meanwhile
            try:
                try:
                    changes, bad = _read(path, data, token_for)
                except (ValueError, TypeError, KeyError) as exc:
                    problems.append(f"{path}: {exc}")
                    os.replace(path, path.with_suffix(".bad"))
                    continue
                if not adopt(changes):
                    continue  # not safe anywhere else yet: leave it for the next start
                if bad:
                    problems.append(f"{path}: {bad} unreadable lines (the others are taken)")
                    os.replace(path, path.with_suffix(".bad"))
                else:
                    path.unlink()
            except OSError as exc:
                problems.append(f"{path}: {exc}")
    return problems


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[bytes | None]:
    """A file another process left, read under an exclusive lock held until the block ends (so two
    processes never take one file); None when its writer is alive (it holds the lock) or another
    process took it meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield None  # taken (removed) by another process meanwhile
        return
    try:
        yield _read_locked(fd, path)
    finally:
        os.close(fd)


def _read_locked(fd: int, path: Path) -> bytes | None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return None  # taken (and removed or replaced) by another process meanwhile
    except OSError:
        return None  # locked: its process is alive
    with os.fdopen(os.dup(fd), "rb") as f:
        return f.read()
