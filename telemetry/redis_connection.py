"""Connecting to Redis, and knowing when it is away.

`make_client` builds the client (no retries of its own: the store reconnects). `DOWN_ERRORS` and
`refuses_writes` tell an outage (unreachable, or answering but taking no writes: full, a replica)
from one command's error. `RedisConnection` is the part of RedisStore that keeps the connection
state (set up in RedisStore.__init__): it reconnects with backoff, takes Redis as back only once a
write probe is taken, and logs one line when an outage begins and one when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    ClusterDownError, NoPermissionError, OutOfMemoryError, ReadOnlyError, RedisClusterException, ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .store import BufferedStore

log = logging.getLogger("ponder.telemetry")
MAX_CONNECTIONS = 32  # per replica
MAX_BACKOFF_S = 1.0  # reconnect attempts at most this far apart: the buffer flushes < 5 s after recovery
# A Redis Cluster in failover answers CLUSTERDOWN or TRYAGAIN (ResponseErrors in redis-py, not
# RedisClusterException): down for now, as a lost connection is, not a batch to drop.
DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, RedisClusterException, ClusterDownError, TryAgainError,
               OSError, asyncio.TimeoutError)
# Refusals that say the server answers but takes no writes now: full (OOM at maxmemory under noeviction),
# a replica (READONLY: a failover demoted our primary), failing to persist (MISCONF), short of replicas
# (NOREPLICAS). An outage too: what it refuses is kept and written once it takes writes, never dropped
# as a batch it "keeps refusing". redis-py has classes for the first two, and leaves the others' codes
# in a ResponseError's message.
# Redis 6.2 wraps a refusal inside a Lua script in its own error ("Error running script ... -OOM
# command not allowed ..."): the code is found after a dash there.
WRITES_REFUSED = (OutOfMemoryError, ReadOnlyError)
WRITES_REFUSED_CODES = ("MISCONF ", "NOREPLICAS ")
_SCRIPT_REFUSAL = re.compile(r"-(?:OOM|READONLY|MISCONF|NOREPLICAS) ")


def refuses_writes(exc: BaseException) -> bool:
    if isinstance(exc, WRITES_REFUSED):
        return True
    message = str(exc)
    return isinstance(exc, ResponseError) and (message.startswith(WRITES_REFUSED_CODES)
                                               or _SCRIPT_REFUSAL.search(message) is not None)


def make_client(url: str, op_timeout_s: float) -> tuple[Redis | RedisCluster, bool]:
    """`?cluster=1` in the URL selects the Redis Cluster client. No client-side retries: the store
    has its own reconnect loop, and a request must not wait on retries while Redis is down."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    cluster = any(k == "cluster" and v.lower() in ("1", "true", "yes") for k, v in query)
    url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "cluster"])))
    kwargs: dict[str, Any] = dict(
        socket_timeout=op_timeout_s,
        socket_connect_timeout=op_timeout_s,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )
    if cluster:
        return RedisCluster.from_url(url, **kwargs), True
    # A bounded pool: a burst of concurrent reservations queues for a connection (each is held for a
    # fraction of a millisecond) instead of opening hundreds of sockets at once, which under load
    # overflows the server's accept backlog and shows up as spurious connection errors.
    pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=op_timeout_s, **kwargs)
    return Redis.from_pool(pool), False


class RedisConnection(BufferedStore):
    """BufferedStore's connection hooks, for Redis: when to try again, what counts as down, what an
    error logs. RedisStore is the store."""

    async def _ensure_connected(self, force: bool = False) -> bool:
        if self._connected:
            return True
        now = time.monotonic()
        if not force and now < self._next_attempt:
            return False
        try:
            if not self._cluster:
                await self._client.connection_pool.disconnect()  # drop sockets to the dead server
            await asyncio.wait_for(self._client.ping(), self.op_timeout_s)
            if self._started:
                # A gateway's store writes. A server that answers PING but takes no writes (full: OOM; a
                # replica after a failover: READONLY; CLIENT PAUSE WRITE) is still down: taken as back,
                # every write failed at once and the store reconnected again, hundreds of times a second.
                # LPUSHX of a key that never exists changes nothing, and Redis refuses it as it refuses
                # the store's writes (DEL, which frees memory, is allowed at maxmemory).
                try:
                    await asyncio.wait_for(self._client.lpushx(self.keys.write_probe, "1"), self.op_timeout_s)
                except ResponseError as exc:
                    if refuses_writes(exc):
                        raise
                    # Anything else says nothing of whether writes are taken. An ACL without LPUSHX is said
                    # once (without the probe, a full Redis is reconnected to in a loop).
                    if isinstance(exc, NoPermissionError):
                        self._on_error("write probe", exc)
        except Exception as exc:
            self._backoff = min(MAX_BACKOFF_S, self._backoff * 2 if self._backoff else 0.05)
            self._next_attempt = now + self._backoff
            self._on_error("connect", exc)
            return False
        self._connected, self._backoff = True, 0.0
        self._budgets_fallback = False
        self.reconnects += 1
        if self._outage_since is not None:
            log.warning("Redis %s again after %.0f s; writing what was buffered meanwhile",
                        "takes writes" if self._answers_reads else "answers", time.monotonic() - self._outage_since)
            self._outage_since = None
        self._answers_reads = False
        return True

    def _loop_timeout(self) -> float:
        return 1.0 if self._connected else max(0.01, self._next_attempt - time.monotonic())

    def _is_down(self, exc: BaseException) -> bool:
        return isinstance(exc, DOWN_ERRORS) or refuses_writes(exc) or super()._is_down(exc)

    async def _ensure_readable(self) -> bool:
        return await self._ensure_connected() or self._answers_reads

    def _on_error(self, where: str, exc: BaseException) -> None:
        super()._on_error(where, exc)
        if isinstance(exc, NoPermissionError) and str(exc) not in self._refused_commands:
            # An ACL that forbids a command the store needs is no outage: Redis answers, and refuses that
            # command every time. Said once per command, loudly, since nothing else would say it.
            self._refused_commands.add(str(exc))
            log.error("Redis refuses a command the gateway needs (%s: %s): grant its user the commands listed in "
                      "docs/telemetry.md; until then whatever uses it fails (without scripts, every event is "
                      "dropped and each replica enforces budgets alone)", where, exc)
        if isinstance(exc, DOWN_ERRORS) or refuses_writes(exc):
            self._connected = False
            self._answers_reads = refuses_writes(exc)
            # One line per outage, when it begins and when it ends, not one per failed try (every second
            # while it lasts). Only a started store (a gateway's) logs: `ponder stats` says it itself.
            if self._outage_since is None and self._started:
                self._outage_since = time.monotonic()
                log.warning("Redis %s (%s: %s): events are buffered, decisions use the last learned stats and "
                            "each replica enforces budgets alone until it %s",
                            "takes no writes" if self._answers_reads else "is unreachable",
                            where, self.last_error.split(": ", 1)[1],
                            "takes them" if self._answers_reads else "answers")

    async def _warn_if_evicting(self) -> None:
        """One WARNING at start when Redis may evict keys: under any maxmemory-policy but noeviction a
        full Redis drops budget counters, holds and push marks (they have TTLs), so keys overspend.
        INFO, not CONFIG GET (an admin command): an ACL without it (`-@dangerous`) makes this a no-op."""
        try:
            info = await asyncio.wait_for(self._client.info("memory"), self.op_timeout_s)
        except Exception as exc:  # not needed to serve: no outage, no error logged
            log.debug("INFO memory refused (%s): maxmemory-policy not checked", exc)
            return
        # (Redis Cluster answers per node: {node: {...}})
        policies = {info["maxmemory_policy"]} if "maxmemory_policy" in info else {
            node["maxmemory_policy"] for node in info.values() if isinstance(node, dict) and "maxmemory_policy" in node}
        evicting = sorted(p for p in policies if p != "noeviction")
        if evicting:
            log.warning("Redis's maxmemory-policy is %s, not noeviction: once it is full it evicts keys the gateway "
                        "needs (budget counters, holds, push marks), and keys can spend past their caps (docs/telemetry.md); set "
                        "maxmemory-policy noeviction", ", ".join(evicting))
