"""The gateway config is read at start only (keys, backends, budgets, prices: what would change under
requests in flight); its policies reload by themselves (gateway/policy_watch.py). An edit of the config
file was ignored without a word until a restart: the policy poll now also hashes the config file, and
says once per change, at WARNING, that a restart is needed (docs/deploy.md).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger("ponder.config")


def content_digest(data: bytes) -> bytes:
    """What a file holds, hashed: its content, not its mtime (a ConfigMap's symlink swap, `cp -p`)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class ConfigFileWatch:
    """`served`: the digest of the text the gateway started with (load_config's), so an edit made
    between the read and the first poll is seen too."""

    def __init__(self, path: Path, served: bytes) -> None:
        self.path = path
        self._served = served
        self._seen: bytes | None = served  # None: the file could not be read at the last look

    def check(self) -> None:
        """Look at the file (a few KB: microseconds, once a second) and say what changed, once."""
        try:
            digest: bytes | None = content_digest(self.path.read_bytes())
        except OSError:
            digest = None
        if digest == self._seen:
            return
        self._seen = digest
        if digest is None:
            log.warning("gateway config %s can no longer be read; the gateway goes on with the config it "
                        "started with", self.path)
        elif digest == self._served:
            log.info("gateway config %s holds what the gateway started with again", self.path)
        else:
            log.warning("gateway config %s changed; the gateway reads it at start only: restart the gateway "
                        "to apply the change (policy files reload by themselves)", self.path)
