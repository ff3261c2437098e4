"""The HTTP connection guard: uvicorn's httptools protocol with limits it does not have.

httptools gathers a request's headers for as long and as large as a client sends them: a 200 MB header
line is held in memory, and a client that never finishes its headers (slowloris) keeps its connection
forever. Both happen before the app or any API key is seen, so they are refused here: headers still
unfinished past `max_header_bytes` get a 431 (counted read by read: a header block that arrives whole in
one read, at most a few hundred KB, passes), headers not complete within `header_timeout_s` of their
first byte (or of the connection) a 408. A body that stalls is the app's to time out (gateway.request_path.read_body),
but a request answered before its body was read (a 401, a 413 by its Content-Length) leaves the rest to
uvicorn, which reads and drops it for as long as it comes: that connection is closed once its body is
not complete within `body_timeout_s` of its headers.

What the app may know of its client's connection rides in each request's scope (`ClientConnection`):
how much of the answer the client has not taken yet, and a way to drop the connection.

And the process's open-files limit, which every connection counts against: `raise_open_files_limit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import resource
import socket
import struct
import termios

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("ponder.connections")
# Sockets a request in flight may hold (the client's and an upstream's), and what else the process keeps
# open (the store, the policy files, the local model's pipes, libraries).
FILES_PER_REQUEST = 2
FILES_KEPT = 256
NO_LIMIT_CAP = 1 << 20  # a soft limit asked for where the hard one is unlimited (the kernel's usual nr_open)

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
CLIENT_CONNECTION = "ponder.client_connection"  # the scope's extension that holds a ClientConnection


class ClientConnection:
    """A request's client connection, as gateway/streaming.py's stall watch needs it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def unsent_bytes(self) -> int:
        """What was written and the client has not taken: the transport's buffer, and the kernel's send
        queue (unsent or unacknowledged: Linux's SIOCOUTQ), which the transport fills first. It goes
        down only as the client reads."""
        unsent = self._transport.get_write_buffer_size()
        with contextlib.suppress(OSError, AttributeError, ValueError):  # elsewhere: the transport's alone
            sock = self._transport.get_extra_info("socket")
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        return unsent

    def lost(self) -> bool:
        """The connection is closed or closing: uvicorn drops what is sent on it after, silently."""
        return self._transport.is_closing()

    def abort(self) -> None:
        """Drop the connection and what is buffered for it: a close waits for a client that reads
        nothing to take it (for ever), and holds the socket and its buffers (megabytes) meanwhile."""
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock = self._transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a FIN
        self._transport.abort()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[HttpToolsProtocol]:
    """An httptools protocol class (uvicorn's `http=`) enforcing these limits."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _in_headers = True  # the bytes arriving now belong to a request's line and headers
        _header_bytes = 0
        _header_timer: asyncio.TimerHandle | None = None
        _body_deadline = 0.0  # loop time by which the request's body must be complete
        _body_timer: asyncio.TimerHandle | None = None
        _boundary = False  # during one data_received: a request's headers or a whole request ended in it

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._client = ClientConnection(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            self._disarm_body_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_headers and self._header_timer is None:
                self._arm_header_timer()
            self._boundary = False
            super().data_received(data)
            # Counted after parsing, and only for a read that crossed no boundary (headers ended, or a
            # request ended): such a read may carry a body, which is no header, and must not count
            # toward the next request's headers. A header line that never ends is cut off one read (at
            # most a few hundred KB) past the limit.
            if self._in_headers and not self._boundary and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(431, f"Request headers are larger than the {max_header_bytes} bytes this gateway "
                                      "accepts.", "headers_too_large")

        def on_headers_complete(self) -> None:
            self._in_headers, self._boundary = False, True
            self.scope.setdefault("extensions", {})[CLIENT_CONNECTION] = self._client  # the app's, from here
            self._disarm_header_timer()
            self._body_deadline = self.loop.time() + body_timeout_s
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm_body_timer()
            # What comes next on this connection is the next request's headers (keep-alive); its
            # timer starts with its first byte (uvicorn's keep-alive timeout covers the idle gap).
            self._in_headers, self._header_bytes, self._boundary = True, 0, True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # answered before its body was all read (this request's: not one pipelined behind it):
            # the rest is dropped as it comes, until the body's deadline, not for ever
            if not self._in_headers and self.cycle.response_complete and not self.transport.is_closing():
                self._body_timer = self.loop.call_later(max(0.0, self._body_deadline - self.loop.time()),
                                                        self._body_too_slow)

        def _body_too_slow(self) -> None:
            self._body_timer = None
            if not self._in_headers and not self.transport.is_closing():
                self.transport.close()

        def _disarm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers and not self.transport.is_closing():
                self._refuse(408, f"Request headers did not arrive within {header_timeout_s:g} s.", "header_timeout")

        def _refuse(self, status: int, message: str, code: str) -> None:
            """An OpenAI-schema error, then the connection closes: nothing else of it is read."""
            self._in_headers = False
            self._disarm_header_timer()
            body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": code}})
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
                status, REASONS[status], len(body))
            self.transport.write(head + body)
            self.transport.close()

    return GuardedHttpToolsProtocol


def raise_open_files_limit(max_in_flight: int) -> None:
    """Raise this process's soft limit on open files to its hard limit, as Go's runtime does. Shells and
    systemd services start with a soft limit of 1,024 (the hard one is far higher): a burst of ~500
    concurrent requests then ran out of descriptors, accept() failed (clients saw resets) and so did
    the connects to a healthy upstream, which was cooled down as if it had failed, refusing everyone.
    Warns when even the hard limit is short of what `max_in_flight` requests need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NO_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:  # a container's seccomp, an nr_open below the cap
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    needed = max_in_flight * FILES_PER_REQUEST + FILES_KEPT
    if max_in_flight and soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open files limit (%d) is short of what max_requests_in_flight (%d) needs (%d): past it "
                    "connections fail; raise `ulimit -n` (LimitNOFILE=, the container's nofile) or lower "
                    "max_requests_in_flight", soft, max_in_flight, needed)
