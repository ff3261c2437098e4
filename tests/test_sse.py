"""gateway.sse: the event stream format read as the spec says, however TCP splits the bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import EventReader, EventTooLarge

STREAM = ("\ufeff: keep-alive\r\n\r\n"
          "event: message\r\ndata: {\"content\": \"Caf\u00e9 \U0001F600\"}\r\n\r\n"
          "data:one\rdata: two\r\r"
          "id: 7\nretry: 10\ndata:  spaced\n\n"
          "data: [DONE]").encode()
EVENTS = ['{"content": "Caf\u00e9 \U0001F600"}'.encode(), b"one\ntwo", b" spaced", b"[DONE]"]


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_split_of_the_bytes_reads_as_the_same_events(cuts):
    points = sorted(set(cuts))
    reader, events = EventReader(1024), []
    for start, stop in zip([0, *points], [*points, len(STREAM)]):
        events += reader.feed(STREAM[start:stop])
    assert events + reader.close() == EVENTS


def test_a_crlf_split_between_two_reads_ends_one_line_not_two():
    """A CR ending one read and its LF opening the next are one line end: the event's two data lines
    stay one event, wherever the bytes are cut (a stray blank line would dispatch it early)."""
    stream = b"data: one\r\ndata: two\r\n\r\n"
    for cut in range(1, len(stream)):
        reader = EventReader(1024)
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) + reader.close() == [b"one\ntwo"], cut


def test_a_byte_order_mark_before_the_first_field_is_stripped():
    reader = EventReader(1024)
    assert reader.feed(b"\xef\xbb\xbfdata: first\n\n") == [b"first"]
    assert reader.feed(b"\xef\xbb\xbfdata: later\n\n") == []  # only at the stream's start: a field named BOM+data


def test_an_event_that_never_ends_is_refused_past_the_limit():
    reader = EventReader(100)
    reader.feed(b"data: " + b"x" * 90)
    with pytest.raises(EventTooLarge):
        reader.feed(b"x" * 20)  # no line end yet: still counted
    reader = EventReader(100)
    with pytest.raises(EventTooLarge):
        reader.feed(b"data: " + b"x" * 60 + b"\ndata: " + b"x" * 60 + b"\n")  # one event of two lines
    assert EventReader(100).feed(b"data: " + b"x" * 60 + b"\n\ndata: " + b"x" * 60 + b"\n\n") == [b"x" * 60] * 2


def test_a_reasoning_text_under_both_names_counts_once():
    """vLLM has renamed `reasoning_content` to `reasoning`; a version writing both in one delta must not
    have its thought billed twice when a broken stream is billed by length."""
    from gateway.streaming import _content_chars

    both = {"choices": [{"delta": {"reasoning_content": "abcd", "reasoning": "abcd", "content": "xy"}}]}
    assert _content_chars(both) == 6
    assert _content_chars({"choices": [{"delta": {"reasoning": "abcd"}}]}) == 4
