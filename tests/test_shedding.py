"""Load shedding (gateway/shedding.py): past `max_requests_in_flight`, a fast 503 in the OpenAI schema.

Real `ponder serve` in front of the mock upstream, a limit of 2, driven by the openai SDK (max_retries=0:
it retries a 503 after its Retry-After otherwise) and by raw sockets for clients that hang up.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import resource
import socket
import threading
import time
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import psutil
import pytest

from gateway.metrics import Metrics
from gateway.shedding import LoadShedding
from tests.servers import calls, control, mock_backend, reset, running, start_gateway, start_mock, write_policy

LIMIT = 2
KEY = "sk-shed-budget-key"
ADMIN_KEY = "sk-shed-admin-key"
MESSAGES = [{"role": "user", "content": "hello there"}]
ORIGIN = "https://app.example"
STALL_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shedding")
    with running(start_mock(tmp)) as mock:
        policy = write_policy(tmp, {
            "name": "shed",
            "arms": {"one": {"backend": "m", "strategy": "single"},
                     "vote": {"backend": "m", "strategy": "self_consistency", "n": 3}},
            "routes": [{"name": "all", "candidates": ["one"]}],
            "exploration": {"share": 0.0},
            "overrides": {"strategy_header": ["self_consistency", "single"]},
        })
        config = {"backends": [mock_backend("m", mock, timeout_s=20, first_byte_timeout_s=20, max_retries=0)],
                  "policy": policy, "max_requests_in_flight": LIMIT, "max_body_bytes": 10_000,
                  "cors_origins": [ORIGIN], "stream_stall_timeout_s": STALL_S,
                  "api_keys": [{"id": "app", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                                "budget_usd_per_day": 5.0},
                               {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}]}
        with running(start_gateway(tmp, config, name="shed")) as gateway:
            yield gateway, mock


def client(gateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def metric(gateway, name: str) -> float:
    """A metric's value (summed over its label sets), from the gateway's own /metrics."""
    text = httpx.get(gateway.url + "/metrics", headers=ADMIN).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def wait_in_flight(gateway, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := metric(gateway, "ponder_requests_in_flight")) != count:
        assert time.monotonic() < deadline, f"{now} requests in flight, not {count}"
        time.sleep(0.05)


def hold_slots(gateway, mock, seconds: float) -> list[Any]:
    """LIMIT requests the upstream keeps waiting for `seconds`: every slot taken until then. Returns the
    threads and, last, the list their answers (status, billed cost) go into."""
    control(mock, script=["hang"] * LIMIT, hang_s=seconds)
    answers: list[tuple[int, float]] = []

    def one() -> None:
        raw = client(gateway).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        answers.append((raw.status_code, float(raw.headers["x-ponder-cost-usd"])))

    threads = [threading.Thread(target=one) for _ in range(LIMIT)]
    for thread in threads:
        thread.start()
    wait_in_flight(gateway, LIMIT)
    return [*threads, answers]


def join(held: list[Any]) -> list[tuple[int, float]]:
    *threads, answers = held
    for thread in threads:
        thread.join(30)
    return answers


def spent_today(gateway) -> float:
    keys = httpx.get(gateway.url + "/v1/ponder/spend", headers=ADMIN).json()["keys"]
    return next(k["spent"].get("day", 0.0) for k in keys if k["key_id"] == "app")


def raw_request_then_close(gateway, body: dict[str, Any], after_s: float) -> None:
    """A client that gives up: the request on a bare socket, hung up after `after_s`."""
    payload = orjson.dumps(body)
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        time.sleep(after_s)


def assert_overloaded(exc: openai.APIStatusError) -> float:
    """The 503 a shed request gets; returns its retry-after-ms in seconds."""
    assert exc.status_code == 503
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("service_unavailable", None, "overloaded")
    assert f"limit of {LIMIT} requests in flight" in error["message"]
    headers = exc.response.headers
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert exc.request_id and exc.request_id.startswith("req_") and headers["x-ponder-request-id"] == exc.request_id
    wait_s = int(headers["retry-after-ms"]) / 1000
    assert 0.5 <= wait_s <= 1.5
    return wait_s


def test_past_the_limit_model_requests_get_a_fast_503_in_the_openai_schema_and_nothing_else_is_shed(stack):
    gateway, mock = stack
    reset(mock)
    spent_before, since = spent_today(gateway), time.time()
    shed_before = metric(gateway, "ponder_shed_requests_total")
    held = hold_slots(gateway, mock, seconds=3.0)
    sdk = client(gateway)
    waits, took = [], []
    attempts = [
        lambda: sdk.chat.completions.create(model="auto", messages=MESSAGES),
        lambda: sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True),
        lambda: sdk.responses.create(model="auto", input="hello there"),
        lambda: sdk.embeddings.create(model="m", input="hello there"),
        # refused before its body is read, however large: the same connection then serves the next request
        lambda: sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x " * 4000}]),
    ]
    for attempt in attempts:
        with pytest.raises(openai.InternalServerError) as caught:
            attempt()
        # the gateway's time (send to last byte), not the SDK's: its first call of a resource imports
        # and builds that resource's types, over 1 s on a loaded machine
        took.append(caught.value.response.elapsed.total_seconds())
        waits.append(assert_overloaded(caught.value))
    # a browser app reads the 503 too (CORS on): shed inside the CORS middleware, not before it
    from_browser = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                              headers={"origin": ORIGIN, "authorization": f"Bearer {KEY}"})
    assert from_browser.status_code == 503 and from_browser.headers["access-control-allow-origin"] == ORIGIN
    assert {"retry-after", "retry-after-ms"} <= set(from_browser.headers["access-control-expose-headers"].split(", "))
    assert len(set(waits)) > 1, "retry-after-ms is spread, so shed clients do not all come back at once"
    assert max(took) < 1.0, took  # at once, not after the held requests
    # never shed: health, readiness, metrics, models, feedback, the dashboard and its admin API
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {KEY}"}) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/v1/models").status_code == 200
        assert http.post("/v1/feedback", json={"request_id": "chatcmpl-none", "score": 1}).status_code == 404
        for path in ("/metrics", "/v1/ponder/summary", "/v1/ponder/requests?limit=1", "/dashboard"):
            assert http.get(path, headers=ADMIN).status_code == 200, path
    assert metric(gateway, "ponder_requests_in_flight") == LIMIT
    answers = join(held)
    assert [status for status, _ in answers] == [200] * LIMIT
    # no upstream work, no record (so nothing for the learner), nothing billed, no budget hold left
    assert calls(mock)["count"] == LIMIT
    assert metric(gateway, "ponder_shed_requests_total") - shed_before == len(attempts) + 1
    time.sleep(1.5)  # the store's flush
    recorded = httpx.get(gateway.url + "/v1/ponder/requests?limit=50", headers=ADMIN).json()["requests"]
    assert len([r for r in recorded if r["ts"] >= since]) == LIMIT, recorded
    assert spent_today(gateway) - spent_before == pytest.approx(sum(cost for _, cost in answers), abs=1e-9)
    assert metric(gateway, "ponder_requests_in_flight") == 0
    assert f"answered 503 at max_requests_in_flight ({LIMIT})" in gateway.log()  # the operator is told


def test_a_wrong_method_on_a_model_path_at_the_limit_is_a_405_not_a_503(stack):
    """A GET (or any method but POST) on a model path does no model work: the router's 405, with the
    methods the path takes, whatever the load. It was shed first, a 503 `overloaded` that a client
    retried after Retry-After to get the same mistake back; it is neither counted nor shed."""
    gateway, mock = stack
    reset(mock)
    shed_before = metric(gateway, "ponder_shed_requests_total")
    held = hold_slots(gateway, mock, seconds=2.0)
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {KEY}"}) as http:
        for method in ("GET", "PUT", "DELETE"):
            for path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
                answer = http.request(method, path)
                assert answer.status_code == 405, (method, path, answer.text)
                assert answer.json()["error"]["code"] == "method_not_allowed"
                assert "POST" in answer.headers["allow"] and answer.headers["x-request-id"].startswith("req_")
    assert metric(gateway, "ponder_shed_requests_total") == shed_before
    assert metric(gateway, "ponder_requests_in_flight") == LIMIT  # the held requests alone
    assert [status for status, _ in join(held)] == [200] * LIMIT


def test_a_slot_is_released_once_however_a_request_ends(stack):
    """A counter left high by a request that ended oddly sheds forever: after streams (relayed and
    synthesized, read whole or dropped), upstream errors, refused requests and clients that hung up,
    the count is back to 0, and LIMIT requests at once are all served."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=["one two three four five six seven eight"])
    sdk = client(gateway)
    sdk.chat.completions.create(model="auto", messages=MESSAGES)
    assert "".join(c.choices[0].delta.content or "" for c in
                   sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True) if c.choices)
    voted = sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True,
                                        extra_headers={"x-ponder-strategy": "self_consistency"})
    assert list(voted)
    with sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True) as dropped:
        next(iter(dropped))  # the client reads one chunk and closes
    control(mock, script=["500"])
    with pytest.raises(openai.APIStatusError):
        sdk.chat.completions.create(model="auto", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="auto", messages=[{"role": "nobody", "content": "x"}])
    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x" * 20_000}])
    assert too_large.value.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-wrong").chat.completions.create(model="auto", messages=MESSAGES)
    # clients that hang up: while the upstream hangs, before the first chunk, and in the middle of a stream
    for behaviour, stream in (("hang", False), ("stall", True), ("hold", True)):
        control(mock, script=[behaviour], hang_s=8)  # the mock's handlers sleep on: not longer, so it stops soon
        raw_request_then_close(gateway, {"model": "auto", "messages": MESSAGES, "stream": stream}, after_s=0.5)
    wait_in_flight(gateway, 0, timeout=3.0)  # at once, not when the upstream would have answered
    shed_before = metric(gateway, "ponder_shed_requests_total")
    # held long enough to be seen both in flight: at 0.5 s, on a loaded machine, the first was answered
    # before the second arrived
    assert [status for status, _ in join(hold_slots(gateway, mock, seconds=3.0))] == [200] * LIMIT
    assert metric(gateway, "ponder_shed_requests_total") == shed_before


def test_a_client_that_stops_reading_its_stream_gives_its_slot_back(stack):
    """A client that keeps its connection but reads nothing blocks the stream's sends once the socket's
    buffers are full: it held its slot (and its upstream call) for good, and LIMIT such clients would
    have had every other request shed. Past stream_stall_timeout_s it is a client that left: 499,
    billed what was streamed, the connection closed."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[" ".join(["word"] * 60_000)])  # far more than the socket buffers hold
    # max_tokens: a budgeted key's request without one is capped at 1,024 tokens, which the buffers hold
    payload = orjson.dumps({"model": "auto", "messages": MESSAGES, "stream": True, "max_tokens": 100_000})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        wait_in_flight(gateway, 1)
        started = time.monotonic()
        wait_in_flight(gateway, 0, timeout=4 * STALL_S)
        assert time.monotonic() - started >= STALL_S / 2  # not before it stalled
        time.sleep(1.0)  # the record
        latest = httpx.get(gateway.url + "/v1/ponder/requests?limit=1", headers=ADMIN).json()["requests"][0]
        assert latest["status"] == 499 and latest["completion_tokens"] > 0, latest
        # dropped, not closed: a close waited for the client to take megabytes it never reads, and the
        # gateway held the socket and its buffers for as long as the client kept it
        port = sock.getsockname()[1]
        held = [c for c in psutil.Process(gateway.process.pid).net_connections() if c.raddr and c.raddr.port == port]
        assert held == []
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert "read nothing of its stream" in gateway.log()


def test_a_client_that_reads_its_stream_slowly_is_not_cut_off(stack):
    """A send waits until the client has taken some 48 KB (uvicorn's buffer from its high-water mark to
    its low one): a client reading 8 KB/s, slower than that over stream_stall_timeout_s, was cut off
    as one that read nothing. Taking anything restarts the wait."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[" ".join(["word"] * 60_000)])
    payload = orjson.dumps({"model": "auto", "messages": MESSAGES, "stream": True, "max_tokens": 100_000})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        sock.settimeout(5)
        read, started = 0, time.monotonic()
        while time.monotonic() - started < 4 * STALL_S:
            chunk = sock.recv(4096)
            assert chunk, f"the gateway ended the stream of a client reading, after {read} bytes"
            read += len(chunk)
            time.sleep(0.5)
        assert metric(gateway, "ponder_requests_in_flight") == 1
    wait_in_flight(gateway, 0)


class _Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


def test_a_slot_is_released_when_the_app_raises_or_is_cancelled():
    """A bug's exception (the 500 is written outside, by Starlette) and a task cancelled by a server
    shutting down leave the count where it was."""
    async def scenario() -> None:
        started = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["path"] == "/v1/responses":
                raise RuntimeError("a bug")
            started.set()
            await asyncio.sleep(60)

        shedding = LoadShedding(app, limit=1, metrics=Metrics())
        scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": []}
        with pytest.raises(RuntimeError):
            await shedding(scope, None, _Sent())
        assert shedding.in_flight == 0
        task = asyncio.ensure_future(shedding({**scope, "path": "/v1/chat/completions"}, None, _Sent()))
        await started.wait()
        assert shedding.in_flight == 1
        sent = _Sent()
        await shedding({**scope, "path": "/v1/embeddings"}, None, sent)
        assert sent.messages[0]["status"] == 503
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert shedding.in_flight == 0
        assert shedding.metrics.registry.get_sample_value("ponder_requests_in_flight") == 0

    asyncio.run(scenario())


def test_a_burst_past_the_shells_soft_open_files_limit_is_served(tmp_path):
    """`ponder serve` started where the soft limit on open files is low (1,024 in shells and systemd
    services; 256 here, for a burst of 300) raises it to the hard limit: the burst ran out of
    descriptors, its connections were reset and the healthy upstream, whose connects failed with
    EMFILE, was cooled down, refusing everyone with 503s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files ({hard}) leaves no room to raise")
    burst = 300
    with running(start_mock(tmp_path)) as mock:
        policy = write_policy(tmp_path, {"name": "fds", "arms": {"one": {"backend": "m", "strategy": "single"}},
                                         "routes": [{"name": "all", "candidates": ["one"]}]})
        config = {"backends": [mock_backend("m", mock, max_concurrency=burst, timeout_s=30)], "policy": policy}
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what the gateway process inherits
        try:
            gateway = start_gateway(tmp_path, config, name="fds")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with running(gateway):
            assert psutil.Process(gateway.process.pid).rlimit(resource.RLIMIT_NOFILE)[0] > 2 * burst
            control(mock, delay_ms=1000)  # every request holds its sockets at once

            async def fire() -> list[Any]:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                    async def one() -> Any:
                        try:
                            async with session.post(gateway.url + "/v1/chat/completions",
                                                    json={"model": "auto", "messages": MESSAGES}) as response:
                                return response.status
                        except aiohttp.ClientError as exc:
                            return type(exc).__name__

                    return await asyncio.gather(*(one() for _ in range(burst)))

            assert collections.Counter(asyncio.run(fire())) == {200: burst}
            assert "Too many open files" not in gateway.log()


def test_a_gateway_out_of_open_files_answers_503_and_leaves_the_backend_healthy(tmp_path):
    """Where even the hard limit on open files is short of a burst (256 here, for 300 requests), the
    connects to the upstream fail with EMFILE: that is the gateway's own shortage, not the backend's.
    Each request that could not be served gets a 503 `overloaded` with Retry-After (the SDKs retry
    it), and the healthy backend is not cooled down: it was, and every request for the next 30 s got
    "cooling down after repeated failures" long after the burst had passed."""
    burst = 300
    with running(start_mock(tmp_path)) as mock:
        policy = write_policy(tmp_path, {"name": "emfile", "arms": {"one": {"backend": "m", "strategy": "single"}},
                                         "routes": [{"name": "all", "candidates": ["one"]}]})
        config = {"backends": [mock_backend("m", mock, max_concurrency=burst, timeout_s=30)], "policy": policy}
        with running(start_gateway(tmp_path, config, name="emfile")) as gateway:
            served = psutil.Process(gateway.process.pid)
            served.rlimit(resource.RLIMIT_NOFILE, (256, 256))  # as `ulimit -n 256` before `ponder serve`
            control(mock, delay_ms=1000)  # every request holds its sockets at once

            async def fire() -> list[Any]:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                    async def one() -> Any:
                        try:
                            async with session.post(gateway.url + "/v1/chat/completions",
                                                    json={"model": "auto", "messages": MESSAGES}) as response:
                                body = await response.json(content_type=None)
                                return response.status, body["error"]["code"] if response.status != 200 else None, \
                                    response.headers.get("retry-after")
                        except aiohttp.ClientError:  # not accepted: the gateway had no descriptor for it either
                            return None

                    return await asyncio.gather(*(one() for _ in range(burst)))

            answers = collections.Counter(result for result in asyncio.run(fire()) if result is not None)
            assert answers[(503, "overloaded", "1")] > 0, answers  # the burst did run the gateway out of files
            assert set(answers) <= {(200, None, None), (503, "overloaded", "1")}, answers
            control(mock, delay_ms=0)
            after = client(gateway, key="unused").chat.completions.create(model="auto", messages=MESSAGES)
            assert after.choices[0].message.content == "Hello from the mock upstream."
            assert "backend m is failing" not in gateway.log()
            assert "the gateway has run out of open files" in gateway.log()


def test_without_a_limit_the_requests_in_flight_are_still_counted(tmp_path):
    """`max_requests_in_flight: 0` turns shedding off, not the count: ponder_requests_in_flight read 0
    with requests waiting on their upstream (the middleware that counts was left out), so an operator
    who lifted the limit for slow upstreams lost the one gauge that says how many wait."""
    with running(start_mock(tmp_path)) as mock:
        policy = write_policy(tmp_path, {"name": "unlimited", "arms": {"one": {"backend": "m", "strategy": "single"}},
                                         "routes": [{"name": "all", "candidates": ["one"]}],
                                         "exploration": {"share": 0.0}})
        config = {"backends": [mock_backend("m", mock, timeout_s=20, max_retries=0)], "policy": policy,
                  "max_requests_in_flight": 0,
                  "api_keys": [{"id": "app", "sha256": hashlib.sha256(KEY.encode()).hexdigest()},
                               {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}]}
        with running(start_gateway(tmp_path, config, name="unlimited")) as gateway:
            held = LIMIT + 1  # past what a limit of 2 would take: none of them is shed
            control(mock, script=["hang"] * held, hang_s=3)  # long enough to see all in flight on a loaded machine
            statuses: list[int] = []

            def one() -> None:
                raw = client(gateway).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
                statuses.append(raw.status_code)

            threads = [threading.Thread(target=one) for _ in range(held)]
            for thread in threads:
                thread.start()
            wait_in_flight(gateway, held)
            for thread in threads:
                thread.join(30)
            assert statuses == [200] * held
            wait_in_flight(gateway, 0)
            assert metric(gateway, "ponder_shed_requests_total") == 0


def test_shedding_is_logged_at_once_then_at_most_every_log_every_s(monkeypatch, caplog):
    """A burst shed thousands of requests a second: one warning each would flood the log (and spend the
    CPU the shedding saves). The first is said at once, the rest counted into the next report."""
    import gateway.shedding as shedding_module

    now = [1000.0]
    monkeypatch.setattr(shedding_module.time, "monotonic", lambda: now[0])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached: every request is past the limit of 1, which one holds")

    async def shed(count: int) -> None:
        for _ in range(count):
            sent = _Sent()
            await shedding(scope, None, sent)
            assert sent.messages[0]["status"] == 503

    shedding = LoadShedding(app, limit=1, metrics=Metrics())
    shedding.in_flight = 1  # one request held throughout (a limit of 0 is no limit)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    with caplog.at_level("WARNING", logger="ponder.shedding"):
        asyncio.run(shed(5))
        now[0] += shedding_module.LOG_EVERY_S - 0.1
        asyncio.run(shed(3))
        assert [r.getMessage().split(" request(s)")[0] for r in caplog.records] == ["overloaded: 1"]
        now[0] += 0.1
        asyncio.run(shed(1))
    assert [r.getMessage().split(" request(s)")[0] for r in caplog.records] == ["overloaded: 1", "overloaded: 8"]


def test_a_streams_stall_watch_ends_with_the_stream(monkeypatch):
    """The stall watch re-arms itself every stall_timeout_s / 2 while its stream lasts: one left armed by
    a stream that ended fired for the life of the process, one more for every stream served."""
    from gateway.streaming import EventStream

    async def scenario() -> tuple[int, list[bool]]:
        loop = asyncio.get_running_loop()
        armed: list[Any] = []
        call_later = loop.call_later

        def counted(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            if "EventStream" in getattr(callback, "__qualname__", ""):  # not asyncio.sleep's
                armed.append(callback)
            return call_later(delay, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_later", counted)

        async def body() -> Any:
            for _ in range(3):
                await asyncio.sleep(0.03)  # longer than half the stall timeout: the watch fires during it
                yield b"data: {}\n\n"

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        finished: list[bool] = []

        async def finish() -> None:
            finished.append(True)

        sent = _Sent()
        await EventStream(body(), finish, {}, stall_timeout_s=0.04)(
            {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive, sent)
        assert sent.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert len(armed) > 1  # it watched while the stream lasted
        ended_with = len(armed)
        await asyncio.sleep(0.3)
        return len(armed) - ended_with, finished

    rearmed, finished = asyncio.run(scenario())
    assert finished == [True] and rearmed == 0


def test_a_stream_cancelled_by_its_server_stays_cancelled_and_is_no_stalled_client(caplog):
    """The stall watch ends its stream by cancelling it, and takes that one cancellation back: a cancel
    from outside (a server shutting down, a task group) still ends the stream cancelled and settled,
    and is not logged as a client that read nothing."""
    from gateway.streaming import EventStream

    async def scenario() -> list[bool]:
        started = asyncio.Event()

        async def body() -> Any:
            yield b"data: {}\n\n"
            started.set()
            await asyncio.sleep(60)
            yield b"data: {}\n\n"

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        finished: list[bool] = []

        async def finish() -> None:
            finished.append(True)

        stream = EventStream(body(), finish, {}, stall_timeout_s=30.0)
        task = asyncio.ensure_future(stream({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                                             "headers": []}, receive, _Sent()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return finished

    with caplog.at_level("WARNING", logger="ponder.streaming"):
        assert asyncio.run(scenario()) == [True]
    assert "read nothing" not in caplog.text


INFINITY = resource.RLIM_INFINITY


@pytest.mark.parametrize("soft, hard, in_flight, raised_to, short", [
    (1024, 4096, 1000, 4096, False),  # to the hard limit, which holds 1,000 requests' sockets
    (1024, 2048, 1000, 2048, True),  # raised, and still short of what 1,000 need: said
    (1024, INFINITY, 1000, 1 << 20, False),  # an unlimited hard limit: the kernel's usual cap, not infinity
    (INFINITY, INFINITY, 1000, None, False),  # nothing to raise
    (512, 512, 0, None, False),  # no limit on requests in flight: nothing to size
])
def test_the_open_files_limit_is_raised_to_the_hard_one_and_a_short_one_said(monkeypatch, caplog, soft, hard,
                                                                             in_flight, raised_to, short):
    from gateway.connections import raise_open_files_limit

    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: asked.append(limits))
    with caplog.at_level("WARNING", logger="ponder.connections"):
        raise_open_files_limit(in_flight)
    assert asked == ([] if raised_to is None else [(raised_to, hard)])
    assert ("is short of what max_requests_in_flight" in caplog.text) is short, caplog.text


def test_a_stalled_stream_ends_as_a_client_that_left_and_its_task_goes_on_uncancelled():
    """The watch cancels the stream's task to end a send that stalls, and takes that cancellation back:
    the task (uvicorn's, the middleware's code after the app) goes on as a task that was never
    cancelled, and the stream is settled."""
    from gateway.streaming import EventStream

    async def scenario() -> tuple[list[bool], int]:
        async def body() -> Any:
            while True:
                yield b"data: {}\n\n"

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def stalled_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # a client that reads nothing: the send never completes

        finished: list[bool] = []

        async def finish() -> None:
            finished.append(True)

        await EventStream(body(), finish, {}, stall_timeout_s=0.05)(
            {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive, stalled_send)
        task = asyncio.current_task()
        assert task is not None
        return finished, task.cancelling()

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ([True], 0)
