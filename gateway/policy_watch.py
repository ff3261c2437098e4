"""Named policies, hot reloaded: a changed file replaces its policy only if the new file is valid.

A broken edit is logged, kept in `rejected` until the file loads again (the gateway's /metrics shows
it), and the previous policy keeps serving; in-flight requests keep the policy
object they started with (policies are immutable once loaded).

A change is what the file holds, not its mtime: two saves within one tick of the kernel's file clock
(a few ms) leave one mtime, and a file restored with its old mtime (`cp -p`, `rsync -t`) or swapped
under a symlink (a Kubernetes ConfigMap's `..data`) may look unchanged to an mtime. The file is read
only when its stat (inode, size, mtime, ctime) differs from the one it had when last read, or for
SETTLE_S after a stat first seen (a second save in the same clock tick leaves the same stat): a 10 MB
policy was read and hashed every second (47 ms of the loop each time, before reads moved to a thread),
and a file on a slow network mount would be read for each poll.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from policies.backends import BackendSpec
from policies.loader import PolicyError, load_policy
from policies.schema import Policy
from router.estimates import CompiledPolicy, compile_policy

log = logging.getLogger("ponder.policy")


@dataclass
class _Entry:
    path: Path
    digest: bytes | None  # of the file's content when last read; None while it cannot be read
    compiled: CompiledPolicy
    stat: tuple[int, ...] | None = None  # the file's _stat_key when its digest was taken
    stat_seen: float = 0.0  # monotonic time that stat was first seen: it is trusted SETTLE_S after


# Longer than any file clock's tick (FAT's is 2 s): a save after it changes the stat for sure
SETTLE_S = 3.0


def _digest(path: Path) -> bytes:
    """What the file holds, hashed."""
    return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()


def _stat_key(path: Path) -> tuple[int, ...]:
    """What a stat says of the file (through a symlink): any save or swap changes one of these, though
    not always within one clock tick (see SETTLE_S); ctime cannot be set back as mtime can (`cp -p`)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class PendingReload:
    """What PolicySet.read_changed read and compiled, for swap_in to serve."""

    due: dict[str, None] = field(default_factory=dict)  # the policies read again, in order (a set's is random)
    digests: dict[str, bytes] = field(default_factory=dict)  # policy -> its file's content now
    unreadable: dict[str, OSError] = field(default_factory=dict)
    refused: dict[str, PolicyError] = field(default_factory=dict)
    read: dict[str, tuple[_Entry, CompiledPolicy]] = field(default_factory=dict)  # what loads, compiled
    stats: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)  # policy -> a new stat, when seen


class PolicySet:
    def __init__(self, default: str, extra: dict[str, str], backends: list[BackendSpec]) -> None:
        self._backends = backends
        self._entries: dict[str, _Entry] = {}
        self._config_keys = {Path(path): key for key, path in extra.items()}  # the names the config gives them
        problems: list[tuple[str, int | None, str, str]] = []  # every file's, not the first one's alone
        for index, path in enumerate([default, *extra.values()]):
            try:
                name = self._load(Path(path))
            except PolicyError as exc:
                problems += [problem for problem in exc.problems if problem not in problems]  # a file named twice
                continue
            if index == 0:
                self.default_name = name
        if problems:
            raise PolicyError(problems)
        self.last_error: str | None = None
        self.rejected: dict[str, str] = {}  # policy -> why the file on disk is not what serves (its last edit failed)

    def _load(self, path: Path) -> str:
        stat = _stat_key(path) if path.is_file() else None  # taken before the read: a save meanwhile shows
        digest = _digest(path) if path.is_file() else None  # an unreadable file: load_policy says why
        policy: Policy = load_policy(path, extra_backends=self._backends, served_inline=self._inline_elsewhere(path))
        self._check_unique(policy.name, path)
        self._entries[policy.name] = _Entry(path, digest, compile_policy(policy), stat, time.monotonic())
        return policy.name

    def _check_unique(self, name: str, path: Path, upcoming: dict[str, Path] | None = None) -> None:
        """Policies are chosen by name (x-ponder-policy, telemetry): a second file with a name already
        served (or, `upcoming`, taken by another file of the same reload) would silently replace the
        first, the default included."""
        entry = self._entries.get(name)
        other = (upcoming or {}).get(name, entry.path if entry is not None else None)
        if other is not None and other.resolve() != path.resolve():
            raise PolicyError([(str(path), None, "name", f"{name!r} is already the name of the policy in "
                                                        f"{other}; each policy file needs its own name")])

    def _inline_elsewhere(self, path: Path, upcoming: dict[str, Policy] | None = None) -> dict[str, tuple[BackendSpec, str]]:
        """The backends the other policies declare inline (not the gateway config's), with whose they are:
        the gateway serves one backend per name, so a policy may declare one of them only as they do.
        `upcoming`: policy -> the version a reload is about to serve instead of the one serving."""
        configured = {spec.name for spec in self._backends}
        return {spec.name: (spec, f"`{name}` ({entry.path})") for name, entry in self._entries.items()
                if entry.path.resolve() != path.resolve()
                for spec in (upcoming or {}).get(name, entry.compiled.policy).backends if spec.name not in configured}

    def warnings(self) -> list[str]:
        """What serves, but not as the operator likely meant (the gateway logs it at start and on each
        reload, `ponder policy check --config` prints it). extra_policies are picked with x-ponder-policy,
        which only a default policy with overrides.policy_header (off by default) honours: else the
        header is ignored and every request gets the default, with nothing said."""
        default = self.default.policy
        others = [name for name in self.names() if name != default.name]
        if others and not default.overrides.policy_header:
            return [f"policies {', '.join(others)} cannot be picked: the default policy {default.name!r} does not "
                    f"honour x-ponder-policy (overrides.policy_header: false), so every request gets {default.name!r}"]
        # x-ponder-policy picks a policy by the `name` in its file: an extra_policies key that differs
        # reads as the name to send, and sending it is answered 400 unknown_policy
        return [f"extra_policies.{key} is policy {name!r} ({entry.path}): clients pick it with "
                f"x-ponder-policy: {name}, not {key}"
                for name, entry in self._entries.items()
                if (key := self._config_keys.get(entry.path)) is not None and key != name]

    def get(self, name: str | None = None) -> CompiledPolicy | None:
        entry = self._entries.get(name or self.default_name)
        return entry.compiled if entry else None

    @property
    def default(self) -> CompiledPolicy:
        return self._entries[self.default_name].compiled

    def names(self) -> list[str]:
        return list(self._entries)

    def path(self, name: str) -> Path:
        """The file the policy named `name` was read from."""
        return self._entries[name].path

    def all(self) -> list[CompiledPolicy]:
        return [entry.compiled for entry in self._entries.values()]

    def reload_changed(self, *, force: bool = False) -> list[str]:
        """Reload every policy whose file changed; returns the names reloaded. (The gateway splits it:
        read_changed in a thread, then swap_in on the event loop.)"""
        return self.swap_in(self.read_changed(force=force))

    def read_changed(self, *, force: bool = False) -> PendingReload:
        """Read, validate and compile every policy whose file changed (`force`: every file), changing
        nothing: what a big policy costs (~50 ms for multi-provider.yaml) runs off the event loop, in a
        thread, while requests are served; swap_in then serves the result. One at a time: the gateway
        holds a lock from this call to swap_in's."""
        pending = PendingReload()
        now = time.monotonic()
        for name, entry in list(self._entries.items()):
            try:
                stat = _stat_key(entry.path)
                if stat == entry.stat and entry.digest is not None and now - entry.stat_seen > SETTLE_S \
                        and not force:
                    continue  # unchanged, and past the tick in which a second save could hide
                if stat != entry.stat:  # kept by swap_in: a reload that fails or is dropped reads it again
                    pending.stats[name] = stat, now
                digest = _digest(entry.path)
            except OSError as exc:
                pending.unreadable[name] = exc
                continue
            if digest == entry.digest and not force:
                continue
            pending.digests[name] = digest
            pending.due[name] = None
        if pending.due:
            # A policy refused for declaring a shared inline backend unlike another is read again beside
            # that one's edit: an edit of such a backend in every file that declares it was refused in
            # each (checked against the others' versions serving), for good.
            pending.due.update(dict.fromkeys(name for name, entry in self._entries.items() if name in self.rejected
                                             and entry.digest is not None and name not in pending.unreadable))
        read = pending.read
        for name in pending.due:
            entry = self._entries[name]
            try:
                policy = load_policy(entry.path, extra_backends=self._backends)
                self._check_unique(policy.name, entry.path, {c.policy.name: e.path for e, c in read.values()})
                read[name] = entry, compile_policy(policy)
            except PolicyError as exc:
                pending.refused[name] = exc
        # Then the inline backends of those whose backends changed, against the others as they will
        # serve: their new version where it loads, else the one serving (a refusal puts that one back, so
        # the rest are checked again). A policy whose backends did not change clashes with none serving.
        moved = [name for name, (entry, compiled) in read.items()
                 if compiled.policy.backends != entry.compiled.policy.backends]
        checked = False
        while not checked:
            checked = True
            upcoming = {name: read[name][1].policy for name in moved}
            for name in moved:
                path = read[name][0].path
                try:
                    load_policy(path, extra_backends=self._backends,
                                served_inline=self._inline_elsewhere(path, upcoming))
                except PolicyError as exc:
                    pending.refused[name] = exc
                    del read[name]
                    moved.remove(name)
                    checked = False
                    break
        return pending

    def swap_in(self, pending: PendingReload) -> list[str]:
        """Serve what read_changed compiled, all at once (no await here: no request sees half of it);
        requests in flight keep the compiled policy they started with. Returns the names reloaded."""
        for name, (stat, seen) in pending.stats.items():
            self._entries[name].stat, self._entries[name].stat_seen = stat, seen
        for name, exc in pending.unreadable.items():
            entry = self._entries[name]
            if entry.digest is not None:  # said once, not every poll
                log.error("policy file unreadable, the previous %r keeps serving: %s", name, exc)
            self.last_error = self.rejected[name] = f"{entry.path}: {exc}"
            entry.digest = None  # once the file is back it is loaded, whatever it holds
        for name, digest in pending.digests.items():
            self._entries[name].digest = digest  # a broken file is reported once, not every poll
        for name, exc in pending.refused.items():
            self._reject(name, exc)
        reloaded = []
        for name, (entry, compiled) in pending.read.items():
            new_name = compiled.policy.name
            if new_name != name:
                self._entries.pop(name)
                if name == self.default_name:
                    self.default_name = new_name
            self._entries[new_name] = _Entry(entry.path, entry.digest, compiled, entry.stat, entry.stat_seen)
            self.rejected.pop(name, None)
            reloaded.append(new_name)
            log.info("policy %r reloaded from %s", new_name, entry.path)
        if reloaded and not any(name in self.rejected for name in pending.due):
            self.last_error = None
        return reloaded

    def _reject(self, name: str, exc: PolicyError) -> None:
        self.last_error = self.rejected[name] = str(exc)
        log.error("policy reload rejected, the previous %r keeps serving: %s", name, exc)
