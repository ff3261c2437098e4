"""Shedding by event-loop lag (gateway/loop_lag.py): while the loop runs late, new model requests get the
503 `overloaded` at once; admitted ones finish; health always answers; once it is on time, all is served.

A real `ponder serve` whose loop is made late from outside by its own CPU work: requests of 200,000
messages, ~0.2 s of JSON parsing and validation each (refused 400 at the end: the mock does no work),
sent back to back from a few threads. The helpers are tests/test_shedding.py's.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time

import httpx
import openai
import orjson
import pytest

from gateway.loop_lag import LATE_TICKS, RECOVER_S, EventLoopLag
from gateway.metrics import Metrics
from tests.servers import control, mock_backend, running, start_gateway, start_mock, write_policy
from tests.test_shedding import ADMIN_KEY, KEY, MESSAGES, client, metric, wait_in_flight

BOUND_MS = 100
ORIGIN = "https://app.example"  # a browser app reads the 503 too (CORS), under an x-request-id as any answer
SHED_BY_LAG = 'ponder_shed_requests_total{path="/v1/chat/completions",reason="event_loop_lag"}'


@functools.cache
def heavy_body() -> bytes:
    """~0.2 s of the gateway's CPU in one stretch (orjson, then pydantic), then a 400: no upstream call."""
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "word word"}] * 200_000
                         + [{"role": "nobody", "content": "x"}]})


@pytest.fixture
def lagging(tmp_path):
    with running(start_mock(tmp_path)) as mock:
        policy = write_policy(tmp_path, {"name": "lag", "arms": {"one": {"backend": "m", "strategy": "single"}},
                                         "routes": [{"name": "all", "candidates": ["one"]}],
                                         "exploration": {"share": 0.0}})
        config = {"backends": [mock_backend("m", mock, timeout_s=60, first_byte_timeout_s=60, max_retries=0)],
                  "policy": policy, "max_event_loop_lag_ms": BOUND_MS, "max_body_bytes": 64_000_000,
                  "cors_origins": [ORIGIN],
                  "api_keys": [{"id": "app", "sha256": hashlib.sha256(KEY.encode()).hexdigest()},
                               {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}]}
        with running(start_gateway(tmp_path, config, name="lag")) as gateway:
            yield gateway, mock


def test_while_the_loop_lags_new_requests_are_shed_admitted_ones_finish_and_then_all_is_served(lagging):
    gateway, mock = lagging
    sdk = client(gateway)
    assert sdk.chat.completions.create(model="auto", messages=MESSAGES).choices  # on time: served
    # admitted before the lag, and held by the upstream through it
    control(mock, script=["hang"], hang_s=8)
    held: list[tuple[int, float]] = []
    holder = threading.Thread(target=lambda: held.append(
        (sdk.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES).status_code,
         time.monotonic())))
    holder.start()
    wait_in_flight(gateway, 1)

    stop, heavy_statuses = threading.Event(), []

    def heavy() -> None:
        with httpx.Client(timeout=60, headers={"authorization": f"Bearer {KEY}",
                                               "content-type": "application/json"}) as http:
            while not stop.is_set():
                heavy_statuses.append(http.post(gateway.url + "/v1/chat/completions", content=heavy_body()).status_code)

    senders = [threading.Thread(target=heavy) for _ in range(3)]
    for sender in senders:
        sender.start()
    shed: list[openai.APIStatusError] = []
    shed_at, lags, health = None, [], []
    try:
        deadline = time.monotonic() + 60
        while not shed and time.monotonic() < deadline:
            health.append(httpx.get(gateway.url + "/healthz", timeout=30).status_code)
            lags.append(metric(gateway, "ponder_event_loop_lag_seconds"))
            try:
                sdk.chat.completions.create(model="auto", messages=MESSAGES, extra_headers={"origin": ORIGIN})
            except openai.InternalServerError as exc:
                shed.append(exc)
                shed_at = time.monotonic()
            time.sleep(0.1)
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)
    assert shed, f"never shed; loop lag seen (s): {lags}"
    error = shed[0].response.json()["error"]
    assert shed[0].status_code == 503 and (error["type"], error["code"]) == ("service_unavailable", "overloaded")
    assert "event loop runs" in error["message"] and "ms late" in error["message"]
    assert shed[0].response.headers["retry-after"] == "1" and 500 <= int(shed[0].response.headers["retry-after-ms"]) <= 1500
    assert shed[0].request_id.startswith("req_") and shed[0].response.headers["access-control-allow-origin"] == ORIGIN
    # at once, not after the queued work: generous, the machine is shared and the loop is busy by design
    assert shed[0].response.elapsed.total_seconds() < 3.0
    assert 400 in heavy_statuses  # admitted, parsed and refused: the CPU that made the loop late
    assert set(health) == {200}  # never shed
    assert max(lags) > BOUND_MS / 1000, lags  # the gauge saw it
    holder.join(60)
    assert held and held[0][0] == 200, held  # admitted before: finished, not cut
    assert shed_at < held[0][1], "the shedding happened while it was in flight"
    assert metric(gateway, SHED_BY_LAG) >= 1
    assert metric(gateway, 'ponder_shed_requests_total{path="/v1/chat/completions",reason="in_flight"}') == 0
    # the lag gone: after RECOVER_S on time, requests are admitted again
    deadline, served = time.monotonic() + 30, None
    while served is None and time.monotonic() < deadline:
        try:
            served = sdk.chat.completions.create(model="auto", messages=MESSAGES)
        except openai.InternalServerError as exc:
            assert "event loop runs" in exc.response.json()["error"]["message"]
            time.sleep(0.2)
    assert served is not None and served.choices[0].message.content
    log = gateway.log()
    assert "the event loop runs" in log and f"(max_event_loop_lag_ms: {BOUND_MS})" in log


class _Gauge:
    def __init__(self) -> None:
        self.value = None

    def set(self, value: float) -> None:
        self.value = value


def test_the_lag_sheds_after_consecutive_late_ticks_and_stops_after_a_calm_second():
    """Hysteresis: one stall is not overload; shedding, once on, stays on while the lag is above half the
    bound and ends RECOVER_S after it went under."""
    gauge = _Gauge()
    lag = EventLoopLag(100, gauge)
    now = 0.0

    def tick(lag_ms: float, after_s: float = 0.05) -> bool:
        nonlocal now
        now += after_s
        lag.observe(lag_ms / 1000, now)
        return lag.overloaded

    assert not tick(5000)  # one stall alone (a huge body, a collection): the next tick is on time
    assert not tick(0) and gauge.value == 0.0
    assert [tick(150) for _ in range(LATE_TICKS)][-1] and gauge.value == 0.15
    assert tick(60)  # above half the bound: still late
    calm_from = now
    while now - calm_from < RECOVER_S - 0.06:
        assert tick(40), now - calm_from  # within half the bound, not yet for RECOVER_S
    assert not tick(40, after_s=0.1)
    assert not tick(150)  # one late tick after recovering: not yet
    assert tick(-3) is False and lag.lag_s == 0.0  # a timer early by the clock's rounding reads 0


def test_the_start_of_shedding_is_logged_at_once_then_at_most_every_log_every_s(caplog):
    """A process at its limit may start and stop shedding every second or two: one line each would flood
    the log. The first is said at once, the next starts counted into the next report."""
    import gateway.loop_lag as loop_lag

    lag, now = EventLoopLag(100, _Gauge()), 0.0

    def episode() -> None:  # late long enough to start, calm long enough to stop
        nonlocal now
        for lag_s in [0.2] * LATE_TICKS + [0.0] * int(RECOVER_S / 0.05 + 2):
            now += 0.05
            lag.observe(lag_s, now)
        assert not lag.overloaded

    with caplog.at_level("WARNING", logger="ponder.loop_lag"):
        for _ in range(3):
            episode()
        assert [r.getMessage().rsplit(" (", 1)[-1] for r in caplog.records] == ["1 time(s) since the last report)"]
        now += loop_lag.LOG_EVERY_S
        episode()
    assert [r.getMessage().rsplit(" (", 1)[-1] for r in caplog.records] == ["1 time(s) since the last report)",
                                                                     "3 time(s) since the last report)"]


def test_a_bound_of_0_measures_and_never_sheds():
    gauge = _Gauge()
    lag = EventLoopLag(0, gauge)
    for step in range(10):
        lag.observe(10.0, step * 0.05)
    assert not lag.overloaded and gauge.value == 10.0


def test_the_monitor_measures_a_blocked_loop_and_stops_with_the_app():
    """On a real loop: a 0.3 s block reads about 0.3 s late; stop() leaves no timer behind."""
    import asyncio

    metrics = Metrics()

    async def scenario() -> tuple[float, int]:
        lag = EventLoopLag(100, metrics.event_loop_lag)
        lag.start()
        await asyncio.sleep(0.12)
        time.sleep(0.3)  # the loop blocked, as by a long parse
        await asyncio.sleep(0.01)  # the overdue tick runs first (its 50 ms is long past)
        seen = metrics.registry.get_sample_value("ponder_event_loop_lag_seconds")
        lag.stop()
        handles = [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]  # noqa: SLF001
        return seen, len(handles)

    seen, armed = asyncio.run(scenario())
    assert 0.2 < seen < 2.0 and armed == 0
