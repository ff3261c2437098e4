"""A burst of new connections (no keep-alive) against a real `ponder serve`: what exceeds
`max_requests_in_flight` is shed at once with a 503, not left in the kernel's accept queue.

uvloop (libuv >= 1.45) accepts one connection per turn of the loop, and a turn lasts as long as the work
queued for it, so a busy gateway used to admit new connections at the pace it served them: the in-flight
count stayed under its limit, nothing was shed and the burst waited in the kernel (bench/accept_burst.py:
1,000 connections, limit 32: 0 shed, the last answered after 0.9 to 2.3 s). gateway/accept.py drains the
queue at each readiness. The mock upstream answers at once, so the gateway's own CPU is what is busy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource
import socket

import pytest

from bench.accept_burst import burst
from gateway.accept import RETRY_AFTER_SHORTAGE_S, DrainingLoop, listening_sockets
from tests.servers import mock_backend, running, start_gateway, start_mock, write_policy

LIMIT = 8
CONNECTIONS = 400
BODY = b'{"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accept")
    with running(start_mock(tmp)) as mock:
        policy = write_policy(tmp, {"name": "burst", "arms": {"one": {"backend": "m", "strategy": "single"}},
                                    "routes": [{"name": "all", "candidates": ["one"]}], "exploration": {"share": 0.0}})
        config = {"backends": [mock_backend("m", mock, timeout_s=60, first_byte_timeout_s=60, max_retries=0)],
                  "policy": policy, "max_requests_in_flight": LIMIT, "max_event_loop_lag_ms": 0}
        with running(start_gateway(tmp, config, name="accept")) as gateway:
            yield gateway, mock


def request() -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


def test_a_burst_of_new_connections_is_shed_not_queued_in_the_kernel(stack):
    gateway, _ = stack
    port = int(gateway.url.rsplit(":", 1)[1])
    answers = burst(port, request(), CONNECTIONS)
    outcomes = collections.Counter(status for status, _ in answers)
    assert set(outcomes) <= {"200", "503"}, outcomes
    assert outcomes["200"] >= 1, outcomes
    # Before: a few shed at most (the in-flight count stayed under its limit), every other request
    # served in turn. Now all are accepted at once and all but a few slots' worth are refused.
    assert outcomes["503"] >= CONNECTIONS // 2, outcomes
    shed_s = sorted(seconds for status, seconds in answers if status == "503")
    served_s = sorted(seconds for status, seconds in answers if status == "200")
    # a 503 is not an answer that waited behind the served ones
    assert shed_s[len(shed_s) // 2] <= served_s[-1], (shed_s[len(shed_s) // 2], served_s[-1])


def test_the_draining_server_accepts_all_that_is_queued_in_one_turn():
    """The mechanism itself: 200 connections queued while the loop is blocked are accepted at its next
    readiness, not one per turn (uvloop's own server needs 200 turns)."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        turns, made = [0], []

        class Closing(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(turns[0])
                transport.close()

        server = await loop.create_server(Closing, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]

        def tick() -> None:
            turns[0] += 1
            if len(made) < len(clients):
                loop.call_soon(tick)

        loop.call_soon(tick)
        while len(made) < len(clients):
            await asyncio.sleep(0.001)
        server.close()
        for sock in clients:
            sock.close()
        return max(made) - min(made)

    runner = asyncio.Runner(loop_factory=DrainingLoop)
    with runner:
        spread = runner.run(main())
    assert spread <= 2, f"the draining server took {spread} turns to accept 200 queued connections"


def test_listening_sockets_bind_every_address_on_one_port():
    sockets = listening_sockets("localhost", 0, 16)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and ports != {0}
        assert all(not sock.getblocking() for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_out_of_descriptors_the_server_pauses_and_then_accepts_what_waited(caplog):
    """accept() failing with EMFILE must neither spin the loop nor drop the listener: the connections stay
    queued in the kernel (not reset), accepting stops for RETRY_AFTER_SHORTAGE_S and then takes them."""

    async def main() -> tuple[int, int, float]:
        loop = asyncio.get_running_loop()
        made: list[float] = []

        class Closing(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(loop.time())
                transport.close()

        server = await loop.create_server(Closing, "127.0.0.1", 0, backlog=64)
        port = server.sockets[0].getsockname()[1]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        try:
            # no descriptor number free under the limit: the next accept() fails with EMFILE
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            short_since = loop.time()
            await asyncio.sleep(0.3)
            during = len(made)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        while len(made) < len(clients) and loop.time() - short_since < 10:
            await asyncio.sleep(0.01)
        server.close()
        for sock in clients:
            sock.close()
        return during, len(made), (made[-1] - short_since) if made else -1.0

    with caplog.at_level(logging.ERROR, logger="ponder.accept"), asyncio.Runner(loop_factory=DrainingLoop) as runner:
        during, accepted, after_s = runner.run(main())
    assert during == 0
    assert accepted == 5, "connections queued during the shortage were lost"
    assert after_s >= RETRY_AFTER_SHORTAGE_S * 0.9, after_s
    assert "accepting connections failed" in caplog.text
