"""Claude behind litellm: the openai SDK against `ponder serve`, in front of a real HTTP mock of
Anthropic's Messages API (tests/mock_anthropic.py), which refuses what Anthropic refuses."""

from __future__ import annotations

import time

import openai
import pytest

from tests.servers import (BEDROCK_ENV, control, running, sent, start_anthropic_mock, start_bedrock_mock, start_gateway,
                           write_policy)

# litellm's cost map for claude-sonnet-4-5, USD per token
SONNET_INPUT, SONNET_OUTPUT, SONNET_CACHE_READ, SONNET_CACHE_WRITE = 3e-6, 15e-6, 0.3e-6, 3.75e-6


def claude_backend(name: str, mock, model: str = "anthropic/claude-sonnet-4-5", **extra) -> dict:
    return {"name": name, "model": model, "api_base": mock.url, "api_key_env": "ANTHROPIC_API_KEY",
            "supports_n": False, "max_retries": 1, "timeout_s": 5, "first_byte_timeout_s": 3, **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anthropic")
    policy = write_policy(tmp, {
        "name": "claude",
        "arms": {"plain": {"backend": "sonnet", "effort": "none", "prior": 0.8},
                 "vote": {"backend": "haiku", "effort": "low", "strategy": "self_consistency", "n": 3}},
        "routes": [{"name": "all", "candidates": ["plain"]}],
        "exploration": {"share": 0.0},
        "overrides": {"reasoning_effort": True},
    }, "claude.yaml")
    efforts = ["none", "low", "medium", "high"]
    with running(start_anthropic_mock(tmp)) as mock, running(start_gateway(tmp, {
            "backends": [claude_backend("sonnet", mock, reasoning=True, efforts=efforts),
                         claude_backend("haiku", mock, "anthropic/claude-haiku-4-5", reasoning=True, efforts=efforts),
                         claude_backend("sonnet-budget", mock, reasoning=True, efforts=efforts,
                                        effort_param="thinking_budget"),
                         # no `efforts` list: every level is sent as asked
                         claude_backend("sonnet-budget-any", mock, reasoning=True, effort_param="thinking_budget"),
                         # `supports_n` left at its default (true), as an operator may
                         {**claude_backend("haiku-n", mock, "anthropic/claude-haiku-4-5"), "supports_n": True},
                         # one per test that leaves its backend cooling down
                         *(claude_backend(f"plain-haiku-{i}", mock, "anthropic/claude-haiku-4-5") for i in range(2)),
                         # one per truncation test: a cut call counts against its backend
                         *(claude_backend(f"cut-haiku-{i}", mock, "anthropic/claude-haiku-4-5") for i in range(2)),
                         # a whole call may take long, a pause in its stream may not
                         claude_backend("stall-haiku", mock, "anthropic/claude-haiku-4-5", timeout_s=60,
                                        first_byte_timeout_s=1)],
            "policy": policy}, name="anthropic", env={"ANTHROPIC_API_KEY": "sk-ant-test"})) as gateway:
        yield gateway, mock


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_cache_writes_are_billed_at_the_cache_write_price(client, mock, stream):
    """Anthropic bills the prompt tokens it wrote to its cache at 1.25x the input price, and those it
    read from it at 0.1x; both were billed at the input price's, or the cache-read price's, rate."""
    control(mock, answers=["four words long here"], cache_read=1000, cache_creation=2000)
    raw = client.chat.completions.with_raw_response.create(
        model="sonnet", messages=[{"role": "user", "content": "one two three"}], stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        usage_chunk = list(raw.parse())[-1]
        usage, cost = usage_chunk.usage, usage_chunk.model_extra["ponder"]["cost_usd"]
    else:
        completion = raw.parse()
        usage, cost = completion.usage, float(raw.headers["x-ponder-cost-usd"])
    assert usage.prompt_tokens == 3003 and usage.prompt_tokens_details.cached_tokens == 1000
    assert cost == pytest.approx(3 * SONNET_INPUT + 1000 * SONNET_CACHE_READ + 2000 * SONNET_CACHE_WRITE
                                 + 4 * SONNET_OUTPUT, rel=1e-3)


@pytest.mark.parametrize("stream", [False, True])
def test_a_rate_limit_passes_on_anthropics_retry_after(client, mock, stream):
    """litellm keeps Anthropic's response headers apart from its exception's `response`: the client's
    429 lost the upstream's Retry-After (and the backend cooled down for less than it asked)."""
    control(mock, script=["429"])
    backend = f"plain-haiku-{int(stream)}"
    with pytest.raises(openai.RateLimitError) as limited:
        response = client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}],
                                                  stream=stream)
        list(response) if stream else None
    assert limited.value.response.headers["retry-after"] == "7"  # the mock's
    assert len(sent(mock)) == 1
    # the backend waits as long as Anthropic asked: no call reaches it meanwhile
    with pytest.raises(openai.APIStatusError) as cooling:
        client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}])
    assert cooling.value.status_code == 503 and int(cooling.value.response.headers["retry-after"]) >= 5
    assert len(sent(mock)) == 1


def test_a_thinking_budget_backend_sends_claude_only_its_thinking_block(client, mock):
    """`effort_param: thinking_budget` (docs/policies.md: "Anthropic-style budgets") also sent
    `chat_template_kwargs`, a vLLM field that Anthropic's API refuses (400, extra inputs are not
    permitted): every call to such a Claude backend failed, thinking or not."""
    for effort, thinking in (("high", {"type": "enabled", "budget_tokens": 16384}), ("none", None)):
        completion = client.chat.completions.create(model="sonnet-budget", reasoning_effort=effort,
                                                    messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "Hello from the mock Anthropic."
        body = sent(mock)[-1]
        assert body.get("thinking") == thinking and "chat_template_kwargs" not in body


@pytest.mark.parametrize("model, effort, max_tokens, thinking", [
    ("sonnet", "high", 2000, {"type": "enabled", "budget_tokens": 1999}),  # litellm's 4096, cut to fit
    ("sonnet", "high", 1024, None),  # no room for the smallest budget (1024): no thinking
    ("sonnet", "low", 5000, {"type": "enabled", "budget_tokens": 1024}),  # fits: as litellm sends it
    ("sonnet-budget", "high", 4000, {"type": "enabled", "budget_tokens": 3999}),  # Ponder's own 16384
    # Ponder's `minimal` (512) is under Claude's least: raised to it, as litellm maps `minimal` (was a 400)
    ("sonnet-budget-any", "minimal", 4000, {"type": "enabled", "budget_tokens": 1024}),
])
def test_claudes_thinking_budget_fits_the_clients_output_limit(client, mock, model, effort, max_tokens, thinking):
    """Anthropic refuses a thinking budget that is not below max_tokens. The effort's budget (the
    arm's, which the client may not have chosen) ignored the client's max_tokens, so a request OpenAI
    takes (reasoning spent within the output limit) got a 400 and no fallback."""
    completion = client.chat.completions.create(model=model, reasoning_effort=effort, max_tokens=max_tokens,
                                                messages=[{"role": "user", "content": "What is 6 x 7?"}])
    assert completion.choices[0].message.content == "Hello from the mock Anthropic."
    body = sent(mock)[-1]
    assert body["max_tokens"] == max_tokens and body.get("thinking") == thinking


def test_a_vote_on_a_thinking_claude_arm_samples_at_claudes_temperature(client, mock):
    """A vote draws its samples at a sampling temperature (0.7), which Claude refuses while it thinks
    (only 1): every sample of a self-consistency arm on a thinking Claude failed with a 400."""
    control(mock, answers=["The answer is 42"])
    raw = client.chat.completions.with_raw_response.create(
        model="auto", reasoning_effort="low", messages=[{"role": "user", "content": "What is 6 x 7?"}])
    assert raw.headers["x-ponder-arm"] == "haiku/low/self_consistency/3"
    assert raw.parse().choices[0].message.content == "The answer is 42"
    bodies = sent(mock)
    assert len(bodies) == 3 and all(b["thinking"]["budget_tokens"] == 1024 and "temperature" not in b
                                    for b in bodies)


def test_a_clients_sampling_knobs_and_forced_tool_call_meet_claudes_thinking(client, mock):
    """The client's temperature, a top_p under 0.95 and a forced tool call are refused by Claude while
    it thinks; the thinking is the arm's effort, so the client's request must not fail for it."""
    messages = [{"role": "user", "content": "What is 6 x 7?"}]
    client.chat.completions.create(model="sonnet", reasoning_effort="high", temperature=0.2, top_p=0.5,
                                   messages=messages)
    body = sent(mock)[-1]
    assert body["thinking"]["budget_tokens"] == 4096 and "temperature" not in body and "top_p" not in body
    client.chat.completions.create(model="sonnet", reasoning_effort="none", temperature=0.2, messages=messages)
    assert sent(mock)[-1]["temperature"] == 0.2  # not thinking: sent as the client asked

    tools = [{"type": "function", "function": {"name": "multiply", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    control(mock, script=["tool_use"], answers=['{"a": 6, "b": 7}'])
    completion = client.chat.completions.create(model="sonnet", reasoning_effort="high", tools=tools,
                                                tool_choice="required", messages=messages)
    call = completion.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("multiply", '{"a": 6, "b": 7}')
    assert "thinking" not in sent(mock)[-1]  # the forced call wins: answered without thinking


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_asking_n_choices_of_claude_gets_n(client, mock, stream):
    """Anthropic's API has no `n`, and litellm drops it: a backend that kept `supports_n` at its
    default answered a client's n=3 with one choice. The missing choices are drawn as separate calls."""
    control(mock, answers=["one", "two", "three"])
    response = client.chat.completions.create(model="haiku-n", n=3, messages=[{"role": "user", "content": "a word"}],
                                              stream=stream)
    if stream:
        texts = {}
        for chunk in response:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    else:
        texts = {choice.index: choice.message.content for choice in response.choices}
    assert sorted(texts.values()) == ["one", "three", "two"] and sorted(texts) == [0, 1, 2]
    assert len(sent(mock)) == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_claudes_window_is_openais_context_length_error(client, mock, stream):
    """Anthropic says "prompt is too long"; apps branch on OpenAI's code (trim the history): the 400 has
    it, and is neither retried nor sent to another backend."""
    control(mock, script=["too_long"])
    with pytest.raises(openai.BadRequestError) as refused:
        response = client.chat.completions.create(model="haiku", messages=[{"role": "user", "content": "x"}],
                                                  stream=stream)
        list(response) if stream else None
    assert refused.value.code == "context_length_exceeded" and "prompt is too long" in refused.value.message
    assert len(sent(mock)) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_image_url_litellm_cannot_fetch_stays_out_of_the_log(stack, client, mock, stream):
    """litellm fetches an `http://` image itself for Claude (Anthropic takes URLs over https only), and
    logged the URL of one it refused or failed to fetch at WARNING: part of the prompt, and a signed
    URL is a credential. Without `log_prompts` no prompt text reaches the log: the client still gets
    its 400, which names the URL."""
    gateway = stack[0]
    url = f"http://127.0.0.1:9/private/scan-{stream}.png?X-Amz-Signature=zebra-quartz-{stream}"
    content = [{"type": "text", "text": "What is on this page?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError) as refused:
        answer = client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": content}],
                                                max_tokens=50, stream=stream)
        list(answer) if stream else None
    assert url in refused.value.message
    time.sleep(0.3)
    assert f"zebra-quartz-{stream}" not in gateway.log()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("asked", "param"), [({"logprobs": True, "top_logprobs": 2}, "logprobs"),
                                              ({"modalities": ["text", "audio"],
                                                "audio": {"voice": "alloy", "format": "wav"}}, "audio")])
def test_logprobs_or_audio_claude_cannot_give_are_refused_not_dropped(client, mock, stream, asked, param):
    """litellm drops what Anthropic's API does not have: an app that asked for logprobs (or a spoken
    answer) got a 200 without them, and without a word (`choice.logprobs` None, its code's crash).
    Refused with OpenAI's code instead, naming the parameter, before any call."""
    with pytest.raises(openai.BadRequestError) as refused:
        response = client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "x"}],
                                                  stream=stream, **asked)
        list(response) if stream else None
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", param)
    assert "sonnet (anthropic/claude-sonnet-4-5) cannot give" in refused.value.message
    assert sent(mock) == []
    # what Claude can do is sent as before: stop sequences become Anthropic's
    client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "x"}], stop=["END"])
    assert sent(mock)[-1]["stop_sequences"] == ["END"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_before_message_stop_is_never_passed_off_as_complete(client, mock, stream):
    """A body that ends cleanly without Anthropic's message_delta and message_stop: a stream that had
    relayed bytes ends with the SSE error event (no finish_reason); a JSON answer cut half way is the
    upstream's failure, retried."""
    control(mock, answers=["one two three four"], script=["truncate"])
    backend = f"cut-haiku-{int(stream)}"
    if not stream:
        completion = client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "count"}])
        assert completion.choices[0].message.content == "one two three four" and len(sent(mock)) == 2
        return
    chunks = []
    with pytest.raises(openai.APIError) as broken:
        for chunk in client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "count"}],
                                                    stream=True):
            chunks.append(chunk)
    assert "stream broke before the answer was complete" in broken.value.message
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one"
    assert all(choice.finish_reason is None for c in chunks for choice in c.choices)
    assert len(sent(mock)) == 1


def test_a_claude_stream_that_stalls_mid_answer_is_cut_after_first_byte_timeout(client, mock):
    """`first_byte_timeout_s` bounds any pause between two events (docs/policies.md), as on the fast
    path: through litellm only its read timeout (the whole call's `timeout_s`) cut a stalled stream, and
    the client waited that long (up to the request's deadline) for the error event."""
    control(mock, answers=["one two three four"], script=["stall"], hang_s=20)
    chunks, started = [], time.monotonic()
    with pytest.raises(openai.APIError) as broken:
        for chunk in client.chat.completions.create(model="stall-haiku", stream=True,
                                                    messages=[{"role": "user", "content": "count"}]):
            chunks.append(chunk)
    assert time.monotonic() - started < 8, "cut at the stream's pause limit (1 s), not after the mock's 20 s"
    assert "stream stalled" in broken.value.message
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one"


def test_a_claude_stream_on_bedrock_cut_before_message_stop_ends_with_an_error(tmp_path):
    """Claude on Bedrock streams Converse's events: a body that ends cleanly without messageStop is not
    a complete answer (litellm's own check, which StreamEnd leaves to it there)."""
    backend = {"name": "bedrock-haiku", "model": "bedrock/anthropic.claude-3-5-haiku-20241022-v1:0",
               "max_retries": 0, "timeout_s": 5, "first_byte_timeout_s": 3}
    policy = write_policy(tmp_path, {"name": "bedrock", "arms": {"plain": {"backend": "bedrock-haiku"}},
                                     "routes": [{"name": "all", "candidates": ["plain"]}]})
    with running(start_bedrock_mock(tmp_path)) as mock, running(start_gateway(
            tmp_path, {"backends": [{**backend, "api_base": mock.url}], "policy": policy}, env=BEDROCK_ENV)) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "count"}]
        control(mock, answer="one two three four")
        chunks = list(client.chat.completions.create(model="bedrock-haiku", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three four"
        assert [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason] == ["stop"]
        control(mock, script=["truncate"])
        chunks = []
        with pytest.raises(openai.APIError) as broken:
            for chunk in client.chat.completions.create(model="bedrock-haiku", messages=messages, stream=True):
                chunks.append(chunk)
        assert "stream broke before the answer was complete" in broken.value.message
        assert all(choice.finish_reason is None for c in chunks for choice in c.choices)
