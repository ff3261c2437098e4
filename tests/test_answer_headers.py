"""What an answer's headers and error fields tell a client, on a real gateway through HTTP: the exact
`x-ponder-cost-usd`, the header an `invalid_header` refusal names, and retry advice that does not
contradict itself (docs/api.md)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.servers import control, mock_backend, running, start_gateway, start_mock, two_mock_policy

UPSTREAM_503_WAIT = {"status": 503, "headers": {"Retry-After": "1"},
                     "body": '{"error": {"message": "overloaded, come back in a second"}}'}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headers")
    with running(start_mock(tmp)) as mock:
        with running(start_gateway(tmp, {
            # mock-a: one prompt word costs $1e-9 (8 fixed decimals wrote it 0.00000000)
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 0.001, "output_per_mtok": 0}),
                         mock_backend("mock-b", mock, max_retries=0),
                         mock_backend("mock-c", mock, max_retries=0)],
            "policy": two_mock_policy(tmp, "headers"),
        }, name="headers")) as gateway:
            yield gateway, mock


def chat(gw, model: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers or {}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_the_cost_header_is_the_bodys_cost_exactly_as_a_plain_decimal(gw, mock):
    control(mock, answers=["ok"])
    answer = chat(gw, "mock-a")
    assert answer.status_code == 200, answer.text
    header, body = answer.headers["x-ponder-cost-usd"], answer.json()["ponder"]["cost_usd"]
    assert body == pytest.approx(1e-9)
    assert header == "0.000000001" and float(header) == body  # no exponent, nothing rounded away


@pytest.mark.parametrize("header, value", [("x-ponder-max-cost-usd", "abc"), ("x-ponder-max-latency-ms", "-1"),
                                           ("x-ponder-strategy", "nope"), ("x-ponder-task", "Not A Label!")])
def test_a_malformed_header_is_named_in_param(gw, mock, header, value):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={header: value})
    assert refused.value.code == "invalid_header" and refused.value.param == header
    assert header in refused.value.message
    # embeddings read the same headers (the cost caps), and name them alike
    embedding = httpx.post(gw.url + "/v1/embeddings", headers={header: value}, timeout=30,
                           json={"model": "mock-a", "input": "hi"})
    assert embedding.status_code == 400 and embedding.json()["error"]["param"] == header


def test_a_502_that_cooled_its_backend_down_says_only_do_not_retry(gw, mock):
    """An upstream 503 with Retry-After is the client's 502 (after the gateway's own tries) and cools
    the backend down: the 502 said `retry-after: 1` beside `x-should-retry: false`. It says only the
    latter now; the next request, while the backend cools, is the 503 that says when to come back."""
    control(mock, script=["error"], error=UPSTREAM_503_WAIT)
    failed = chat(gw, "mock-b")
    assert failed.status_code == 502, failed.text
    assert failed.headers["x-should-retry"] == "false" and "retry-after" not in failed.headers
    cooling = chat(gw, "mock-b")
    assert cooling.status_code == 503 and cooling.headers["retry-after"] == "1"
    assert "x-should-retry" not in cooling.headers
    # an embeddings call's 502 alike (its own backend: mock-c, not cooling yet)
    control(mock, script=["error"], error=UPSTREAM_503_WAIT)
    failed = httpx.post(gw.url + "/v1/embeddings", json={"model": "mock-c", "input": "hi"}, timeout=30)
    assert failed.status_code == 502, failed.text
    assert failed.headers["x-should-retry"] == "false" and "retry-after" not in failed.headers
