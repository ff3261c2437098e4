"""The gateway core over real HTTP: the openai SDK against `ponder serve`, in front of a mock upstream."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import orjson
import pytest

from tests.servers import (TODAYS_CHAT_MESSAGES, calls, control, mock_backend, reset, running, sent, start_gateway,
                           start_mock, two_mock_policy, write_policy)

KEY = "sk-test-key-123"
ADMIN_KEY = "sk-admin-456"
SMALL_BUDGET_KEY = "sk-small-789"
ZERO_BUDGET_KEY = "sk-zero-000"
MONTH_BUDGET_KEY = "sk-month-321"
METERED_KEY = "sk-metered-246"


def policy(tmp) -> str:
    return two_mock_policy(tmp, "test")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    with running(start_mock(tmp)) as mock:
        with running(start_gateway(tmp, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock),
                         mock_backend("mock-litellm", mock, fast_path=False),
                         mock_backend("mock-split", mock, supports_n=False),
                         # one backend per effort knob (docs/policies.md, "Effort levels per provider")
                         mock_backend("mock-o", mock, reasoning=True, efforts=["low", "medium", "high"]),
                         mock_backend("mock-think", mock, reasoning=True, effort_param="thinking_budget"),
                         mock_backend("mock-qwen", mock, reasoning=True, effort_param="enable_thinking"),
                         # upstream model `o4-mini`: the mock refuses what OpenAI's reasoning models refuse
                         mock_backend("o4-mini", mock, reasoning=True, efforts=["low", "medium", "high"]),
                         mock_backend("gpt-4.1-mini", mock),  # and what its chat models refuse
                         mock_backend("mock-small", mock, max_context=100)],
            "policy": policy(tmp),
            "max_body_bytes": 100_000,
        })) as gateway:
            yield gateway, mock


def test_the_sdk_logs_the_request_id_of_an_answer_and_of_an_error(client, mock):
    """The openai SDK reads `x-request-id` into `_request_id` (an answer's, a stream's) and an error's
    `request_id`, what apps log to report a failed request: it is the request's id (it was None)."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    completion = client.chat.completions.create(model="auto", messages=messages)
    assert completion._request_id == completion.id
    response = client.responses.create(model="mock-a", input="What is 2 + 2?")
    assert response._request_id == response.id
    assert client.embeddings.create(model="mock-a", input="two words")._request_id.startswith("emb-")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, stream=True, extra_headers={"x-ponder-strategy": "self_consistency"})
    assert {chunk.id for chunk in raw.parse()} == {raw.headers["x-request-id"]}
    control(mock, script=["500", "500"])  # the call and its retry
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="mock-a", messages=messages)
    assert failed.value.request_id == failed.value.response.headers["x-ponder-request-id"]
    assert failed.value.request_id.startswith("chatcmpl-")
    # a request that answers leaves mock-a healthy for the module's next tests (one failed request is
    # half a cool-down: another would skip its retry)
    assert client.chat.completions.create(model="mock-a", messages=messages).choices


def test_models_lists_backends_and_routed_aliases(client):
    ids = {m.id for m in client.models.list()}
    assert {"auto", "mock-a", "mock-b"} <= ids
    assert client.models.retrieve("auto").id == "auto" and client.models.retrieve("mock-b").id == "mock-b"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"


def test_a_request_the_backend_fails_does_not_cool_it_down_for_the_next(client, mock):
    """Both attempts of one request fail (a body this upstream cannot take fails every time): that is
    one failure of the backend, not two, so the next request is served instead of refused."""
    control(mock, script=["500", "500"])
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and len(calls(mock)["bodies"]) == 2
    assert client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "y"}]).choices


def test_failures_of_two_requests_in_a_row_cool_the_backend_down_for_one_second(client, mock):
    """docs/api.md: a backend cools down after failed calls of two different requests in a row: it is
    skipped at once (a 503 with Retry-After, no call), then tried again after 1 s."""
    # both attempts of the first request; the second's first failure cools the backend, so no retry
    control(mock, script=["500"] * 3)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
        assert failed.value.status_code == 502
    assert calls(mock)["count"] == 3
    with pytest.raises(openai.APIStatusError) as cooling:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    assert cooling.value.status_code == 503 and cooling.value.response.headers["retry-after"] == "1"
    assert calls(mock)["count"] == 3  # skipped, not called
    time.sleep(1.1)
    assert client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "y"}]).choices
    assert calls(mock)["count"] == 4


def test_a_prompt_clearly_over_a_backends_context_window_is_refused_before_any_call(client, mock):
    """OpenAI's 400 `context_length_exceeded` (clients trim their history on it), streamed or not,
    and the upstream is not asked: its window is declared (max_context: 100)."""
    long = [{"role": "user", "content": "word " * 200}]  # ~254 tokens by the estimate
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock-small", messages=long, stream=stream)
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
        assert "maximum context length is 100 tokens" in refused.value.message
    assert calls(mock)["count"] == 0
    # one that may fit is sent: the upstream knows its exact count
    assert client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "word " * 80}]).choices


def test_direct_backend_answer_usage_and_headers(client, mock):
    control(mock, answers=["four words long here"])
    raw = client.chat.completions.with_raw_response.create(
        model="mock-b", messages=[{"role": "user", "content": "one two three"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "four words long here"
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 4
    assert raw.headers["x-ponder-arm"] == "mock-b/-/single/1"
    assert raw.headers["x-ponder-task"] in {"math", "code", "reasoning", "knowledge", "writing", "chat"}
    assert 0 <= float(raw.headers["x-ponder-difficulty"]) <= 1
    # prices: $1 per M input tokens, $2 per M output tokens
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(3e-6 + 8e-6)
    assert raw.headers["x-ponder-request-id"] == completion.id


def test_auto_routes_through_the_policy(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi there, how are you?"}])
    completion = raw.parse()
    assert raw.headers["x-ponder-policy"] == "test"
    assert raw.headers["x-ponder-arm"].split("/")[0] in {"mock-a", "mock-b"}
    extension = completion.model_extra["ponder"]
    assert extension["arm"] == raw.headers["x-ponder-arm"] and extension["calls"] == 1


def test_parameters_pass_through_faithfully(client, mock):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    client.chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "x"}], temperature=0.3, max_tokens=17, stop=["END"],
        seed=5, user="u-1", tools=tools, tool_choice="auto", response_format={"type": "json_object"},
        reasoning_effort="low", max_completion_tokens=20)
    body = calls(mock)["bodies"][-1]
    assert body["model"] == "mock-a"
    for key, value in {"temperature": 0.3, "max_tokens": 17, "stop": ["END"], "seed": 5, "user": "u-1",
                       "tools": tools, "tool_choice": "auto", "response_format": {"type": "json_object"},
                       "max_completion_tokens": 20}.items():
        assert body[key] == value, key


def test_parameters_sent_as_null_are_the_defaults(client, mock):
    """The openai SDK sends an argument given as None as null, which the API reads as its default:
    `n=None` or `stream=None` is answered (it was a 400), and no null is forwarded (llama.cpp's
    server answers `"temperature": null` with a 500)."""
    completion = client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}],
                                                n=None, stream=None, temperature=None, max_tokens=None, seed=None)
    assert len(completion.choices) == 1
    sent = calls(mock)["bodies"][-1]
    assert None not in sent.values() and not {"n", "stream", "temperature", "max_tokens", "seed"} & set(sent)


@pytest.mark.parametrize("model, asked, arm_effort, sent", [
    ("mock-o", "minimal", "low", {"reasoning_effort": "low"}),  # the closest level it declares
    ("mock-think", "high", "high", {"thinking": {"type": "enabled", "budget_tokens": 16384},
                                    "chat_template_kwargs": {"enable_thinking": True}}),
    ("mock-qwen", "none", "none", {"chat_template_kwargs": {"enable_thinking": False}}),
    # OpenAI's level above high: the most thinking, not none (it turned thinking off), and on a
    # backend declaring levels its highest (it was "low")
    ("mock-think", "xhigh", "xhigh", {"thinking": {"type": "enabled", "budget_tokens": 32768},
                                      "chat_template_kwargs": {"enable_thinking": True}}),
    ("mock-o", "xhigh", "high", {"reasoning_effort": "high"}),
    ("mock-a", "low", "-", {}),  # not a reasoning model: OpenAI would refuse the parameter
])
def test_a_clients_reasoning_effort_is_translated_for_the_backend(client, mock, model, asked, arm_effort, sent):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "x"}], reasoning_effort=asked)
    body = calls(mock)["bodies"][-1]
    assert {k: body[k] for k in ("reasoning_effort", "thinking", "chat_template_kwargs") if k in body} == sent
    assert raw.headers["x-ponder-arm"] == f"{model}/{arm_effort}/single/1"  # what was sent, not what was asked


@pytest.mark.parametrize("stream", [False, True])
def test_verbosity_reaches_only_the_models_that_take_it(client, mock, stream):
    """`verbosity` is gpt-5's knob, as `reasoning_effort` is: an app written for gpt-5 that sends it
    got a 400 from OpenAI's chat models (any value but `medium`), also where the policy routed it there."""
    for model, kept in (("gpt-4.1-mini", False), ("o4-mini", True)):
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                                  verbosity="low", stream=stream)
        assert (list(response)[0].choices if stream else response.choices)
        assert ("verbosity" in calls(mock)["bodies"][-1]) is kept


def test_a_backend_called_through_litellm(client, mock):
    """Providers without an OpenAI-compatible endpoint go through litellm: the same answer, usage,
    price, streaming and error mapping as the fast path (here litellm's OpenAI client against the mock)."""
    control(mock, answers=["four words long here"])
    raw = client.chat.completions.with_raw_response.create(
        model="mock-litellm", messages=[{"role": "user", "content": "one two three"}], max_tokens=9)
    completion = raw.parse()
    assert completion.choices[0].message.content == "four words long here"
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 4
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(3e-6 + 8e-6)
    assert calls(mock)["bodies"][-1]["max_tokens"] == 9

    chunks = list(client.chat.completions.create(model="mock-litellm", messages=[{"role": "user", "content": "a b"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "four words long here"
    assert chunks[-1].usage.completion_tokens == 4

    control(mock, script=["500", "500"])
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="mock-litellm", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and "mock-litellm" in failed.value.message
    control(mock, script=["429"])  # the upstream's Retry-After reaches the client
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="mock-litellm", messages=[{"role": "user", "content": "x"}])
    assert int(limited.value.response.headers["retry-after"]) >= 1
    time.sleep(int(limited.value.response.headers["retry-after"]) + 0.1)  # its cool-down is over: served again
    assert client.chat.completions.create(model="mock-litellm", messages=[{"role": "user", "content": "x"}]).choices


@pytest.mark.parametrize("limit", ["429_ms", "429_date"])
def test_an_upstreams_wait_in_retry_after_ms_or_as_a_date_is_honoured_and_passed_on(tmp_path, limit):
    """An upstream's 429 may say its wait as `retry-after-ms` only (Azure OpenAI; the openai SDK reads it
    first) or as an HTTP-date (RFC 9110): read as seconds only, the wait was lost, so the backend was
    called again at once and the client's SDK retried on its own short backoff."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock),
                         mock_backend("mock-litellm", mock, fast_path=False)],
            "policy": policy(tmp_path)}, name="waits")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        for backend in ("mock-a", "mock-litellm"):
            reset(mock)
            control(mock, script=[limit, limit])
            with pytest.raises(openai.RateLimitError) as limited:
                client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}])
            # 7 s less the time it took to answer (and an HTTP-date's whole seconds)
            assert 5 <= int(limited.value.response.headers["retry-after"]) <= 7, backend
            assert calls(mock)["count"] == 1, backend  # not called again within the upstream's wait


def test_retry_after_counts_only_the_backends_the_request_could_use(tmp_path):
    """A 429's Retry-After is when the soonest of the request's own cooling backends is back. It was the
    soonest of all of them: another model's backend cooling for a second told this request's client to
    come back in one, seven seconds before its own backend would take a call."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": policy(tmp_path)}, name="own-waits")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, script=["429", "429_ms"])  # mock-b: back in 1 s; then mock-a: back in 7 s
        with pytest.raises(openai.RateLimitError) as other:
            client.chat.completions.create(model="mock-b", messages=[{"role": "user", "content": "x"}])
        assert other.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
        assert 5 <= int(limited.value.response.headers["retry-after"]) <= 7


def test_a_first_call_through_litellm_waits_for_no_import(tmp_path):
    """litellm takes seconds to import, all of them with the event loop blocked. Imported by the first
    call that needed it, that call's first-byte timeout ran out (a 504 that cooled the backend down)
    and every other stream in flight froze meanwhile; the gateway now imports it as it starts."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock),
                         mock_backend("mock-litellm", mock, fast_path=False, first_byte_timeout_s=1.5)],
            "policy": policy(tmp_path)}, name="litellm")) as gateway:
        pieces = upstream_sse([f"w{i} " for i in range(25)], USAGE)
        control(mock, script=["raw"], raw=[p for piece in pieces for p in (piece.hex(), 0.1)])
        gaps: list[float] = []

        def read_other_stream() -> None:
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=30, json={
                    "model": "mock-a", "messages": [{"role": "user", "content": "a"}], "stream": True}) as other:
                last = time.monotonic()
                for _ in other.iter_lines():
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

        other = threading.Thread(target=read_other_stream)
        other.start()
        time.sleep(0.5)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        chunks = list(client.chat.completions.create(model="mock-litellm", messages=[{"role": "user", "content": "a"}],
                                                     stream=True))
        other.join()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the mock upstream."
    assert len(gaps) > 25 and max(gaps) < 1.5, max(gaps)


@pytest.mark.parametrize("model", ["mock-a", "mock-litellm", "auto"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_request_error_keeps_its_code_and_param(client, mock, model, stream):
    """Apps branch on the upstream's error code (a context-length error: trim the history and send
    again), so the 400 passes it on, with its param, on every path (it came as upstream_error)."""
    control(mock, script=["too_long"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}], stream=stream)
    assert refused.value.code == "context_length_exceeded" and "maximum context length" in refused.value.message
    if model != "mock-litellm":  # litellm keeps its own exception for it, without the upstream's param
        assert refused.value.param == "messages"
    assert calls(mock)["count"] == 1  # about the request: never retried


def test_n_choices(client, mock):
    control(mock, answers=["a", "b", "c"])
    completion = client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}], n=3)
    assert [c.message.content for c in completion.choices] == ["a", "b", "c"]
    assert completion.usage.completion_tokens == 3


def test_streaming_with_usage(client, mock):
    control(mock, answers=["streamed answer in five"])
    stream = client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a b"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed answer in five"
    assert chunks[-1].usage.prompt_tokens == 2 and chunks[-1].usage.completion_tokens == 4
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_a_synthesized_stream_keeps_what_the_answer_carries(client, mock):
    """n > 1 streams the finished answer as chunks: each choice's logprobs (asked for) and the
    system_fingerprint come with it, as they do without streaming (they were dropped)."""
    control(mock, answers=["two words", "three more words"])
    asked = dict(model="mock-a", messages=[{"role": "user", "content": "x"}], n=2, logprobs=True, seed=0)
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert whole.system_fingerprint == "fp_mock" and all(c.system_fingerprint == "fp_mock" for c in chunks)
    for choice in whole.choices:
        streamed = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        tokens = [t.token for s in streamed if s.logprobs for t in s.logprobs.content]
        assert tokens == [t.token for t in choice.logprobs.content] == choice.message.content.split()


@pytest.mark.parametrize("model", ["mock-a", "auto"])
def test_a_synthesized_stream_keeps_a_search_answers_citations(client, mock, model):
    """A search model's answer (`web_search_options`) carries its citations in `annotations`, which a
    vote (the strategy header on `auto`) or n > 1 streamed as chunks without: the links were lost."""
    citation = {"type": "url_citation", "url_citation": {"start_index": 0, "end_index": 5, "url": "https://x.org",
                                                          "title": "X"}}
    control(mock, answers=[{"content": "Paris is the capital.", "annotations": [citation]}])
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "The capital of France?"}], web_search_options={},
        stream=True, extra_headers={"x-ponder-strategy": "self_consistency"}, **({"n": 2} if model == "mock-a" else {})))
    # the SDK's delta type has no `annotations` field yet: it keeps them as an extra
    streamed = [choice.delta.model_extra.get("annotations") for chunk in chunks for choice in chunk.choices
                if choice.delta.content]
    assert streamed and all(annotations == [citation] for annotations in streamed)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def weather_call(city: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_stream_as_they_are_answered(client, mock, stream):
    """Parallel tool calls reach the openai SDK's stream helper whole (ids, names, argument fragments
    joined by index), relayed (n = 1) or synthesized from the finished answer (n = 2), with a null
    content as in the JSON answer (the synthesized stream sent "" for it) and a legacy function_call
    kept (the synthesized stream dropped it)."""
    calls_asked = [weather_call("Paris, France", "call_1"), weather_call("Lyon", "call_2")]
    for n in (1, 2):
        control(mock, answers=[{"tool_calls": calls_asked}])
        asked = dict(model="mock-a", messages=[{"role": "user", "content": "Weather in Paris and Lyon?"}],
                     tools=[WEATHER], n=n)
        if stream:
            with client.chat.completions.stream(**asked) as events:
                completion = events.get_final_completion()
        else:
            completion = client.chat.completions.create(**asked)
        assert len(completion.choices) == n
        for choice in completion.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert [(c.id, c.type, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
                [(c["id"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls_asked]
    control(mock, answers=[{"function_call": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}])
    functions = dict(model="mock-a", messages=[{"role": "user", "content": "Weather in Lyon?"}],
                     functions=[WEATHER["function"]], n=2)
    if stream:
        chunks = list(client.chat.completions.create(**functions, stream=True))
        called = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
        finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        choices = client.chat.completions.create(**functions).choices
        called, finished = [c.message.function_call for c in choices], [c.finish_reason for c in choices]
    assert [(f.name, f.arguments) for f in called] == [("get_weather", '{"city": "Lyon"}')] * 2
    assert finished == ["function_call"] * 2


def test_a_stream_repeating_each_tool_calls_id_and_name_reaches_the_client_as_openai_streams_it(client, mock):
    """llama-cpp-python's server (the local model) repeats a tool call's id, type and name in every
    delta (and a legacy function_call's name): the SDK's stream helper, which joins every string, made
    a call to 'get_weatherget_weatherget_weather' with an id three times over. Only the call's first
    delta says them now; the arguments' pieces pass as they came."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    def piece(arguments: str) -> dict:  # as llama-cpp-python writes each delta of a named tool_choice
        return {"role": None, "content": None, "function_call": {"name": "get_weather", "arguments": arguments},
                "tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                "function": {"name": "get_weather", "arguments": arguments}}]}

    pieces = [chunk({"role": "assistant", "content": None}), *(chunk(piece(a)) for a in ('{"city', '": "Pa', 'ris"}')),
              chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    control(mock, script=["raw"], raw=[p.hex() for p in pieces])
    with client.chat.completions.stream(model="mock-a", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        tools=[WEATHER]) as events:
        message = events.get_final_completion().choices[0].message
    (call,) = message.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == (
        "call_0", "function", "get_weather", '{"city": "Paris"}')
    assert message.function_call.name == "get_weather"


@pytest.mark.parametrize("index", [0, None])
def test_parallel_tool_calls_streamed_under_one_index_reach_the_client_numbered_apart(client, mock, index):
    """Some servers stream parallel tool calls each whole under one index (0 for every call, or none at
    all): the SDK's stream helper joined them into one call ('call_acall_b', the two argument objects
    end to end). A delta with a new id is a new call, sent under the next index, and so are the pieces
    after it."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    def call(arguments: str, call_id: str | None = None) -> dict:
        head = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}} \
            if call_id else {"function": {"arguments": arguments}}
        return {"tool_calls": [{**head, **({"index": index} if index is not None else {})}]}

    pieces = [chunk({"role": "assistant", "content": None}), chunk(call('{"city": ', "call_a")), chunk(call('"Paris"}')),
              chunk(call('{"city": ', "call_b")), chunk(call('"Rome"}')), chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    control(mock, script=["raw"], raw=[p.hex() for p in pieces])
    with client.chat.completions.stream(model="mock-a", messages=[{"role": "user", "content": "Weather?"}],
                                        tools=[WEATHER]) as events:
        message = events.get_final_completion().choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_weather", '{"city": "Rome"}')]


def test_streaming_without_usage_sends_no_usage_chunk(client, mock):
    chunks = list(client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a"}],
                                                 stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_self_consistency_votes_and_counts_every_sample(client, mock):
    control(mock, answers=["The answer is 7", "The answer is 7", "The answer is 9", "The answer is 7",
                           "The answer is 9"])
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is 3 + 4?"}],
        extra_headers={"x-ponder-strategy": "self_consistency"})
    completion = raw.parse()
    assert "7" in completion.choices[0].message.content
    extension = completion.model_extra["ponder"]
    assert extension["samples"] == 5 and extension["strategy"] == "self_consistency"
    got = calls(mock)
    assert got["count"] == 5
    assert completion.usage.completion_tokens == 5 * 4
    assert completion.usage.prompt_tokens == sum(
        sum(len(m["content"].split()) for m in b["messages"]) for b in got["bodies"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_vote_over_reasoning_chains_hands_the_client_their_final_answers(client, mock, stream):
    """A vote on a backend that does not reason on its own samples under the reasoning instruction, as a
    cot arm does, and answers as one: the final answers as content, the chains as reasoning_content.
    The client got each whole chain and the instruction's 'Final answer:' line, so a JSON reply the
    app asked for in its prompt did not parse (a cot arm handed over the JSON alone)."""
    chains = ['The app wants JSON. 6 * 7 = 42.\nFinal answer: {"why": "6 * 7, so the answer is 42", "product": 42}',
              'Six sevens make 42.\nFinal answer: {"why": "six sevens: the answer is 42", "product": 42}',
              'Maybe 6 * 7 = 41.\nFinal answer: {"why": "the answer is 41", "product": 41}']
    control(mock, answers=chains)
    asked = dict(model="auto", n=2, extra_headers={"x-ponder-strategy": "self_consistency"},
                 messages=[{"role": "user", "content": 'What is 6 times 7? Reply with JSON only: {"product": N}'}])
    if stream:
        contents: dict[int, str] = {}
        for chunk in client.chat.completions.create(**asked, stream=True):
            for choice in chunk.choices:
                contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
        replies = [contents[i] for i in sorted(contents)]
    else:
        completion = client.chat.completions.create(**asked)
        assert completion.model_extra["ponder"]["strategy"] == "self_consistency"
        assert [c.message.model_extra["reasoning_content"] for c in completion.choices] == [chains[0], chains[2]]
        replies = [c.message.content for c in completion.choices]
        # a sample with no final answer line is the answer itself: not repeated as reasoning
        control(mock, answers=['{"product": 42}'])
        plain = client.chat.completions.create(**asked).choices[0].message
        assert plain.content == '{"product": 42}' and "reasoning_content" not in plain.model_extra
        control(mock, answers=[{"refusal": "I can't help with that."}])  # no text: its null content stays
        refused = client.chat.completions.create(**asked).choices[0].message
        assert refused.content is None and refused.refusal == "I can't help with that."
    assert "Final answer:" in calls(mock)["bodies"][0]["messages"][-1]["content"]  # the samples reasoned
    assert [orjson.loads(reply)["product"] for reply in replies] == [42, 41]


def test_an_adaptive_vote_over_reasoning_chains_hands_the_client_their_final_answers(tmp_path):
    """As a fixed-size vote does (test_a_vote_over_reasoning_chains_hands_the_client_their_final_answers),
    an adaptive one whose samples reasoned: the final answer as content, the chain as reasoning."""
    path = write_policy(tmp_path, {
        "name": "adaptive-cot", "arms": {"vote": {"backend": "mock-a", "strategy": "adaptive_consistency", "n": 4}},
        "routes": [{"name": "all", "candidates": ["vote"]}]}, "adaptive-cot.yaml")
    chain = "Six sevens make 42.\nFinal answer: 42"
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)], "policy": path}, name="adaptive-cot")) as gateway:
        control(mock, answers=[chain])
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "6 * 7?"}])
        assert completion.model_extra["ponder"]["strategy"] == "adaptive_consistency"
        assert "Final answer:" in calls(mock)["bodies"][0]["messages"][-1]["content"]  # the samples reasoned
        message = completion.choices[0].message
        assert (message.content, message.model_extra["reasoning_content"]) == ("42", chain)


def test_a_reasoning_chains_handed_over_keep_the_models_own_thinking_before_them(client, mock):
    """A backend that thinks aloud on its own (`reasoning_content`) but samples under the reasoning
    instruction: its thinking was replaced by the chain, and lost."""
    control(mock, answers=[{"reasoning_content": "Six sevens, hm.", "content": "6 * 7 = 42.\nFinal answer: 42"}])
    message = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is 6 times 7?"}],
        extra_headers={"x-ponder-strategy": "self_consistency"}).choices[0].message
    assert message.content == "42"
    assert message.model_extra["reasoning_content"] == "Six sevens, hm.\n\n6 * 7 = 42.\nFinal answer: 42"


def test_the_clients_stop_sequences_end_a_reasoning_votes_answer_not_its_chains(client, mock):
    """An eval harness's stop sequences ("\\n\\n", "Question:") were sent with each sample's reasoning
    instruction: every chain ended at its first paragraph, before any answer, and the client got
    "Tom starts with 3 apples." from a vote with no votes. The chains are written without them, and
    end where the sequences end their reply, the final answer: the next question the model went on
    to write, and its answer, are not voted on."""
    reply = "Tom starts with 3 apples.\n\nHe buys 4 more: 3 + 4 = 7.\n\nFinal answer: 7"
    control(mock, answers=[reply + "\n\nQuestion: Ann has 2 pears and gets 3. How many?\nFinal answer: 5"])
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Question: Tom has 3 apples and buys 4. How many?"}],
        stop=["\n\n", "Question:"], extra_headers={"x-ponder-strategy": "self_consistency"})
    choice = completion.choices[0]
    assert choice.message.content == "7" and choice.finish_reason == "stop"
    assert choice.message.model_extra["reasoning_content"] == reply
    assert completion.model_extra["ponder"]["votes"] == {"7": 5}
    assert all("stop" not in body for body in calls(mock)["bodies"])


def test_a_repeated_ponder_header_is_read_as_its_first_value(gw, mock):
    """x-ponder-* headers are read from the raw header list (app.ponder_headers): sent twice, the first
    counts, as Starlette's Headers.get has it."""
    headers = [("x-ponder-strategy", "self_consistency"), ("X-Ponder-Strategy", "single")]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers,
                      json={"model": "auto", "messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["ponder"]["strategy"] == "self_consistency"


def test_samples_cut_at_max_tokens_do_not_vote(client, mock):
    """Three samples cut at max_tokens after the same first step ("48/2 = 24") out-voted two finished
    answers of 72: the client got 24, a cut text (finish_reason "length"), at 3 votes to 2."""
    worked = "Natalia sold 48/2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips. The answer is 72"
    control(mock, answers=[worked, worked, worked, "So 24 and 48: 72. The answer is 72", "The answer is 72"])
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "How many clips did Natalia sell?"}], max_tokens=10,
        extra_headers={"x-ponder-strategy": "self_consistency"})
    choice, extension = completion.choices[0], completion.model_extra["ponder"]
    assert choice.message.content == "So 24 and 48: 72. The answer is 72" and choice.finish_reason == "stop"
    assert extension["votes"] == {"72": 2} and extension["samples"] == 5
    assert completion.usage.completion_tokens == 3 * 10 + 9 + 4  # the cut samples are billed all the same


def test_usage_details_are_passed_on_and_summed_over_samples(client, mock):
    """The upstream's detail counts (a prompt cache hit's cached_tokens, reasoning tokens) reach the
    client, streaming or not, and a vote's usage sums them exactly over its samples (they were dropped)."""
    control(mock, cached_tokens=2)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    single = client.chat.completions.create(model="mock-o", messages=messages, reasoning_effort="low")
    assert single.usage.prompt_tokens_details.cached_tokens == 2
    assert single.usage.completion_tokens_details.reasoning_tokens == 10
    chunks = list(client.chat.completions.create(model="mock-a", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2
    vote = client.chat.completions.create(model="mock-a", messages=messages,
                                          extra_headers={"x-ponder-strategy": "self_consistency"})
    assert vote.model_extra["ponder"]["calls"] == 5 and vote.usage.prompt_tokens_details.cached_tokens == 5 * 2
    assert vote.usage.prompt_tokens_details.audio_tokens == 0


def test_a_votes_reasoning_tokens_are_summed_over_its_samples(client, mock, gw):
    """Each of a vote's five samples on a reasoning backend thinks 10 tokens: the client's usage and the
    recorded event (the `reasoning` token counter in /metrics) count all fifty, not the first sample's."""
    from prometheus_client.parser import text_string_to_metric_families

    def reasoning_tokens() -> float:
        families = text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)
        return sum(s.value for f in families if f.name == "ponder_tokens" for s in f.samples
                   if s.name == "ponder_tokens_total" and s.labels["kind"] == "reasoning")

    before = reasoning_tokens()
    vote = client.chat.completions.create(model="mock-o", messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                          reasoning_effort="low", extra_headers={"x-ponder-strategy": "self_consistency"})
    assert vote.model_extra["ponder"]["calls"] == 5
    assert vote.usage.completion_tokens_details.reasoning_tokens == 5 * 10
    assert reasoning_tokens() - before == 5 * 10


def test_cached_prompt_tokens_are_billed_at_the_cached_price(tmp_path):
    """Input $1000/M, cached input $100/M, output $2000/M: an answer whose usage says 3 of its prompt
    tokens came from the provider's cache pays the cached price for those 3, JSON and stream alike
    (they were billed at the full input price: up to 10x too much for a cached prompt)."""
    from policies.backends import BackendSpec
    from policies.loader import resolve_prices

    prices = {"input_per_mtok": 1000, "output_per_mtok": 2000, "cached_input_per_mtok": 100}
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices=prices), mock_backend("mock-b", mock)],
            "policy": policy(tmp_path)}, name="cached")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Tell me about caching, briefly."}]
        control(mock, cached_tokens=3)
        raw = client.chat.completions.with_raw_response.create(model="mock-a", messages=messages)
        usage = raw.parse().usage
        expected = ((usage.prompt_tokens - 3) * 1000 + 3 * 100 + usage.completion_tokens * 2000) / 1e6
        assert usage.prompt_tokens > 3 and float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(expected)
        chunks = list(client.chat.completions.create(model="mock-a", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = chunks[-1].usage
        assert chunks[-1].model_extra["ponder"]["cost_usd"] == pytest.approx(
            ((streamed.prompt_tokens - 3) * 1000 + 3 * 100 + streamed.completion_tokens * 2000) / 1e6)
    # litellm's cost map knows providers' cached prices
    assert resolve_prices(BackendSpec(name="m", model="openai/gpt-4.1-mini"))[0].cached_input_per_mtok == pytest.approx(0.1)


def test_a_client_asking_more_choices_than_the_vote_draws_gets_them_all(client, mock):
    """n=7 against a 5-sample vote: 7 samples are drawn (the budget already held for 7), 7 choices come
    back; and seeds derived from a client seed near the int64 limit stay inside it."""
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is 3 + 4?"}], n=7, seed=2**63 - 2,
        extra_headers={"x-ponder-strategy": "self_consistency"})
    assert len(completion.choices) == 7 and [c.index for c in completion.choices] == list(range(7))
    seeds = [b["seed"] for b in calls(mock)["bodies"]]
    assert len(seeds) == 7 == len(set(seeds)) and all(0 <= seed < 2**63 for seed in seeds)
    assert completion.model_extra["ponder"]["samples"] == 7


def test_a_vote_of_answers_without_choices_is_a_clean_502_and_recorded(client, mock, gw):
    """Five 200s with no choices: nothing to vote on. A 502 naming it (it was a ValueError: a 500 never
    recorded, its budget hold never settled)."""
    control(mock, script=["empty"] * 5)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                       extra_headers={"x-ponder-strategy": "self_consistency"})
    assert failed.value.status_code == 502 and "every sample failed" in failed.value.message
    request_id = failed.value.response.headers["x-ponder-request-id"]
    recorded = httpx.get(f"{gw.url}/v1/ponder/requests/{request_id}")
    assert recorded.status_code == 200 and recorded.json()["request"]["status"] == 502
    # those answers count against mock-a's health, as any failure: one good answer leaves it healthy,
    # so that a failure in the next test is not the second in a row (a cool-down)
    client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "What is 3 + 4?"}])


def test_an_upstream_error_quoting_a_huge_prompt_is_recorded_short(client, mock, gw):
    """An upstream 400 whose message quotes the request's 70 KB: the client gets it whole, the event
    keeps its first 500 characters (events are sized at 1-3 KB each for the store's retention)."""
    control(mock, script=["echo_400"])
    prompt = "needle " * 10_000
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": prompt}])
    assert prompt in refused.value.message
    request_id = refused.value.response.headers["x-ponder-request-id"]
    deadline = time.monotonic() + 5
    while (recorded := httpx.get(f"{gw.url}/v1/ponder/requests/{request_id}")).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    event, calls = recorded.json()["request"], recorded.json()["execution"]["calls"]
    assert event["status"] == 400 and event["error"].startswith("mock-a: upstream 400: Invalid value: 'needle")
    assert len(event["error"]) <= 503 and calls and all(len(call["error"] or "") <= 300 for call in calls)


def test_a_retried_attempt_is_a_call_not_a_sample(client, mock):
    control(mock, script=["500"])
    raw = client.chat.completions.with_raw_response.create(model="mock-a",
                                                           messages=[{"role": "user", "content": "x"}])
    assert calls(mock)["count"] == 2
    assert raw.headers["x-ponder-samples"] == "1" and raw.parse().model_extra["ponder"]["samples"] == 1


@pytest.mark.parametrize("model", ["auto", "mock-a"])
@pytest.mark.parametrize("structured", [
    {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]},
    {"response_format": {"type": "json_object"}},
    {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
])
def test_tools_and_json_mode_are_answered_by_one_plain_call(client, mock, model, structured):
    """Voting five samples of a tool call, or reasoning text in JSON mode, would break the answer: such
    a request gets one untouched call even when the client asks for self-consistency. So does a spoken
    answer (its `content` is null: a vote counted five empty answers as unanimous, five audio answers billed)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "What is 3 + 4?"}],
        extra_headers={"x-ponder-strategy": "self_consistency"}, **structured)
    assert raw.headers["x-ponder-arm"].endswith("/single/1")
    assert raw.parse().model_extra["ponder"]["samples"] == 1 and calls(mock)["count"] == 1


@pytest.mark.parametrize("model", ["auto", "mock-a"])
@pytest.mark.parametrize("last", ["prefill", "tool_result"])
def test_a_prefill_or_a_tool_result_is_answered_by_one_plain_call(client, mock, model, last):
    """A conversation that ends in the assistant's own start (a prefill) is continued as sent, and one that
    ends in a tool result (an agent loop's next step, its tools left out of this request) is answered
    as sent: a vote put its reasoning instruction in the user turn before them, and voted among them."""
    messages = [{"role": "user", "content": "Solve x^2 = 9."}, {"role": "assistant", "content": "x ="}]
    if last == "tool_result":
        messages = [{"role": "user", "content": "What is 12 * 12? Use the calculator."},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "calc", "arguments": '{"expr": "12*12"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "144"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, extra_headers={"x-ponder-strategy": "self_consistency"})
    assert raw.headers["x-ponder-arm"].endswith("/single/1")
    assert calls(mock)["count"] == 1 and calls(mock)["bodies"][0]["messages"] == messages

def test_a_policy_whose_arms_all_vote_or_reason_answers_tools_and_json_by_one_call(tmp_path):
    """With no single arm anywhere in the policy, a tool call was voted on (three billed samples, and the
    vote's confidence of 0 recorded as the arm's success signal) and JSON mode got the reasoning
    instruction ("End your reply with a last line of the form 'Final answer: <answer>'"): now one plain
    call on the arms' backend answers them, with the messages as the client sent them."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)],
            "policy": write_policy(tmp_path, {
                "name": "reasoned", "exploration": {"share": 0.0},
                "arms": {"vote": {"backend": "mock-a", "strategy": "self_consistency", "n": 3},
                         "think": {"backend": "mock-a", "strategy": "cot"}},
                "routes": [{"name": "all", "candidates": ["vote", "think"]}]})})) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        control(mock, answers=[{"tool_calls": [weather_call("Paris", "call_1")]}])
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages, tools=[WEATHER])
        assert raw.headers["x-ponder-arm"] == "mock-a/-/single/1" and calls(mock)["count"] == 1
        assert raw.parse().choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
        control(mock, answers=['{"city": "Paris", "sky": "clear"}'])
        parsed = client.chat.completions.create(model="auto", messages=messages, response_format={"type": "json_object"})
        assert orjson.loads(parsed.choices[0].message.content) == {"city": "Paris", "sky": "clear"}
        assert calls(mock)["count"] == 2 and calls(mock)["bodies"][-1]["messages"] == messages


@pytest.mark.parametrize("model", ["auto", "mock-a"])
def test_a_cost_cap_no_arm_fits_is_a_400_not_a_retry_later(client, mock, model):
    """The request's cost cap holds for a routed alias and for a backend named as `model` alike."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                       extra_headers={"x-ponder-max-cost-usd": "0.000000001"})
    assert refused.value.code == "over_cost_limit" and "x-ponder-max-cost-usd" in refused.value.message
    assert "retry-after" not in refused.value.response.headers and calls(mock)["count"] == 0


# An agent's toolbox: 40 functions with described parameters, ~47 KB of JSON (~11,800 prompt tokens at
# the mock's 4 characters a token, $0.0118 at its $1 per million) under a one-word question.
TOOLBOX = [{"type": "function", "function": {
    "name": f"lookup_{i}", "description": "Looks up a record in the company database. " * 8,
    "parameters": {"type": "object", "properties": {
        f"field_{j}": {"type": "string", "description": "A field of the record to match exactly."} for j in range(8)}}}}
    for i in range(40)]


@pytest.mark.parametrize("model", ["auto", "mock-a"])
def test_a_cost_cap_counts_the_tool_definitions_the_prompt_carries(client, mock, model):
    """Tool definitions are prompt the provider bills: a request whose toolbox alone costs more than its
    cap is refused before any call (it was sent, priced as a one-word prompt, and cost 10x its cap),
    and one under a cap that holds it is served for less than the cap."""
    asked = dict(model=model, messages=[{"role": "user", "content": "hi"}], tools=TOOLBOX, max_tokens=10)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**asked, extra_headers={"x-ponder-max-cost-usd": "0.005"})
    assert refused.value.code == "over_cost_limit" and calls(mock)["count"] == 0
    raw = client.chat.completions.with_raw_response.create(**asked, extra_headers={"x-ponder-max-cost-usd": "0.02"})
    assert raw.parse().usage.prompt_tokens > 11_000
    assert 0.01 < float(raw.headers["x-ponder-cost-usd"]) <= 0.02


def test_a_backend_key_missing_from_the_environment_is_said_at_startup(tmp_path):
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("m", mock, api_key_env="PONDER_TEST_UNSET_KEY")],
            "policy": write_policy(tmp_path, {"name": "k", "arms": {"one": {"backend": "m"}},
                                              "routes": [{"name": "all", "candidates": ["one"]}]})},
                                                 name="nokey")) as gateway:
        assert "backend m: $PONDER_TEST_UNSET_KEY is not set" in gateway.log()


def test_long_prompts_under_a_cost_cap_stay_served_as_the_learner_learns(tmp_path):
    """3,000-word prompts that fit a $0.001 cap: once their outcomes are learned, the learned cost must
    still compare each request with its own estimate (it compared with a 300-token prompt's, read
    them as ~10x over, and refused every request from the third on, for good)."""
    import time

    path = write_policy(tmp_path, {"name": "long", "arms": {"one": {"backend": "mock-a", "tokens": 5}},
                                   "routes": [{"name": "all", "candidates": ["one"]}],
                                   "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "long.yaml")
    cheap_input = {"prices": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, **cheap_input)], "policy": path,
            "telemetry": {"data_dir": str(tmp_path / "long-data"), "refresh_s": 0.1}}, name="long")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        long_prompt = [{"role": "user", "content": "word " * 3000}]
        for _ in range(6):
            answer = client.chat.completions.create(model="auto", messages=long_prompt, max_tokens=5,
                                                    extra_headers={"x-ponder-max-cost-usd": "0.001"})
            assert answer.choices
            time.sleep(0.3)  # the next decision sees this outcome


def test_a_policy_can_keep_clients_off_its_backends(tmp_path):
    """overrides.direct_backend: false: a backend name is not a model for clients (404, and not listed),
    so no request skips the policy's routing and caps."""
    path = write_policy(tmp_path, {"name": "routed-only", "arms": {"cheap": {"backend": "mock-a"}},
                                   "routes": [{"name": "all", "candidates": ["cheap"]}],
                                   "overrides": {"direct_backend": False}}, "routed.yaml")
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock)], "policy": path},
                                   name="routed")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            assert [m.id for m in client.models.list()] == ["auto"]
            with pytest.raises(openai.NotFoundError) as refused:
                client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
            assert refused.value.code == "model_not_found" and "direct_backend" in refused.value.message
            assert calls(mock)["count"] == 0
            assert client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}]).choices


def test_a_vote_on_an_openai_reasoning_model_samples_at_its_only_temperature(client, mock):
    """A vote draws its samples at a sampling temperature (0.7), which OpenAI's reasoning models
    (o-series, gpt-5) refuse with a 400: every vote on them failed, for a knob the client never sent.
    They sample at 1, so the samples differ all the same."""
    control(mock, answers=["7", "7", "9"])
    raw = client.chat.completions.with_raw_response.create(
        model="o4-mini", messages=[{"role": "user", "content": "What is 3 + 4?"}], reasoning_effort="high",
        extra_headers={"x-ponder-strategy": "self_consistency"})
    assert raw.headers["x-ponder-arm"] == "o4-mini/high/self_consistency/5"
    assert raw.parse().choices[0].message.content == "7"
    bodies = calls(mock)["bodies"]
    assert len(bodies) == 5 and not any("temperature" in body for body in bodies)
    assert len({body["seed"] for body in bodies}) == 5  # still one draw each


@pytest.mark.parametrize("stream", [False, True])
def test_openai_reasoning_models_get_the_clients_output_limit_by_the_name_they_take(client, mock, stream):
    """An app written for chat models sends `max_tokens` and a `temperature`; OpenAI's reasoning models
    refuse both (a 400 naming a knob the app did not choose this model for, when it was routed there).
    The limit is sent as `max_completion_tokens`, the sampling knobs they refuse are left out."""
    response = client.chat.completions.create(
        model="o4-mini", messages=[{"role": "user", "content": "x"}], max_tokens=50, temperature=0.2, top_p=0.5,
        presence_penalty=0.1, stop=["END"], stream=stream)
    assert (list(response)[0].choices if stream else response.choices)
    body = calls(mock)["bodies"][-1]
    assert body["max_completion_tokens"] == 50 and body["stop"] == ["END"]
    assert not {"max_tokens", "temperature", "top_p", "presence_penalty"} & set(body)
    # both limits: the one the budget held (max_completion_tokens) is the one sent
    client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "x"}], max_tokens=500,
                                   max_completion_tokens=40)
    body = calls(mock)["bodies"][-1]
    assert body["max_completion_tokens"] == 40 and "max_tokens" not in body
    # a chat model on the same API gets them as sent
    client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}], max_tokens=50,
                                   temperature=0.2)
    assert {"max_tokens": 50, "temperature": 0.2}.items() <= calls(mock)["bodies"][-1].items()


def test_a_parameter_the_chosen_model_does_not_take_goes_to_the_next_arm(tmp_path):
    """OpenAI's reasoning models refuse `logprobs` (400 `unsupported_parameter`): a routed request
    asking for them got that 400 whenever the policy chose such an arm, as if no model could answer
    it (a 400 was never sent to a fallback). Another model may take the parameter: the next arm
    answers. A request naming that backend gets its 400, as OpenAI answers it."""
    path = write_policy(tmp_path, {"name": "mixed", "exploration": {"share": 0.0},
                                   "arms": {"think": {"backend": "o4-mini", "effort": "high", "prior": 0.95},
                                            "plain": {"backend": "mock-a", "prior": 0.3}},
                                   "routes": [{"name": "all", "candidates": ["think", "plain"]}]}, "mixed.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("o4-mini", mock, reasoning=True, efforts=["high"]), mock_backend("mock-a", mock)],
            "policy": path}, name="mixed")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "x"}]
        assert client.chat.completions.with_raw_response.create(
            model="auto", messages=messages).headers["x-ponder-arm"] == "o4-mini/high/single/1"
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages, logprobs=True,
                                                                   stream=stream)
            assert raw.headers["x-ponder-arm"] == "mock-a/-/single/1"
            answer = raw.parse()
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
            else:
                assert answer.choices[0].logprobs.content  # the mock's streams carry none
            assert [(b["model"], b["logprobs"]) for b in calls(mock)["bodies"][-2:]] == [("o4-mini", True),
                                                                                       ("mock-a", True)]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="o4-mini", messages=messages, logprobs=True)
        assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "logprobs")


def test_a_routed_request_sends_its_arms_effort_not_the_clients(tmp_path):
    """A policy that does not let clients pick the effort (overrides.reasoning_effort: false) routes to
    an arm that sends none: the client's `reasoning_effort: high` must not reach the reasoning model
    anyway (it did, while x-ponder-arm said no effort was sent, and the learner recorded that)."""
    path = write_policy(tmp_path, {"name": "fixed-effort", "arms": {"o": {"backend": "mock-o"},
                                                                   "o-low": {"backend": "mock-o", "effort": "low"}},
                                   "routes": [{"name": "all", "candidates": ["o"]}], "exploration": {"share": 0.0},
                                   "overrides": {"reasoning_effort": False}}, "effort.yaml")
    with running(start_mock(tmp_path)) as mock:
        backend = mock_backend("mock-o", mock, reasoning=True, efforts=["low", "medium", "high"])
        with running(start_gateway(tmp_path, {"backends": [backend], "policy": path}, name="effort")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            for stream in (False, True):
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": "x"}], reasoning_effort="high", stream=stream)
                assert raw.headers["x-ponder-arm"] == "mock-o/-/single/1"
                assert "reasoning_effort" not in calls(mock)["bodies"][-1]
            # a request naming the backend gets the effort it asked for (the arm carries it)
            raw = client.chat.completions.with_raw_response.create(
                model="mock-o", messages=[{"role": "user", "content": "x"}], reasoning_effort="high")
            assert raw.headers["x-ponder-arm"] == "mock-o/high/single/1"
            assert calls(mock)["bodies"][-1]["reasoning_effort"] == "high"


def test_a_policy_chosen_by_header_does_not_choose_the_keys_budget(tmp_path):
    """The default policy caps keys at $0.00005 a day and lets clients pick the policy `open`, which
    sets no budget: picking it must not lift the key's cap (mock prices $1 / $2 per M tokens)."""
    import hashlib

    arms = {"cheap": {"backend": "mock-a"}}
    capped = write_policy(tmp_path, {"name": "capped", "arms": arms, "routes": [{"name": "all", "candidates": ["cheap"]}],
                                     "budgets": {"per_key_daily_usd": 0.00005},
                                     "overrides": {"policy_header": True}}, "capped.yaml")
    open_policy = write_policy(tmp_path, {"name": "open", "arms": arms,
                                          "routes": [{"name": "all", "candidates": ["cheap"]}]}, "open.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)], "policy": capped, "extra_policies": {"open": open_policy},
            "api_keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}, name="pick")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        question = [{"role": "user", "content": "x"}]
        with pytest.raises(openai.RateLimitError):
            for _ in range(20):
                client.chat.completions.create(model="auto", messages=question, max_tokens=5)
        for policy_name in ("open", "capped"):
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model="auto", messages=question, max_tokens=5,
                                               extra_headers={"x-ponder-policy": policy_name})
            assert refused.value.code == "budget_exhausted"


def test_extra_policies_the_default_policy_lets_no_client_pick_are_said_at_startup(tmp_path):
    """extra_policies are picked with x-ponder-policy, honoured only with the default policy's
    overrides.policy_header (false by default): without it the header is ignored, so the log says so
    rather than leaving the operator to find that every request gets the default."""
    arms = {"cheap": {"backend": "mock-a"}}
    main = write_policy(tmp_path, {"name": "main", "arms": arms, "routes": [{"name": "all", "candidates": ["cheap"]}]},
                        "main.yaml")
    other = write_policy(tmp_path, {"name": "other", "arms": arms, "routes": [{"name": "all", "candidates": ["cheap"]}]},
                         "other.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)], "policy": main, "extra_policies": {"other": other}},
            name="unpickable")) as gateway:
        answer = httpx.post(gateway.url + "/v1/chat/completions", headers={"x-ponder-policy": "other"},
                            json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
        assert answer.status_code == 200 and answer.headers["x-ponder-policy"] == "main"  # the header is ignored
        assert "policies other cannot be picked: the default policy 'main' does not honour x-ponder-policy" \
            in gateway.log()


def test_an_extra_policies_key_that_is_not_the_policys_name_is_said_at_startup(tmp_path):
    """x-ponder-policy picks a policy by the `name` in its file, and the extra_policies key is not read:
    `extra_policies: {premium: quality.yaml}` reads as "send premium", which is answered 400
    unknown_policy, with nothing said at start. The log (and `ponder policy check --config`) says which
    name to send."""
    arms = {"cheap": {"backend": "mock-a"}}
    main = write_policy(tmp_path, {"name": "main", "arms": arms, "routes": [{"name": "all", "candidates": ["cheap"]}],
                                   "overrides": {"policy_header": True}}, "main.yaml")
    quality = write_policy(tmp_path, {"name": "quality", "arms": arms,
                                      "routes": [{"name": "all", "candidates": ["cheap"]}]}, "quality.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)], "policy": main, "extra_policies": {"premium": quality}},
            name="keyed")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": "x"}]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="auto", messages=question,
                                           extra_headers={"x-ponder-policy": "premium"})
        assert refused.value.code == "unknown_policy"
        answer = client.chat.completions.with_raw_response.create(model="auto", messages=question,
                                                                  extra_headers={"x-ponder-policy": "quality"})
        assert answer.headers["x-ponder-policy"] == "quality"
        assert f"extra_policies.premium is policy 'quality' ({quality}): clients pick it with x-ponder-policy: " \
               "quality, not premium" in gateway.log()


def test_an_arms_cot_template_is_what_the_upstream_gets(tmp_path):
    path = write_policy(tmp_path, {"name": "templated", "arms": {"think": {
        "backend": "mock-a", "strategy": "cot", "cot_template": "HOUSE STYLE: reason about this {task} question."}},
        "routes": [{"name": "all", "candidates": ["think"]}]}, "templated.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(
            tmp_path, {"backends": [mock_backend("mock-a", mock)], "policy": path}, name="tpl")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 3 + 4?"}])
        sent = calls(mock)["bodies"][-1]["messages"]
        assert any("HOUSE STYLE: reason about this" in str(m["content"]) for m in sent), sent


def test_a_cot_arm_answers_the_n_choices_asked_for(tmp_path):
    """docs/api.md: a client asking `n` choices gets `n`, whichever arm the learner routes to; a cot arm
    answered one. On a backend that takes `n` they come from one call, else from one call each."""
    path = write_policy(tmp_path, {
        "name": "cot-n",
        "arms": {"think": {"backend": "mock-a", "strategy": "cot"},
                 "think-split": {"backend": "mock-split", "strategy": "cot"}},
        "routes": [{"name": "all", "candidates": ["think"]}],
        "aliases": {"auto": {}, "auto-split": {"arms": ["think-split"]}}}, "cot-n.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-split", mock, supports_n=False)],
            "policy": path}, name="cot-n")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, answers=["6 times 7 makes 42\nFinal answer: 42", "so it is 42\nFinal answer: 42",
                               "it is 42\nFinal answer: 42"])
        for model, upstream_calls in (("auto", 1), ("auto-split", 3)):
            before = calls(mock)["count"]
            raw = client.chat.completions.with_raw_response.create(
                model=model, n=3, messages=[{"role": "user", "content": "What is 6 * 7?"}])
            completion = raw.parse()
            assert raw.headers["x-ponder-arm"].endswith("/cot/1")
            assert [c.index for c in completion.choices] == [0, 1, 2]
            assert all(c.message.model_extra.get("reasoning_content") for c in completion.choices)
            assert [c.message.content for c in completion.choices] == ["42"] * 3
            assert completion.model_extra["ponder"]["samples"] == 3
            assert calls(mock)["count"] - before == upstream_calls


def test_a_max_tokens_too_small_to_reason_aloud_gets_a_direct_answer(tmp_path):
    """docs/policies.md: a client's max_tokens that leaves no room for a chain of thought is answered by
    a direct call, not by chains cut before their answer line (the client got "Let us think step by"
    with finish_reason `length`, from one cot call or from every sample of a vote). A routed alias
    prefers its direct arm; an alias of reasoning arms only gets a plain call to the same model."""
    path = write_policy(tmp_path, {
        "name": "aloud",
        "arms": {"direct": {"backend": "mock-a", "prior": 0.6},
                 "think": {"backend": "mock-a", "strategy": "cot", "prior": 0.9},
                 "vote": {"backend": "mock-b", "strategy": "self_consistency", "n": 3, "prior": 0.9}},
        "routes": [{"name": "all", "candidates": ["direct", "think"]}],
        "aliases": {"auto": {}, "auto-vote": {"arms": ["vote"]}},
        "exploration": {"share": 0.0}}, "aloud.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)], "policy": path},
            name="aloud")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, answers=["Let us think step by step. 6 * 7 = 42.\nFinal answer: 42"])
        question = [{"role": "user", "content": "What is 6 * 7?"}]
        for model, reasoning, direct in (("auto", "mock-a/-/cot/1", "mock-a/-/single/1"),
                                         ("auto-vote", "mock-b/-/self_consistency/3", "mock-b/-/single/1")):
            uncapped = client.chat.completions.with_raw_response.create(model=model, messages=question)
            assert uncapped.headers["x-ponder-arm"] == reasoning
            assert uncapped.parse().choices[0].message.content == "42"
            before = calls(mock)["count"]
            raw = client.chat.completions.with_raw_response.create(model=model, messages=question, max_tokens=5)
            assert raw.headers["x-ponder-arm"] == direct
            assert raw.parse().model_extra["ponder"]["strategy"] == "single"
            assert calls(mock)["count"] - before == 1
            assert calls(mock)["bodies"][-1]["messages"] == question  # asked directly, no reasoning instruction


def test_a_max_tokens_too_small_to_think_within_gets_an_arm_that_answers(tmp_path):
    """docs/policies.md: a reasoning backend spends its thinking within the client's max_tokens (the mock
    thinks 10 tokens at any effort, as a real one does thousands): under a cap its effort `high` cannot
    think within, the route answers with its direct arm, not with empty content and finish_reason
    `length` from the thinking arm (which won: it was priced as cheaper under the cap, and as likely right)."""
    path = write_policy(tmp_path, {
        "name": "thinking",
        "arms": {"direct": {"backend": "mock-a", "prior": 0.6},
                 "high": {"backend": "mock-r", "effort": "high", "prior": 0.9}},
        "routes": [{"name": "all", "candidates": ["direct", "high"]}],
        "objective": {"cost_weight": 0, "latency_weight": 0},
        "exploration": {"share": 0.0}}, "thinking.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock),
                         mock_backend("mock-r", mock, reasoning=True, efforts=["low", "medium", "high"])],
            "policy": path}, name="thinking")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, answers=["The answer is 42"])
        question = [{"role": "user", "content": "What is 6 * 7?"}]
        uncapped = client.chat.completions.with_raw_response.create(model="auto", messages=question)
        assert uncapped.headers["x-ponder-arm"] == "mock-r/high/single/1"
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=question, max_tokens=5)
        assert raw.headers["x-ponder-arm"] == "mock-a/-/single/1"
        answer = raw.parse().choices[0]
        assert (answer.message.content, answer.finish_reason) == ("The answer is 42", "stop")


def test_a_max_tokens_too_small_to_think_within_on_a_route_where_every_arm_thinks(tmp_path):
    """docs/policies.md: where every arm of the route thinks (efforts low and high), the lowest effort won
    under a tiny max_tokens (the scaling leaves it the most), and answered the client empty content with
    finish_reason `length`: the mock thought the whole cap away. A call to the same model at effort
    `none` (its thinking off) competes and answers (rule `all+direct`); the decision's reasons say so."""
    path = write_policy(tmp_path, {
        "name": "thinkers",
        "arms": {"high": {"backend": "mock-r", "effort": "high", "prior": 0.9},
                 "low": {"backend": "mock-r", "effort": "low", "prior": 0.8}},
        "routes": [{"name": "all", "candidates": ["high", "low"]}],
        "objective": {"cost_weight": 0, "latency_weight": 0},
        "exploration": {"share": 0.0}}, "thinkers.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-r", mock, reasoning=True, efforts=["none", "low", "high"])],
            "policy": path}, name="thinkers")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, answers=["The answer is 42"])
        question = [{"role": "user", "content": "What is 6 * 7?"}]
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=question, max_tokens=8)
        assert raw.headers["x-ponder-arm"] == "mock-r/none/single/1"
        completion = raw.parse()
        answer = completion.choices[0]
        assert (answer.message.content, answer.finish_reason) == ("The answer is 42", "stop")
        assert sent(mock)[-1]["reasoning_effort"] == "none"
        decision = httpx.get(f"{gateway.url}/v1/ponder/requests/{completion.id}").json()["decision"]
        assert any("a direct call to the same model competes (at an effort that does not think)" in reason
                   for reason in decision["reasons"]), decision["reasons"]
        uncapped = client.chat.completions.with_raw_response.create(model="auto", messages=question)
        assert uncapped.headers["x-ponder-arm"] == "mock-r/high/single/1"


def test_the_clients_stop_sequences_end_a_cot_arms_reply_not_its_chain(tmp_path):
    """As for a vote's chains (test_the_clients_stop_sequences_end_a_reasoning_votes_answer_not_its_chains),
    for a cot arm's, from one call (n) or one call each: the reply ends where the client's sequences end
    it, "stop" where they did; a chain cut at its length before any answer stays cut ("length"), not its
    first paragraph passed off as a finished reply."""
    path = write_policy(tmp_path, {
        "name": "cot-stop",
        "arms": {"think": {"backend": "mock-a", "strategy": "cot"},
                 "think-split": {"backend": "mock-split", "strategy": "cot"}},
        "routes": [{"name": "all", "candidates": ["think"]}],
        "aliases": {"auto": {}, "auto-split": {"arms": ["think-split"]}}}, "cot-stop.yaml")
    reply = "Tom starts with 3 apples.\n\nHe buys 4 more: 3 + 4 = 7.\n\nFinal answer: 7"
    question = "Question: Tom has 3 apples and buys 4. How many?"
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-split", mock, supports_n=False)],
            "policy": path}, name="cot-stop")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        for model in ("auto", "auto-split"):
            for behaviour in ("ok", "length"):  # the model went on to the next question, then ran out
                control(mock, script=[behaviour] * 2, answers=[
                    reply + "\n\nQuestion: Ann has 2 pears and gets 3. How many?\nFinal answer: 5"])
                choice = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                        stop=["\n\n", "Question:"]).choices[0]
                assert (choice.message.content, choice.finish_reason) == ("7", "stop"), (model, behaviour)
                assert choice.message.model_extra["reasoning_content"] == reply
            cut = "Tom starts with 3 apples.\n\nHe buys 4"
            control(mock, script=["length"], answers=[cut])
            choice = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                    stop=["\n\n", "Question:"]).choices[0]
            assert (choice.message.content, choice.finish_reason) == (cut, "length"), model
        assert all("stop" not in body for body in calls(mock)["bodies"])


def test_refused_requests_are_counted_in_metrics(gw, client):
    """A request refused before any decision (bad input, a cost cap) has no event, but /metrics counts it
    by status; the alias label is the model only when it is a known one."""
    from prometheus_client.parser import text_string_to_metric_families

    def refusals() -> dict[tuple[str, str], float]:
        families = text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)
        return {(s.labels["alias"], s.labels["status_class"]): s.value for f in families if f.name == "ponder_requests"
                for s in f.samples if s.name == "ponder_requests_total" and s.labels["task"] == "-"}

    before = refusals()
    httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": [], "n": 1})
    httpx.post(gw.url + "/v1/chat/completions", json={"model": "no-such-model-x1", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-ponder-max-cost-usd": "0.000000001"})
    after = refusals()
    assert after[("auto", "4xx")] - before.get(("auto", "4xx"), 0) == 1  # the cost cap
    assert after[("-", "4xx")] - before.get(("-", "4xx"), 0) == 2  # no valid request, an unknown model
    assert not any("no-such-model" in alias for alias, _ in after)


def test_client_task_label_keys_the_learner(client, gw):
    """x-ponder-task: the policy allows `legal-qa`, so the decision, the response and the recorded
    event carry it (the learner's bucket is legal-qa x tier); a malformed label is a clean 400."""
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Is a verbal contract binding?"}],
        extra_headers={"x-ponder-task": "legal-qa"})
    completion = raw.parse()
    assert raw.headers["x-ponder-task"] == "legal-qa" and completion.model_extra["ponder"]["task"] == "legal-qa"
    detail = httpx.get(f"{gw.url}/v1/ponder/requests/{completion.id}").json()
    assert detail["classifier"]["bucket"].startswith("legal-qa:")
    assert any("from x-ponder-task" in reason for reason in detail["decision"]["reasons"])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-ponder-task": "Legal QA"})
    assert info.value.body["code"] == "invalid_header" and "x-ponder-task" in info.value.body["message"]


def test_feedback_with_the_unused_field_null_is_accepted(client, gw):
    """A typed client sends every optional field, the one it does not use as null: `score: null`
    next to `correct` is the correct flag, not a 400."""
    completion = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    graded = httpx.post(gw.url + "/v1/feedback", json={"request_id": completion.id, "score": None, "correct": False})
    assert graded.status_code == 200 and graded.json()["status"] == "accepted", graded.text
    missing = httpx.post(gw.url + "/v1/feedback", json={"request_id": completion.id, "score": None, "correct": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "score"


def test_stream_that_breaks_before_any_byte_is_retried_invisibly(client, mock):
    control(mock, script=["500"], answers=["fine after all"])
    chunks = list(client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine after all"
    assert calls(mock)["count"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_attempt_is_retried_after_a_backoff_streamed_or_not(client, mock, stream):
    """A stream's retry before its first byte waits as a JSON call's does (BACKOFF_BASE_S, jittered
    down to half of it): it went again at once, into the same overload."""
    from gateway.calls import BACKOFF_BASE_S

    control(mock, script=["500"], answers=["fine after all"])
    answered = client.chat.completions.create(model="mock-b", messages=[{"role": "user", "content": "a"}],
                                              stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in answered if c.choices) if stream else \
        answered.choices[0].message.content
    assert text == "fine after all"
    first, second = calls(mock)["times"]
    assert second - first >= BACKOFF_BASE_S / 2, second - first


def test_stream_truncated_after_bytes_ends_with_an_error_not_done(gw, mock):
    control(mock, script=["truncate"], answers=["one two three four five six"])
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={
            "model": "mock-a", "messages": [{"role": "user", "content": "a"}], "stream": True}) as response:
        body = b"".join(response.iter_bytes())
    assert b"data: [DONE]" not in body
    assert b'"error"' in body and b"finish_reason\":\"stop" not in body


def test_stream_chunks_carry_the_request_id_to_send_feedback_on(client, gw):
    """A relayed stream's chunks say the gateway's request id (x-ponder-request-id), not the upstream's,
    so feedback on `chunk.id` is accepted; the usage chunk is a whole chunk like the others."""
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": "hi there"}], stream=True,
            stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["x-ponder-request-id"]
        chunks = list(raw.parse())
    assert len(chunks) >= 3 and {c.id for c in chunks} == {request_id}
    last = chunks[-1]
    assert last.usage is not None and not last.choices and last.object == "chat.completion.chunk"
    assert (last.created, last.model) == (chunks[0].created, chunks[0].model)
    accepted = httpx.post(gw.url + "/v1/feedback", json={"request_id": chunks[0].id, "correct": True})
    assert accepted.status_code == 200, accepted.text


def upstream_sse(contents: list[str], usage: dict, *, end: bytes = b"\n\n", data: bytes = b"data: ") -> list[bytes]:
    """A chat stream as an upstream writes it: one event per content piece, a finish, a usage chunk."""
    chunks = [{"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in contents]
    chunks.append({**chunks[0], "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**chunks[0], "choices": [], "usage": usage})
    return [data + orjson.dumps(c) + end for c in chunks] + [data + b"[DONE]" + end]


def relay(gw, mock, pieces: list, **body) -> tuple[str, openai.types.chat.ChatCompletionChunk, dict]:
    """`pieces` (bytes, each one write, or seconds to wait) relayed to the openai SDK: the content,
    the last chunk (usage) and the recorded request."""
    control(mock, script=["raw"], raw=[p.hex() if isinstance(p, bytes) else p for p in pieces])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a b"}],
                                                 stream=True, stream_options={"include_usage": True}, **body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert calls(mock)["count"] == 1  # no retry: the first stream was read right
    return text, chunks[-1], httpx.get(f"{gw.url}/v1/ponder/requests/{chunks[0].id}").json()


WORDS = ["Caf\u00e9 ", "\u4e16\u754c ", "\U0001F600", " done"]
USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def split_everywhere() -> list:
    """The stream in small writes with pauses between, cut inside a UTF-8 character and a CRLF."""
    whole = b"".join(upstream_sse(WORDS, USAGE, end=b"\r\n\r\n"))
    cut = whole.index("\u4e16".encode()) + 1
    crlf = whole.index(b"\r\n") + 1
    points = sorted({crlf, cut, *range(0, len(whole), 97)} - {0})
    pieces: list = []
    for start, stop in zip([0, *points], [*points, len(whole)]):
        pieces += [whole[start:stop], 0.002]
    return pieces


SSE_STYLES = {
    "lf": lambda: upstream_sse(WORDS, USAGE),
    "crlf": lambda: upstream_sse(WORDS, USAGE, end=b"\r\n\r\n"),
    "cr": lambda: upstream_sse(WORDS, USAGE, end=b"\r\r"),  # valid SSE: it was "invalid JSON", then retried
    "no_space": lambda: upstream_sse(WORDS, USAGE, data=b"data:"),
    "comments_and_fields": lambda: [b": keep-alive\n\n", b"retry: 1000\n"] + [
        b"event: message\nid: 1\n" + event for event in upstream_sse(WORDS, USAGE)] + [b": bye\n\n"],
    # one event's data on several lines (joined with LF): relayed as one line, or the client would lose it
    "multi_line_data": lambda: [e.replace(b'","choices"', b'",\ndata: "choices"') for e in upstream_sse(WORDS, USAGE)],
    "split_everywhere": split_everywhere,
}


@pytest.mark.parametrize("style", list(SSE_STYLES))
def test_a_relayed_stream_reads_sse_however_the_upstream_writes_it(gw, mock, style):
    """Every way the SSE format lets an upstream end lines, name fields and split its writes is read
    as the same events: each content piece arrives once and in order, and the request is billed what
    the upstream reported."""
    text, last, recorded = relay(gw, mock, SSE_STYLES[style]())
    assert text == "".join(WORDS)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 4)
    assert last.model_extra["ponder"]["usage_estimated"] is False
    row, made = recorded["request"], recorded["execution"]["calls"]
    assert row["status"] == 200 and len(made) == 1 and made[0]["ok"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 4)
    assert row["cost_usd"] == pytest.approx((7 * 1.0 + 4 * 2.0) / 1e6)


def test_a_stream_without_usage_is_billed_by_its_length_not_its_chunk_count(gw, mock):
    """An upstream that sends no usage: a chunk counts as at least one token (llama.cpp sends one a
    chunk), and a long chunk as its characters / 4; two chunks of 350 characters were billed 2 tokens."""
    pieces = [e for e in upstream_sse(["x" * 350, "y" * 350], USAGE) if b'"usage"' not in e]
    text, last, recorded = relay(gw, mock, pieces)
    assert text == "x" * 350 + "y" * 350
    assert last.model_extra["ponder"]["usage_estimated"] is True
    assert last.usage.completion_tokens == recorded["request"]["completion_tokens"] == 700 // 4


def test_a_stream_without_usage_is_never_billed_more_than_its_max_tokens(gw, mock):
    """The characters / 4 estimate of an answer cut at max_tokens (llama.cpp's: a token a chunk, some of
    them whole words) is held to that limit: 8 chunks of 33 characters read 9 completion tokens."""
    answer = ["Hello", "!", " How", " can", " I", " assist", " you", " today"]
    pieces = [e for e in upstream_sse(answer, USAGE) if b'"usage"' not in e]
    for limit in ({"max_tokens": 8}, {"max_completion_tokens": 8}):
        text, last, recorded = relay(gw, mock, pieces, **limit)
        assert text == "".join(answer) and last.model_extra["ponder"]["usage_estimated"] is True
        assert last.usage.completion_tokens == recorded["request"]["completion_tokens"] == 8
        reset(mock)


def test_a_stream_that_keeps_flowing_outlasts_the_backends_call_timeout(tmp_path):
    """timeout_s bounds a call; a relayed stream is bounded only by its pauses (first_byte_timeout_s
    between reads). A long answer flowing for twice timeout_s used to be cut at timeout_s: an SSE error
    mid-answer, recorded as the backend's failure."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, timeout_s=1.0, first_byte_timeout_s=1.0),
                         mock_backend("mock-b", mock)],
            "policy": policy(tmp_path)}, name="flowing")) as gateway:
        words = [f"w{i} " for i in range(6)]
        pieces = [p for piece in upstream_sse(words, USAGE) for p in (piece.hex(), 0.4)]  # ~3.6 s in all
        control(mock, script=["raw"], raw=pieces)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        chunks = list(client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(words)
        assert chunks[-1].usage.completion_tokens == USAGE["completion_tokens"]
        recorded = httpx.get(f"{gateway.url}/v1/ponder/requests/{chunks[0].id}").json()["request"]
        assert recorded["status"] == 200


def test_a_relayed_stream_takes_a_megabyte_in_one_event(gw, mock):
    """One chunk holding a whole long answer (aiohttp's line reader stops at 512 KiB: the relay died
    with a traceback, no error event, and the request was recorded as a 499 billed $0)."""
    long = "word " * 200_000
    pieces = upstream_sse(["Start: ", long, "end"], {"prompt_tokens": 7, "completion_tokens": 200_002,
                                                     "total_tokens": 200_009})
    text, last, recorded = relay(gw, mock, pieces)
    assert text == "Start: " + long + "end"
    assert last.usage.completion_tokens == 200_002
    row = recorded["request"]
    assert row["status"] == 200 and row["completion_tokens"] == 200_002
    assert row["cost_usd"] == pytest.approx((7 * 1.0 + 200_002 * 2.0) / 1e6)


@pytest.mark.parametrize("model", ["auto", "mock-split"])
def test_a_multi_sample_stream_nobody_can_serve_is_an_http_error(gw, mock, model):
    """n > 1 streams a synthesized answer; when every backend fails before anything was sent, the
    client gets the HTTP status and OpenAI error body a one-sample stream gets, with the upstream's
    message (`mock-split` takes no `n`: its two samples are two calls that both fail)."""
    control(mock, fail_rate=1.0)
    response = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "a"}], "n": 2, "stream": True})
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "mock upstream failure" in error["message"]
    assert error["message"].startswith("mock-") and response.headers["x-ponder-request-id"]


def test_a_client_that_leaves_a_multi_sample_stream_stops_the_sampling(gw, mock):
    """A synthesized stream holds its headers while it samples; a client that gives up meanwhile
    cancels the samples, and the request is recorded as 499."""
    control(mock, script=["hang"] * 5, hang_s=2)  # short: the mock waits for its handlers when stopped
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", timeout=0.5, headers={"x-ponder-strategy": "self_consistency"},
                   json={"model": "mock-a", "messages": [{"role": "user", "content": "a"}], "stream": True})
    deadline = time.monotonic() + 5
    while (latest := httpx.get(gw.url + "/v1/ponder/requests?limit=1").json()["requests"][0])["status"] != 499:
        assert time.monotonic() < deadline, latest
        time.sleep(0.05)
    assert latest["strategy"] == "self_consistency" and calls(mock)["count"] == 5
    # the five cancelled calls had read the prompt: billed at its estimate, not at $0
    detail = httpx.get(f"{gw.url}/v1/ponder/requests/{latest['request_id']}").json()
    cancelled = detail["execution"]["calls"]
    assert len(cancelled) == 5 and all(not c["ok"] and c["error"].startswith("cut off: the client left")
                                       for c in cancelled)
    assert latest["prompt_tokens"] == sum(c["prompt_tokens"] for c in cancelled) > 0 and latest["cost_usd"] > 0


def test_upstream_failure_is_a_502_with_the_upstream_message(client, mock):
    control(mock, script=["500", "500"])
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "a"}])
    assert info.value.status_code == 502
    assert "mock upstream failure" in info.value.body["message"]


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "auto"}', 400, "messages"),
    (b'{"model": "auto", "messages": []}', 400, "messages"),
    (b'{"model": "auto", "messages": "hi"}', 400, "messages"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    (b'{"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 100000}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    # wrong types are refused, not coerced (the body is forwarded as sent)
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": "2"}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": true}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 2.0}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": null}]}', 400, "messages.0"),
    (b'{"model": "auto", "messages": [{"role": "user"}]}', 400, "messages.0"),
    # a text part's text must be a string: the router and the token estimate read it (it was a 500)
    (b'{"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400,
     "messages.0.content.0.text"),
    (b'{"model": "mock-a", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}', 400,
     "messages.0.content.0.text"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}', 400,
     "messages.0.content.0.text"),
    # a union-typed field is named as the field, not as pydantic's union member ("stop.str")
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "stop"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "tool_choice": 5}', 400, "tool_choice"),
    (b"\xff\xfe\x00garbage", 400, None),
])
def test_bad_input_gets_an_openai_error(gw, payload, status, param):
    response = httpx.post(gw.url + "/v1/chat/completions", content=payload,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_huge_body_is_413(gw):
    response = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": "x" * 200_000}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_unknown_path_and_method_are_openai_errors(gw):
    assert httpx.get(gw.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = httpx.get(gw.url + "/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()
    assert response.headers["allow"] == "POST"  # required on a 405 (RFC 9110)


def test_health_and_readiness(gw):
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz").json()
    assert ready["ready"] and ready["classifier"] and ready["backends"]


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    """A second gateway with the opt-in settings on: API keys, the Server-Timing header, and a backend
    (`mock-text`) that takes only the basic chat format and no `n`."""
    import hashlib

    tmp = tmp_path_factory.mktemp("keys")
    with running(start_mock(tmp)) as mock:
        with running(start_gateway(tmp, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock),
                         mock_backend("mock-text", mock, message_format="basic", supports_n=False)],
            "policy": policy(tmp),
            "api_keys": [{"id": "team-a", "sha256": hashlib.sha256(KEY.encode()).hexdigest()},
                         {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True},
                         {"id": "small", "sha256": hashlib.sha256(SMALL_BUDGET_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0.00005},
                         {"id": "none", "sha256": hashlib.sha256(ZERO_BUDGET_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0},
                         {"id": "metered", "sha256": hashlib.sha256(METERED_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 1.0},
                         {"id": "month", "sha256": hashlib.sha256(MONTH_BUDGET_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0.00005, "budget_usd_per_month": 0.00005}],
            "server_timing": True,
        }, name="keyed")) as gateway:
            yield gateway, mock


@pytest.fixture
def keyed_gateway(keyed_stack):
    return keyed_stack[0]


def test_api_keys(keyed_gateway):
    url = keyed_gateway.url
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    missing = httpx.post(url + "/v1/chat/completions", json={"model": "mock-a", "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}]).choices
    assert "sk-test-key" not in keyed_gateway.log()


def test_answers_refused_before_routing_carry_a_request_id(keyed_stack):
    """OpenAI sends `x-request-id` on every answer; the openai SDK reads it into an error's `request_id`,
    what apps log to report a failure. A 401, a 400, a 404 (unknown model or path) or the key budget's
    429 carried none: `request_id` was None. Each now has its own id, under both names; no request
    record holds it (docs/api.md)."""
    gateway, _ = keyed_stack
    question = [{"role": "user", "content": "x"}]
    keyed = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    refusals = []
    for client, call, error in [
        (openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0),
         lambda c: c.chat.completions.create(model="mock-a", messages=question), openai.AuthenticationError),
        (keyed, lambda c: c.chat.completions.create(model="mock-a", messages=[]), openai.BadRequestError),
        (keyed, lambda c: c.chat.completions.create(model="no-such-model", messages=question), openai.NotFoundError),
        (keyed, lambda c: c.models.retrieve("no-such-model"), openai.NotFoundError),
        (keyed, lambda c: c.responses.create(model="mock-a", input=[]), openai.BadRequestError),
        (openai.OpenAI(base_url=gateway.url + "/v1", api_key=ZERO_BUDGET_KEY, max_retries=0),
         lambda c: c.chat.completions.create(model="mock-a", messages=question, max_tokens=5), openai.RateLimitError),
    ]:
        with pytest.raises(error) as refused:
            call(client)
        headers = refused.value.response.headers
        assert refused.value.request_id is not None and refused.value.request_id.startswith("req_")
        assert headers["x-ponder-request-id"] == refused.value.request_id
        refusals.append(refused.value.request_id)
    unknown_path = httpx.get(gateway.url + "/v1/no-such-path", headers={"authorization": f"Bearer {KEY}"})
    assert unknown_path.status_code == 404 and unknown_path.headers["x-request-id"].startswith("req_")
    refusals.append(unknown_path.headers["x-request-id"])
    assert len(set(refusals)) == len(refusals)  # one id per answer
    record = httpx.get(f"{gateway.url}/v1/ponder/requests/{refusals[-2]}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert record.status_code == 404  # refused before routing: no request record


def test_answers_other_than_completions_carry_a_request_id(keyed_stack):
    """OpenAI sends `x-request-id` on every answer, and the openai SDK reads it into every result's
    `_request_id`: the model list, a model, health, metrics, feedback and the operators' views answered
    200 with none (`client.models.retrieve(...)._request_id` was None)."""
    gateway, _ = keyed_stack
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve("mock-a")
    assert model._request_id is not None and model._request_id.startswith("req_")
    completion = client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    for _ in range(50):  # the completion's record is written just after its answer
        feedback = httpx.post(gateway.url + "/v1/feedback", json={"request_id": completion.id, "score": 1},
                              headers={"authorization": f"Bearer {KEY}"})
        if feedback.status_code != 404:
            break
        time.sleep(0.1)
    assert feedback.status_code == 200, feedback.text
    ids = [feedback.headers["x-request-id"]]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/v1/models", "/healthz", "/readyz", "/metrics", "/v1/ponder/summary", "/dashboard"):
        answer = httpx.get(gateway.url + path, headers=admin)
        assert answer.status_code == 200, (path, answer.status_code)
        assert answer.headers.get_list("x-request-id") == answer.headers.get_list("x-ponder-request-id"), path
        assert len(answer.headers.get_list("x-request-id")) == 1, path
        # added to the answer's own headers, not in their place
        assert answer.headers["content-length"] == str(len(answer.content)) and "content-type" in answer.headers, path
        ids.append(answer.headers["x-request-id"])
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)
    # a completion keeps its own, once
    raw = client.chat.completions.with_raw_response.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    assert raw.headers.get_list("x-request-id") == [raw.parse().id]


def test_budget_refusals_say_what_to_do(keyed_stack):
    """A day budget of $0.00005 (mock prices: $1 / $2 per M tokens). Without max_tokens a request holds
    1,024 output tokens a call: more than the whole budget, which waiting cannot fix (400). With a small
    max_tokens requests are served until the day's money is gone, then 429 with Retry-After at the
    next UTC midnight, when the budget starts anew."""
    import calendar
    import time

    gateway, _ = keyed_stack
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=SMALL_BUDGET_KEY, max_retries=0)
    question = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as too_big:
        client.chat.completions.create(model="mock-a", messages=question)
    assert too_big.value.code == "over_budget_cap" and "max_tokens" in too_big.value.message
    served = 0
    with pytest.raises(openai.RateLimitError) as spent:
        for _ in range(10):
            client.chat.completions.create(model="mock-a", messages=question, max_tokens=5)
            served += 1
    assert served >= 2 and spent.value.code == "budget_exhausted"
    now = time.time()
    midnight = calendar.timegm(time.gmtime(now)[:3] + (0, 0, 0, 0, 0, 0)) + 86400
    assert abs(int(spent.value.response.headers["retry-after"]) - (midnight - now)) <= 5
    # the SDK's own retries would be refused again until midnight: it is told not to make them
    sent = []
    retrying = openai.OpenAI(base_url=gateway.url + "/v1", api_key=SMALL_BUDGET_KEY, max_retries=2,
                             http_client=httpx.Client(event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.RateLimitError) as again:
        retrying.chat.completions.create(model="mock-a", messages=question, max_tokens=5)
    assert again.value.response.headers["x-should-retry"] == "false" and len(sent) == 1
    # a key whose budget is $0 has nothing to spend, whatever max_tokens says: 429 on either path
    broke = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ZERO_BUDGET_KEY, max_retries=0)
    for model in ("mock-a", "auto"):
        with pytest.raises(openai.RateLimitError) as empty:
            broke.chat.completions.create(model=model, messages=question, max_tokens=5)
        assert empty.value.code == "budget_exhausted" and "retry-after" in empty.value.response.headers


def test_ponder_key_makes_a_key_and_the_config_line_that_admits_it(tmp_path):
    import subprocess
    import sys

    import yaml

    made = subprocess.run([sys.executable, "-m", "gateway.cli", "key", "--id", "made"], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    new_key = made[0].rsplit(" ", 1)[1]
    line = yaml.safe_load(made[-1])
    assert line[0]["id"] == "made" and new_key not in made[-1]  # the config holds only the hash
    hashed = subprocess.run([sys.executable, "-m", "gateway.cli", "key", "--hash"], input=new_key + "\n",
                            capture_output=True, text=True, check=True).stdout.strip()
    assert hashed == line[0]["sha256"]
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": policy(tmp_path), "api_keys": line}, name="made-key")) as gateway:
        question = [{"role": "user", "content": "hi"}]
        served = openai.OpenAI(base_url=gateway.url + "/v1", api_key=new_key, max_retries=0)
        assert served.chat.completions.create(model="auto", messages=question).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gateway.url + "/v1", api_key=new_key + "x", max_retries=0
                          ).chat.completions.create(model="auto", messages=question)


@pytest.mark.parametrize("key_id", ["2024", "yes", "team: web", "{x}", "null"])
def test_ponder_key_config_line_keeps_any_id_a_string(tmp_path, key_id):
    """The printed line is pasted into the config: an id that YAML reads as a number, a boolean, a
    mapping or null (or cannot read) must still come back as the id, and the config must load."""
    import subprocess
    import sys

    import yaml

    from gateway.config import load_config

    made = subprocess.run([sys.executable, "-m", "gateway.cli", "key", "--id", key_id], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    config = tmp_path / "gateway.yaml"
    config.write_text("api_keys:\n" + made[-1] + "\n")
    assert yaml.safe_load(config.read_text())["api_keys"][0]["id"] == key_id
    assert load_config(config).api_keys[0].id == key_id
    empty = subprocess.run([sys.executable, "-m", "gateway.cli", "key", "--id", " "], capture_output=True, text=True)
    assert empty.returncode == 2 and "--id must not be empty" in empty.stderr


def test_a_key_out_of_its_month_too_is_told_to_wait_for_the_month_not_midnight(keyed_stack):
    """Day and month caps both spent: midnight frees the day but not the month, so Retry-After is the
    start of next month (UTC), on both paths: a named backend (the reservation refuses) and a routed
    alias (the decision refuses, from what the key has left)."""
    import calendar
    import time

    gateway, _ = keyed_stack
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=MONTH_BUDGET_KEY, max_retries=0)
    question = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.RateLimitError):
        for _ in range(10):
            client.chat.completions.create(model="mock-a", messages=question, max_tokens=5)
    now = time.gmtime()
    next_month = calendar.timegm((now.tm_year + now.tm_mon // 12, now.tm_mon % 12 + 1, 1, 0, 0, 0, 0, 0, 0))
    for model in ("mock-a", "auto"):
        with pytest.raises(openai.RateLimitError) as spent:
            client.chat.completions.create(model=model, messages=question, max_tokens=5)
        assert spent.value.code == "budget_exhausted"
        assert abs(int(spent.value.response.headers["retry-after"]) - (next_month - time.time())) <= 5, model


def test_a_budget_held_by_requests_in_flight_is_retried_in_a_moment_not_at_midnight(tmp_path):
    """Two holds ($0.065: 25 prompt tokens held, 20 answer tokens) fit the day's $0.15; four requests at
    once against a slow upstream: two are served, two get 429 `budget_held` with Retry-After 1, since
    only holds that settle in a moment stand in the way (not 429 `budget_exhausted` with Retry-After at
    midnight, which an SDK takes as "give up"). After they settle at their actual cost, the key is
    served again."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 1000, "output_per_mtok": 2000}),
                         mock_backend("mock-b", mock)],
            "policy": policy(tmp_path),
            "api_keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "budget_usd_per_day": 0.15}],
    }, name="held")) as gateway:
        control(mock, delay_ms=800)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        question = [{"role": "user", "content": "Who wrote Hamlet?"}]

        def ask(_):
            try:
                return client.chat.completions.with_raw_response.create(model="mock-a", messages=question,
                                                                        max_tokens=20).parse()
            except openai.RateLimitError as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(ask, range(4)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        served = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(served) == 2 and len(refused) == 2, outcomes
        for exc in refused:
            assert exc.code == "budget_held" and exc.response.headers["retry-after"] == "1"
        control(mock, delay_ms=0)
        assert client.chat.completions.create(model="mock-a", messages=question, max_tokens=20).choices


def test_a_costly_fallback_does_not_lock_a_key_out_of_what_it_has_left(tmp_path):
    """A cheap arm wins; a 5-sample vote is eligible as its fallback by its expected cost, but its worst
    case (5 samples with the reasoning instruction, each writing max_tokens) is more than the key's
    whole day. The hold covers the arms that may answer: the fallback that cannot fit goes, and the
    key spends its day on the cheap arm instead of getting 400 over_budget_cap (then 429 all day)."""
    import hashlib

    path = write_policy(tmp_path, {
        "name": "thrifty",
        "arms": {"cheap": {"backend": "mock-a", "prior": 0.9},
                 "vote": {"backend": "mock-a", "strategy": "self_consistency", "n": 5, "prior": 0.5}},
        "routes": [{"name": "all", "candidates": ["cheap", "vote"]}],
        "exploration": {"share": 0.0},
    }, "thrifty.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 1000, "output_per_mtok": 2000})],
            "policy": path,
            "api_keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "budget_usd_per_day": 0.3},
                         {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}],
    }, name="thrifty")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        question = [{"role": "user", "content": "Who wrote Hamlet?"}]
        served = []
        with pytest.raises(openai.RateLimitError) as spent:
            for _ in range(40):
                served.append(client.chat.completions.create(model="auto", messages=question, max_tokens=20))
        assert spent.value.code == "budget_exhausted"
        assert served and {c.ponder["arm"] for c in served} == {"mock-a/-/single/1"}
        cost = sum(c.ponder["cost_usd"] for c in served)
        # the day's money is spent, up to less than one request's hold ($0.025 for the prompt's 17 bytes
        # and 8 template tokens, $0.04 for 20 answer tokens)
        assert 0.3 - 0.065 < cost <= 0.3
        day = httpx.get(gateway.url + "/v1/ponder/spend", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert abs(next(k for k in day["keys"] if k["key_id"] == "k")["spent"]["day"] - cost) < 1e-9


def test_basic_format_backend_gets_messages_it_can_take(keyed_stack):
    gateway, mock = keyed_stack
    reset(mock)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    messages = TODAYS_CHAT_MESSAGES
    client.chat.completions.create(model="mock-text", messages=messages)
    sent = calls(mock)["bodies"][-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[1]["content"] == "What is 2 + 3?\nUse f." and sent[2]["content"] == ""
    assert sent[2]["tool_calls"] == messages[2]["tool_calls"]
    client.chat.completions.create(model="mock-a", messages=messages)  # today's format goes as it is
    assert calls(mock)["bodies"][-1]["messages"] == messages

    sent_before = len(calls(mock)["bodies"])
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock-text", messages=[{"role": "user", "content": image}],
                                           stream=stream)
        assert refused.value.code == "unsupported_content" and "image_url" in refused.value.message
    assert len(calls(mock)["bodies"]) == sent_before  # refused here, not sent


@pytest.mark.parametrize("stream", [False, True])
def test_basic_format_backend_gets_a_kept_history_and_its_output_limit(keyed_stack, stream):
    """An app that keeps the assistant's turn as the SDK dumps it sends `"tool_calls": null` (and
    `function_call`, `audio`, ...), and today's SDK limits output with max_completion_tokens: a basic
    server (llama-cpp-python) fails on the first with a 500 and ignores the second, writing on."""
    gateway, mock = keyed_stack
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    first = client.chat.completions.create(model="mock-text", messages=[{"role": "user", "content": "Say hi."}])
    history = [{"role": "user", "content": "Say hi."}, first.choices[0].message.model_dump(),
               {"role": "user", "content": "Again."}]
    assert history[1]["tool_calls"] is None  # what the SDK gives the app to keep
    reset(mock)
    answer = client.chat.completions.create(model="mock-text", messages=history, max_completion_tokens=7,
                                            stream=stream)
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    sent = calls(mock)["bodies"][-1]
    assert sent["messages"][1] == {"role": "assistant", "content": first.choices[0].message.content}
    assert sent["max_tokens"] == 7 and "max_completion_tokens" not in sent


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("tools, tool_choice, sent_choice", [
    ([_tool("get_weather")], "required", {"type": "function", "function": {"name": "get_weather"}}),
    # two tools: naming one would force the one the model may not have chosen
    ([_tool("get_weather"), _tool("get_time")], "required", "required"),
    ([_tool("get_weather")], "auto", "auto"),
    ([_tool("get_weather")], "none", "none"),
])
def test_basic_format_backend_gets_a_required_tool_call_as_the_one_tool_named(keyed_stack, tools, tool_choice,
                                                                              sent_choice):
    """A basic server (llama-cpp-python) ignores `tool_choice: "required"` but forces a named tool: with
    one tool, that tool is named; any other choice, or more tools, goes as the client sent it."""
    gateway, mock = keyed_stack
    reset(mock)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    client.chat.completions.create(model="mock-text", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                   tools=tools, tool_choice=tool_choice)
    assert calls(mock)["bodies"][-1]["tool_choice"] == sent_choice


def test_n_without_upstream_n_draws_distinct_seeded_samples(keyed_stack):
    gateway, mock = keyed_stack
    reset(mock)
    control(mock, answers=["a", "b", "c"])
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    completion = client.chat.completions.create(model="mock-text", messages=[{"role": "user", "content": "x"}],
                                                n=3, seed=7, temperature=0.9)
    bodies = calls(mock)["bodies"]
    assert len(bodies) == 3 and all("n" not in b for b in bodies)
    # one client seed for three separate calls would give three copies of one answer
    assert sorted(b["seed"] for b in bodies) == [7, 8, 9]
    assert len(completion.choices) == 3 and completion.usage.completion_tokens == 3


def timings(header: str) -> dict[str, float]:
    """Server-Timing entries as {name: ms}."""
    out = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        out[name] = next(float(p[4:]) for p in params if p.startswith("dur="))
    return out


def test_server_timing_says_where_the_time_went(keyed_stack):
    gateway, mock = keyed_stack
    control(mock, delay_ms=60)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "What is 12 * 7?"}])
        steps = timings(raw.headers["server-timing"])
        assert set(steps) == {"classify", "decide", "upstream", "execute", "total"}
        assert 60 <= steps["upstream"] <= steps["execute"] <= steps["total"]
        assert steps["classify"] > 0 and steps["decide"] > 0
        assert steps["classify"] + steps["decide"] + steps["execute"] <= steps["total"]

        with client.chat.completions.with_streaming_response.create(
                model="mock-a", messages=[{"role": "user", "content": "x"}], stream=True) as streamed:
            steps = timings(streamed.headers["server-timing"])
            assert list(streamed.iter_lines())
        # a relayed stream's headers leave at its first chunk: no finished call to sum yet
        assert set(steps) == {"classify", "decide", "execute", "total"} and steps["execute"] >= 60
    finally:
        control(mock, delay_ms=0)


def test_server_timing_is_off_by_default(client):
    raw = client.chat.completions.with_raw_response.create(model="mock-a", messages=[{"role": "user", "content": "x"}])
    assert "server-timing" not in raw.headers


@pytest.mark.parametrize("config,says", [
    ({"policy": "/nonexistent/policy.yaml"}, "cannot read the file"),
    ({"classifier": "/nonexistent/artifact"}, "cannot load classifier"),
    ({"backends": [{"name": "a", "model": "openai/a", "api_bse": "http://x"}]},
     "backends[0].api_bse: unknown key `api_bse`; did you mean `api_base`?"),
    ({"backends": [{"name": "a", "model": "openai/a", "prices": {"input_per_mtok": float("inf"),
                                                               "output_per_mtok": 1}}]}, "finite number"),
    # a policy file given as the config: said so, not "name: Extra inputs are not permitted; arms: ..."
    ({"name": "p", "arms": {"a": {"backend": "local"}}, "routes": [{"name": "all", "candidates": ["a"]}]},
     "this is a policy, not a gateway config"),
])
def test_serve_refuses_a_bad_config_in_one_line(tmp_path, config, says):
    """Before any server starts: exit 2 and what is wrong, not a lifespan traceback."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "ponder.yaml"
    path.write_text(yaml.safe_dump({"local_model": {"enabled": False}, **config}))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", "9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def _serve(*argv: str, config: dict | None = None, tmp_path=None):
    """`ponder serve` in a subprocess that must give up before a server starts."""
    import subprocess
    import sys

    import yaml

    args = [sys.executable, "-m", "gateway.cli", "serve", *argv]
    if config is not None:
        path = tmp_path / "ponder.yaml"
        path.write_text(yaml.safe_dump({"local_model": {"enabled": False}, **config}))
        args += ["--config", str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text,says", [
    # a misspelt key: its file, line and key path, the key it likely meant and every key allowed there
    ("local_model: {enabled: false}\ntelemetry:\n  redis_ulr: redis://127.0.0.1:6379/0\n",
     "ponder.yaml:3: telemetry.redis_ulr: unknown key `redis_ulr`; did you mean `redis_url`? expected one of: "
     "redis_url, data_dir"),
    # YAML keeps the last of two equal keys: the first was ignored unsaid
    ("local_model: {enabled: false}\nmax_n: 4\nmax_n: 8\n", "ponder.yaml:3: max_n: key `max_n` appears twice"),
    # served by name: the second silently replaced the first
    ("local_model: {enabled: false}\nbackends:\n  - {name: a, model: openai/gpt-4.1-mini}\n"
     "  - {name: a, model: openai/gpt-4o}\n", "ponder.yaml:2: backends: backend `a` is declared more than once"),
    # a provider's model litellm does not price was billed $0: budgets and cost caps never held
    ("local_model: {enabled: false}\nbackends:\n  - {name: a, model: anthropic/claude-sonnet-9}\n",
     "ponder.yaml:2: backends: backends[0] `a`: litellm's cost map has no price for `anthropic/claude-sonnet-9`"),
    # the key itself where its variable's name goes: refused, and not written out (it was, in a warning)
    ("local_model: {enabled: false}\nbackends:\n  - {name: a, model: openai/gpt-4.1-mini, api_key_env: sk-secret-raw-key}\n",
     "ponder.yaml:3: backends[0].api_key_env: not a variable's name"),
    # kept as text, the variable was looked for as a folder named `$PONDER_TEST_UNSET_DIR`
    ("local_model: {enabled: false}\npolicy: $PONDER_TEST_UNSET_DIR/p.yaml\n",
     "ponder.yaml:2: policy: $PONDER_TEST_UNSET_DIR is not set in the environment"),
    ("- policy: local.yaml\n", "ponder.yaml:1: expected a mapping of config keys (backends, local_model, policy, "
                                "extra_policies, ...); got a list"),
    ("local_model:\n\tenabled: false\n", "(a tab: YAML takes spaces only) (line 2, column 1)"),
    # a raw key pasted where its sha256 goes is refused without being repeated (stderr lands in logs)
    ("local_model: {enabled: false}\napi_keys:\n  - {id: a, sha256: sk-secret-raw-key}\n",
     "ponder.yaml:3: api_keys[0].sha256: String should match pattern '^[0-9a-f]{64}$' (got a str)"),
])
def test_serve_refuses_a_config_mistake_naming_its_line_and_key(tmp_path, text, says):
    """A bad config said `polcy: Extra inputs are not permitted`: no line, nothing of what was meant or
    allowed; two equal keys and two backends of one name loaded, the last winning; a file holding a list
    said `: Input should be a valid dictionary or instance of GatewayConfig`."""
    import subprocess
    import sys

    path = tmp_path / "ponder.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", "9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"ponder: bad config: {tmp_path}/"), done.stderr
    assert says in done.stderr, done.stderr
    assert "sk-secret-raw-key" not in done.stderr


@pytest.mark.parametrize("flags,says", [
    (["--port", "99999"], "--port: 99999 is not a port (0-65535)"),
    (["--port", "-5"], "--port: -5 is not a port (0-65535)"),
    (["--port", "http"], "--port: 'http' is not a port (0-65535)"),
    (["--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
])
def test_serve_refuses_a_bad_flag_before_starting(flags, says):
    done = _serve(*flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1]  # argparse's usage line, then what is wrong


def test_serve_refuses_api_keys_that_are_ambiguous(tmp_path):
    """One sha256 listed under two ids was admitted as whichever came last (an admin or not); one id's
    keys (a rotation) share its budget counters, so they must say the same budget."""
    import hashlib

    digest = hashlib.sha256(b"the key").hexdigest()
    twice = [{"id": "a", "sha256": digest}, {"id": "ops", "sha256": digest, "admin": True}]
    done = _serve("--port", "9", config={"api_keys": twice}, tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "keys `a` and `ops` have the same sha256" in done.stderr
    rotation = [{"id": "a", "sha256": digest, "budget_usd_per_day": 5},
                {"id": "a", "sha256": hashlib.sha256(b"new").hexdigest(), "budget_usd_per_day": 50}]
    done = _serve("--port", "9", config={"api_keys": rotation}, tmp_path=tmp_path)
    assert done.returncode == 2 and "the keys of id `a` differ in admin, budgets or limits" in done.stderr


def test_serve_refuses_a_data_dir_it_cannot_create(tmp_path):
    done = _serve("--port", "9", config={"telemetry": {"data_dir": "/proc/forbidden"}}, tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["ponder: bad config: telemetry.data_dir: "
                                                "cannot create /proc/forbidden or write in it (No such file or directory)"]


def test_serve_refuses_a_data_dir_another_gateway_holds(tmp_path):
    """Another running gateway holds the data dir's lock: this one says so instead of a lifespan traceback,
    and the check leaves no lock behind (the dir is usable once the other one is gone)."""
    import fcntl
    import os

    data = tmp_path / "data"
    data.mkdir()
    held = os.open(data / "telemetry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running gateway's embedded store holds
    try:
        done = _serve("--port", "9", config={"telemetry": {"data_dir": str(data)}}, tmp_path=tmp_path)
    finally:
        os.close(held)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ponder: bad config: telemetry.data_dir: {data} is in use by another Ponder store (telemetry.lock)"]


def test_data_dir_check_releases_the_lock_and_skips_it_with_redis(tmp_path):
    from gateway.config import ConfigError, GatewayConfig
    from gateway.service import Gateway
    from telemetry.embedded_store import EmbeddedStore

    data = tmp_path / "new" / "data"
    Gateway.check(GatewayConfig(local_model={"enabled": False}, telemetry={"data_dir": str(data)}))
    store = EmbeddedStore(data, stream_maxlen=10, refresh_s=1.0, buffer_max=10, decay_half_life_s=None,
                          feedback_window_s=60.0)
    store._open_db()  # the real start takes the lock the check took and let go
    try:
        with pytest.raises(ConfigError, match="in use by another Ponder store"):
            Gateway.check(GatewayConfig(local_model={"enabled": False}, telemetry={"data_dir": str(data)}))
    finally:
        store._close_db()
    # with Redis the data dir is never used, so it is not checked
    Gateway.check(GatewayConfig(local_model={"enabled": False},
                                telemetry={"redis_url": "redis://127.0.0.1:1/0", "data_dir": "/proc/forbidden"}))


def test_serve_refuses_a_redis_url_that_does_not_parse_without_quoting_its_password(tmp_path):
    """A password with a `/` written raw in redis_url was read as the port: the lifespan traceback ended in
    `Port could not be cast to integer value as 's3cr3t'`, a piece of the password, in the gateway's log."""
    done = _serve("--port", "9", config={"telemetry": {"redis_url": "redis://ponder:s3cr3t/Tail@127.0.0.1:6379/0"}},
                  tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad config" in done.stderr and "telemetry.redis_url is not a Redis URL" in done.stderr
    assert "s3cr3t" not in done.stderr and "Tail" not in done.stderr


def test_a_config_that_is_no_yaml_is_refused_without_quoting_its_lines(tmp_path):
    """PyYAML's message quotes the line it stopped at: a redis_url whose password holds a quote (or `#`,
    or `: `) broke the YAML on that very line, and `ponder serve` printed the password in its refusal."""
    config = tmp_path / "ponder.yaml"
    config.write_text('local_model: {enabled: false}\ntelemetry:\n  redis_url: "redis://:s3cr3t"Tail@127.0.0.1:6379/0"\n')
    done = _serve("--port", "9", "--config", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad config" in done.stderr and "YAML syntax error: " in done.stderr and "(line 3, column" in done.stderr, done.stderr
    assert "s3cr3t" not in done.stderr and "Tail" not in done.stderr, done.stderr


def test_serve_refuses_a_redis_url_whose_database_is_not_a_number(tmp_path):
    """redis-py reads `/abc` after host:port as no database at all: the gateway wrote to db 0, beside
    whatever else lives there, without a word. A bad config, that quotes nothing of the URL."""
    done = _serve("--port", "9", config={"telemetry": {"redis_url": "redis://ponder:s3cr3t@127.0.0.1:6379/abc"}},
                  tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad config" in done.stderr and "the database after host:port must be a number" in done.stderr
    assert "s3cr3t" not in done.stderr and "abc" not in done.stderr


def test_serve_refuses_a_redis_url_naming_two_databases(tmp_path):
    """redis-py takes `?db=5` over the path's `/0`, and docs/deploy.md says the path's number is the
    database: the gateway wrote to db 5 without a word. Named twice, differently: a bad config, quoting
    nothing of the URL; named twice alike, the one database."""
    from gateway.config import load_config

    done = _serve("--port", "9", tmp_path=tmp_path,
                  config={"telemetry": {"redis_url": "redis://ponder:s3cr3t@127.0.0.1:6379/0?db=5"}})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad config" in done.stderr and "names the database twice, differently" in done.stderr
    assert "s3cr3t" not in done.stderr and "db=5" not in done.stderr
    config = tmp_path / "same.yaml"
    config.write_text("telemetry: {redis_url: 'redis://127.0.0.1:6379/3?db=3'}\n")
    assert load_config(config).telemetry.redis_url.endswith("/3?db=3")


def test_serve_refuses_a_redis_url_naming_an_unset_variable(tmp_path, monkeypatch):
    """An unset `${REDIS_PASSWORD}` stayed in the URL as text and was sent as the password: the gateway
    started without its store and said only "invalid username-password pair". A bad config naming the
    variable, not the values of those that are set."""
    monkeypatch.delenv("PONDER_TEST_UNSET_PASSWORD", raising=False)
    monkeypatch.setenv("PONDER_TEST_REDIS_USER", "s3cr3t-user")
    done = _serve("--port", "9", tmp_path=tmp_path, config={"telemetry": {
        "redis_url": "redis://${PONDER_TEST_REDIS_USER}:${PONDER_TEST_UNSET_PASSWORD}@127.0.0.1:6379/0"}})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad config" in done.stderr and "$PONDER_TEST_UNSET_PASSWORD is not set" in done.stderr
    assert "PONDER_TEST_REDIS_USER" not in done.stderr and "s3cr3t-user" not in done.stderr


def test_a_redis_password_from_the_environment_is_used_as_it_is(tmp_path, redis_server):
    """`redis://user:${REDIS_PASSWORD}@host` keeps the secret out of the file; a generated password (base64:
    / + =) was expanded raw into the URL, which then did not parse (the gateway did not start). It is
    percent-encoded as it is expanded: the gateway logs in as that user, writes its events, and the
    password is nowhere in its log or on /readyz."""
    import redis

    secret = "s3cr3t/Pa+ss=word"
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "envpw", "reset", "on", f">{secret}", "~*", "&*", "+@all", "-@dangerous")
    try:
        with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
                "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)], "policy": policy(tmp_path),
                "telemetry": {"redis_url": f"redis://envpw:${{PONDER_TEST_REDIS_PASSWORD}}@127.0.0.1:{redis_server.port}/7",
                              "refresh_s": 0.2}},
                env={"PONDER_TEST_REDIS_PASSWORD": secret})) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What is 2+2?"}])
            deadline = time.monotonic() + 10
            while (store := httpx.get(gateway.url + "/readyz").json()["store"])["written"] < 1:
                assert time.monotonic() < deadline, store
                time.sleep(0.05)
            assert store["connected"] and store["last_error"] is None
            with redis.Redis(port=redis_server.port, db=7) as db7:  # the URL's db index, as the user
                assert db7.xlen("ponder:{events}:stream") >= 1
            assert secret not in httpx.get(gateway.url + "/readyz").text and secret not in gateway.log()
    finally:
        admin.execute_command("ACL", "DELUSER", "envpw")
        admin.close()


def test_telemetry_retention_is_set_in_the_gateway_config(tmp_path):
    """docs/deploy.md tells operators with heavy traffic to lower `feedback_window_s` (the per-request
    records dominate Redis memory) and the stream holds `stream_maxlen` events: both are config keys, and
    the store keeps to them (feedback after the window is 410 expired; only the newest events are kept)."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)], "policy": policy(tmp_path),
            "telemetry": {"data_dir": str(tmp_path / "data"), "feedback_window_s": 1, "stream_maxlen": 5}},
            name="retention")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "x"}]
        ids = [client.chat.completions.create(model="mock-a", messages=question).id for _ in range(8)]
        assert httpx.post(gateway.url + "/v1/feedback", json={"request_id": ids[-1], "score": 1}).status_code == 200
        time.sleep(1.2)
        late = httpx.post(gateway.url + "/v1/feedback", json={"request_id": ids[-2], "score": 1})
        assert late.status_code == 410 and late.json()["error"]["code"] == "expired"
        kept = httpx.get(gateway.url + "/v1/ponder/requests", params={"limit": 100}).json()["requests"]
        assert [row["request_id"] for row in kept] == ids[::-1][:5]


def test_policy_hot_reload_keeps_serving_through_a_broken_edit(tmp_path):
    import time

    import yaml

    def routed_to(url: str) -> str:
        response = httpx.post(url + "/v1/chat/completions",
                              json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})
        assert response.status_code == 200, response.text
        return response.headers["x-ponder-arm"].split("/")[0]

    def wait_for(url: str, backend: str) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if routed_to(url) == backend:
                return True
            time.sleep(0.2)
        return False

    spec = {"name": "reloading",
            "arms": {"cheap": {"backend": "mock-a"}, "strong": {"backend": "mock-b"}},
            "routes": [{"name": "all", "candidates": ["cheap"]}], "exploration": {"share": 0.0}}
    path = write_policy(tmp_path, spec, "reloading.yaml")
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                              "policy": path}, name="reload")) as gateway:
            assert routed_to(gateway.url) == "mock-a"
            spec["routes"][0]["candidates"] = ["strong"]
            (tmp_path / "reloading.yaml").write_text(yaml.safe_dump(spec))
            assert wait_for_rejected_policies(gateway.url, "mock-b")
            (tmp_path / "reloading.yaml").write_text("name: reloading\narms: {cheap: {backend: nowhere}}\nroutes: [")
            time.sleep(2.5)  # more than one reload poll
            assert all(routed_to(gateway.url) == "mock-b" for _ in range(5))  # the previous policy serves
            assert "policy reload rejected" in gateway.log()
            # and /metrics says so, for an alert: the file on disk is not what serves
            assert 'ponder_policy_reload_rejected{policy="reloading"} 1.0' in httpx.get(gateway.url + "/metrics").text
            # a reload that declares a new backend inline: its arm is chosen and served by it
            spec["backends"] = [mock_backend("inline-c", mock)]
            spec["arms"]["fresh"] = {"backend": "inline-c"}
            spec["routes"][0]["candidates"] = ["fresh"]
            (tmp_path / "reloading.yaml").write_text(yaml.safe_dump(spec))
            assert wait_for_rejected_policies(gateway.url, "inline-c")
            assert 'ponder_policy_reload_rejected{policy="reloading"} 0.0' in httpx.get(gateway.url + "/metrics").text
            # ... and a reload that removes it: a request on it in flight is answered, later ones are not
            # sent to it (it stayed listed and callable by name, at its cost, after the operator removed it)
            control(mock, delay_ms=2500)
            direct = {"model": "inline-c", "messages": [{"role": "user", "content": "hello"}]}
            in_flight: list[httpx.Response] = []
            sender = threading.Thread(target=lambda: in_flight.append(
                httpx.post(gateway.url + "/v1/chat/completions", json=direct, timeout=30)))
            sender.start()
            time.sleep(0.5)
            del spec["backends"], spec["arms"]["fresh"]
            spec["routes"][0]["candidates"] = ["strong"]
            (tmp_path / "reloading.yaml").write_text(yaml.safe_dump(spec))
            sender.join()
            control(mock, delay_ms=0)
            assert in_flight[0].status_code == 200, in_flight[0].text
            assert wait_for_rejected_policies(gateway.url, "mock-b")
            models = [m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]]
            assert "inline-c" not in models and {"mock-a", "mock-b"} <= set(models)
            gone = httpx.post(gateway.url + "/v1/chat/completions", json=direct)
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def rejected_policies(url: str) -> dict[str, str]:
    """The gateway's ponder_policy_reload_rejected series: policy -> value."""
    text = httpx.get(url + "/metrics").text
    return {line.split('"')[1]: line.rsplit(" ", 1)[1] for line in text.splitlines()
            if line.startswith("ponder_policy_reload_rejected{")}


def wait_for_rejected_policies(url: str, expected: dict[str, str]) -> dict[str, str]:
    """The series once they read `expected`, or as they read after 10 s."""
    deadline = time.monotonic() + 10
    while (seen := rejected_policies(url)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


def test_a_policy_renamed_by_the_edit_that_fixes_it_leaves_no_rejection_alert(tmp_path):
    """A broken edit sets ponder_policy_reload_rejected{policy=OLD} to 1; the edit that fixes it also
    renames the policy: OLD is served no more, and its series must not stay at 1 (an alert firing forever)."""
    import yaml

    spec = {"name": "before", "backends": [{"name": "b", "model": "openai/b", "api_base": "http://127.0.0.1:9/v1"}],
            "arms": {"one": {"backend": "b"}}, "routes": [{"name": "all", "candidates": ["one"]}]}
    path = write_policy(tmp_path, spec, "renamed.yaml")
    with running(start_gateway(tmp_path, {"policy": path}, name="rename")) as gateway:
        assert rejected_policies(gateway.url) == {"before": "0.0"}
        (tmp_path / "renamed.yaml").write_text("name: before\nroutes: [")
        assert wait_for_rejected_policies(gateway.url, {"before": "1.0"}) == {"before": "1.0"}
        (tmp_path / "renamed.yaml").write_text(yaml.safe_dump({**spec, "name": "after"}))
        assert wait_for_rejected_policies(gateway.url, {"after": "0.0"}) == {"after": "0.0"}


def test_a_configmap_swap_reloads_the_policy_and_requests_in_flight_finish_on_the_old_one(tmp_path):
    """Kubernetes mounts a ConfigMap as `policy.yaml -> ..data/policy.yaml`, `..data -> ..<timestamp>/`,
    and updates it by writing a new timestamped folder and renaming a new `..data` link over the old one.
    The poll compared the file's mtime: a new file with the old one's mtime (written in the same tick of
    the file clock, or restored with it) was never served. A request in flight during the swap finishes
    on the policy it was planned with."""
    import os
    import time

    import yaml

    spec = {"name": "mounted", "arms": {"cheap": {"backend": "mock-a"}, "strong": {"backend": "mock-b"}},
            "routes": [{"name": "all", "candidates": ["cheap"]}], "exploration": {"share": 0.0}}
    mount = tmp_path / "policies"
    (mount / "..2026_01").mkdir(parents=True)
    (mount / "..2026_01" / "policy.yaml").write_text(yaml.safe_dump(spec))
    stamp = os.stat(mount / "..2026_01" / "policy.yaml").st_mtime_ns
    os.symlink("..2026_01", mount / "..data")
    os.symlink("..data/policy.yaml", mount / "policy.yaml")
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                              "policy": str(mount / "policy.yaml")}, name="configmap")) as gateway:
            control(mock, delay_ms=2500)
            called = calls(mock)["count"]
            in_flight: list[httpx.Response] = []
            sender = threading.Thread(target=lambda: in_flight.append(
                httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)))
            sender.start()
            deadline = time.monotonic() + 10
            while calls(mock)["count"] == called:  # planned and at the upstream (a fixed 0.5 s: a loaded machine
                assert time.monotonic() < deadline  # had not planned it yet, and it was planned on the new policy)
                time.sleep(0.02)
            spec["routes"][0]["candidates"] = ["strong"]
            (mount / "..2026_02").mkdir()
            (mount / "..2026_02" / "policy.yaml").write_text(yaml.safe_dump(spec))
            os.utime(mount / "..2026_02" / "policy.yaml", ns=(stamp, stamp))
            os.symlink("..2026_02", mount / "..data_tmp")
            os.replace(mount / "..data_tmp", mount / "..data")  # what the kubelet does
            (mount / "..2026_01" / "policy.yaml").unlink()
            (mount / "..2026_01").rmdir()
            sender.join()
            control(mock, delay_ms=0)
            assert in_flight[0].status_code == 200, in_flight[0].text
            assert in_flight[0].headers["x-ponder-arm"].startswith("mock-a")  # planned before the swap
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                arm = httpx.post(gateway.url + "/v1/chat/completions", json=body).headers["x-ponder-arm"]
                if arm.startswith("mock-b"):
                    break
                time.sleep(0.2)
            assert arm.startswith("mock-b"), "the swapped ConfigMap was never served"
            assert 'ponder_policy_reload_rejected{policy="mounted"} 0.0' in httpx.get(gateway.url + "/metrics").text


def test_sighup_rereads_the_policies_and_keeps_serving(tmp_path):
    """`kill -HUP` (systemd's ExecReload) killed the gateway on the spot, a request in flight unanswered.
    It re-reads every policy file now, changed or not."""
    import signal
    import time

    spec = {"name": "hup", "arms": {"cheap": {"backend": "mock-a"}, "strong": {"backend": "mock-b"}},
            "routes": [{"name": "all", "candidates": ["cheap"]}], "exploration": {"share": 0.0}}
    path = tmp_path / "hup.yaml"
    write_policy(tmp_path, spec, "hup.yaml")
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                              "policy": str(path)}, name="hup", log_level="info")) as gateway:
            time.sleep(1.5)  # the poll has looked at the file since the start: an unchanged file, not read again
            assert "reloaded from" not in gateway.log()
            control(mock, delay_ms=1500)
            in_flight: list[httpx.Response] = []
            sender = threading.Thread(target=lambda: in_flight.append(
                httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)))
            sender.start()
            time.sleep(0.5)
            gateway.process.send_signal(signal.SIGHUP)
            sender.join()
            control(mock, delay_ms=0)
            assert in_flight[0].status_code == 200, in_flight[0].text
            assert gateway.process.poll() is None
            answer = httpx.post(gateway.url + "/v1/chat/completions", json=body)
            assert answer.status_code == 200 and answer.headers["x-ponder-arm"].startswith("mock-a")
            assert "SIGHUP: re-reading the policy files" in gateway.log()
            assert f"policy 'hup' reloaded from {path}" in gateway.log()  # read again though unchanged


def test_a_policy_reload_reads_and_compiles_off_the_event_loop(tmp_path):
    """A reload parsed and compiled the edited file on the event loop: every request waited for it
    (~50 ms for policies/multi-provider.yaml, each edit). Here a policy that takes over a second to
    read (2 MB of comments, which the YAML scanner reads a character at a time): while the gateway
    reads its edit, /healthz still answers in a fraction of that; the edit is then served."""
    from policies.backends import BackendSpec
    from policies.loader import load_policy

    spec = {"name": "big", "arms": {"cheap": {"backend": "mock-a"}, "strong": {"backend": "mock-b"}},
            "routes": [{"name": "all", "candidates": ["cheap"]}], "exploration": {"share": 0.0}}
    comments = ("# " + "x" * 98 + "\n") * 20_000
    path = tmp_path / "big.yaml"
    path.write_text(write_policy_text(spec) + comments)
    started = time.perf_counter()  # what a reload costs, read here the way the gateway reads it
    load_policy(path, extra_backends=[BackendSpec(name="mock-a", model="openai/a"),
                                      BackendSpec(name="mock-b", model="openai/b")])
    read_s = time.perf_counter() - started
    assert read_s > 0.5, read_s  # the premise: a reload long enough to see
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                              "policy": str(path)}, name="big", log_level="info")) as gateway:
            slowest, served = 0.0, False
            spec["routes"][0]["candidates"] = ["strong"]
            path.write_text(write_policy_text(spec) + comments)
            deadline = time.monotonic() + 30
            with httpx.Client(timeout=30) as client:
                while time.monotonic() < deadline and "policy 'big' reloaded" not in gateway.log():
                    asked = time.perf_counter()
                    assert client.get(gateway.url + "/healthz").status_code == 200
                    slowest = max(slowest, time.perf_counter() - asked)
                    time.sleep(0.01)
                served = client.post(gateway.url + "/v1/chat/completions", json=body).headers["x-ponder-arm"]
    assert "policy 'big' reloaded" in gateway.log() and served.startswith("mock-b")
    assert slowest < read_s / 4, (slowest, read_s)  # on the loop, one /healthz waited for the whole read


def test_an_edit_of_the_gateway_config_is_said_once_to_need_a_restart(tmp_path):
    """The gateway config is read at start only: an edit of it was ignored without a word (the operator
    believed a new key or budget was in force). The policy poll hashes it too, and logs one WARNING per
    change naming the file; what serves is unchanged until a restart."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
    warning = "changed; the gateway reads it at start only: restart the gateway to apply the change"
    with running(start_mock(tmp_path)) as mock:
        with running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                              "policy": two_mock_policy(tmp_path, "cfg")}, name="cfg")) as gateway:
            [config] = tmp_path.glob("cfg-*.yaml")
            config.write_text(config.read_text() + "max_n: 2\n")

            def warnings() -> list[str]:
                return [line for line in gateway.log().splitlines() if warning in line]

            deadline = time.monotonic() + 10
            while not warnings() and time.monotonic() < deadline:
                time.sleep(0.1)
            [line] = warnings()
            assert "WARNING ponder.config:" in line and str(config) in line
            time.sleep(2.5)  # more polls of the same content: nothing more said
            assert len(warnings()) == 1
            # the config it started with still serves (max_n 16, not the edit's 2)
            answer = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=30)
            assert answer.status_code == 200, answer.text
            config.write_text(config.read_text() + "max_n: 3\n")  # another change: said again
            deadline = time.monotonic() + 10
            while len(warnings()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(warnings()) == 2


def write_policy_text(spec: dict) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)


def test_a_client_that_drops_a_stream_pays_for_what_was_streamed(keyed_stack):
    """The client reads one chunk of a relayed stream and hangs up: the tokens the upstream wrote so
    far are billed (estimated: the upstream's usage comes at the end) and charged to the key's budget,
    the request is recorded as 499 (client closed), and the backend is not marked as failing."""
    gateway, mock = keyed_stack
    reset(mock)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    control(mock, script=["slow_first", "slow_first"], answers=["one two three four five six seven eight"])
    served, rows = set(), []
    for _ in range(2):  # two requests in a row: a failure of each would cool the backend down
        with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                          json={"model": "auto", "messages": [{"role": "user", "content": "count to eight"}],
                                "stream": True}, headers={"authorization": f"Bearer {METERED_KEY}"}) as response:
            request_id = response.headers["x-ponder-request-id"]
            served.add(response.headers["x-ponder-arm"].split("/")[0])
            assert next(response.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 5
        while (detail := httpx.get(f"{gateway.url}/v1/ponder/requests/{request_id}", headers=admin)).status_code != 200:
            assert time.monotonic() < deadline, detail.text
            time.sleep(0.05)
        row, calls_made = detail.json()["request"], detail.json()["execution"]["calls"]
        assert row["status"] == 499 and row["prompt_tokens"] > 0 and row["completion_tokens"] >= 1, row
        # cut short by the client: marked so (not a complete call), but no mark against the backend (below)
        assert len(calls_made) == 1 and not calls_made[0]["ok"], calls_made
        assert calls_made[0]["error"] == "cut off: the client left mid-answer", calls_made
        assert row["cost_usd"] > 0 and row["cost_usd"] == pytest.approx(calls_made[0]["cost_usd"])
        rows.append(row)
    spend = httpx.get(gateway.url + "/v1/ponder/spend", headers=admin).json()
    metered = next(k for k in spend["keys"] if k["key_id"] == "metered")
    assert metered["spent"]["day"] == pytest.approx(sum(r["cost_usd"] for r in rows))  # not settled to $0
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    for backend in served:  # not cooling down: a named backend that is answers 503
        assert client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}]).choices


def test_a_stream_refused_with_a_server_error_is_retried_without_a_probe(client, mock, gw):
    """The non-streaming probe is for a stream the upstream accepted (200) and then dropped (llama-cpp-
    python, for a prompt over its window). An upstream 500 is the backend's failure, whatever the prompt's
    length: it is retried as such, with no extra call, and counts against the backend."""
    control(mock, script=["500"], answers=["fine after all"])
    prompt = "word " * 30  # may be over mock-small's window of 100 (estimates can be 6x under), clearly is not
    chunks = list(client.chat.completions.create(model="mock-small", stream=True,
                                                 messages=[{"role": "user", "content": prompt}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine after all"
    sent = calls(mock)["bodies"]
    assert [body.get("stream") for body in sent] == [True, True]


def test_a_routed_request_refused_for_holds_in_flight_is_retried_in_a_moment(tmp_path):
    """The routed path decides with what the key has left, holds in flight subtracted: with the day held
    by two slow requests, a third to `auto` found no arm that fits, and was told budget_exhausted, retry
    at midnight, do not retry (x-should-retry: false), with most of the day unspent. It gets what the
    direct path gets: 429 `budget_held`, Retry-After 1; and once the holds settle it is served."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    path = write_policy(tmp_path, {
        "name": "one", "arms": {"cheap": {"backend": "mock-a"}},
        "routes": [{"name": "all", "candidates": ["cheap"]}], "exploration": {"share": 0.0},
    }, "one.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 1000, "output_per_mtok": 2000})],
            "policy": path,
            "api_keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "budget_usd_per_day": 0.15}],
    }, name="routed-held")) as gateway:
        control(mock, delay_ms=1500)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        question = [{"role": "user", "content": "Who wrote Hamlet?"}]

        def ask(_=None):
            return client.chat.completions.create(model="auto", messages=question, max_tokens=20)

        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(ask) for _ in range(2)]  # each holds its worst case, $0.065
            time.sleep(0.7)
            with pytest.raises(openai.RateLimitError) as held:
                ask()
            assert held.value.code == "budget_held", held.value.message
            assert held.value.response.headers["retry-after"] == "1"
            assert "x-should-retry" not in held.value.response.headers
            assert all(future.result().choices for future in slow)
        control(mock, delay_ms=0)
        assert ask().choices  # the holds settled at their actual cost, well under the day's $0.15


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_response_format_without_its_object_is_a_400(keyed_stack, stream):
    """What a basic backend is sent is built from `response_format.json_schema`: a string there was a
    500 (AttributeError), and on a relayed stream one never recorded nor settled, its budget hold left
    standing on the key. OpenAI refuses it with a 400 naming the field; so does the gateway."""
    gateway, mock = keyed_stack
    reset(mock)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    for response_format in ({"type": "json_schema", "json_schema": "answer"}, {"type": "json_schema"}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock-text", messages=[{"role": "user", "content": "x"}],
                                           response_format=response_format, stream=stream)
        assert refused.value.code == "invalid_value" and refused.value.param == "response_format"
    assert calls(mock)["count"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_template_kwargs_that_is_not_an_object_is_a_400(client, mock, stream):
    """vLLM's chat_template_kwargs is where an enable_thinking backend's effort is written: sent as a
    string it was a 500 (ValueError), and on a relayed stream an unrecorded one."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="mock-qwen", messages=[{"role": "user", "content": "x"}],
                                       reasoning_effort="high", stream=stream, extra_body={"chat_template_kwargs": "x"})
    assert refused.value.code == "invalid_value" and refused.value.param == "chat_template_kwargs"
    assert calls(mock)["count"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_refusing_its_key_is_replaced_by_a_fallback_arm(tmp_path, stream):
    """A 401 (a revoked key, a key unset in the environment) is about the backend, not the request: not
    retried on that backend, but the request's fallback arms on other backends answer it (only an
    upstream's 400/404/413/422 about the request itself goes to no fallback). A gateway of its own: the
    refusal cools its backend down for 30 s (docs/api.md, "Errors")."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "refused")}, name="refused")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, script=["401"], answers=["served by the fallback"])
        answer = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Who wrote Hamlet?"}], stream=stream)
        assert answer.headers["x-ponder-arm"].startswith("mock-b/")
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in answer.parse() if c.choices) == \
                "served by the fallback"
        else:
            assert answer.parse().choices[0].message.content == "served by the fallback"
        assert [body["model"] for body in calls(mock)["bodies"]] == ["mock-a", "mock-b"]


def test_the_context_probe_asks_for_one_token_in_the_words_the_backend_takes():
    """A stream dropped before its first byte is checked with one non-streamed token. OpenAI's reasoning
    models refuse `max_tokens` with a 400 (it would have read as the prompt's fault)."""
    from gateway.streaming import _probe_body

    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 500, "max_completion_tokens": 400}
    assert _probe_body(body, reasoning=True) == {"model": "m", "messages": [], "max_completion_tokens": 1}
    assert _probe_body(body, reasoning=False) == {"model": "m", "messages": [], "max_tokens": 1}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """A gateway and mock of their own: the tests above leave `mock-a` cooling down in the shared one."""
    tmp = tmp_path_factory.mktemp("own")
    with running(start_mock(tmp)) as mock:
        with running(start_gateway(tmp, {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                                         "policy": two_mock_policy(tmp, "own")}, name="own")) as gateway:
            yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0), mock


def test_an_answer_in_content_parts_reads_as_text(own_stack):
    """Mistral's reasoning models answer `content` as a list of parts (thinking, then text). Clients
    (the SDK types content as a string) get the text, with the thinking as `reasoning_content`; the
    strategies read text too: a single arm's confidence and a vote raised a TypeError (a 500)."""
    client, mock = own_stack
    parts = {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "six times seven"}]},
                         {"type": "text", "text": "The answer is 42."}]}
    control(mock, answers=[parts])
    single = client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "6 * 7?"}])
    assert single.choices[0].message.content == "The answer is 42."
    assert single.choices[0].message.model_extra["reasoning_content"] == "six times seven"
    voted = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "6 * 7?"}],
                                           extra_headers={"x-ponder-strategy": "self_consistency"})
    assert voted.choices[0].message.content == "The answer is 42."
    assert voted.model_extra["ponder"]["samples"] >= 2


def test_a_stream_in_content_parts_reads_as_text(own_stack):
    """Mistral's reasoning models stream `delta.content` as a list of parts too. Relayed as it came, the
    chat stream's clients got a list where the SDK types a string, and the Responses API's stream broke
    after its headers (a TypeError in its translation: the SDK's connection error, nothing answered)."""
    client, mock = own_stack
    parts = {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "six times seven"}]},
                         {"type": "text", "text": "The answer is 42."}]}
    control(mock, answers=[parts])
    chunks = [c for c in client.chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "6 * 7?"}], stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The answer is 42."
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == "six times seven"
    events = list(client.responses.create(model="mock-a", input="6 * 7?", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "The answer is 42."


def test_an_answer_without_choices_is_a_failed_call(own_stack):
    """A 200 with `choices: []` (some servers answer so under load) reached the client as a 200 with no
    choices: `choices[0]` raised in the app. A routed request goes to its next arm; a named backend
    answers 502, which the SDKs retry."""
    client, mock = own_stack
    reset(mock)
    control(mock, script=["empty"])
    routed = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello there"}])
    assert routed.parse().choices[0].message.content
    assert calls(mock)["count"] == 2  # the empty answer, then the fallback's
    control(mock, script=["empty"])
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hello there"}])
    assert failed.value.status_code == 502 and "no choices" in failed.value.message


def test_an_effort_between_two_declared_levels_goes_to_the_cheaper_but_not_to_none():
    """`minimal` on a backend declaring none, low, medium, high (Gemini's knobs) was sent as none: a
    tie, taken in list order, turned off the thinking the client asked a little of."""
    from gateway.effort import effective_effort
    from policies.backends import BackendSpec

    gemini = BackendSpec(name="flash", model="gemini/gemini-2.5-flash", reasoning=True,
                         efforts=["none", "low", "medium", "high"])
    assert effective_effort(gemini, "minimal") == "low"
    assert effective_effort(gemini, "none") == "none"
    o_series = BackendSpec(name="o", model="openai/o4-mini", reasoning=True, efforts=["low", "high"])
    assert effective_effort(o_series, "medium") == "low"  # a tie between two levels: the cheaper


def test_a_backend_outage_is_logged_once_when_it_begins_and_once_when_it_ends(tmp_path):
    """A backend failing for minutes left nothing in the log (every request answered 502 or 503, the
    operator saw no line why): one WARNING when it is first cooled down, with the upstream's status but
    not its message (which may quote the prompt), and one when it answers again; none per request."""
    with running(start_mock(tmp_path)) as mock, \
            running(start_gateway(tmp_path, {"backends": [mock_backend("mock-a", mock, max_retries=0),
                                                          mock_backend("mock-b", mock)],
                                             "policy": two_mock_policy(tmp_path, "outage")})) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, script=["500"] * 3)  # cooled down 1 s, then 2 s
        failed = 0
        deadline = time.monotonic() + 10
        while calls(mock)["count"] < 3 and time.monotonic() < deadline:  # through its cool-downs
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "SECRET-PROMPT"}])
            failed += 1
            time.sleep(0.2)
        assert calls(mock)["count"] == 3
        while True:  # its last cool-down runs out: it answers again
            try:
                client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
                break
            except openai.APIStatusError:
                failed += 1
                time.sleep(0.2)
        gateway.stop()
        log = gateway.log()
    assert failed > 3  # the outage's requests: some refused while it cooled down
    assert log.count("backend mock-a is failing (HTTP 500)") == 1, log
    assert log.count("backend mock-a answers again, after") == 1, log
    assert "SECRET-PROMPT" not in log


def test_a_reload_that_removes_a_backend_spares_the_requests_already_planned_on_it(tmp_path):
    """A policy reload removes an inline backend while a request planned on it awaits its budget hold
    (the store: a Redis round trip, or slow): the request took the backends on offer only after the
    hold, found its backend gone, and got a 503 `backend_missing`, chat and embeddings alike. A request
    keeps the backends it was planned with. The reload is forced inside the hold, not left to timing."""
    import asyncio

    import yaml

    from gateway.app import create_app
    from gateway.config import GatewayConfig, hash_key

    with running(start_mock(tmp_path)) as mock:
        spec = {"name": "reloading", "backends": [mock_backend("inline-c", mock)],
                "arms": {"fresh": {"backend": "inline-c"}}, "routes": [{"name": "all", "candidates": ["fresh"]}],
                "exploration": {"share": 0.0}}
        path = tmp_path / "reloading.yaml"
        path.write_text(yaml.safe_dump(spec))
        config = GatewayConfig.model_validate({
            "backends": [mock_backend("mock-a", mock)], "policy": str(path), "local_model": {"enabled": False},
            "api_keys": [{"id": "capped", "sha256": hash_key("sk-capped"), "budget_usd_per_day": 10.0}],
            "telemetry": {"data_dir": str(tmp_path / "data")}})

        MESSAGES = [{"role": "user", "content": "hello"}]

        async def main() -> list[httpx.Response]:
            app = create_app(config)
            gw = app.state.gateway
            await gw.start()
            try:
                hold = gw.budgets.hold

                async def hold_then_reload(*args, **kwargs):
                    held = await hold(*args, **kwargs)
                    path.write_text(yaml.safe_dump({**spec, "backends": [], "arms": {"fresh": {"backend": "mock-a"}}}))
                    await gw._reload_policies(force=True)  # the inline backend is no longer on offer
                    return held

                gw.budgets.hold = hold_then_reload
                headers = {"Authorization": "Bearer sk-capped"}
                answers = []
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                             headers=headers, timeout=30) as client:
                    for url, body in (("/v1/chat/completions", {"model": "auto", "messages": MESSAGES}),
                                      ("/v1/chat/completions", {"model": "inline-c", "messages": MESSAGES}),
                                      ("/v1/embeddings", {"model": "inline-c", "input": "hello"})):
                        path.write_text(yaml.safe_dump(spec))
                        await gw._reload_policies(force=True)  # inline-c on offer as the request starts
                        answers.append(await client.post(url, json=body))
                    return answers
            finally:
                await gw.close()

        routed, named, embedded = asyncio.run(main())
        assert routed.status_code == 200, routed.text
        assert routed.headers["x-ponder-arm"].startswith("inline-c/")
        assert named.status_code == 200, named.text
        assert embedded.status_code == 200, embedded.text


def test_while_serving_what_startup_built_is_frozen_out_of_the_garbage_collector(tmp_path):
    """Startup builds objects that live as long as the process (the classifier, the policies, litellm's
    modules where a backend needs them): every full collection of the cyclic garbage collector walked
    all of them (30 ms of CPU, 200 ms with litellm loaded: a stall of every request in flight), and
    Python's young generation of 700 objects was crossed every few requests by 16 in flight. Frozen
    and a young generation of 10,000 while serving; both undone at shutdown."""
    import asyncio
    import gc

    from gateway.app import YOUNG_GC_THRESHOLD, create_app
    from gateway.config import GatewayConfig

    config = GatewayConfig.model_validate({
        "backends": [{"name": "m", "model": "openai/m", "api_base": "http://127.0.0.1:9/v1"}],
        "local_model": {"enabled": False}, "telemetry": {"data_dir": str(tmp_path / "data")}})
    app = create_app(config)
    threshold = gc.get_threshold()

    async def serving() -> tuple[int, tuple[int, ...], bool]:
        async with app.router.lifespan_context(app):
            classifier = app.state.gateway.classifier
            walked = any(obj is classifier for obj in gc.get_objects())  # what a full collection walks
            return gc.get_freeze_count(), gc.get_threshold(), walked

    frozen, serving_threshold, classifier_walked = asyncio.run(serving())
    assert frozen > 10_000 and not classifier_walked
    assert serving_threshold == (YOUNG_GC_THRESHOLD, *threshold[1:])
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold


def test_an_unhandled_error_is_a_500_in_the_openai_schema_with_the_request_id_and_cors(tmp_path, caplog,
                                                                                        monkeypatch):
    """A bug (an exception no handler takes) on any route: Starlette answered it from outside every
    middleware (no x-request-id, no CORS headers: a browser app could not read it), and its traceback
    was logged twice (by the handler, then by uvicorn, to which Starlette raised it again). Now a 500
    in the OpenAI schema, under the id the request's record has once it was planned, readable by a
    browser app, its traceback logged once and never in the body. A stream whose headers went out ends
    with its API's error event instead, recorded as the 500 it is. The bugs are injected into the app
    this test builds (a route of its own, a failing method on its gateway object, a relay that breaks):
    no production app has such a hook."""
    from starlette.routing import Route

    import gateway.wire
    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from gateway.streaming import EventStream, sse
    from tests.servers import serving

    origin = "https://app.example"
    secret = "the bug's own words, which may quote a request"

    async def raises(request):
        raise RuntimeError(secret)

    finished: list[Exception | None] = []

    async def breaks_after_headers(request):
        async def body():
            yield sse({"choices": []})
            raise RuntimeError(secret)

        async def finish():
            finished.append(stream.failure)

        stream = EventStream(body(), finish, {})
        return stream

    relay = gateway.wire.ChatWire.relay

    def breaking_relay(self, *args, **kwargs):
        async def relayed():
            async for frame in relay(self, *args, **kwargs):
                yield frame
                raise KeyError(secret)
        return relayed()

    monkeypatch.setattr(gateway.wire.ChatWire, "relay", breaking_relay)

    with running(start_mock(tmp_path)) as mock:
        config = GatewayConfig.model_validate({
            "backends": [mock_backend("mock-a", mock)], "local_model": {"enabled": False}, "cors_origins": [origin],
            "telemetry": {"data_dir": str(tmp_path / "data")}})
        app = create_app(config)
        app.router.routes += [Route("/test/raises", raises, methods=["GET", "POST"]),
                              Route("/test/breaks", breaks_after_headers)]

        async def execute_raises(*args, **kwargs):
            raise ZeroDivisionError(secret)

        app.state.gateway.execute = execute_raises
        with caplog.at_level("ERROR"), serving(app) as url:
            # a route's own bug, before any plan: an id made for the answer, as any refusal's
            for method in ("GET", "POST"):
                answer = httpx.request(method, url + "/test/raises", headers={"origin": origin})
                assert answer.status_code == 500, answer.text
                assert answer.json() == {"error": {
                    "message": "Internal error in the gateway; the request was not served.",
                    "type": "server_error", "param": None, "code": "internal_error"}}
                assert answer.headers["x-request-id"].startswith("req_")
                assert answer.headers["access-control-allow-origin"] == origin
                assert "x-request-id" in answer.headers["access-control-expose-headers"]
            # after the plan: the request's own id, the one its record has (recorded as a 500)
            sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as failed:
                sdk.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}],
                                            extra_headers={"origin": origin})
            request_id = failed.value.request_id
            assert request_id.startswith("chatcmpl-") and failed.value.code == "internal_error"
            assert failed.value.response.headers["access-control-allow-origin"] == origin
            assert secret not in failed.value.response.text and "Traceback" not in failed.value.response.text
            # a stream whose headers went out: its error event, no [DONE], the failure told to its finish
            broken = httpx.get(url + "/test/breaks")
            assert broken.status_code == 200 and broken.headers["x-request-id"].startswith("req_")
            events = [orjson.loads(e.removeprefix(b"data: ")) for e in broken.content.split(b"\n\n") if e]
            assert events[0] == {"choices": []}
            assert events[1]["error"]["code"] == "internal_error" and events[1]["error"]["type"] == "server_error"
            assert len(events) == 2 and secret not in broken.text
            deadline = time.monotonic() + 5
            while not finished:  # run once the body is closed, after its last byte went out
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert len(finished) == 1 and isinstance(finished[0], RuntimeError)
            # the same on the real relay: the client sees the first chunk, then the error event
            chunks, error = [], None
            with sdk.chat.completions.with_streaming_response.create(
                    model="mock-a", messages=[{"role": "user", "content": "hi"}], stream=True) as streamed:
                relayed_id = streamed.headers["x-request-id"]
                for line in streamed.iter_lines():
                    if line.startswith("data: "):
                        payload = orjson.loads(line.removeprefix("data: "))
                        if "error" in payload:
                            error = payload["error"]
                        else:
                            chunks.append(payload)
            assert len(chunks) == 1 and chunks[0]["id"] == relayed_id
            assert error is not None and error["code"] == "internal_error" and secret not in str(error)
            deadline = time.monotonic() + 10
            while (records := [httpx.get(f"{url}/v1/ponder/requests/{rid}") for rid in (request_id, relayed_id)]) \
                    and any(r.status_code != 200 for r in records):
                assert time.monotonic() < deadline, [r.text for r in records]
                time.sleep(0.2)
            assert [r.json()["request"]["status"] for r in records] == [500, 500]
    tracebacks = [r for r in caplog.records if r.exc_info]
    # once each: two on /test/raises, the chat request's, two streams'; nothing logged by uvicorn
    assert len(tracebacks) == 5, [(r.name, r.getMessage()) for r in tracebacks]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")], caplog.text


@pytest.mark.parametrize("status", [401, 403])
def test_a_backend_refusing_the_gateways_credentials_is_a_502_that_names_no_key(tmp_path, status):
    """A backend's 401 or 403 (the operator's key for it revoked, wrong, unset, not allowed the model) is the
    gateway's problem, not the client's: a 502 naming the backend's failure, on the fast path and
    litellm's, JSON and streamed. The client got the upstream's own words, which quote the masked key
    ("Incorrect API key provided: sk-abc*****wxyz"): they go to the gateway's log, once per outage. A
    revoked key does not come back in a second: the backend cools down at once for the longest
    cool-down (30 s), skipped by every request meanwhile, and a routed request takes another arm."""
    quoted = "Incorrect API key provided: sk-abc*****wxyz. You can find your API key at https://example"
    refusal = {"status": status, "body": orjson.dumps({"error": {
        "message": quoted, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).decode()}
    with running(start_mock(tmp_path)) as mock:
        names = {"fast-json": {}, "fast-stream": {}, "litellm-json": {"fast_path": False},
                 "litellm-stream": {"fast_path": False}}
        backends = [mock_backend(name, mock, **extra) for name, extra in names.items()]
        backends.append(mock_backend("spare", mock))
        routed = write_policy(tmp_path, {
            "name": "keys", "arms": {"revoked": {"backend": "fast-json", "prior": 0.9},
                                     "spare": {"backend": "spare", "prior": 0.5}},
            "routes": [{"name": "all", "candidates": ["revoked", "spare"]}],
            "objective": {"cost_weight": 0, "latency_weight": 0}, "exploration": {"share": 0.0}})
        with running(start_gateway(tmp_path, {"backends": backends, "policy": routed}, name="keys")) as gateway:
            sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            for name in names:
                control(mock, script=["error"] * 5, error=refusal)
                made = calls(mock)["count"]
                with pytest.raises(openai.APIStatusError) as refused:
                    answer = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                         stream=name.endswith("stream"))
                    list(answer) if name.endswith("stream") else None
                error = refused.value
                assert error.status_code == 502, (name, error.response.text)
                assert error.code == "upstream_error" and error.response.headers["x-should-retry"] == "false"
                assert f"{name}: the backend refused the gateway's credentials" in error.message, error.message
                assert "sk-abc" not in error.response.text and "Incorrect API key" not in error.response.text
                assert calls(mock)["count"] == made + 1, name  # not retried on that backend
                # cooled down at once, for the longest cool-down: the next request does not call it
                with pytest.raises(openai.APIStatusError) as cooling:
                    sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
                assert cooling.value.status_code == 503 and int(cooling.value.response.headers["retry-after"]) >= 25
                assert calls(mock)["count"] == made + 1, name
            # a routed request whose best arm's backend refused its key: the other arm, with no call to it
            control(mock, script=[])
            made = calls(mock)["count"]
            answer = sdk.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hi"}])
            assert answer.headers["x-ponder-arm"].startswith("spare/")
            assert [body["model"] for body in calls(mock)["bodies"][made:]] == ["spare"]
            log = gateway.log()
            for name in names:  # the detail is the operator's: in the log, once (litellm's words before it)
                [line] = [line for line in log.splitlines()
                          if f"backend {name} refuses the gateway's credentials (HTTP {status}: " in line]
                assert quoted in line and " ERROR " in line, line


def test_an_image_routed_to_a_text_only_arm_is_answered_by_the_next_arm(tmp_path):
    """A routed request with an image part, whose decision picked a text-only backend (the local
    llama.cpp model, `message_format: basic`, a policy's usual cheap arm), got that backend's 400
    `unsupported_content` as if no backend could see the image. Another backend may: the next arm
    answers it, image and all, streamed or not, chat or Responses. A request naming the text-only
    backend still gets its 400."""
    path = write_policy(tmp_path, {"name": "vision", "exploration": {"share": 0.0},
                                   "arms": {"local": {"backend": "mock-text", "prior": 0.95},
                                            "vision": {"backend": "mock-a", "prior": 0.3}},
                                   "routes": [{"name": "all", "candidates": ["local", "vision"]}]}, "vision.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-text", mock, message_format="basic"), mock_backend("mock-a", mock)],
            "policy": path}, name="vision")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image]}]
        assert client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "x"}]).headers["x-ponder-arm"] == "mock-text/-/single/1"
        for stream in (False, True):
            reset(mock)
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages, stream=stream)
            assert raw.headers["x-ponder-arm"] == "mock-a/-/single/1"
            answer = raw.parse()
            text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else \
                answer.choices[0].message.content
            assert text == "Hello from the mock upstream."
            [body] = calls(mock)["bodies"]  # the text-only backend was sent nothing
            assert body["model"] == "mock-a" and body["messages"][0]["content"][1] == image
        reset(mock)
        response = client.responses.create(model="auto", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is in this picture?"},
            {"type": "input_image", "image_url": image["image_url"]["url"]}]}])
        assert response.output_text == "Hello from the mock upstream."
        assert calls(mock)["bodies"][-1]["messages"][0]["content"][1]["image_url"]["url"] == image["image_url"]["url"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock-text", messages=messages)
        assert refused.value.code == "unsupported_content"


def test_a_best_of_n_judge_sees_the_images_the_answers_are_about(tmp_path):
    """A best-of-N judge was shown the last user turn's text only: asked "What is in this picture?",
    it scored each sample's description of an image it never saw, a verdict on nothing. The judge is
    sent the question's images (and audio) with its text, as the samples were."""
    path = write_policy(tmp_path, {"name": "judged", "exploration": {"share": 0.0},
                                   "arms": {"best": {"backend": "mock-a", "strategy": "best_of_n", "n": 2}},
                                   "routes": [{"name": "all", "candidates": ["best"]}]}, "judged.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock)], "policy": path}, name="judged")) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        control(mock, answers=["Score: 8"])
        messages = [{"role": "user", "content": "Describe pictures briefly."}, {"role": "assistant", "content": "OK."},
                    {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image]}]
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)
        assert raw.headers["x-ponder-arm"] == "mock-a/-/best_of_n/2"
        judged = [b for b in calls(mock)["bodies"] if b["messages"][0]["role"] == "system"]
        assert len(judged) == 2
        for body in judged:
            [text, seen] = body["messages"][1]["content"]
            assert "What is in this picture?" in text["text"] and "Score: 8" in text["text"]
            assert seen == image
        reset(mock)
        control(mock, answers=["Score: 8"])
        client.chat.completions.create(model="auto", messages=messages[:1])  # text only: the judge's prompt as ever
        judged = [b for b in calls(mock)["bodies"] if b["messages"][0]["role"] == "system"]
        assert len(judged) == 2 and all(isinstance(b["messages"][1]["content"], str) for b in judged)


def test_a_streamed_claude_tool_call_has_no_content_as_openai_streams_it(tmp_path):
    """litellm streams Claude's tool call with `content: ""` in every delta, so the openai SDK's stream
    helper gave the app a message whose content was "" beside its tool call, where OpenAI's stream (and
    the same answer not streamed) has none (null): apps that show `content` when it is not None showed
    an empty reply. A delta carrying a tool call carries no empty content."""
    from tests.servers import start_anthropic_mock
    from tests.test_anthropic import claude_backend

    path = write_policy(tmp_path, {"name": "claude", "arms": {"plain": {"backend": "sonnet"}},
                                   "routes": [{"name": "all", "candidates": ["plain"]}]}, "claude.yaml")
    with running(start_anthropic_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [claude_backend("sonnet", mock)], "policy": path}, name="claude",
            env={"ANTHROPIC_API_KEY": "sk-ant-test"})) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        control(mock, script=["tool_use"], answers=['{"city": "Paris"}'])
        whole = client.chat.completions.create(model="sonnet", messages=messages, tools=[WEATHER]).choices[0].message
        control(mock, script=["tool_use"], answers=['{"city": "Paris"}'])
        with client.chat.completions.stream(model="sonnet", messages=messages, tools=[WEATHER]) as events:
            streamed = events.get_final_completion().choices[0].message
        assert whole.content is None and streamed.content is None
        assert [json.loads(m.tool_calls[0].function.arguments) for m in (whole, streamed)] == [{"city": "Paris"}] * 2
        control(mock, answers=["Sunny."])  # a text answer streams its text as ever
        with client.chat.completions.stream(model="sonnet", messages=messages) as events:
            assert events.get_final_completion().choices[0].message.content == "Sunny."


def test_the_policy_watcher_outlives_an_edit_that_yaml_refuses_oddly(tmp_path):
    """A policy saved with a NUL in it raised a ReaderError out of the reload thread: the watcher task
    ended without a word, and no edit was reloaded after (the fixing edit below was never served)."""
    import yaml

    spec = {"name": "before", "backends": [{"name": "b", "model": "openai/b", "api_base": "http://127.0.0.1:9/v1"}],
            "arms": {"one": {"backend": "b"}}, "routes": [{"name": "all", "candidates": ["one"]}]}
    path = write_policy(tmp_path, spec, "odd.yaml")
    with running(start_gateway(tmp_path, {"policy": path}, name="odd-edit")) as gateway:
        assert rejected_policies(gateway.url) == {"before": "0.0"}
        (tmp_path / "odd.yaml").write_text(yaml.safe_dump(spec) + "comment: \x00\n")
        assert wait_for_rejected_policies(gateway.url, {"before": "1.0"}) == {"before": "1.0"}
        (tmp_path / "odd.yaml").write_text(yaml.safe_dump({**spec, "name": "after"}))
        assert wait_for_rejected_policies(gateway.url, {"after": "0.0"}) == {"after": "0.0"}
        assert "Traceback" not in gateway.log()
