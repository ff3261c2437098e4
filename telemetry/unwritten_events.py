"""Events a gateway could not write to Redis by its shutdown (Redis away, or taking no writes), saved
under the data directory for the next start there, or a replica running beside it, to write.

One file per stopping process (`events-unwritten-<pid>-<id>.jsonl`), written whole (to a `.partial`
renamed into place, synced), so a reader never sees half of one. A line is `[batch, event]`: the
events keep the batches the store wrote (or tried to write) them in, so a batch Redis applied all the
same (its reply lost to a timeout just before the shutdown), or one a take-over cut short by a crash
had written, is sent as that same batch again and Redis's batch mark (redis_schema.BATCH_LUA) skips
it: nothing is counted twice. A taker holds an exclusive `flock` on the file while it writes it and
deletes it once Redis took every batch, so replicas sharing the directory never write one file at
once, and a taker that dies leaves it whole for the next.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from .budget_journal import _sync_dir, _write_all, claimed
from .events import Event

FILE_PREFIX = "events-unwritten-"


def save(data_dir: Path, batches: list[list[Event]]) -> Path:
    """Write `batches` to a new file in `data_dir` (synced) and return its path; raises OSError."""
    data = b"".join(b"[%d," % n + ev.to_json() + b"]\n" for n, batch in enumerate(batches) for ev in batch)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    _sync_dir(data_dir)
    return path


def read(data: bytes) -> tuple[list[list[Event]], int]:
    """The batches a file holds, in order, and how many of its lines could not be read (a truncated or
    corrupt line is skipped; the others are written)."""
    batches: dict[int, list[Event]] = {}
    bad = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            n, body = orjson.loads(line)
            if not isinstance(n, int) or isinstance(n, bool) or not isinstance(body, dict):
                raise ValueError("not [batch, event]")
            ev = Event.from_dict(body)
        except Exception:  # anything a damaged line can raise, in the parser or the Event
            bad += 1
            continue
        batches.setdefault(n, []).append(ev)
    return [batches[n] for n in sorted(batches)], bad


async def take_over(data_dir: Path, write: Callable[[list[Event]], Awaitable[None]]) -> tuple[int, list[str]]:
    """Write the events of every saved file in `data_dir` that no other process is writing: each batch
    with `write`, which raises when Redis does not take it (the file then stays, whole, for the next
    try); then delete the file. Returns how many events were written, and a line per file that had
    unreadable lines (kept renamed `*.bad` for an operator once the rest is written)."""
    written, problems = 0, []
    for path in sorted(data_dir.glob(f"{FILE_PREFIX}*.jsonl")):
        with claimed(path) as data:
            if data is None:
                continue  # another process is writing it, or wrote it meanwhile
            batches, bad = read(data)
            for batch in batches:
                await write(batch)
            written += sum(map(len, batches))
            if bad:
                problems.append(f"{path}: {bad} unreadable lines skipped (the other events are written)")
                os.replace(path, path.with_suffix(".bad"))
            else:
                path.unlink()
    return written, problems
