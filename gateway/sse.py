"""Reading server-sent events as upstreams write them.

The event stream format (html.spec.whatwg.org, "Parsing an event stream"), as far as chat completions
need it: lines end in CRLF, LF or a lone CR; a line starting with `:` is a comment (keep-alives); a
`data` field's value follows its colon and one optional space; an event's data lines are joined with
LF; a blank line ends the event. Other fields (`event`, `id`, `retry`) carry nothing we relay. Bytes
arrive in whatever pieces TCP delivers, split anywhere (inside a line, a CRLF or a UTF-8 character).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

BOM = b"\xef\xbb\xbf"


class EventTooLarge(ValueError):
    """One event grew past the reader's limit without ending."""


class EventReader:
    """Feed it the body's bytes as they come; it hands back each complete event's data."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._line = bytearray()  # a line not ended yet
        self._data: list[bytes] = []  # the data lines of the event being read
        self._size = 0
        self._after_cr = False  # the last piece ended in CR: a LF opening the next one belongs to it
        self._started = False

    def feed(self, piece: bytes) -> list[bytes]:
        if not self._started and piece:
            self._started = True
            piece = piece.removeprefix(BOM)  # the spec strips one at the stream's start
        if self._after_cr and piece.startswith(b"\n"):
            piece = piece[1:]
        self._after_cr = piece.endswith(b"\r")
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = piece.split(b"\n")
        if len(lines) == 1:  # no line ended in this piece
            self._line += piece
            self._check_size()
            return []
        if self._line:
            lines[0] = bytes(self._line) + lines[0]
        self._line = bytearray(lines.pop())
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(self._dispatch())
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._data.append(value)
                self._size += len(value)
        self._check_size()
        return events

    def close(self) -> list[bytes]:
        """At the body's end: an event whose blank line never came is taken as it is (a server that
        ends with `data: [DONE]` and no blank line meant it)."""
        if self._line:
            self.feed(b"\n")
        return [self._dispatch()] if self._data else []

    def _dispatch(self) -> bytes:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data, self._size = [], 0
        return data

    def _check_size(self) -> None:
        # a stream that never ends its event must not grow the gateway's memory without bound
        if self._size + len(self._line) > self.max_event_bytes:
            raise EventTooLarge(f"an event longer than {self.max_event_bytes} bytes")


async def read_events(pieces: AsyncIterable[bytes], max_event_bytes: int) -> AsyncIterator[bytes]:
    """Each event's data, from a body read in pieces."""
    reader = EventReader(max_event_bytes)
    async for piece in pieces:
        for data in reader.feed(piece):
            yield data
    for data in reader.close():
        yield data
