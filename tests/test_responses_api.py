"""The Responses API (`POST /v1/responses`) over real HTTP: the openai SDK against `ponder serve`, in
front of the mock upstream. It is the chat request path with a translation at each end, so these tests
check the translation (what the upstream is sent, what the SDK parses) and that the path's guarantees
(usage, headers, auth, budgets, streaming failures) hold on this API too."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.servers import (control, mock_backend, reset, running, sent, start_gateway, start_mock, two_mock_policy,
                           write_policy)

KEY = "sk-resp-key-123"
ADMIN_KEY = "sk-resp-admin-456"
ZERO_BUDGET_KEY = "sk-resp-zero-000"
SMALL_BUDGET_KEY = "sk-resp-small-001"  # $0.0001 a day: a few dozen of the mock's tokens
TIGHT_KEY = "sk-resp-tight-789"  # $0.003 a day: one request of max_output_tokens=1000 at a time (mock-a: $2/M out)
ADVISED_KEY = "sk-resp-advised-321"  # $0.003 a day too, unspent by other tests
VOTE = {"x-ponder-strategy": "self_consistency"}  # 5 samples of mock-a (the policy allows the header)
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("responses")
    with running(start_mock(tmp)) as mock:
        with running(start_gateway(tmp, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock),
                         mock_backend("mock-o", mock, reasoning=True, efforts=["low", "medium", "high"]),
                         mock_backend("mock-small", mock, max_context=100)],
            "policy": two_mock_policy(tmp, "resp"),
            "api_keys": [{"id": "team", "sha256": hashlib.sha256(KEY.encode()).hexdigest()},
                         {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True},
                         {"id": "broke", "sha256": hashlib.sha256(ZERO_BUDGET_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0},
                         {"id": "small", "sha256": hashlib.sha256(SMALL_BUDGET_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0.0001},
                         {"id": "tight", "sha256": hashlib.sha256(TIGHT_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0.003},
                         {"id": "advised", "sha256": hashlib.sha256(ADVISED_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 0.003}],
        })) as gateway:
            yield gateway, mock


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)


def words(body: dict) -> int:
    """The mock's prompt token count of a body it was sent (a word a token)."""
    total = 0
    for message in body["messages"]:
        content = message.get("content") or ""
        total += len(content.split()) if isinstance(content, str) else sum(len(p["text"].split()) for p in content)
    return total


def test_a_text_answer_with_usage_headers_and_echoed_fields(client, mock):
    control(mock, answers=["four words long here"])
    raw = client.responses.with_raw_response.create(model="mock-b", input="one two three", temperature=0.3,
                                                    top_p=0.9, metadata={"app": "t"}, store=True)
    response = raw.parse()
    Response.model_validate(raw.http_response.json())  # validated, where the SDK only constructs it
    assert response.output_text == "four words long here"
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.id == raw.headers["x-ponder-request-id"]
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.usage.input_tokens == 3 and response.usage.output_tokens == 4 and response.usage.total_tokens == 7
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert (response.temperature, response.top_p, response.metadata) == (0.3, 0.9, {"app": "t"})
    assert response.tools == [] and response.tool_choice == "auto" and response.parallel_tool_calls is True
    assert response.error is None and response.model_extra["store"] is False  # accepted, nothing stored
    assert raw.headers["x-ponder-arm"] == "mock-b/-/single/1"
    assert float(raw.headers["x-ponder-cost-usd"]) == pytest.approx(3e-6 + 8e-6)  # $1 / $2 per M tokens
    assert raw.headers["x-ponder-samples"] == "1" and raw.headers["x-ponder-policy"] == "direct"
    assert response.model_extra["ponder"]["arm"] == "mock-b/-/single/1"
    [body] = sent(mock)
    assert body["messages"] == [{"role": "user", "content": "one two three"}]
    assert (body["temperature"], body["top_p"]) == (0.3, 0.9)
    assert not {"metadata", "store", "input"} & set(body)  # Responses-only fields are not forwarded


def test_routed_alias_and_feedback_on_the_response_id(client, gw):
    raw = client.responses.with_raw_response.create(model="auto", input="hi there, how are you?")
    response = raw.parse()
    assert raw.headers["x-ponder-arm"].split("/")[0] in {"mock-a", "mock-b"}
    assert raw.headers["x-ponder-policy"] == "resp"
    assert raw.headers["x-ponder-task"] and 0 <= float(raw.headers["x-ponder-difficulty"]) <= 1
    fed = httpx.post(gw.url + "/v1/feedback", json={"request_id": response.id, "correct": True},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert fed.status_code == 200 and fed.json()["status"] == "accepted"


def test_instructions_and_a_multi_turn_input(client, mock):
    client.responses.create(model="mock-a", instructions="Be brief.", max_output_tokens=50,
                            reasoning={"effort": "low"}, user="u-1", input=[
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2 + 3?"}]},
        {"type": "message", "role": "assistant", "status": "completed", "id": "msg_1",
         "content": [{"type": "output_text", "text": "5", "annotations": []}]},
        {"role": "user", "content": "And 3 + 4?"},
    ])
    [body] = sent(mock)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 3 + 4?"},
    ]
    assert body["max_completion_tokens"] == 50 and body["user"] == "u-1"
    assert "reasoning_effort" not in body  # mock-a is not a reasoning model: the knob is not sent


def test_instructions_alone_are_a_system_prompt_conversation(client, gw, mock):
    """`input` is optional in OpenAI's API: instructions alone were a 400 'Invalid value for input: Field
    required', where the same conversation through chat (a system message only) is answered."""
    response = client.responses.create(model="auto", instructions="You are a helpful assistant.")
    assert response.status == "completed"
    [body] = sent(mock)
    assert body["messages"] == [{"role": "system", "content": "You are a helpful assistant."}]
    neither = httpx.post(gw.url + "/v1/responses", json={"model": "auto"}, headers={"Authorization": f"Bearer {KEY}"})
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "input"


def test_reasoning_effort_and_reasoning_tokens(client, mock):
    raw = client.responses.with_raw_response.create(model="mock-o", input="x", reasoning={"effort": "high"})
    response = raw.parse()
    assert sent(mock)[-1]["reasoning_effort"] == "high" and raw.headers["x-ponder-arm"] == "mock-o/high/single/1"
    assert response.usage.output_tokens_details.reasoning_tokens == 10
    assert response.reasoning.effort == "high"


def test_a_function_tool_round_trip(client, mock):
    control(mock, script=["tool_call"], answers=['{"city": "Paris"}'])
    first = client.responses.create(model="auto", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_mock_")
    assert first.output_text == "" and first.tools[0].name == "get_weather"
    upstream = sent(mock)[-1]
    assert upstream["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert upstream["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert upstream["parallel_tool_calls"] is False

    control(mock, answers=["It is sunny."])
    second = client.responses.create(model="auto", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output],  # as the SDK's apps send it back
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
    ])
    assert second.output_text == "It is sunny."
    assert sent(mock)[-1]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"},
    ]


def test_allowed_tools_are_chats_allowed_tools(client, mock):
    """`tool_choice: {type: allowed_tools, mode, tools}` (the model may call only these, the tool list
    staying whole for the prompt cache) is a tool_choice of chat too, nested as chat nests a tool: it
    was a 400 `unsupported_parameter`. A built-in tool among them is refused as built-in tools are."""
    control(mock, script=["tool_call"], answers=['{"city": "Paris"}'])
    other = {**WEATHER, "name": "get_time"}
    response = client.responses.create(model="mock-a", input="Weather in Paris?", tools=[WEATHER, other],
                                       tool_choice={"type": "allowed_tools", "mode": "required",
                                                    "tools": [{"type": "function", "name": "get_weather"}]})
    assert response.output[0].name == "get_weather" and response.tool_choice.type == "allowed_tools"
    assert sent(mock)[-1]["tool_choice"] == {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}
    for choice, param in (({"mode": "sometimes", "tools": []}, "tool_choice.mode"),
                          ({"mode": "auto", "tools": [{"type": "web_search"}]}, "tool_choice.tools.0.type")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="mock-a", input="x", tools=[WEATHER],
                                    tool_choice={"type": "allowed_tools", **choice})
        assert refused.value.param == param


def test_a_json_schema_format(client, mock):
    control(mock, answers=['{"sum": 5}'])
    schema = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"],
              "additionalProperties": False}
    response = client.responses.create(model="mock-a", input="2 + 3 as JSON",
                                       text={"format": {"type": "json_schema", "name": "Sum", "schema": schema,
                                                        "strict": True}})
    assert json.loads(response.output_text) == {"sum": 5}
    assert response.text.format.type == "json_schema"
    assert sent(mock)[-1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Sum", "schema": schema, "strict": True}}
    client.responses.create(model="mock-a", input="JSON please", text={"format": {"type": "json_object"}})
    assert sent(mock)[-1]["response_format"] == {"type": "json_object"}

    from pydantic import BaseModel

    class Sum(BaseModel):
        sum: int

    parsed = client.responses.parse(model="mock-a", input="2 + 3", text_format=Sum)  # the SDK's helper
    assert parsed.output_parsed == Sum(sum=5)
    assert sent(mock)[-1]["response_format"]["json_schema"]["name"] == "Sum"


def test_max_output_tokens_cut_is_incomplete(client, mock):
    control(mock, script=["length"], answers=["one two three four five six"])
    response = client.responses.create(model="mock-a", input="count", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "one two three" and response.output[0].status == "incomplete"
    assert response.max_output_tokens == 3 and response.usage.output_tokens == 3


def event_types(events) -> list[str]:
    return [e.type for e in events]


TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"]


def test_a_streamed_text_answer_raw_events(client, mock):
    control(mock, answers=["streamed in four pieces"])
    raw = client.responses.with_raw_response.create(model="mock-a", input="a b", stream=True)
    events = list(raw.parse())
    for event in events:  # validated, where the SDK only constructs them
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())
    assert raw.headers["x-ponder-arm"] == "mock-a/-/single/1" and raw.headers["content-type"].startswith(
        "text/event-stream")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["streamed", " in", " four", " pieces"]  # relayed as the upstream wrote them
    assert event_types(events) == TEXT_EVENTS + ["response.output_text.delta"] * 4 + TEXT_END
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, done = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == done.id
    assert done.id == raw.headers["x-ponder-request-id"] and done.output_text == "streamed in four pieces"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (2, 4)
    assert events[-3].item_id == events[2].item.id == done.output[0].id


def test_a_relayed_stream_is_not_buffered(client, mock):
    """The upstream pauses 1.8 s after its first word (under its 2 s pause limit): the first delta
    reaches the client before the pause, not with the rest of the answer."""
    import time

    control(mock, script=["hold"], hang_s=1.8, answers=["first then the rest"])
    arrived = {}
    for event in client.responses.create(model="mock-a", input="x", stream=True):
        arrived.setdefault(event.type, time.monotonic())
    assert arrived["response.completed"] - arrived["response.output_text.delta"] > 1.0


def recorded(gw, request_id: str) -> dict:
    """The request as telemetry recorded it (it is settled right after the answer's last byte)."""
    import time

    deadline = time.monotonic() + 5
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    while (detail := httpx.get(f"{gw.url}/v1/ponder/requests/{request_id}", headers=admin)).status_code != 200:
        assert time.monotonic() < deadline, detail.text
        time.sleep(0.05)
    return detail.json()["request"]


def test_telemetry_records_responses_as_chat_requests_and_bills_a_dropped_stream(client, gw, mock):
    control(mock, answers=["one two three four five six seven eight"])
    response = client.responses.create(model="auto", input="count to eight")
    row = recorded(gw, response.id)
    assert row["status"] == 200 and row["prompt_tokens"] == response.usage.input_tokens
    assert row["completion_tokens"] == response.usage.output_tokens == 8
    assert row["cost_usd"] == pytest.approx(response.model_extra["ponder"]["cost_usd"])

    control(mock, script=["slow_first"])  # the client reads the first delta and hangs up
    with httpx.stream("POST", gw.url + "/v1/responses", json={"model": "mock-a", "input": "count", "stream": True},
                      headers={"authorization": f"Bearer {KEY}"}) as streamed:
        request_id = streamed.headers["x-ponder-request-id"]
        assert any("response.output_text.delta" in line for line in streamed.iter_lines())
    row = recorded(gw, request_id)
    assert row["status"] == 499 and row["completion_tokens"] >= 1 and row["cost_usd"] > 0, row


def test_tool_call_arguments_written_as_an_object_are_its_json_text(client, mock):
    """Chat passes on a tool call as the upstream wrote it; a Response's `arguments` are JSON text
    (the SDK types them so): arguments written as an object were a 500."""
    control(mock, answers=[{"tool_calls": [{"id": "call_1", "type": "function",
                                            "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}])
    [call] = client.responses.create(model="mock-a", input="Weather in Rome?", tools=[WEATHER]).output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Rome"}


def test_an_answer_that_cannot_be_written_is_recorded_and_its_hold_settled(gw, mock):
    """Whatever fails while the Response is written (here a tool call whose `function` is not an
    object), the request's calls are recorded and its budget hold settled: the hold was kept for good,
    and the key refused `budget_held` ("retry shortly") until the gateway restarted."""
    tight = openai.OpenAI(base_url=gw.url + "/v1", api_key=TIGHT_KEY, max_retries=0)
    control(mock, answers=[{"tool_calls": [{"id": "call_1", "type": "function", "function": "get_weather"}]}])
    with pytest.raises(openai.InternalServerError) as failed:
        tight.responses.create(model="mock-a", input="Weather in Rome?", tools=[WEATHER], max_output_tokens=1000)
    assert "Internal error" in failed.value.message
    rows = httpx.get(f"{gw.url}/v1/ponder/requests?limit=1", headers={"authorization": f"Bearer {ADMIN_KEY}"}
                     ).json()["requests"]  # recorded before the 500 was sent
    assert rows and rows[0]["key_id"] == "tight" and rows[0]["status"] == 500 and rows[0]["cost_usd"] > 0, rows
    control(mock, answers=["Sunny."])
    assert tight.responses.create(model="mock-a", input="Weather?", max_output_tokens=1000).output_text == "Sunny."


def test_refusals_name_the_responses_parameters(client, gw, mock):
    """A refusal made after the translation (a budget, a context window) tells the client what to
    send in its own API's words: a Responses client cannot send `max_tokens` (a 400), nor has it
    `messages`. The advice given is then taken."""
    advised = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADVISED_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as over:
        advised.responses.create(model="mock-o", input="Think hard.")  # 8,192 tokens held, over the whole $0.003
    assert over.value.code == "over_budget_cap"
    assert "without max_output_tokens each call holds 8,192 tokens" in over.value.message, over.value.message
    fits = int(re.search(r"send max_output_tokens \(at most ([\d,]+) fits", over.value.message)[1].replace(",", ""))
    control(mock, answers=["Thought."])
    assert advised.responses.create(model="mock-o", input="Think hard.", max_output_tokens=fits).output_text == "Thought."

    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(model="mock-small", input="word " * 1000)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "input"


def test_a_streamed_answer_through_the_sdk_helper(client, mock):
    control(mock, answers=["helper stream works"])
    with client.responses.stream(model="auto", input="hello") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "helper stream works"
    assert final.status == "completed" and final.usage.output_tokens == 3


def test_a_streamed_function_call(client, mock):
    control(mock, script=["tool_call"], answers=['{"city": "Rome"}'])
    with client.responses.stream(model="mock-a", input="Weather in Rome?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert event_types(events) == ["response.created", "response.in_progress", "response.output_item.added",
                                   "response.function_call_arguments.delta", "response.function_call_arguments.delta",
                                   "response.function_call_arguments.done", "response.output_item.done",
                                   "response.completed"]
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "Rome"}
    assert events[5].arguments == call.arguments


def test_a_multi_sample_answer_counts_every_sample_streamed_or_not(client, mock):
    control(mock, answers=["The answer is 7", "The answer is 7", "The answer is 9", "The answer is 7",
                           "The answer is 9"])
    raw = client.responses.with_raw_response.create(model="auto", input="What is 3 + 4?", extra_headers=VOTE)
    response = raw.parse()
    assert "7" in response.output_text and raw.headers["x-ponder-samples"] == "5"
    bodies = sent(mock)
    assert len(bodies) == 5 and response.model_extra["ponder"]["samples"] == 5
    assert response.usage.output_tokens == 5 * 4
    assert response.usage.input_tokens == sum(words(b) for b in bodies)

    reset(mock)
    control(mock, answers=["The answer is 7"], cached_tokens=2)
    with client.responses.stream(model="auto", input="What is 3 + 4?", extra_headers=VOTE) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert event_types(events) == TEXT_EVENTS + ["response.output_text.delta"] + TEXT_END  # the whole answer once
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.model == final.model == "mock-a"  # known from the first event, as when relayed
    bodies = sent(mock)
    assert len(bodies) == 5 and final.usage.output_tokens == 5 * 4
    assert final.usage.input_tokens == sum(words(b) for b in bodies)
    assert final.usage.input_tokens_details.cached_tokens == 5 * 2


def test_a_stream_that_breaks_after_bytes_is_failed_not_completed(client, mock):
    control(mock, script=["truncate"], answers=["this answer will be cut in the middle"])
    events = list(client.responses.create(model="mock-a", input="x", stream=True))
    assert events[-1].type == "response.failed" and "response.completed" not in event_types(events)
    failed = events[-1].response
    assert failed.status == "failed" and "upstream stream broke" in failed.error.message
    assert failed.error.code == "server_error" and failed.output[0].status == "incomplete"
    assert any(e.type == "response.output_text.delta" for e in events)  # bytes reached the client first
    with pytest.raises(RuntimeError, match="response.completed"):
        control(mock, script=["truncate"], answers=["this answer will be cut in the middle"])
        with client.responses.stream(model="mock-b", input="x") as stream:  # mock-a's second failure would cool it
            stream.until_done().get_final_response()
    # answers leave both healthy: one failed request is half a cool-down, and the next test's would finish it
    assert all(client.responses.create(model=model, input="x").output_text for model in ("mock-a", "mock-b"))


def test_a_stream_nobody_can_serve_is_an_http_error(client, mock):
    control(mock, script=["500", "500"])  # both attempts on mock-b (max_retries: 1), before any byte
    with pytest.raises(openai.APIStatusError) as failed:
        client.responses.create(model="mock-b", input="x", stream=True)
    assert failed.value.status_code == 502 and failed.value.body["type"] == "upstream_error"
    assert "mock upstream failure" in failed.value.message and len(sent(mock)) == 2


def test_auth_and_budget_errors_in_the_error_schema(gw):
    missing = httpx.post(gw.url + "/v1/responses", json={"model": "mock-a", "input": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0).responses.create(
            model="mock-a", input="x")
    broke = openai.OpenAI(base_url=gw.url + "/v1", api_key=ZERO_BUDGET_KEY, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as empty:
            broke.responses.create(model="mock-a", input="x", max_output_tokens=5, stream=stream)
        assert empty.value.code == "budget_exhausted" and "retry-after" in empty.value.response.headers


def test_errors_of_the_chat_path_name_the_responses_field(client, gw, mock):
    """An error about a field made from a Responses one (an upstream's, the gateway's own) names it as
    the client sent it: a Responses request has no `messages` and no `max_tokens` to fix."""
    for stream in (False, True):
        control(mock, script=["too_long"])  # OpenAI's 400 for a prompt over the window: param `messages`
        with pytest.raises(openai.BadRequestError) as too_long:
            client.responses.create(model="mock-o", input="x", stream=stream)  # failed by no other test
        assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "input"
    small = openai.OpenAI(base_url=gw.url + "/v1", api_key=SMALL_BUDGET_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as over:
        small.responses.create(model="mock-a", input="x")  # holds 1,024 tokens: more than the whole budget
    assert over.value.code == "over_budget_cap" and "send max_output_tokens (at most" in over.value.message
    assert "max_tokens" not in over.value.message  # a Responses request sending it is refused


@pytest.mark.parametrize("upstream_param, param", [
    ("messages[3].content", "input"), ("max_tokens", "max_output_tokens"), ("response_format", "text.format"),
    ("tools[0].function.parameters", "tools[0].parameters"), ("tool_choice.function.name", "tool_choice.name"),
    ("verbosity", "text.verbosity"),  # a model refusing `text.verbosity` (it was named `verbosity`)
])
def test_an_upstreams_param_is_named_as_the_responses_field(upstream_param, param):
    """OpenAI's own errors index with brackets, and a chat tool's fields are under `function`. Pure."""
    from gateway.errors import ApiError
    from gateway.responses import responses_error

    error = responses_error(ApiError(400, f"Invalid '{upstream_param}': bad.", param=upstream_param))
    assert error.param == param and error.message == f"Invalid '{param}': bad."


@pytest.mark.parametrize("params, param, code", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "unsupported_parameter"),
    ({"conversation": "conv_123"}, "conversation", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_parameter"),
    ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools.0.type", "unsupported_parameter"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input.0.content.0", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input.0.content.0", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": 7}]}]},
     "input.0.content.0.file_data", "invalid_value"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "unsupported_parameter"),
    ({"top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"include": ["message.output_text.logprobs", "output_text.annotations"]}, "include.1", "invalid_value"),
    ({"temperature": "hot"}, "temperature", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "invalid_value"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": [{"role": "user", "content": "x"}, "y"]}, "input.1", "invalid_value"),
])
def test_what_is_not_supported_is_a_400_naming_the_param(client, mock, params, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": "mock-a", "input": "x", **params})
    assert refused.value.param == param and refused.value.code == code, refused.value.message
    assert f"'{param}'" in refused.value.message  # named as the client sent it, not as the chat request has it
    assert refused.value.body["type"] == "invalid_request_error"
    assert sent(mock) == []  # refused before any call


def test_an_image_url_part_reaches_the_upstream_as_a_chat_image(client, mock):
    client.responses.create(model="mock-a", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}]}])
    # its own call, found by its parts: a late call of an earlier test (a dropped stream's) may come after it
    [parts] = [b["messages"][0]["content"] for b in sent(mock) if isinstance(b["messages"][0]["content"], list)]
    assert parts == [{"type": "text", "text": "What is this?"},
                     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]


def test_an_inline_file_part_reaches_the_upstream_as_a_chat_file(client, mock):
    """A document sent inline (`input_file` with `file_data`, a base64 data URL, as the openai SDK's
    examples send a PDF) is chat's `file` part, which OpenAI's chat API and litellm's providers
    (Claude, Gemini) read: it was a 400, though the chat path carries it. One stored at OpenAI
    (`file_id`) or fetched by URL (`file_url`, which chat has no part for) is still refused, saying so."""
    pdf = "data:application/pdf;base64,JVBERi0xLjQK"
    client.responses.create(model="mock-a", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Summarise this."},
        {"type": "input_file", "filename": "report.pdf", "file_data": pdf}]}])
    [parts] = [b["messages"][0]["content"] for b in sent(mock) if isinstance(b["messages"][0]["content"], list)]
    assert parts == [{"type": "text", "text": "Summarise this."},
                     {"type": "file", "file": {"filename": "report.pdf", "file_data": pdf}}]
    for part, says in (({"file_id": "file-1"}, "stored on OpenAI's servers"), ({"file_url": "https://x/r.pdf"}, "file_data")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="mock-a", input=[{"role": "user", "content": [{"type": "input_file", **part}]}])
        assert refused.value.param == "input.0.content.0" and says in refused.value.message


def test_stored_responses_are_not_found(client):
    for call in (lambda: client.responses.retrieve("resp_123"), lambda: client.responses.delete("resp_123"),
                 lambda: client.responses.cancel("resp_123"), lambda: client.responses.input_items.list("resp_123")):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert "stores no responses" in missing.value.message and missing.value.code == "not_found"
        assert "No response 'resp_123':" in missing.value.message  # the id, not 'resp_123/cancel'


def test_a_failure_after_a_synthesized_streams_headers_is_a_failed_response():
    """A multi-sample stream that outlasts its 20 s hold gets its 200 before it is decided; if it then
    fails, the client must read a failure (`response.failed` after the `response.created` the SDK
    needs first), not a completion. Pure: the wire's rendering of that failure."""
    from gateway.errors import ApiError
    from gateway.responses import ResponsesWire, parse_responses_request

    wire = ResponsesWire(*parse_responses_request({"model": "auto", "input": "x", "stream": True}, max_n=4))
    frames = wire.stream_error("resp_abc", ApiError(502, "mock-a: upstream timed out")).decode()
    events = [TypeAdapter(ResponseStreamEvent).validate_json(frame.split("\ndata: ", 1)[1])
              for frame in frames.strip().split("\n\n")]
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert [e.sequence_number for e in events] == [0, 1, 2] and {e.response.id for e in events} == {"resp_abc"}
    assert events[-1].response.error.message == "mock-a: upstream timed out"


@pytest.mark.parametrize("status,code,expected", [
    (429, "upstream_error", "rate_limit_exceeded"), (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    (503, "upstream_error", "server_error"), (504, "upstream_timeout", "server_error")])
def test_a_late_failed_response_carries_the_errors_code(status, code, expected):
    """The failure after a synthesized stream's headers says a rate limit when it was one (a client
    waits one out), as its JSON error's 429 would, not always `server_error`; validated, as OpenAI's
    schema allows only its own few codes there."""
    from gateway.errors import ApiError
    from gateway.responses import ResponsesWire, parse_responses_request

    wire = ResponsesWire(*parse_responses_request({"model": "auto", "input": "x", "stream": True}, max_n=4))
    frames = wire.stream_error("resp_abc", ApiError(status, "mock-a: every sample failed", code=code)).decode()
    failed = TypeAdapter(ResponseStreamEvent).validate_json(frames.strip().split("\n\n")[-1].split("\ndata: ", 1)[1])
    assert failed.type == "response.failed" and failed.response.error.code == expected


def test_a_tool_choice_without_tools_is_not_sent_upstream(client, mock):
    """Chat APIs refuse a `tool_choice` when there are no tools (OpenAI's and vLLM's 400), so a Responses
    request carrying one with no tools (an agent loop's last turn, say) is sent without it; it is
    still checked, and echoed in the Response."""
    control(mock, answers=["no tools here"])
    response = client.responses.create(model="mock-a", input="hello", tool_choice="auto")
    assert response.output_text == "no tools here" and response.tool_choice == "auto"
    assert "tool_choice" not in sent(mock)[-1]


def sse_chunks(*deltas: dict, finish: str = "tool_calls") -> list[str]:
    """A chat stream, as hex pieces for the mock's `raw` behaviour: one chunk per delta, then the finish."""
    base = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 0, "model": "mock-a"}
    chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return [f"data: {json.dumps(chunk)}\n\n".encode().hex() for chunk in chunks] + [b"data: [DONE]\n\n".hex()]


def call_delta(index: int, arguments: str, name: str | None = None) -> dict:
    call = {"index": index, "function": {"arguments": arguments}}
    if name:
        call.update(id=f"call_{index}", type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


def test_interleaved_parallel_calls_close_each_item_after_its_last_delta(client, mock):
    """A server may stream parallel calls' arguments interleaved (call 0, call 1, call 0 again): each
    call's `.done` events come after all of its deltas, so a client that builds the calls from the
    events (and takes an item as finished at `output_item.done`) gets the whole arguments."""
    control(mock, script=["raw"], raw=sse_chunks(
        call_delta(0, "", "get_weather"), call_delta(0, '{"city": '), call_delta(1, "", "get_weather"),
        call_delta(1, '{"city": "Oslo"}'), call_delta(0, '"Rome"}')))
    events = list(client.responses.create(model="mock-a", input="Weather in Rome and Oslo?", tools=[WEATHER],
                                          stream=True))
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for index, city in ((0, "Rome"), (1, "Oslo")):
        mine = [(i, e) for i, e in enumerate(events) if getattr(e, "output_index", None) == index]
        deltas = [i for i, e in mine if e.type == "response.function_call_arguments.delta"]
        [(done_at, done)] = [(i, e) for i, e in mine if e.type == "response.output_item.done"]
        [arguments_done] = [e for _, e in mine if e.type == "response.function_call_arguments.done"]
        assert max(deltas) < done_at, event_types(events)
        assert json.loads(done.item.arguments) == json.loads(arguments_done.arguments) == {"city": city}
        assert "".join(e.delta for _, e in mine if e.type.endswith("arguments.delta")) == done.item.arguments
    final = events[-1].response
    assert final.status == "completed" and [json.loads(c.arguments)["city"] for c in final.output] == ["Rome", "Oslo"]
    assert all(c.status == "completed" for c in final.output)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_backends_reasoning_is_a_reasoning_item_before_the_message(client, mock, field):
    """A reasoning server's chain of thought (vLLM's `reasoning_content`, or `reasoning` as newer vLLM
    names it) is a `reasoning` item before the message, its text as `reasoning_text` content (not a
    `summary`: no backend writes one), whole or streamed; sent back as input, it is dropped."""
    answer = {"content": "It is 5.", field: "two plus three is five"}
    control(mock, answers=[answer])
    response = client.responses.create(model="mock-a", input="What is 2 + 3?", reasoning={"summary": "auto"})
    Response.model_validate(response.to_dict())
    thought, message = response.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.status == "completed"
    assert thought.summary == [] and [(c.type, c.text) for c in thought.content] == [
        ("reasoning_text", "two plus three is five")]
    assert message.type == "message" and response.output_text == "It is 5."

    control(mock, answers=[answer])
    with client.responses.stream(model="mock-a", input="What is 2 + 3?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())
    assert event_types(events) == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.reasoning_text.delta"] * 5, "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done", *TEXT_EVENTS[2:], "response.output_text.delta", *TEXT_END]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "two plus three is five"
    assert events[9].text == "two plus three is five" and events[11].item.content[0].text == "two plus three is five"
    assert [e.output_index for e in events if e.type == "response.output_text.delta"] == [1]
    assert final.output[0].content[0].text == "two plus three is five" and final.output_text == "It is 5."

    control(mock, answers=["Then 8."])
    client.responses.create(model="mock-a", input=[
        {"role": "user", "content": "What is 2 + 3?"}, *[item.to_dict() for item in final.output],
        {"role": "user", "content": "And + 3?"}])
    assert sent(mock)[-1]["messages"] == [{"role": "user", "content": "What is 2 + 3?"},
                                          {"role": "assistant", "content": "It is 5."},
                                          {"role": "user", "content": "And + 3?"}]


def test_input_tokens_are_counted_as_estimated_and_compaction_is_refused_clearly(client, gw):
    """`client.responses.input_tokens.count(...)` was a 404 "No response 'input_tokens'", and
    `client.responses.compact(...)` a 404 "No response 'compact'": the count is the gateway's estimate
    of the prompt (the backends' tokenizers are not known), compaction a 400 that says it is unsupported."""
    from router.estimates import estimate_prompt_tokens

    text = "Count the tokens of this prompt, please. " * 20
    raw = client.responses.input_tokens.with_raw_response.count(model="mock-a", instructions="Be brief.", input=text)
    counted = raw.parse()
    assert counted.object == "response.input_tokens" and raw.http_response.json()["ponder"]["estimated"] is True
    assert counted.input_tokens == estimate_prompt_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])
    assert counted.input_tokens <= raw.http_response.json()["ponder"]["input_tokens_bound"]
    with_tools = client.responses.input_tokens.count(input=text, instructions="Be brief.", tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens + 20  # the tool's definition is prompt too

    # `input` is optional, as in OpenAI's API: a system prompt alone can be sized (it was a 400 "Field required")
    alone = client.responses.input_tokens.count(model="mock-a", instructions="Be brief.", input=None)
    assert alone.input_tokens == estimate_prompt_tokens([{"role": "system", "content": "Be brief."}])
    with pytest.raises(openai.BadRequestError) as truncated:  # said why, as /v1/responses says it
        client.responses.input_tokens.count(model="mock-a", input="x", truncation="auto")
    assert truncated.value.param == "truncation" and "trim `input`" in truncated.value.message

    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.input_tokens.count(model="mock-a", input="x", previous_response_id="resp_1")
    assert stateful.value.param == "previous_response_id" and stateful.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as bad_item:
        client.responses.input_tokens.count(model="mock-a", input=[{"type": "web_search_call", "id": "ws_1"}])
    assert bad_item.value.param == "input.0.type"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0).responses.input_tokens.count(
            model="mock-a", input="x")

    with pytest.raises(openai.BadRequestError) as compact:
        client.responses.compact(model="mock-a", input="x")
    assert compact.value.code == "unsupported_endpoint" and "Compaction" in compact.value.message


def test_logprobs_asked_by_include_are_the_output_texts(client, mock):
    """`include: ["message.output_text.logprobs"]` (and `top_logprobs`) was accepted and answered
    `logprobs: []`, as if the answer had no tokens: it asks the backend for them (chat's `logprobs`,
    `top_logprobs`), and they are the output text's."""
    control(mock, answers=["two words"])
    raw = client.responses.with_raw_response.create(model="mock-a", input="x", top_logprobs=2,
                                                    include=["message.output_text.logprobs"])
    response = raw.parse()
    Response.model_validate(raw.http_response.json())
    assert (sent(mock)[-1]["logprobs"], sent(mock)[-1]["top_logprobs"]) == (True, 2)
    [text] = response.output[0].content
    assert [(t.token, t.logprob, t.bytes) for t in text.logprobs] == [("two", -0.5, list(b"two")),
                                                                      ("words", -0.5, list(b"words"))]
    assert response.top_logprobs == 2
    control(mock, answers=["no logprobs"])
    client.responses.create(model="mock-a", input="x", include=["reasoning.encrypted_content"])
    assert "logprobs" not in sent(mock)[-1]  # asked for only when the client asks


def test_a_call_whose_name_comes_after_its_id_is_named(client, mock):
    """A server may open a tool call with its id alone and send the function's name in a later delta:
    the function_call item still carries the name."""
    opening = {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"arguments": ""}}]}
    named = {"tool_calls": [{"index": 0, "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    control(mock, script=["raw"], raw=sse_chunks(opening, named))
    events = list(client.responses.create(model="mock-a", input="Weather in Rome?", tools=[WEATHER], stream=True))
    [call] = events[-1].response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id == "call_0"
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    assert json.loads(call.arguments) == {"city": "Rome"}


def test_a_content_filter_cut_is_incomplete(client, mock):
    """A chat answer the provider's filter cut (finish_reason `content_filter`) is an incomplete Response
    with that reason, never `completed`."""
    control(mock, script=["raw"], raw=sse_chunks({"content": "The first part"}, finish="content_filter"))
    events = list(client.responses.create(model="mock-a", input="x", stream=True))
    assert events[-1].type == "response.incomplete"
    response = events[-1].response
    assert response.status == "incomplete" and response.incomplete_details.reason == "content_filter"
    assert response.output_text == "The first part" and response.output[0].status == "incomplete"


def test_a_relayed_streams_usage_counts_the_call_that_timed_out_before_its_fallback(client, mock):
    """The chosen arm hangs past its first-byte limit and the stream falls back to the other: the upstream
    read the first call's prompt (and bills it), so the relayed Response's usage sums both calls, as
    chat's does. Last in the module: mock-a is left cooling down."""
    control(mock, script=["hang", "ok"], answers=["three words here"])
    with client.responses.stream(model="auto", input="What is 3 + 4?") as stream:
        final = stream.get_final_response()
    bodies = sent(mock)
    assert len(bodies) == 2 and final.output_text == "three words here"
    # the cut call is billed its prompt at the gateway's estimate: usage, at mock-a's prices, is the cost
    assert final.usage.input_tokens > words(bodies[1]) and final.usage.output_tokens == 3
    ponder = final.model_extra["ponder"]
    assert ponder["calls"] == 2
    assert ponder["cost_usd"] == pytest.approx((final.usage.input_tokens * 1.0 + 3 * 2.0) / 1e6)


def test_a_claude_tool_loop_with_thinking_continues_without_its_thoughts(tmp_path):
    """Claude thinking (an effort above none) refuses a conversation whose last assistant turn called
    tools without the thinking blocks (signed) it wrote before them: every agent loop over the
    Responses API (which takes no thought back: reasoning items are dropped) and every chat app that
    writes its assistant turns itself got a 400 at its second step. That turn is answered without
    thinking, as litellm does with its `modify_params`; a chat client that sends back the message
    as the SDK gave it, thinking blocks and all, keeps thinking."""
    from tests.servers import start_anthropic_mock
    from tests.test_anthropic import claude_backend

    policy = write_policy(tmp_path, {"name": "claude-loop", "arms": {"plain": {"backend": "sonnet"}},
                                     "routes": [{"name": "all", "candidates": ["plain"]}]}, "claude-loop.yaml")
    with running(start_anthropic_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [claude_backend("sonnet", mock, reasoning=True, efforts=["none", "low", "medium", "high"])],
            "policy": policy}, name="claude-loop", env={"ANTHROPIC_API_KEY": "sk-ant-test"})) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        control(mock, script=["tool_use"], answers=['{"city": "Paris"}', "Sunny in Paris."], thinking="Ask the tool.")
        first = client.responses.create(model="sonnet", input="Weather in Paris?", tools=[WEATHER],
                                        reasoning={"effort": "high"})
        assert [item.type for item in first.output] == ["reasoning", "function_call"]
        call = first.output[1]
        for stream in (False, True):
            loop = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
                    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
            if stream:
                with client.responses.stream(model="sonnet", input=loop, tools=[WEATHER],
                                             reasoning={"effort": "high"}) as events:
                    answer = events.get_final_response()
            else:
                answer = client.responses.create(model="sonnet", input=loop, tools=[WEATHER],
                                                 reasoning={"effort": "high"})
            assert answer.status == "completed" and answer.output_text == "Sunny in Paris."
            assert "thinking" not in sent(mock)[-1]  # this turn without: it has no thought to go on from
            control(mock, answers=["Sunny in Paris."])
        # a chat app that keeps the message as the SDK gave it sends its thinking blocks back: thinking stays on
        reset(mock)
        control(mock, script=["tool_use"], answers=['{"city": "Paris"}', "Sunny in Paris."], thinking="Ask the tool.")
        tools = [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        message = client.chat.completions.create(model="sonnet", messages=messages, tools=tools,
                                                 reasoning_effort="high").choices[0].message
        kept = [*messages, message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}]
        answer = client.chat.completions.create(model="sonnet", messages=kept, tools=tools, reasoning_effort="high")
        assert answer.choices[0].message.content == "Sunny in Paris."
        body = sent(mock)[-1]
        assert body["thinking"]["type"] == "enabled" and body["messages"][1]["content"][0]["type"] == "thinking"
        # one that writes its assistant turn itself, without them: answered, without thinking
        control(mock, answers=["Sunny in Paris."])
        written = [*messages, {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in
                                                                               message.tool_calls]}, kept[2]]
        answer = client.chat.completions.create(model="sonnet", messages=written, tools=tools, reasoning_effort="high")
        assert answer.choices[0].message.content == "Sunny in Paris." and "thinking" not in sent(mock)[-1]
        # that loop over (answered), the next question thinks again: only the last assistant turn counts
        control(mock, answers=["Take an umbrella."])
        later = [*written, {"role": "assistant", "content": "Sunny in Paris."}, {"role": "user", "content": "Umbrella?"}]
        answer = client.chat.completions.create(model="sonnet", messages=later, tools=tools, reasoning_effort="high")
        assert answer.choices[0].message.content == "Take an umbrella." and sent(mock)[-1]["thinking"]["type"] == "enabled"


def test_the_prompt_cache_and_safety_hints_reach_the_backend_as_chat_sends_them(client, mock):
    """`prompt_cache_retention` (OpenAI's extended prompt caching, "24h") is a chat parameter too, which
    the chat path forwards as sent: on this API it was a 400 `unsupported_parameter`, so an app that
    set it could not switch its base_url. It and the other hints go to the backend under their names."""
    client.responses.create(model="mock-a", input="hi", prompt_cache_key="app-1", prompt_cache_retention="24h",
                            safety_identifier="u-hash", service_tier="flex", user="u-1")
    [body] = sent(mock)
    assert {k: body.get(k) for k in ("prompt_cache_key", "prompt_cache_retention", "safety_identifier",
                                      "service_tier", "user")} == {
        "prompt_cache_key": "app-1", "prompt_cache_retention": "24h", "safety_identifier": "u-hash",
        "service_tier": "flex", "user": "u-1"}


@pytest.mark.parametrize("index", [0, None])
def test_parallel_calls_streamed_under_one_index_are_separate_calls(client, mock, index):
    """Some servers stream parallel tool calls each whole, under one index (0 for every call, or none
    at all, as Gemini's OpenAI-compatible endpoint writes them): keyed by index alone, the second
    call's arguments were joined onto the first's ('{"city": "Paris"}{"city": "Rome"}', under the
    first call's name and id). A delta with a new id is a new call; its later pieces are its own."""
    def opening(call_id: str, city: str) -> dict:
        call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}
        return {"tool_calls": [{**call, **({"index": index} if index is not None else {})}]}

    def rest(city: str) -> dict:
        call = {"function": {"arguments": f'"{city}"}}'}}
        return {"tool_calls": [{**call, **({"index": index} if index is not None else {})}]}

    control(mock, script=["raw"], raw=sse_chunks(opening("call_a", "Paris"), rest("Paris"),
                                                 opening("call_b", "Rome"), rest("Rome")))
    events = list(client.responses.create(model="mock-a", input="Weather?", tools=[WEATHER], stream=True))
    done = [(e.output_index, e.arguments) for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [(0, '{"city": "Paris"}'), (1, '{"city": "Rome"}')]
    assert [(o.call_id, o.name, json.loads(o.arguments)) for o in events[-1].response.output] == [
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_weather", {"city": "Rome"})]
