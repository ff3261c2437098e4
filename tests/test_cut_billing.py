"""Calls cut off before their end are billed by one rule, whatever cut them.

The request's deadline, a backend's `timeout_s` or `first_byte_timeout_s`, the client leaving, a stream
stalling mid-answer, a vote's samples cut by the deadline: the upstream had read the prompt (and, for a
stream, written what was relayed), and the provider bills it. Each such call is billed its prompt at
the gateway's estimate plus the output received, priced as usual, marked `ok: false` with an error that
says it was cut off; the key's budget ledger (`/v1/ponder/spend`), `/metrics`, the recorded event and
the client's `usage` all count it alike. Calls cut by the deadline or a timeout were billed $0 (and 0
tokens), so budgets overspent by every prompt they let through. Real `ponder serve` in front of the mock
upstream (tests/mock_upstream.py), a budgeted key, real HTTP.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time

import httpx
import openai
import orjson
import pytest

from router.estimates import estimate_prompt_tokens
from tests.servers import control, mock_backend, reset, running, sent, start_gateway, start_mock, write_policy

USER, ADMIN = "sk-cut-user", "sk-cut-admin"
# $0.001 a prompt token, $0.002 an output token: every token shows in the spend
PRICES = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
IN_USD, OUT_USD = PRICES["input_per_mtok"] / 1e6, PRICES["output_per_mtok"] / 1e6
ANSWER = "one two three four five six seven eight nine ten"
PROMPT = "Tell me about the history of the printing press, in some detail please."
REQUEST_TIMEOUT_S = 1.5


QUICK = {"timeout_s": 0.5, "first_byte_timeout_s": 0.5}  # its own timeouts cut first
PATIENT = {"timeout_s": 30, "first_byte_timeout_s": 30}  # only the request's deadline (or the client) cuts
# (the backend's timeouts, stream, the mock's behaviour, the client's status, what the call's error says,
# output tokens received); each on a backend of its own: one case's cool-down never meets the next
CUTS = {
    "timeout_s": (QUICK, False, "hang", 504, "upstream timed out", 0),
    "first_byte_timeout_s": (QUICK, True, "stall", 504, "no first byte in time", 0),
    "deadline": (PATIENT, False, "hang", 504, "request deadline reached", 0),
    "deadline_before_first_byte": (PATIENT, True, "stall", 504, "request deadline reached", 0),
    # the first chunk ("one", relayed) is in, then the stream stalls: that chunk's token is billed too
    "stalled_mid_answer": (QUICK, True, "hold", 200, "upstream stream stalled", 1),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cut")
    with running(start_mock(tmp)) as mock:
        backends = [mock_backend(name, mock, prices=PRICES, max_retries=0, **CUTS[name][0]) for name in CUTS]
        backends += [mock_backend(name, mock, prices=PRICES, max_retries=0, **timeouts) for name, timeouts in
                     (("voter", PATIENT), ("first", QUICK), ("second", PATIENT), ("left", PATIENT),
                      ("quiet", PATIENT), ("broken", PATIENT), ("sdk-timeout", QUICK),
                      ("hangup", PATIENT))]
        backends.append(mock_backend("sdk-failing", mock, prices=PRICES, max_retries=1, **PATIENT))
        policy = write_policy(tmp, {
            "name": "cut",
            "arms": {"vote": {"backend": "voter", "strategy": "self_consistency", "n": 3},
                     "first": {"backend": "first", "strategy": "single", "prior": 0.9},
                     "second": {"backend": "second", "strategy": "single", "prior": 0.5}},
            "routes": [{"name": "all", "candidates": ["vote"]}],
            "aliases": {"vote": {"arms": ["vote"], "explore": False},
                        "fallback": {"arms": ["first", "second"], "explore": False}},
            "objective": {"cost_weight": 0, "latency_weight": 0},
            "exploration": {"share": 0.0}}, "cut.yaml")
        keys = [{"id": "user", "sha256": hashlib.sha256(USER.encode()).hexdigest(), "budget_usd_per_day": 1000.0},
                {"id": "admin", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "admin": True}]
        with running(start_gateway(tmp, {"backends": backends, "policy": policy, "api_keys": keys,
                                         "request_timeout_s": REQUEST_TIMEOUT_S}, name="cut")) as gateway:
            yield gateway, mock


def body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def post(gateway, payload: dict) -> httpx.Response:
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=payload, timeout=30,
                      headers={"authorization": f"Bearer {USER}"}) as response:
        response.read()
    return response


def admin_get(gateway, path: str) -> httpx.Response:
    return httpx.get(gateway.url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)


def ledger(gateway) -> float:
    """The key's settled spend today: what its budget counts."""
    row = next(k for k in admin_get(gateway, "/v1/ponder/spend").json()["keys"] if k["key_id"] == "user")
    return float(row["spent"].get("day", 0.0))


def metered(gateway) -> float:
    """ponder_cost_usd_total over every arm and task."""
    text = admin_get(gateway, "/metrics").text
    return sum(float(v) for v in re.findall(r"^ponder_cost_usd_total\{[^}]*\} (\S+)$", text, re.M))


def latest_id(gateway) -> str | None:
    rows = admin_get(gateway, "/v1/ponder/requests?limit=1").json()["requests"]
    return rows[0]["request_id"] if rows else None


def recorded(gateway, request_id: str) -> dict:
    """The request's event, once it is settled."""
    for _ in range(100):
        detail = admin_get(gateway, f"/v1/ponder/requests/{request_id}")
        if detail.status_code == 200:
            return detail.json()
        time.sleep(0.05)
    raise AssertionError(f"request {request_id} was never recorded")


def prompt_tokens(sent_body: dict) -> int:
    """The rule's prompt: the gateway's estimate of the body the upstream got."""
    return estimate_prompt_tokens(sent_body["messages"], sent_body)


def assert_billed(gateway, before: tuple[float, float], expected_usd: float) -> None:
    """The key's ledger and /metrics both grew by `expected_usd` (the ledger settles right after the
    answer: waited for)."""
    for _ in range(100):
        if abs(ledger(gateway) - before[0] - expected_usd) < 1e-9:
            break
        time.sleep(0.05)
    assert ledger(gateway) - before[0] == pytest.approx(expected_usd, abs=1e-9)
    assert metered(gateway) - before[1] == pytest.approx(expected_usd, abs=1e-9)


def assert_cut(call: dict, why: str) -> None:
    assert call["ok"] is False and call["error"].startswith("cut off: ") and why in call["error"], call


def leave_after(gateway, payload: dict, seconds: float) -> None:
    """Send a request on a bare socket and hang up after `seconds`, as a client that gives up does."""
    data = orjson.dumps(payload)
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + USER.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
                     + b"\r\n\r\n" + data)
        time.sleep(seconds)


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_call_cut_by_a_timeout_or_the_deadline_is_billed_its_prompt_and_what_it_wrote(stack, cut):
    gateway, mock = stack
    _, stream, behaviour, status, why, output = CUTS[cut]
    reset(mock)
    control(mock, answers=[ANSWER], script=[behaviour], hang_s=5)
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body(cut, stream=stream))
    assert response.status_code == status, response.text
    event = recorded(gateway, response.headers["x-ponder-request-id"])
    [call] = event["execution"]["calls"]
    assert_cut(call, why)
    prompt = prompt_tokens(sent(mock)[0])
    assert (call["prompt_tokens"], call["completion_tokens"]) == (prompt, output)
    expected = prompt * IN_USD + output * OUT_USD
    assert call["cost_usd"] == pytest.approx(expected, abs=1e-12)
    assert event["request"]["cost_usd"] == pytest.approx(expected, abs=1e-12)
    if status != 200:  # an error answer tells the client what it was billed, as an answer does
        assert float(response.headers["x-ponder-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert_billed(gateway, before, expected)
    assert f'ponder_backend_calls_total{{backend="{cut}",outcome="cut"}} 1.0' in admin_get(gateway, "/metrics").text


@pytest.mark.parametrize("backend, behaviour, status, upstream_calls", [
    ("sdk-timeout", "hang", 504, 1),  # cut by its timeout_s, and billed its prompt
    ("sdk-failing", "500", 502, 2),  # after the gateway's own retry (max_retries: 1)
])
def test_the_sdk_does_not_repeat_what_the_gateway_already_tried(stack, backend, behaviour, status, upstream_calls):
    """The openai SDK retries any 5xx twice by default: one app call whose upstream timed out became
    three billed upstream timeouts, a 502 three rounds of the gateway's own retries. Both answers say
    `x-should-retry: false`, which the SDK obeys. The real SDK, with its default retries."""
    gateway, mock = stack
    reset(mock)
    control(mock, script=[behaviour] * 10, hang_s=5)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=USER)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(**body(backend))
    assert failed.value.status_code == status
    assert len(sent(mock)) == upstream_calls
    assert failed.value.response.headers["x-should-retry"] == "false"


def test_every_sample_of_a_vote_the_deadline_cut_is_billed(stack):
    """A vote of 3 whose samples all hang: the deadline cuts all three, and the upstream had read all three
    prompts. Billed $0 before."""
    gateway, mock = stack
    reset(mock)
    control(mock, script=["hang"] * 3, hang_s=5)
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body("vote"))
    assert response.status_code == 504, response.text
    calls = recorded(gateway, response.headers["x-ponder-request-id"])["execution"]["calls"]
    assert len(calls) == 3 and len(sent(mock)) == 3
    for call in calls:
        assert_cut(call, "request deadline reached")
    expected = sum(prompt_tokens(b) for b in sent(mock)) * IN_USD
    assert sum(c["cost_usd"] for c in calls) == pytest.approx(expected, abs=1e-12)
    assert float(response.headers["x-ponder-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert_billed(gateway, before, expected)


def test_a_call_cut_before_a_fallback_answered_is_in_the_clients_usage_and_cost(stack):
    """The first arm's backend times out (its `timeout_s`), the fallback answers: the client's usage, its
    x-ponder-cost-usd, the ledger and /metrics all count the cut call's prompt, alike."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[ANSWER], script=["hang"], hang_s=5)
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body("fallback"))
    assert response.status_code == 200, response.text
    cut_body, _ = sent(mock)
    usage = response.json()["usage"]
    calls = recorded(gateway, response.headers["x-ponder-request-id"])["execution"]["calls"]
    assert_cut(calls[0], "upstream timed out")
    assert calls[1]["ok"] is True and calls[1]["prompt_tokens"] > 0  # the mock's own count for its answer
    assert usage["prompt_tokens"] == calls[0]["prompt_tokens"] + calls[1]["prompt_tokens"]
    assert calls[0]["prompt_tokens"] == prompt_tokens(cut_body) > 0
    expected = sum(c["cost_usd"] for c in calls)
    assert float(response.headers["x-ponder-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert_billed(gateway, before, expected)
    # the learner charges the fallback its own call, not the cut prompt of the arm that failed before it
    # (which made the fallback look dearer than it is); the spend above counts both
    for _ in range(100):  # the learned stats are a snapshot the store refreshes
        summary = admin_get(gateway, "/v1/ponder/summary?policy=cut").json()
        arms = {a["arm"]: a for t in summary["tasks"] for a in t["arms"]}
        if "second/-/single/1" in arms:
            break
        time.sleep(0.1)
    assert arms["second/-/single/1"]["mean_cost_usd"] == pytest.approx(calls[1]["cost_usd"], abs=1e-9), summary


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_call_the_client_left_is_billed_by_the_same_rule(stack, stream):
    """The client hangs up: a JSON call (the upstream still thinking) is billed its prompt; a stream it
    left mid-answer, its prompt and the chunk relayed. Both marked cut off, as the timeouts are."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[ANSWER], script=["hold" if stream else "hang"], hang_s=5)
    before, previous = (ledger(gateway), metered(gateway)), latest_id(gateway)
    leave_after(gateway, body("left", stream=stream), 0.5)
    for _ in range(100):  # recorded once the gateway has seen the client go
        if (request_id := latest_id(gateway)) != previous:
            break
        time.sleep(0.05)
    event = recorded(gateway, request_id)
    assert event["request"]["status"] == 499, event["request"]
    [call] = event["execution"]["calls"]
    assert_cut(call, "the client left")
    output = 1 if stream else 0
    assert (call["prompt_tokens"], call["completion_tokens"]) == (prompt_tokens(sent(mock)[0]), output)
    assert_billed(gateway, before, call["prompt_tokens"] * IN_USD + output * OUT_USD)


def test_a_client_that_hangs_up_on_a_long_stream_is_recorded_as_leaving(stack):
    """A client hangs up after reading part of a long answer whose rest the gateway already has: uvicorn
    drops sends to a gone client silently, and the relay ran to the end, so the request was recorded as
    200 with the whole answer (60,000 tokens), learned from as an answer and billed for what no one read
    at the upstream's count. The disconnect ends the stream: a 499, the call cut off and billed what
    was relayed."""
    gateway, mock = stack
    reset(mock)
    words = 60_000
    control(mock, answers=[" ".join(["word"] * words)])
    before, previous = (ledger(gateway), metered(gateway)), latest_id(gateway)
    data = orjson.dumps(body("hangup", stream=True, max_tokens=100_000))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: the gateway gets ahead
        sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + USER.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
                     + b"\r\n\r\n" + data)
        read = 0
        while read < 100_000:
            read += len(sock.recv(8192))
    for _ in range(200):  # recorded once the gateway has seen the client go
        if (request_id := latest_id(gateway)) != previous:
            break
        time.sleep(0.05)
    event = recorded(gateway, request_id)
    assert event["request"]["status"] == 499, event["request"]
    [call] = event["execution"]["calls"]
    assert_cut(call, "the client left")
    assert 0 < call["completion_tokens"] < words // 2, call
    assert call["cost_usd"] == pytest.approx(call["prompt_tokens"] * IN_USD + call["completion_tokens"] * OUT_USD,
                                             abs=1e-12)
    assert_billed(gateway, before, call["cost_usd"])


def test_a_stream_broken_mid_answer_is_billed_its_prompt_and_what_it_relayed(stack):
    """The upstream ends its stream half way (no finish_reason, no [DONE]): the client gets the error
    event, and the call, cut off, is billed by the one rule: its prompt and the six words relayed."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[ANSWER], script=["truncate"])
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body("broken", stream=True))
    assert response.status_code == 200  # the headers went out with the first chunk
    assert b"data: [DONE]" not in response.content and b'"code":"upstream_stream_error"' in response.content
    event = recorded(gateway, response.headers["x-ponder-request-id"])
    [call] = event["execution"]["calls"]
    assert call["ok"] is False and call["error"].startswith("cut off: "), call
    relayed = "one two three four five six"  # the mock breaks after its sixth word
    written = max(len(relayed.split()), -(-len(relayed) // 4))  # chunks or characters / 4 (Usage.estimated)
    assert (call["prompt_tokens"], call["completion_tokens"]) == (prompt_tokens(sent(mock)[0]), written)
    expected = call["prompt_tokens"] * IN_USD + written * OUT_USD
    assert event["request"]["cost_usd"] == pytest.approx(expected, abs=1e-12)
    assert_billed(gateway, before, expected)


def test_an_answer_without_usage_is_billed_by_its_estimate_not_nothing(stack):
    """A server that leaves `usage` out of a JSON answer: billed as a stream without usage is, the prompt
    at its estimate and the answer's characters / 4 (never over max_tokens); it was billed $0."""
    gateway, mock = stack
    reset(mock)
    control(mock, answers=[ANSWER], script=["no_usage"])
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body("quiet", max_tokens=100))
    assert response.status_code == 200, response.text
    [call] = recorded(gateway, response.headers["x-ponder-request-id"])["execution"]["calls"]
    written = -(-len(ANSWER) // 4)
    assert call["ok"] is True
    assert (call["prompt_tokens"], call["completion_tokens"]) == (prompt_tokens(sent(mock)[0]), written)
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (call["prompt_tokens"], written)
    assert response.json()["ponder"]["usage_estimated"] is True  # as for a stream without usage
    assert_billed(gateway, before, call["prompt_tokens"] * IN_USD + written * OUT_USD)


def test_choices_without_usage_are_each_billed_up_to_max_tokens(stack):
    """A call asked for `n` choices from a server that leaves `usage` out: each choice may write
    max_tokens, so each is capped on its own. Three choices cut at max_tokens=5 were billed 5 output
    tokens in all, not 15 (the cap was applied to their sum)."""
    gateway, mock = stack
    reset(mock)
    long = "extraordinarily " * 20  # cut at 5 words, 4 tokens a word by the estimate: capped at 5 each
    control(mock, answers=[long, long, long], script=["no_usage"])
    before = ledger(gateway), metered(gateway)
    response = post(gateway, body("quiet", max_tokens=5, n=3))
    assert response.status_code == 200, response.text
    assert [c["finish_reason"] for c in response.json()["choices"]] == ["length"] * 3
    [call] = recorded(gateway, response.headers["x-ponder-request-id"])["execution"]["calls"]
    assert (call["prompt_tokens"], call["completion_tokens"]) == (prompt_tokens(sent(mock)[0]), 3 * 5)
    assert response.json()["usage"]["completion_tokens"] == 3 * 5
    assert_billed(gateway, before, call["prompt_tokens"] * IN_USD + 3 * 5 * OUT_USD)
