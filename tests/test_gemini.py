"""Gemini behind litellm: the openai SDK against `ponder serve`, in front of a real HTTP mock of the
Gemini API (tests/mock_gemini.py), which refuses what Gemini refuses."""

from __future__ import annotations

import asyncio
import types

import openai
import orjson
import pytest

from tests.servers import (calls, control, reset, running, sent, start_gateway, start_gemini_mock, start_mock,
                           write_policy)

# litellm's cost map for gemini-2.5-flash, USD per token
FLASH_INPUT, FLASH_OUTPUT, FLASH_CACHE_READ = 0.3e-6, 2.5e-6, 0.03e-6


def gemini_backend(name: str, mock, model: str = "gemini/gemini-2.5-flash", **extra) -> dict:
    return {"name": name, "model": model, "api_base": mock.url + "/v1beta", "api_key_env": "GEMINI_API_KEY",
            "reasoning": True, "efforts": ["none", "low", "medium", "high"], "max_retries": 1, "timeout_s": 5,
            "first_byte_timeout_s": 3, **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemini")
    policy = write_policy(tmp, {
        "name": "gemini",
        "arms": {"plain": {"backend": "flash", "effort": "none", "prior": 0.8},
                 "vote": {"backend": "flash", "effort": "low", "strategy": "self_consistency", "n": 3}},
        "routes": [{"name": "all", "candidates": ["plain"]}],
        "exploration": {"share": 0.0},
        "overrides": {"reasoning_effort": True},
    }, "gemini.yaml")
    with running(start_gemini_mock(tmp)) as mock, running(start_mock(tmp)) as openai_mock, \
            running(start_gateway(tmp, {
            "backends": [gemini_backend("flash", mock),
                         # one per test that leaves its backend cooling down
                         *(gemini_backend(f"flash-{i}", mock) for i in range(2)),
                         # one per truncation test: a cut call counts against its backend
                         *(gemini_backend(f"flash-cut-{i}", mock) for i in range(4)),
                         # one per stream mode of the blocked-prompt test
                         *(gemini_backend(f"flash-blocked-{i}", mock) for i in range(2)),
                         # Gemini's OpenAI-compatible endpoint, on the fast path
                         {"name": "flash-openai", "model": "openai/gemini-2.5-flash",
                          "api_base": openai_mock.url + "/v1", "max_retries": 1, "timeout_s": 5}],
            "policy": policy}, name="gemini", env={"GEMINI_API_KEY": "gemini-test-key"})) as gateway:
        yield gateway, mock, openai_mock


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_and_cached_tokens_are_billed_as_gemini_bills_them(client, mock, stream):
    """Gemini reports thoughts apart from the answer (thoughtsTokenCount) and the prompt's cached part
    (cachedContentTokenCount): thoughts are billed as output, cached tokens at the cached price."""
    control(mock, answers=["four words long here"], cached=2, thinking="one two three four five six")
    raw = client.chat.completions.with_raw_response.create(
        model="flash", reasoning_effort="low", messages=[{"role": "user", "content": "one two three"}],
        stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        usage_chunk = list(raw.parse())[-1]
        usage, cost = usage_chunk.usage, usage_chunk.model_extra["ponder"]["cost_usd"]
    else:
        completion = raw.parse()
        usage, cost = completion.usage, float(raw.headers["x-ponder-cost-usd"])
        assert completion.choices[0].message.content == "four words long here"
    assert sent(mock)[-1]["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 1024
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4 + 6)
    assert usage.completion_tokens_details.reasoning_tokens == 6 and usage.prompt_tokens_details.cached_tokens == 2
    assert cost == pytest.approx(1 * FLASH_INPUT + 2 * FLASH_CACHE_READ + 10 * FLASH_OUTPUT, rel=1e-3)


def test_a_vote_on_gemini_reads_the_answers_not_the_thoughts(client, mock):
    control(mock, answers=["The answer is 42", "The answer is 41", "The answer is 42"],
            thinking="Perhaps it is 41 or maybe 41")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", reasoning_effort="low", messages=[{"role": "user", "content": "What is 6 x 7?"}])
    assert raw.headers["x-ponder-arm"] == "flash/low/self_consistency/3"
    assert raw.parse().choices[0].message.content == "The answer is 42"
    bodies = sent(mock)
    assert len(bodies) == 3 and all(b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 1024 for b in bodies)


@pytest.mark.parametrize("stream", [False, True])
def test_a_rate_limit_passes_on_geminis_retry_delay(client, mock, stream):
    """Gemini sends no Retry-After: its 429 RESOURCE_EXHAUSTED says when to come back in the body's
    RetryInfo (retryDelay "7s"). That was lost: the backend was called again at once (spending the
    exhausted quota's next request), and the client's 429 said to retry in 1 s."""
    control(mock, script=["429", "429"])
    backend = f"flash-{int(stream)}"
    with pytest.raises(openai.RateLimitError) as limited:
        response = client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}],
                                                  stream=stream)
        list(response) if stream else None
    assert limited.value.response.headers["retry-after"] == "7"  # the mock's retryDelay
    assert len(sent(mock)) == 1
    # the backend waits as long as Gemini asked: no call reaches it meanwhile
    with pytest.raises(openai.APIStatusError) as cooling:
        client.chat.completions.create(model=backend, messages=[{"role": "user", "content": "x"}])
    assert cooling.value.status_code == 503 and int(cooling.value.response.headers["retry-after"]) >= 5
    assert len(sent(mock)) == 1


def test_a_rate_limit_from_geminis_openai_compatible_endpoint_passes_on_its_retry_delay(stack, client):
    """The same RetryInfo, in the list-wrapped error body of Gemini's OpenAI-compatible endpoint."""
    openai_mock = stack[2]
    reset(openai_mock)
    control(openai_mock, script=["429_google", "429_google"])
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="flash-openai", messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "7"
    assert calls(openai_mock)["count"] == 1


def relayed(response) -> tuple[list, Exception | None]:
    """A stream's chunks, and the error its SSE error event raised in the openai SDK (None if it ended)."""
    chunks = []
    try:
        for chunk in response:
            chunks.append(chunk)
    except openai.APIError as exc:
        return chunks, exc
    return chunks, None


@pytest.mark.parametrize("break_kind, backend", [("truncate", "flash-cut-0"), ("break_mid", "flash-cut-1")])
def test_a_gemini_stream_cut_after_bytes_ends_with_an_error_not_a_finish(client, mock, break_kind, backend):
    """Gemini's stream has no end marker but the candidate's finishReason, and litellm marks every chunk
    "stop": a body that ended cleanly after its first chunk was relayed as a complete answer, with a
    finish_reason and [DONE]. It ends with the SSE error event, as a reset mid-stream does."""
    control(mock, answers=["one two three four five six"], script=[break_kind])
    chunks, error = relayed(client.chat.completions.create(
        model=backend, messages=[{"role": "user", "content": "count"}], stream=True))
    assert error is not None and "stream broke before the answer was complete" in error.message
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one"
    assert all(choice.finish_reason is None for c in chunks for choice in c.choices)
    assert len(sent(mock)) == 1  # bytes had reached the client: not retried


def test_a_gemini_stream_cut_before_its_first_chunk_is_retried_invisibly(client, mock):
    """A body that ended before any event was an empty answer with finish_reason "stop"; nothing had
    reached the client, so it is retried, and the client gets the whole answer."""
    control(mock, answers=["one two three"], script=["truncate_at_start"])
    chunks, error = relayed(client.chat.completions.create(
        model="flash-cut-2", messages=[{"role": "user", "content": "count"}], stream=True))
    assert error is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason] == ["stop"]
    assert len(sent(mock)) == 2


@pytest.mark.parametrize("break_kind", ["truncate", "break_mid"])
def test_a_gemini_answer_cut_half_way_is_retried_not_the_clients_422(client, mock, break_kind):
    """A JSON answer whose body stops half way (a 200): litellm cannot read it and says 422, which was
    passed on as the client's error, not retried, no fallback. It is the upstream's failure (502),
    retried: the client gets the answer."""
    control(mock, answers=["one two three"], script=[break_kind])
    completion = client.chat.completions.create(model="flash-cut-3", messages=[{"role": "user", "content": "count"}])
    assert completion.choices[0].message.content == "one two three"
    assert len(sent(mock)) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_geminis_filters_block_is_a_content_filter_answer_not_a_failure(client, mock, stream):
    """Gemini answers a prompt its safety filters block with promptFeedback.blockReason and no candidate
    (a stream's one event): litellm makes it finish_reason "content_filter". The stream's end check
    took the missing candidate for a cut stream: retried, the backend marked failing (two such
    prompts cooled it down for everyone), and the client got a 502 for its own prompt."""
    backend = f"flash-blocked-{int(stream)}"
    for _ in range(2):
        reset(mock)
        control(mock, script=["blocked", "blocked"])
        raw = client.chat.completions.with_raw_response.create(
            model=backend, messages=[{"role": "user", "content": "something blocked"}], stream=stream)
        if stream:
            chunks, error = relayed(raw.parse())
            assert error is None
            finishes = [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason]
        else:
            finishes = [choice.finish_reason for choice in raw.parse().choices]
        assert finishes == ["content_filter"]
        assert len(sent(mock)) == 1  # not retried: the answer is Gemini's, not a broken one
    reset(mock)
    control(mock, answers=["fine"])  # nor is the backend cooling down after two of them
    assert client.chat.completions.create(
        model=backend, messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "fine"


def vertex_llama_stream(events: list[dict]):
    """litellm's own iterator of a Vertex partner model's stream (Llama, served OpenAI-compatible, as
    DeepSeek, Qwen, gpt-oss and Mistral are there), over these SSE events and [DONE]."""
    from litellm.llms.vertex_ai.vertex_ai_partner_models.llama.transformation import VertexAILlama3Config

    async def lines():
        for event in events:
            yield "data: " + orjson.dumps(event).decode()
        yield "data: [DONE]"

    return VertexAILlama3Config().get_model_response_iterator(streaming_response=lines(), sync_stream=False)


def test_a_vertex_partner_models_whole_stream_is_not_taken_for_a_cut_one():
    """`vertex_ai/` serves Gemini and Claude, whose ends StreamEnd reads, but also partner models that
    stream OpenAI's chunks (Llama, DeepSeek, Qwen, Mistral...). Those have no candidate nor
    message_stop: every whole answer of theirs counted as cut, and each stream ended with the SSE
    error event after its last word (and marked its backend failing). Their end is litellm's to judge."""
    from gateway.litellm_calls import StreamEnd

    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "meta/llama-3.3-70b-instruct-maas"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}]
    source = vertex_llama_stream(events)
    end = StreamEnd(types.SimpleNamespace(completion_stream=source), "vertex_ai/meta/llama-3.3-70b-instruct-maas")

    async def read() -> list:
        return [chunk async for chunk in source]

    chunks = asyncio.run(read())
    assert len(chunks) >= 2  # litellm read the whole stream, its finish chunk included
    assert not end.cut
