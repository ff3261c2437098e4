"""The listening socket, drained at each turn of the event loop (uvloop's own accepts one connection a turn).

libuv since 1.45 (libuv/libuv#3696; uvloop 0.23 bundles 1.52) accepts a single connection each time the
loop polls, and a turn of the loop lasts as long as the work queued for it. So a process busy with a few
requests takes one new connection per turn: a burst of new connections (no keep-alive) waits in the
kernel's accept queue, unseen by `max_requests_in_flight` and by the loop's lag, while the process
admits them at the pace it serves them. Here each readiness of the listening socket accepts everything
queued (up to the backlog, as asyncio's own loop does), so the requests reach the gateway at once and
what it cannot take is shed with a fast 503. Connections are otherwise uvloop's: the accepted socket
becomes a uvloop transport (`connect_accepted_socket`), TCP_NODELAY included.

`ponder serve` runs uvicorn with `loop="gateway.accept:new_event_loop"`; uvicorn's only call that
differs is `create_server`, answered with a `DrainingServer`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger("ponder.accept")

RETRY_AFTER_SHORTAGE_S = 1.0  # as asyncio's loop: out of descriptors or memory, stop accepting a while
SHORTAGE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def listening_sockets(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """One listening socket per address `host` resolves to (as asyncio's create_server binds them)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if port == 0:  # "any free port": every address on the one the first got
                port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class DrainingServer:
    """What uvicorn uses of an asyncio.Server (sockets, close, wait_closed), accepting greedily."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 protocol_factory: Callable[[], asyncio.BaseProtocol], backlog: int) -> None:
        self._loop, self.sockets, self._protocol_factory = loop, sockets, protocol_factory
        self._backlog = backlog
        self._attaching: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept_all, sock)

    def _accept_all(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in SHORTAGE_ERRNOS:
                    raise
                # the connections stay queued in the kernel (a retry may find descriptors free again)
                log.error("accepting connections failed (%s); retrying in %.0f s", exc, RETRY_AFTER_SHORTAGE_S)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(RETRY_AFTER_SHORTAGE_S, self._resume, listener)
                return
            task = self._loop.create_task(self._attach(conn))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except OSError:  # the client is gone already
            conn.close()
        except Exception:  # not to leak the socket, nor leave an exception no one retrieves
            conn.close()
            log.exception("a new connection could not be set up")

    def _resume(self, listener: socket.socket) -> None:
        if listener.fileno() != -1:
            self._loop.add_reader(listener.fileno(), self._accept_all, listener)

    def is_serving(self) -> bool:
        return any(sock.fileno() != -1 for sock in self.sockets)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        # accepted connections are uvicorn's to close (its shutdown waits for them itself)
        return None


class DrainingLoop(uvloop.Loop):
    """uvloop, but a TCP server made with create_server drains its accept queue at each readiness."""

    async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
                            port: int | None = None, *, sock: socket.socket | None = None, backlog: int = 100,
                            ssl: Any = None, **kwargs: Any) -> Any:
        if ssl is not None or kwargs or isinstance(host, list) or (sock is not None and sock.family == socket.AF_UNIX):
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               **kwargs)
        if sock is not None:
            sock.setblocking(False)
            sockets = [sock]
        else:
            sockets = listening_sockets(host, port or 0, backlog)
        return DrainingServer(self, sockets, protocol_factory, backlog)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn calls (`loop="gateway.accept:new_event_loop"`)."""
    return DrainingLoop()
