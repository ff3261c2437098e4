"""Per-key request limits (gateway/key_limits.py): an api_keys entry's `max_requests_in_flight` and
`requests_per_minute`, past which its requests get a 429 `rate_limit_exceeded` at once.

Real `ponder serve` in front of the mock upstream, driven by the openai SDK (max_retries=0: it retries
a 429 after its retry-after-ms otherwise), httpx and raw sockets for clients that hang up.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.config import ApiKey
from gateway.key_limits import SCOPE_KEY, Admission, KeyLimits, duration
from gateway.errors import ApiError
from gateway.metrics import Metrics
from tests.servers import calls, control, mock_backend, reset, running, start_gateway, start_mock, write_policy

BUSY, CALM, METERED, ADMIN_KEY = "sk-busy-key", "sk-calm-key", "sk-metered-key", "sk-limited-admin-key"
IN_FLIGHT = 2  # the busy key's max_requests_in_flight
PER_MINUTE = 30  # the metered key's requests_per_minute: a token back every 2 s
MESSAGES = [{"role": "user", "content": "hello there"}]
ORIGIN = "https://app.example"


def entry(key_id: str, key: str, **settings: Any) -> dict[str, Any]:
    return {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest(), **settings}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("key-limits")
    with running(start_mock(tmp)) as mock:
        policy = write_policy(tmp, {
            "name": "limits",
            "arms": {"one": {"backend": "m", "strategy": "single"},
                     "vote": {"backend": "m", "strategy": "self_consistency", "n": 3}},
            "routes": [{"name": "all", "candidates": ["one"]}],
            "exploration": {"share": 0.0},
            "overrides": {"strategy_header": ["self_consistency", "single"]},
        })
        config = {"backends": [mock_backend("m", mock, timeout_s=20, first_byte_timeout_s=20, max_retries=0)],
                  "policy": policy, "cors_origins": [ORIGIN],
                  "api_keys": [entry("busy", BUSY, max_requests_in_flight=IN_FLIGHT, budget_usd_per_day=5.0),
                               entry("calm", CALM),
                               entry("metered", METERED, requests_per_minute=PER_MINUTE),
                               entry("ops", ADMIN_KEY, admin=True, max_requests_in_flight=1, requests_per_minute=1)]}
        with running(start_gateway(tmp, config, name="limits")) as gateway:
            yield gateway, mock


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def hold_streams(gateway, mock, seconds: float) -> list[Any]:
    """IN_FLIGHT streams of the busy key that the upstream pauses after their first chunk for `seconds`
    (long streams holding every slot of the key). Returns the threads and, last, the statuses list."""
    control(mock, script=["hold"] * IN_FLIGHT, hang_s=seconds, answers=["one two three four"])
    statuses: list[int] = []
    first_chunks = threading.Semaphore(0)

    def one() -> None:
        with client(gateway, BUSY).chat.completions.with_streaming_response.create(
                model="auto", messages=MESSAGES, stream=True) as raw:
            lines = raw.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            first_chunks.release()
            assert "[DONE]" in "".join(lines)
            statuses.append(raw.status_code)

    threads = [threading.Thread(target=one) for _ in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    for _ in range(IN_FLIGHT):
        assert first_chunks.acquire(timeout=10)
    return [*threads, statuses]


def join(held: list[Any]) -> list[int]:
    *threads, statuses = held
    for thread in threads:
        thread.join(30)
    return statuses


def assert_rate_limited(exc: openai.APIStatusError, limit_name: str) -> httpx.Headers:
    assert exc.status_code == 429
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("requests", None, "rate_limit_exceeded")
    assert limit_name in error["message"], error["message"]
    headers = exc.response.headers
    assert exc.request_id and exc.request_id.startswith("req_") and headers["x-ponder-request-id"] == exc.request_id
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    return headers


def spent_today(gateway, key_id: str) -> float:
    keys = httpx.get(gateway.url + "/v1/ponder/spend", headers=ADMIN).json()["keys"]
    return next((k["spent"].get("day", 0.0) for k in keys if k["key_id"] == key_id), 0.0)


def test_a_key_at_its_requests_in_flight_gets_a_429_and_other_keys_are_served(stack):
    """The morning's report: one key's long streams took every slot and starved the others. With
    max_requests_in_flight the key's next request is refused at once (neither recorded, billed, held nor
    sent upstream), another key is served meanwhile, and the key is served again once a stream ends."""
    gateway, mock = stack
    reset(mock)
    spent_before, since = spent_today(gateway, "busy"), time.time()
    held = hold_streams(gateway, mock, seconds=3.0)
    busy = client(gateway, BUSY)
    attempts = [
        lambda: busy.chat.completions.create(model="auto", messages=MESSAGES),
        lambda: busy.chat.completions.create(model="auto", messages=MESSAGES, stream=True),
        lambda: busy.responses.create(model="auto", input="hello there"),
        lambda: busy.embeddings.create(model="m", input="hello there"),
    ]
    for attempt in attempts:
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as caught:
            attempt()
        assert time.perf_counter() - started < 1.0  # at once, not when a held stream ends
        headers = assert_rate_limited(caught.value, "max_requests_in_flight")
        assert f"limit {IN_FLIGHT}" in caught.value.message
        assert int(headers["retry-after-ms"]) <= 1500  # a short hint: a concurrency limit has no window
        assert "x-ratelimit-limit-requests" not in headers  # they tell a requests_per_minute limit only
    # refused before the body is read: an invalid one is not reached
    refused = httpx.post(gateway.url + "/v1/chat/completions", content=b"{not json",
                         headers={"authorization": f"Bearer {BUSY}", "content-type": "application/json"})
    assert refused.status_code == 429
    # another key is served meanwhile; the busy key's other endpoints are not counted
    assert client(gateway, CALM).chat.completions.create(model="auto", messages=MESSAGES).choices
    assert busy.models.list().data
    assert httpx.post(gateway.url + "/v1/feedback", json={"request_id": "chatcmpl-none", "score": 1},
                      headers={"authorization": f"Bearer {BUSY}"}).status_code == 404
    metrics = httpx.get(gateway.url + "/metrics", headers=ADMIN).text
    assert 'ponder_rate_limited_requests_total{key_id="busy",limit="max_requests_in_flight"} 5.0' in metrics
    assert 'ponder_rate_limited_requests_total{key_id="metered",limit="requests_per_minute"} 0.0' in metrics
    assert join(held) == [200] * IN_FLIGHT
    assert busy.chat.completions.create(model="auto", messages=MESSAGES).choices  # its slots are back
    assert calls(mock)["count"] == IN_FLIGHT + 2  # the held streams, the calm key's and the last one
    time.sleep(1.5)  # the store's flush
    recorded = httpx.get(gateway.url + "/v1/ponder/requests?limit=50", headers=ADMIN).json()["requests"]
    assert len([r for r in recorded if r["ts"] >= since and r["key_id"] == "busy"]) == IN_FLIGHT + 1, recorded
    assert spent_today(gateway, "busy") > spent_before  # what was served is billed, the refusals are not


def test_a_key_slot_is_given_back_once_however_a_request_ends(stack):
    """A count left high locks the key out for good, one left low lets it past its limit: after streams
    read whole or dropped, a vote, upstream errors, refused bodies and clients that hung up, the key has
    exactly IN_FLIGHT slots again."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=["one two three four five six seven eight"])
    busy = client(gateway, BUSY)
    busy.chat.completions.create(model="auto", messages=MESSAGES)
    assert list(busy.chat.completions.create(model="auto", messages=MESSAGES, stream=True))
    assert list(busy.chat.completions.create(model="auto", messages=MESSAGES, stream=True,
                                             extra_headers={"x-ponder-strategy": "self_consistency"}))
    with busy.chat.completions.create(model="auto", messages=MESSAGES, stream=True) as dropped:
        next(iter(dropped))
    control(mock, script=["500"])
    with pytest.raises(openai.APIStatusError):
        busy.chat.completions.create(model="auto", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        busy.chat.completions.create(model="auto", messages=[{"role": "nobody", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        busy.embeddings.create(model="no-such-model", input="x")
    port = int(gateway.url.rsplit(":", 1)[1])
    for behaviour, stream in (("hang", False), ("hold", True)):
        control(mock, script=[behaviour], hang_s=8)
        payload = orjson.dumps({"model": "auto", "messages": MESSAGES, "stream": stream})
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + BUSY.encode() + b"\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            time.sleep(0.5)
    time.sleep(0.5)  # the gateway sees the hang-ups
    held = hold_streams(gateway, mock, seconds=1.5)  # not too few slots: both are taken
    with pytest.raises(openai.RateLimitError):  # not too many: the next is refused
        busy.chat.completions.create(model="auto", messages=MESSAGES)
    assert join(held) == [200] * IN_FLIGHT


def test_requests_per_minute_refuses_past_the_bucket_and_says_when_a_request_is_back(stack):
    """A bucket of PER_MINUTE requests, one back every 60/PER_MINUTE s: every answer of the key carries
    OpenAI's x-ratelimit-*-requests headers (a browser app may read them), the request past the bucket
    gets a 429 whose retry-after-ms is the time until a request is back, and after it the key is served."""
    gateway, mock = stack
    reset(mock)
    metered = client(gateway, METERED)
    answered = metered.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert answered.headers["x-ratelimit-limit-requests"] == str(PER_MINUTE)
    assert answered.headers["x-ratelimit-remaining-requests"] == str(PER_MINUTE - 1)
    assert answered.headers["x-ratelimit-reset-requests"].endswith("s")
    # cheap requests (refused bodies) count as requests too; a slow machine may see a token come back
    remaining, sent = [], 1
    while True:
        assert sent <= PER_MINUTE + 5, "no 429 past the bucket"
        try:
            sent += 1
            metered.chat.completions.create(model="auto", messages=[{"role": "nobody", "content": "x"}])
        except openai.BadRequestError as exc:
            remaining.append(int(exc.response.headers["x-ratelimit-remaining-requests"]))
        except openai.RateLimitError as exc:
            caught = exc
            break
    assert sent > PER_MINUTE and remaining[-1] == 0 and remaining == sorted(remaining, reverse=True)
    headers = assert_rate_limited(caught, "requests_per_minute")
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 60_000 / PER_MINUTE
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # another key is not metered by it
    assert client(gateway, CALM).chat.completions.create(model="auto", messages=MESSAGES).choices
    time.sleep(wait_ms / 1000 + 0.1)
    served = metered.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, stream=True)
    assert served.status_code == 200 and served.headers["x-ratelimit-limit-requests"] == str(PER_MINUTE)
    assert list(served.parse())
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {METERED}", "origin": ORIGIN}) as http:
        from_browser = http.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES})
    assert from_browser.headers["access-control-allow-origin"] == ORIGIN
    assert {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests"} <= set(from_browser.headers["access-control-expose-headers"].split(", "))
    assert calls(mock)["count"] == 3  # the refused requests reached no upstream


def test_an_admin_keys_limits_leave_the_admin_endpoints_alone(stack):
    """The ops key may send 1 model request per minute; its dashboard, metrics and admin API are not
    counted (an operator must still see a key that is being limited)."""
    gateway, _ = stack
    with httpx.Client(base_url=gateway.url, headers=ADMIN) as http:
        for _ in range(3):
            for path in ("/metrics", "/v1/ponder/summary", "/v1/ponder/requests?limit=1", "/dashboard",
                         "/v1/models", "/healthz"):
                answer = http.get(path)
                assert answer.status_code == 200, path
                assert "x-ratelimit-limit-requests" not in answer.headers


def test_the_bucket_refills_with_time_and_a_refusal_takes_no_token():
    now = [1000.0]
    metrics = Metrics()
    limits = KeyLimits([ApiKey(id="k", sha256="0" * 64, requests_per_minute=2, max_requests_in_flight=1)],
                       metrics, clock=lambda: now[0])
    scopes = [{SCOPE_KEY: Admission()} for _ in range(3)]
    limits.admit("k", scopes[0])
    with pytest.raises(ApiError) as in_flight:  # its one slot is held
        limits.admit("k", scopes[1])
    assert "max_requests_in_flight" in in_flight.value.message
    scopes[0][SCOPE_KEY].release()
    scopes[0][SCOPE_KEY].release()  # twice gives back one slot, not two
    limits.admit("k", scopes[1])  # the refusal took no token: the second of the two
    scopes[1][SCOPE_KEY].release()
    with pytest.raises(ApiError) as per_minute:
        limits.admit("k", scopes[2])
    assert per_minute.value.headers["retry-after-ms"] == "30000"  # one token back in 60/2 s
    now[0] += 15.0
    with pytest.raises(ApiError) as halfway:
        limits.admit("k", scopes[2])
    assert halfway.value.headers["retry-after-ms"] == "15000" and halfway.value.headers["Retry-After"] == "15"
    now[0] += 15.0
    limits.admit("k", scopes[2])
    assert dict(scopes[2][SCOPE_KEY].headers)[b"x-ratelimit-reset-requests"] == b"1m0s"
    limits.admit("other", {})  # a key without limits passes, counted nowhere
    refused = {limit: metrics.registry.get_sample_value("ponder_rate_limited_requests_total",
                                                        {"key_id": "k", "limit": limit})
               for limit in ("max_requests_in_flight", "requests_per_minute")}
    assert refused == {"max_requests_in_flight": 1.0, "requests_per_minute": 2.0}
    assert [duration(s) for s in (0.12, 8.64, 60.0, 90.5)] == ["120ms", "8.64s", "1m0s", "1m30.5s"]
