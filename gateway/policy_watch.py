"""Named policies, hot reloaded: a changed file replaces its policy only if the new file is valid.

A broken edit is logged, kept in `rejected` until the file loads again (the gateway's /metrics shows
it), and the previous policy keeps serving; in-flight requests keep the policy
object they started with (policies are immutable once loaded).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from policies.backends import BackendSpec
from policies.loader import PolicyError, load_policy
from policies.schema import Policy
from router.estimates import CompiledPolicy, compile_policy

log = logging.getLogger("ponder.policy")


@dataclass
class _Entry:
    path: Path
    mtime: float
    compiled: CompiledPolicy


class PolicySet:
    def __init__(self, default: str, extra: dict[str, str], backends: list[BackendSpec]) -> None:
        self._backends = backends
        self._entries: dict[str, _Entry] = {}
        self.default_name = self._load(Path(default))
        for path in extra.values():
            self._load(Path(path))
        self.last_error: str | None = None
        self.rejected: dict[str, str] = {}  # policy -> why the file on disk is not what serves (its last edit failed)

    def _load(self, path: Path) -> str:
        policy: Policy = load_policy(path, extra_backends=self._backends, served_inline=self._inline_elsewhere(path))
        self._check_unique(policy.name, path)
        self._entries[policy.name] = _Entry(path, os.stat(path).st_mtime, compile_policy(policy))
        return policy.name

    def _check_unique(self, name: str, path: Path) -> None:
        """Policies are chosen by name (x-ponder-policy, telemetry): a second file with a name already
        served would silently replace the first, the default included."""
        other = self._entries.get(name)
        if other is not None and other.path.resolve() != path.resolve():
            raise PolicyError([(str(path), None, "name", f"{name!r} is already the name of the policy in "
                                                        f"{other.path}; each policy file needs its own name")])

    def _inline_elsewhere(self, path: Path) -> dict[str, tuple[BackendSpec, str]]:
        """The backends the other policies declare inline (not the gateway config's), with whose they are:
        the gateway serves one backend per name, so a policy may declare one of them only as they do."""
        configured = {spec.name for spec in self._backends}
        return {spec.name: (spec, f"`{name}` ({entry.path})") for name, entry in self._entries.items()
                if entry.path.resolve() != path.resolve()
                for spec in entry.compiled.policy.backends if spec.name not in configured}

    def get(self, name: str | None = None) -> CompiledPolicy | None:
        entry = self._entries.get(name or self.default_name)
        return entry.compiled if entry else None

    @property
    def default(self) -> CompiledPolicy:
        return self._entries[self.default_name].compiled

    def names(self) -> list[str]:
        return list(self._entries)

    def all(self) -> list[CompiledPolicy]:
        return [entry.compiled for entry in self._entries.values()]

    def reload_changed(self, *, force: bool = False) -> list[str]:
        """Reload every policy whose file changed; returns the names reloaded."""
        reloaded = []
        for name, entry in list(self._entries.items()):
            try:
                mtime = os.stat(entry.path).st_mtime
            except OSError as exc:
                if entry.mtime != -1.0:  # said once, not every poll
                    log.error("policy file unreadable, the previous %r keeps serving: %s", name, exc)
                self.last_error = self.rejected[name] = f"{entry.path}: {exc}"
                entry.mtime = -1.0  # once the file is back it is loaded, whatever its mtime
                continue
            if mtime == entry.mtime and not force:
                continue
            entry.mtime = mtime  # a broken file is reported once, not every poll
            try:
                policy = load_policy(entry.path, extra_backends=self._backends,
                                     served_inline=self._inline_elsewhere(entry.path))
                self._check_unique(policy.name, entry.path)
                compiled = compile_policy(policy)
            except PolicyError as exc:
                self.last_error = self.rejected[name] = str(exc)
                log.error("policy reload rejected, the previous %r keeps serving: %s", name, exc)
                continue
            if policy.name != name:
                self._entries.pop(name)
                if name == self.default_name:
                    self.default_name = policy.name
            self._entries[policy.name] = _Entry(entry.path, mtime, compiled)
            self.last_error = None
            self.rejected.pop(name, None)
            reloaded.append(policy.name)
            log.info("policy %r reloaded from %s", policy.name, entry.path)
        return reloaded
