"""POST /v1/embeddings: a pass-through to the backend the client names, billed like chat.

A real `ponder serve` in front of the mock upstream (a deterministic vector per input, usage = its
words), telemetry in a real redis-server, talked to with the real openai SDK.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import struct
import time

import httpx
import openai
import pytest

from tests.servers import (BEDROCK_ENV, calls, control, mock_backend, reset, running, sent, start_bedrock_mock,
                           start_gateway, start_mock, write_policy)

EMB = "text-embedding-3-small"  # priced from litellm's map: $0.02 per million input tokens
LITELLM_PRICE = 0.02 / 1e6
EMB_LARGE = "text-embedding-3-large"
TITAN = "titan"  # Bedrock's Titan embeddings, through litellm (tests/mock_bedrock.py)
PRICED = "emb-priced"  # `prices:` in the config: $5 per million
KEYS = {"sk-admin": ("admin", None, True), "sk-budget": ("budget", 1.0, False), "sk-tiny": ("tiny", 1e-9, False),
        "sk-mid": ("mid", 0.001, False)}


def vector(item: str, dimensions: int = 8) -> list[float]:
    """The mock's vector of an input (tests/mock_upstream.py embedding_vector)."""
    digest = hashlib.sha256(item.encode()).digest()
    return [digest[i % len(digest)] / 256 for i in range(dimensions)]


def policy(tmp, name: str, budgets: dict | None = None, **overrides) -> str:
    return write_policy(tmp, {
        "name": name,
        "arms": {"one": {"backend": "chat", "strategy": "single"}},
        "routes": [{"name": "all", "candidates": ["one"]}],
        "exploration": {"share": 0.0},
        "overrides": {"policy_header": True, **overrides},
        **({"budgets": budgets} if budgets else {}),
    }, f"{name}.yaml")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("embeddings")
    with running(start_mock(tmp)) as mock, running(start_bedrock_mock(tmp)) as bedrock:
        backends = [
            mock_backend("chat", mock),
            {**mock_backend(EMB, mock), "prices": None},  # litellm's price for openai/text-embedding-3-small
            mock_backend(PRICED, mock, prices={"input_per_mtok": 5.0, "output_per_mtok": 0.0}),
            mock_backend("emb-429", mock),  # its own: a 429 cools it down
            mock_backend("emb-litellm", mock, fast_path=False),
            mock_backend(EMB_LARGE, mock, fast_path=False),  # through litellm, which sends it `dimensions`
            {"name": TITAN, "model": "bedrock/amazon.titan-embed-text-v2:0", "api_base": bedrock.url, "max_retries": 0,
             "prices": {"input_per_mtok": 0.02, "output_per_mtok": 0.0}},
            mock_backend("emb-slow", mock, prices={"input_per_mtok": 5.0, "output_per_mtok": 0.0}, max_retries=0,
                         timeout_s=0.5),
            mock_backend("emb-litellm-failing", mock, fast_path=False),  # its own: its failures cool it down
        ]
        config = {"backends": backends, "policy": policy(tmp, "open"),
                  "extra_policies": {"closed": policy(tmp, "closed", direct_backend=False),
                                     "capped": policy(tmp, "capped", budgets={"per_request_usd": 1e-4})},
                  "telemetry": {"redis_url": redis_server.url, "refresh_s": 0.2},
                  "api_keys": [{"id": ident, "sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": admin,
                                **({"budget_usd_per_day": cap} if cap is not None else {})}
                               for key, (ident, cap, admin) in KEYS.items()]}
        with running(start_gateway(tmp, config, name="embeddings", env=BEDROCK_ENV)) as gw:
            yield gw, mock, bedrock


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-admin", max_retries=0)


def admin(gw, path: str) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"Authorization": "Bearer sk-admin"})


def eventually(check, timeout: float = 5.0):
    """The event is recorded and the hold settled after the answer is written: poll for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the openai SDK through the gateway --------------------------------------------------------------


def test_a_string_is_embedded_through_the_sdk(client, mock):
    result = client.embeddings.create(model=EMB, input="hello embedding world")
    assert [d.embedding for d in result.data] == [vector("hello embedding world")]
    assert result.usage.prompt_tokens == 3
    body = sent(mock)[-1]
    # the SDK asks for base64 (and decodes it), the upstream is sent the backend's own model name
    assert body == {"model": EMB, "input": "hello embedding world", "encoding_format": "base64"}


def test_a_list_of_strings_as_floats(client, mock):
    result = client.embeddings.create(model=EMB, input=["one two", "three"], encoding_format="float")
    assert [d.index for d in result.data] == [0, 1]
    assert [d.embedding for d in result.data] == [vector("one two"), vector("three")]
    assert result.usage.prompt_tokens == 3
    assert sent(mock)[-1]["encoding_format"] == "float"


def test_base64_is_passed_through_as_the_upstream_wrote_it(gw, mock):
    response = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": "Bearer sk-admin"},
                          json={"model": EMB, "input": "raw bytes", "encoding_format": "base64", "user": "u-1"})
    assert response.status_code == 200, response.text
    encoded = response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == vector("raw bytes")
    assert sent(mock)[-1]["user"] == "u-1"


def test_dimensions_and_token_ids(client, mock):
    result = client.embeddings.create(model=EMB, input=[[1, 2, 3], [4, 5]], dimensions=4, encoding_format="float")
    assert [len(d.embedding) for d in result.data] == [4, 4]
    assert result.usage.prompt_tokens == 5  # one a token id
    assert sent(mock)[-1]["dimensions"] == 4


def test_a_backend_called_through_litellm(client, mock):
    result = client.embeddings.create(model="emb-litellm", input=["via litellm"])  # the SDK asks for base64
    assert [d.embedding for d in result.data] == [pytest.approx(vector("via litellm"))]
    assert result.usage.prompt_tokens == 2
    assert calls(mock)["count"] == 1


def test_dimensions_litellm_would_drop_are_refused_not_ignored(client, mock):
    """litellm drops `dimensions` for a model its lists give none (`drop_params`: here an `openai/` model
    not named text-embedding-3; Mistral's, Fireworks'), and the vectors came back at full length: 8
    floats where the app asked for 4, into an index built for 4. Refused before any call instead."""
    reset(mock)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="emb-litellm", input=["via litellm"], dimensions=4)
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "dimensions")
    assert calls(mock)["count"] == 0
    # a model litellm sends them to gets them
    result = client.embeddings.create(model=EMB_LARGE, input=["via litellm"], dimensions=4, encoding_format="float")
    assert [d.embedding for d in result.data] == [pytest.approx(vector("via litellm", 4))]
    assert sent(mock)[-1]["dimensions"] == 4


def titan_vector(text: str, dimensions: int = 8) -> list[float]:
    """The Bedrock mock's Titan vector of a text (tests/mock_bedrock.py), centred on 0."""
    return [v - 0.5 for v in vector(text, dimensions)]


def test_bedrock_titan_through_the_sdk_gets_its_float_vectors(stack, client):
    """The openai SDK asks for base64 by default, which litellm maps to Titan's `binary` embedding type:
    the answer's vector was one 0 or 1 a dimension ([0, 1, 1, ...]), which the SDK handed the app as its
    embedding. Floats are asked for, and encoded as base64 only where the client asked for it."""
    bedrock = stack[2]
    reset(bedrock)
    result = client.embeddings.create(model=TITAN, input="hello titan")  # the SDK's base64, decoded by it
    assert [d.embedding for d in result.data] == [pytest.approx(titan_vector("hello titan"))]
    assert sent(bedrock)[-1].get("embeddingTypes", ["float"]) == ["float"]
    raw = httpx.post(stack[0].url + "/v1/embeddings", headers={"Authorization": "Bearer sk-admin"},
                     json={"model": TITAN, "input": "hello titan", "encoding_format": "base64"}).json()
    encoded = raw["data"][0]["embedding"]
    assert isinstance(encoded, str)  # the format asked for, as OpenAI writes it: little-endian float32
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == pytest.approx(titan_vector("hello titan"))


# -- money ------------------------------------------------------------------------------------------


def test_a_budgeted_key_is_billed_usage_times_the_price(gw, mock):
    budget = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-budget", max_retries=0)
    before = admin(gw, "/v1/ponder/spend").json()
    spent_before = next(k for k in before["keys"] if k["key_id"] == "budget")["spent"].get("day", 0.0)
    raw = budget.embeddings.with_raw_response.create(model=EMB, input=["a b c d", "e f"])
    assert raw.parse().usage.prompt_tokens == 6
    cost = 6 * LITELLM_PRICE
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(cost)

    def settled():
        key = next(k for k in admin(gw, "/v1/ponder/spend").json()["keys"] if k["key_id"] == "budget")
        assert key["spent"]["day"] - spent_before == pytest.approx(cost, rel=1e-6)
        assert key["cost_usd_30d"] == pytest.approx(cost)  # the spend rollups count it too
    eventually(settled)
    metrics = admin(gw, "/metrics").text
    assert f'ponder_cost_usd_total{{arm="{EMB}",task="embedding"}}' in metrics


def test_configured_prices_win_over_litellms(client):
    raw = client.embeddings.with_raw_response.create(model=PRICED, input="five words are billed here")
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(5 * 5.0 / 1e6)


def test_an_answer_without_usage_is_billed_by_the_estimate(client, mock):
    control(mock, script=["no_usage"])
    raw = client.embeddings.with_raw_response.create(model=PRICED, input="x" * 400)
    assert raw.parse().usage.prompt_tokens == 100  # 4 characters a token
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(100 * 5.0 / 1e6)


def test_a_call_cut_by_its_timeout_is_billed_its_input_and_the_error_says_so(gw, client, mock):
    """The upstream had read the input when the timeout cut it: billed by the estimate, as a cut chat
    call is, and the 504 carries x-ponder-cost-usd as an answer does (it had none: the client could not
    reconcile its bill with the key's spend)."""
    control(mock, script=["hang"], hang_s=3)
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="emb-slow", input="x" * 400)
    assert info.value.status_code == 504
    cost = 100 * 5.0 / 1e6  # 4 characters a token
    assert float(info.value.response.headers["x-ponder-cost-usd"]) == pytest.approx(cost)
    request_id = info.value.response.headers["x-ponder-request-id"]

    def recorded():
        row = next(r for r in admin(gw, "/v1/ponder/requests?limit=50").json()["requests"]
                   if r["request_id"] == request_id)
        assert (row["status"], row["cost_usd"]) == (504, pytest.approx(cost))
    eventually(recorded)


def test_a_budget_too_small_for_the_input_refuses_before_any_call(gw, mock):
    tiny = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-tiny", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        tiny.embeddings.create(model=PRICED, input="too dear")
    assert info.value.code == "over_budget_cap"
    assert calls(mock)["count"] == 0


def test_a_budget_holds_the_inputs_worst_case_not_its_estimate(gw, mock):
    """$0.001 a day at $5 per million: 400 characters are 100 tokens at the estimate ($0.0005) but may be
    400 (a token per UTF-8 byte, $0.002), so the key cannot hold them; 100 characters it can."""
    mid = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-mid", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        mid.embeddings.create(model=PRICED, input="x" * 400)
    assert info.value.code == "over_budget_cap"
    assert calls(mock)["count"] == 0
    assert len(mid.embeddings.create(model=PRICED, input="x" * 100).data) == 1


def test_the_requests_cost_caps_hold_as_for_a_chat_request_naming_a_backend(client, mock):
    # $5 per million input tokens: 400 characters (100 tokens at the estimate) may cost $0.0005
    for headers in ({"x-ponder-policy": "capped"}, {"x-ponder-max-cost-usd": "0.0001"}):
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=PRICED, input="x" * 400, extra_headers=headers)
        assert info.value.code == "over_cost_limit" and "send fewer or shorter inputs" in info.value.message
    assert calls(mock)["count"] == 0
    within = client.embeddings.create(model=PRICED, input="x" * 40, extra_headers={"x-ponder-policy": "capped"})
    assert len(within.data) == 1


def test_an_embedding_is_no_arm_outcome(gw, client, mock):
    raw = client.embeddings.with_raw_response.create(model=PRICED, input="not a chat answer")
    request_id = raw.headers["x-ponder-request-id"]

    def recorded():
        rows = admin(gw, "/v1/ponder/requests?limit=50").json()["requests"]
        row = next(r for r in rows if r["request_id"] == request_id)
        assert (row["task"], row["policy"], row["arm"]) == ("embedding", "direct", PRICED)
    eventually(recorded)
    summary = admin(gw, "/v1/ponder/summary?policy=direct").json()
    assert all(task["task"] != "embedding" for task in summary["tasks"])  # no routing view charts it
    feedback = httpx.post(gw.url + "/v1/feedback", headers={"Authorization": "Bearer sk-admin"},
                          json={"request_id": request_id, "score": 1})
    assert feedback.status_code == 404  # nothing to score: no arm answered
    assert 'ponder_decisions_total{arm="emb-priced"' not in admin(gw, "/metrics").text


def test_embeddings_do_not_crowd_routed_requests_out_of_the_explore_share(gw, client, mock):
    """An app that embeds its documents sends many embeddings a chat. The summary's explore share counts
    the policy's last 500 requests; it looked at the last 500 events of any kind, so after 500
    embeddings it counted no routed request at all (the page's KPI read '-')."""
    routed = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "route me"}])
    assert routed.headers["x-ponder-policy"] == "open"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.embeddings.create(model=PRICED, input=f"chunk {i}"), range(500)))

    def crowded():
        rows = admin(gw, "/v1/ponder/requests?limit=500").json()["requests"]
        assert all(r["task"] == "embedding" for r in rows)  # the latest 500 events: embeddings only
    eventually(crowded)
    opened = [r for r in admin(gw, "/v1/ponder/requests?limit=1000").json()["requests"] if r["policy"] == "open"]
    exploration = admin(gw, "/v1/ponder/summary?policy=open").json()["exploration"]
    assert exploration["window"] == len(opened) >= 1
    assert exploration["explored"] + exploration["exploited"] == len(opened)


# -- refusals and failures --------------------------------------------------------------------------


def test_an_unknown_model_is_404(client, mock):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="no-such-model", input="x")
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


def test_a_routed_alias_is_400(client, mock):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="auto", input="x")
    assert "alias" in info.value.message and "embeddings are not routed" in info.value.message
    assert calls(mock)["count"] == 0


def test_a_policy_without_direct_backends_refuses_as_chat_does(client, mock):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model=EMB, input="x", extra_headers={"x-ponder-policy": "closed"})
    assert info.value.code == "model_not_found" and "direct_backend: false" in info.value.message


def test_an_upstream_500_is_retried_on_the_same_backend(client, mock):
    control(mock, script=["500", "ok"])
    raw = client.embeddings.with_raw_response.create(model=PRICED, input="second time lucky")
    assert raw.parse().usage.prompt_tokens == 3
    assert calls(mock)["count"] == 2
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(3 * 5.0 / 1e6)  # the failed call cost nothing


def test_an_upstream_that_keeps_failing_is_a_clean_502(client, mock):
    control(mock, script=["500", "500"])
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model="chat", input="x")
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert calls(mock)["count"] == 2


def test_a_backend_through_litellm_is_called_only_as_often_as_its_max_retries_says(client, mock):
    """litellm's embedding() reads no `num_retries` (its completion() does): the openai SDK under it made
    two retries of its own per attempt, on its own backoff (honouring an upstream's Retry-After up to
    60 s), unseen by the gateway's retries, cool-downs and ledger: six calls where max_retries 1 allows two."""
    control(mock, script=["500"] * 6)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model="emb-litellm-failing", input="x")
    assert info.value.status_code == 502
    assert calls(mock)["count"] == 2
    assert time.monotonic() - started < 1  # no SDK backoff (0.5 s and more) hidden between them


def test_embeddings_a_backend_fails_to_serve_do_not_cool_its_chat_down(client, mock):
    """A chat server that does not serve embeddings answers them 500 (llama.cpp's without embedding=True):
    two clients asking it for embeddings cooled the backend down, and its chat answered 503 for everyone."""
    for _ in range(2):
        control(mock, script=["500", "500"])
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model="chat", input="x")
    reset(mock)  # a request refused while cooling down sent nothing: its part of the script is left over
    answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content

def test_a_429_passes_its_retry_after_on(client, mock):
    control(mock, script=["429"])
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="emb-429", input="x")
    assert info.value.response.headers["retry-after"] == "1"
    assert calls(mock)["count"] == 1  # the backend said when: not called again at once


def test_more_than_2048_inputs_are_refused(client, mock):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMB, input=["x"] * 2049)
    assert info.value.body["param"] == "input" and "2048" in info.value.message
    assert calls(mock)["count"] == 0
    assert len(client.embeddings.create(model=EMB, input=["x"] * 2048).data) == 2048


@pytest.mark.parametrize("body, param", [({"model": EMB, "input": []}, "input"),
                                         ({"model": EMB, "input": ["a", ""]}, "input"),
                                         ({"model": EMB, "input": ["a", 1]}, "input"),
                                         ({"model": EMB, "input": [-1]}, "input"),  # OpenAI refuses it too
                                         ({"model": EMB, "input": "a", "encoding_format": "int8"}, "encoding_format"),
                                         ({"model": EMB, "input": "a", "dimensions": 0}, "dimensions")])
def test_invalid_bodies_name_the_field(gw, mock, body, param):
    response = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": "Bearer sk-admin"}, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert calls(mock)["count"] == 0


def test_a_body_of_token_ids_with_one_wrong_is_refused_at_once(gw, mock):
    """The 2 million token ids a 4 MiB body holds, the last one a string: pydantic's union built an error
    per id for each form it tried, and held the event loop (every request) for half a minute."""
    body = b'{"model":"%s","input":[' % EMB.encode() + b"0," * 2_000_000 + b'"x"]}'
    started = time.monotonic()
    response = httpx.post(gw.url + "/v1/embeddings", content=body, timeout=120,
                          headers={"Authorization": "Bearer sk-admin", "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    assert time.monotonic() - started < 5
    assert calls(mock)["count"] == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "base_url": "{other}/v1"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "base_url": "{other}/v1"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mock_response": "free"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "api_key": "sk-mine"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mock_tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "transfer", "arguments": "{}"}}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "callbacks": ["generic_api"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "_skip_mcp_handler": True}),
    # litellm's call arguments outside its list of options: what to drop, how long to wait
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "drop_params": False}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "timeout": 0.001}),
    ("/v1/embeddings", {"input": "x", "mock_response": [0.5]}),
    ("/v1/embeddings", {"input": "x", "aws_bedrock_runtime_endpoint": "{other}"}),
])
def test_a_field_litellm_takes_as_its_own_option_is_refused(stack, gw, mock, path, body):
    """Through litellm a body field named like one of its options was taken as that option: `base_url`
    sent the backend's API key to any address a client named, `mock_response` answered for free, and a
    clashing `api_key` failed as a 502 that cooled the backend down for every key. Names litellm reads
    outside its list of options were taken too: `mock_tool_calls` answered made-up tool calls without
    calling the upstream, `callbacks` registered a logging integration for every later call."""
    bedrock = stack[2]
    reset(bedrock)
    body = {"model": "emb-litellm", **{k: v.replace("{other}", bedrock.url) if isinstance(v, str) else v
                                       for k, v in body.items()}}
    for _ in range(3):  # never a mark against the backend either
        response = httpx.post(gw.url + path, json=body, headers={"Authorization": "Bearer sk-admin"})
        assert response.status_code == 400, response.text
        name = next(k for k in body if k not in ("model", "messages", "input", "stream"))
        assert response.json()["error"]["param"] == name
    assert calls(mock)["count"] == 0 and calls(bedrock)["count"] == 0
    assert httpx.post(gw.url + path, json={k: v for k, v in body.items() if k != name},
                      headers={"Authorization": "Bearer sk-admin"}).status_code == 200


def test_the_api_key_is_checked(gw, mock):
    response = httpx.post(gw.url + "/v1/embeddings", json={"model": EMB, "input": "x"})
    assert response.status_code == 401


def test_models_lists_what_it_did(client):
    assert [m.id for m in client.models.list()] == ["auto", "chat", EMB, PRICED, "emb-429", "emb-litellm",
                                                     EMB_LARGE, TITAN, "emb-slow", "emb-litellm-failing"]
