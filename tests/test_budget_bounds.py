"""Per-key budgets are a true bound for requests without max_tokens (issue #10).

A request without `max_tokens` used to hold a default output length (1,024 tokens a call) that nothing
enforced: an upstream writing 5,000 let 20 concurrent requests near a key's cap spend several times it.
Now a key with a budget holds the backend's maximum output when that is known (`max_output_tokens`,
declared or from litellm's map), else the default length, which is then sent to the upstream as the
call's limit. Keys without a budget are untouched. Real `ponder serve` processes in front of the mock
upstream (which cuts an answer at the max_tokens it is sent, as a real one does), a real redis-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

import httpx
import orjson
import pytest

from tests.servers import calls, control, mock_backend, reset, running, sent, start_gateway, start_mock, write_policy

PROMPT = "Write a long essay."  # the mock counts 4 words
HELD_PROMPT = 19 + 8  # a budget holds a prompt's bytes, plus 8 a message (its estimate, 19 // 4 + 4, is no bound)
LONG = " ".join(["word"] * 5000)  # 5,000 completion tokens at the mock
PRICES = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}  # mock_backend's: $2 per million output tokens
DEFAULT_HOLD = (HELD_PROMPT * 1.0 + 1024 * 2.0) / 1e6  # one call without max_tokens, unknown maximum
DECLARED_MAX = 3000
DECLARED_HOLD = (HELD_PROMPT * 1.0 + DECLARED_MAX * 2.0) / 1e6

KEYS = {  # key -> (id, daily budget or None)
    "sk-free": ("free", None),
    "sk-capped": ("capped", 5.0),
    "sk-tiny": ("tiny", 0.001),
    "sk-burst": ("burst", 0.02),
    "sk-burst-max": ("burst-max", 2.5 * DECLARED_HOLD),
    "sk-left": ("left", 0.05),
    "sk-digits": ("digits", 0.01),
    "sk-sliver": ("sliver", 1e-12),
}


def key_lines(keys: dict[str, tuple[str, float | None]]) -> list[dict]:
    return [{"id": ident, "sha256": hashlib.sha256(key.encode()).hexdigest(),
             **({"budget_usd_per_day": cap} if cap is not None else {})} for key, (ident, cap) in keys.items()]


def policy(tmp) -> str:
    return write_policy(tmp, {
        "name": "bounds",
        "arms": {"one": {"backend": "m", "strategy": "single"},
                 "vote": {"backend": "m", "strategy": "self_consistency", "n": 3}},
        "routes": [{"name": "all", "candidates": ["one"]}],
        "exploration": {"share": 0.0},
        "overrides": {"strategy_header": ["self_consistency", "single"]},
    }, "bounds.yaml")


def backends(mock) -> list[dict]:
    return [mock_backend("m", mock),  # an api_base: its maximum output is unknown
            mock_backend("m-max", mock, max_output_tokens=DECLARED_MAX),
            mock_backend("m-think", mock, reasoning=True),
            mock_backend("m-free", mock, prices={"input_per_mtok": 0.0, "output_per_mtok": 0.0}),
            mock_backend("m-window", mock, max_context=4000)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    with running(start_mock(tmp)) as mock, running(start_gateway(tmp, {
            "backends": backends(mock), "policy": policy(tmp), "api_keys": key_lines(KEYS)}, name="bounds")) as gw:
        yield {"tmp": tmp, "mock": mock, "gateway": gw}


@pytest.fixture
def mock(stack):
    reset(stack["mock"])
    return stack["mock"]


def post(url: str, key: str, headers: dict | None = None, **body) -> httpx.Response:
    payload = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}], **body}
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=30,
                      headers={"authorization": f"Bearer {key}", **(headers or {})})


async def burst(urls: list[str], key: str, count: int, **body) -> list[httpx.Response]:
    """`count` requests at once, spread over `urls`."""
    payload = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}], **body}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=payload,
                                                  headers={"authorization": f"Bearer {key}"}) for i in range(count)))


def spent_by(responses: list[httpx.Response]) -> float:
    return sum(float(r.headers["x-ponder-cost-usd"]) for r in responses if r.status_code == 200)


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_concurrent_requests_without_max_tokens_stay_within_one_requests_hold(stack, mock, store, request):
    """The issue's repro: an upstream answering 5,000 tokens, a key with a $0.02 day, 20 requests at once
    without max_tokens. Before: about 10 admitted, each holding 1,024 tokens and spending 5,000 (the key
    ended at ~4.5x its cap). Now each call is sent max_tokens 1024, the length it holds, so the key ends
    within one request's hold of its cap: on the embedded store, and on Redis across two replicas."""
    control(mock, answers=[LONG], delay_ms=400)
    if store == "embedded":
        urls, key = [stack["gateway"].url], "sk-burst"
        responses = asyncio.run(burst(urls, key, 20))
    else:
        redis_url = request.getfixturevalue("redis_url")
        config = {"backends": backends(mock), "policy": policy(stack["tmp"]), "api_keys": key_lines(KEYS),
                  "telemetry": {"redis_url": redis_url}}
        with running(start_gateway(stack["tmp"], {**config, "telemetry": {
                **config["telemetry"], "data_dir": str(stack["tmp"] / "r1")}}, name="r1")) as one, \
             running(start_gateway(stack["tmp"], {**config, "telemetry": {
                **config["telemetry"], "data_dir": str(stack["tmp"] / "r2")}}, name="r2")) as two:
            responses = asyncio.run(burst([one.url, two.url], "sk-burst", 20))
    ok = [r for r in responses if r.status_code == 200]
    assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses if r.status_code != 200][:2]
    assert len(ok) >= 5, [r.text for r in responses][:2]
    cap = KEYS["sk-burst"][1]
    assert spent_by(responses) <= cap + DEFAULT_HOLD + 1e-12, f"spent {spent_by(responses):.6f} of {cap}"
    assert all(r.json()["usage"]["completion_tokens"] == 1024 for r in ok)
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in ok)
    assert all(r.json()["ponder"]["max_tokens_sent"] == {"m": 1024} for r in ok)
    assert [body.get("max_tokens") for body in sent(mock)] == [1024] * len(ok)
    for refused in (r for r in responses if r.status_code == 429):  # told what would fit now
        assert "max_tokens" in refused.json()["error"]["message"]


def test_prompts_the_estimate_undercounts_cannot_overspend_a_budget(stack, mock):
    """A prompt of 2,000 digits ("7 7 7 ..."): the gateway's estimate (4 characters a token) says 1,004
    tokens, the mock bills 2,000 (a real tokenizer: 2,000 to 4,000; Chinese or emoji up to 8x the
    estimate). 64 requests at once on a $0.01 day, chat and Responses, streamed or not: the holds
    counted the estimate, so 9 were admitted and the provider billed $0.018. A budget holds the
    prompt's bytes, which no tokenizer's count exceeds: what the provider bills stays within the cap
    and one request's hold."""
    control(mock, answers=["ok"], delay_ms=400)
    prompt = "7 " * 2000
    per_call = (2000 * 1.0 + 1 * 2.0) / 1e6  # what the mock bills: 2,000 prompt tokens, 1 answer token
    hold = ((len(prompt) + 8) * 1.0 + 1 * 2.0) / 1e6
    chat = {"model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": prompt}]}
    responses = {"model": "auto", "max_output_tokens": 1, "input": prompt}
    requests = [("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True}),
                ("/v1/responses", responses), ("/v1/responses", {**responses, "stream": True})] * 16

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack["gateway"].url, timeout=60,
                                     headers={"authorization": "Bearer sk-digits"},
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    answers = asyncio.run(fire())
    assert {r.status_code for r in answers} <= {200, 429}, [r.text for r in answers if r.status_code != 200][:2]
    served = [r for r in answers if r.status_code == 200]
    billed = calls(mock)["count"] * per_call
    assert served and calls(mock)["count"] == len(served)
    assert billed <= KEYS["sk-digits"][1] + hold + 1e-12, f"{len(served)} served, billed ${billed:.6f}"


def test_a_declared_maximum_output_is_held_and_nothing_is_added(stack, mock):
    """A backend with max_output_tokens: 3000 declared: a key's request without max_tokens holds 3,000
    tokens a call (a budget of 2.5 holds admits 2 of 10 at once) and is sent as it came."""
    control(mock, answers=[" ".join(["word"] * 2500)], delay_ms=1000)
    responses = asyncio.run(burst([stack["gateway"].url], "sk-burst-max", 10, model="m-max"))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 2, [r.text for r in responses]
    assert spent_by(responses) <= KEYS["sk-burst-max"][1]
    assert all("max_tokens" not in body and "max_completion_tokens" not in body for body in sent(mock))
    assert all("max_tokens_sent" not in r.json()["ponder"] for r in ok)


def test_a_request_over_a_keys_whole_budget_is_told_the_max_tokens_that_fits(stack, mock):
    """$0.001 a day. Without max_tokens a request to the declared backend holds its 3,000-token maximum
    ($0.006): 400 over_budget_cap, saying so and how many tokens fit; that many is served, one more is
    not. Against a backend of unknown maximum the message says the default it holds and sends."""
    url = stack["gateway"].url
    too_big = post(url, "sk-tiny", model="m-max")
    assert too_big.status_code == 400
    error = too_big.json()["error"]
    assert error["code"] == "over_budget_cap"
    assert "m-max's maximum output (3,000 tokens)" in error["message"] and "send max_tokens" in error["message"]
    fits = int(re.search(r"at most ([\d,]+) fits", error["message"]).group(1).replace(",", ""))
    assert fits == int((0.001 * 1e6 - HELD_PROMPT) / 2.0)  # $1 / $2 per million tokens
    over = post(url, "sk-tiny", model="m-max", max_tokens=fits + 1)
    assert over.status_code == 400 and over.json()["error"]["code"] == "over_budget_cap"
    assert "send a lower max_tokens" in over.json()["error"]["message"]
    assert post(url, "sk-tiny", model="m-max", max_tokens=fits).status_code == 200
    unknown = post(url, "sk-tiny", model="m").json()["error"]
    assert unknown["code"] == "over_budget_cap"
    assert "1,024 tokens and is sent that as its max_tokens (m's maximum output is unknown)" in unknown["message"]
    assert "send max_tokens" in unknown["message"] and "send a lower" not in unknown["message"]  # it sent none


def test_a_key_with_money_left_is_told_the_max_tokens_that_fits_it(stack, mock):
    """$0.05 a day, $0.044 of it spent: a request holding m-max's 3,000 tokens ($0.006) does not fit what
    is left. The 429 says so, and that a max_tokens it names fits: sent with it, the request is served."""
    url = stack["gateway"].url
    control(mock, answers=[" ".join(["word"] * 2200)])
    for _ in range(10):  # $0.0044 each (2,200 tokens; 4 prompt tokens at the mock)
        post(url, "sk-left", model="m-max")
    control(mock, answers=[LONG])
    refused = post(url, "sk-left", model="m-max")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exhausted" and "m-max's maximum output (3,000 tokens)" in error["message"]
    fits = int(re.search(r"at most ([\d,]+) fits in what is left", error["message"]).group(1).replace(",", ""))
    assert 0 < fits < DECLARED_MAX
    served = post(url, "sk-left", model="m-max", max_tokens=fits)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == fits


def test_an_unknown_maximum_is_sent_as_max_tokens_only_for_keys_with_a_budget(stack, mock):
    """Where the backend's maximum output is unknown, a capped key's calls are sent the default length
    they hold (max_completion_tokens for a reasoning backend; every sample of a vote; a relayed stream;
    nothing for a backend whose output is free, nor where the client set its own). A key without a
    budget gets its body upstream byte for byte as before."""
    url = stack["gateway"].url
    control(mock, answers=["a short answer"])
    cases = [  # (model, headers, extra body, what each upstream call gets)
        ("m", {}, {}, {"max_tokens": 1024}),
        ("auto", {}, {}, {"max_tokens": 1024}),
        ("m", {}, {"stream": True}, {"max_tokens": 1024}),
        ("m", {"x-ponder-strategy": "self_consistency"}, {}, {"max_tokens": 1024}),
        ("m-think", {}, {}, {"max_completion_tokens": 8192}),
        ("m-free", {}, {}, {}),
        ("m", {}, {"max_completion_tokens": 50}, {}),
    ]
    for model, headers, extra, added in cases:
        reset(mock)
        control(mock, answers=["a short answer"])
        answer = post(url, "sk-capped", headers, model=model, **extra)
        assert answer.status_code == 200, answer.text
        bodies = sent(mock)
        assert bodies, model
        for body in bodies:
            limits = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}
            assert limits == (added or {k: v for k, v in extra.items() if k.startswith("max_")}), (model, extra, body)
        if not extra.get("stream"):
            assert answer.json()["ponder"].get("max_tokens_sent", {}) == \
                ({model if model != "auto" else "m": next(iter(added.values()))} if added else {})

    # a key without a budget: exactly the client's bytes (mock_backend's upstream model names are the
    # backends' own: `openai/m` is sent as `m`)
    for model in ("m", "m-think"):
        reset(mock)
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0.3})
        answer = httpx.post(url + "/v1/chat/completions", content=body, timeout=30,
                            headers={"authorization": "Bearer sk-free", "content-type": "application/json"})
        assert answer.status_code == 200 and "max_tokens_sent" not in answer.json()["ponder"]
        assert calls(mock)["raw_bodies"] == [body.decode()], model
    reset(mock)
    streamed = post(url, "sk-free", model="m", stream=True)
    assert streamed.status_code == 200
    assert sent(mock) == [{"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                          "stream_options": {"include_usage": True}}]


def test_an_arm_whose_maximum_output_would_not_fit_gives_way_to_one_that_does(tmp_path):
    """A strong arm on a backend that may write 100,000 tokens ($0.2 held without max_tokens) is chosen
    by its expected cost; a key with $0.05 a day could never hold it. Its fallback, whose calls are held
    (and sent) 1,024 tokens, answers instead of a 429 until midnight; a key without a budget still gets
    the strong arm."""
    path = write_policy(tmp_path, {
        "name": "giving-way",
        "arms": {"strong": {"backend": "big", "prior": 0.9}, "plain": {"backend": "m", "prior": 0.5}},
        "routes": [{"name": "all", "candidates": ["strong", "plain"]}],
        "objective": {"cost_weight": 0.0, "latency_weight": 0.0},
        "exploration": {"share": 0.0},
    }, "giving-way.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("big", mock, max_output_tokens=100_000), mock_backend("m", mock)],
            "policy": path, "api_keys": key_lines({"sk-free": ("free", None), "sk-left": ("left", 0.05)}),
    }, name="giving-way")) as gateway:
        capped = post(gateway.url, "sk-left")
        assert capped.status_code == 200, capped.text
        assert capped.headers["x-ponder-arm"].startswith("m/") and capped.json()["ponder"]["max_tokens_sent"] == {"m": 1024}
        assert sent(mock)[-1]["max_tokens"] == 1024
        free = post(gateway.url, "sk-free")
        assert free.status_code == 200 and free.headers["x-ponder-arm"].startswith("big/")
        assert "max_tokens" not in sent(mock)[-1]


def test_an_explored_arm_that_gives_way_is_not_recorded_as_explored(tmp_path):
    """Every request explores (share 1.0): the draw picks `strong`, the challenger, over the greedy
    `plain`. A key that cannot hold strong's worst case is answered by plain, the greedy arm: that
    request explored nothing, and was recorded (and counted in the dashboard's exploration share) as
    explored."""
    path = write_policy(tmp_path, {
        "name": "explored-giving-way",
        "arms": {"strong": {"backend": "big", "prior": 0.59}, "plain": {"backend": "m", "prior": 0.6}},
        "routes": [{"name": "all", "candidates": ["strong", "plain"]}],
        "objective": {"cost_weight": 0.0, "latency_weight": 0.0},
        "exploration": {"share": 1.0},
    }, "explored-giving-way.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("big", mock, max_output_tokens=100_000), mock_backend("m", mock)],
            "policy": path, "api_keys": key_lines({"sk-free": ("free", None), "sk-left": ("left", 0.05)}),
    }, name="explored-giving-way")) as gateway:
        free = post(gateway.url, "sk-free")
        assert free.headers["x-ponder-arm"].startswith("big/") and free.json()["ponder"]["explore"] is True
        capped = post(gateway.url, "sk-left")
        assert capped.status_code == 200, capped.text
        assert capped.headers["x-ponder-arm"].startswith("m/") and capped.json()["ponder"]["explore"] is False


def test_a_limit_sent_leaves_the_prompt_its_room_in_the_context_window(stack, mock):
    """vLLM refuses a request whose prompt plus max_tokens is over its window (--max-model-len); the
    request without the gateway's limit was served. A limit sent for a capped key is cut to the room
    the prompt leaves (its estimate with a quarter's slack and the reasoning instruction's)."""
    from gateway.cost_bounds import MIN_OUTPUT_LIMIT, PROMPT_ADDITIONS, PROMPT_UNDERCOUNT
    from router.estimates import estimate_prompt_tokens

    messages = [{"role": "user", "content": "word " * 2000}]
    answer = httpx.post(stack["gateway"].url + "/v1/chat/completions", timeout=30,
                        json={"model": "m-window", "messages": messages},
                        headers={"authorization": "Bearer sk-capped"})
    assert answer.status_code == 200, answer.text
    room = 4000 - int(estimate_prompt_tokens(messages) * PROMPT_UNDERCOUNT) - PROMPT_ADDITIONS
    assert MIN_OUTPUT_LIMIT < room < 1024
    assert [body["max_tokens"] for body in sent(mock)] == [room]
    assert answer.json()["ponder"]["max_tokens_sent"] == {"m-window": room}


def test_a_named_backends_cost_cap_prices_the_prompt_as_routed_requests_do(stack, mock):
    """The request's own cost cap (x-ponder-max-cost-usd, budgets.per_request_usd) prices the prompt at
    its estimate for every key, as the decision does for routed requests: the bytes bound is what a
    key's budget holds, and checked against the cap it refused a budgeted key's 10,000-character
    prompt that a key without a budget (or `auto`) was served."""
    prompt = "word " * 2000  # estimate ~2,504 tokens ($0.0025 at $1/M), bytes 10,000 ($0.010)
    for key in ("sk-capped", "sk-free"):
        answer = httpx.post(stack["gateway"].url + "/v1/chat/completions", timeout=30,
                            json={"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
                            headers={"authorization": f"Bearer {key}", "x-ponder-max-cost-usd": "0.005"})
        assert answer.status_code == 200, (key, answer.text)
    refused = httpx.post(stack["gateway"].url + "/v1/chat/completions", timeout=30,
                         json={"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
                         headers={"authorization": "Bearer sk-capped", "x-ponder-max-cost-usd": "0.001"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "over_cost_limit"


def test_the_hold_counts_the_prompts_of_the_arms_a_fallback_follows():
    """A fallback answers after the arms before it failed, and an arm cut off mid-call (a timeout) is
    billed its prompt: the hold is the most any arm can cost plus the prompts of the arms before it,
    not only the costliest arm's worst case. An arm whose bound so counted is over what the key has
    left is dropped."""
    from gateway.backends import Backend
    from gateway.cost_bounds import arms_within, plan_worst_case_usd, worst_case_usd
    from gateway.schemas import parse_chat_request
    from policies.backends import BackendSpec
    from router.types import Arm, Decision

    spec = {"input_per_mtok": 1000.0, "output_per_mtok": 0.0}  # the prompt is all a call costs
    backends = {name: Backend(BackendSpec(name=name, model=f"openai/{name}", prices=spec), None)  # type: ignore[arg-type]
                for name in ("a", "b", "c")}
    req = parse_chat_request({"model": "auto", "messages": [{"role": "user", "content": "7" * 4000}],
                              "max_tokens": 1}, max_n=16)
    a, b, c = Arm("a", "single", None, 1), Arm("b", "self_consistency", None, 3), Arm("c", "single", None, 1)
    one, vote = worst_case_usd(backends, a, req, capped=True), worst_case_usd(backends, b, req, capped=True)
    assert vote > 2.5 * one > 0
    decision = Decision(arm=a, fallbacks=(b, c))
    # c answers after a and b were cut: a's prompt, b's three samples' prompts, and c
    assert plan_worst_case_usd(backends, decision, req, None, capped=True) == pytest.approx(one + vote + one)
    assert plan_worst_case_usd(backends, Decision(arm=c), req, None, capped=True) == pytest.approx(one)

    kept = arms_within(backends, decision, req, None, budget_left_usd=one + vote + 0.5 * one)
    assert (kept.arm, kept.fallbacks) == (a, (b,))  # c would cost more than is left once a and b were cut
    assert any("fallbacks dropped: c/" in reason for reason in kept.reasons)
    assert arms_within(backends, decision, req, None, budget_left_usd=2 * one + vote) is decision


def test_a_routed_request_whose_cheapest_arm_is_over_the_whole_cap_is_a_400(stack, mock):
    """A key with money left whose cap is below what the cheapest arm of `auto` costs: waiting cannot help,
    so a 400 over_budget_cap, as a named backend's request over the whole cap gets; it was a 429 saying to
    come back when the period starts anew, which would only be refused again."""
    for model in ("m", "auto"):
        refused = post(stack["gateway"].url, "sk-sliver", model=model, max_tokens=2000)
        assert refused.status_code == 400, (model, refused.text)
        assert refused.json()["error"]["code"] == "over_budget_cap" and "retry-after" not in refused.headers
    assert "USD. Even the cheapest arm may cost" in refused.json()["error"]["message"]  # two sentences (auto's)
