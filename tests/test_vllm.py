"""vLLM as the local reasoning backend: the openai SDK against `ponder serve`, in front of the mock
OpenAI-compatible upstream answering as vLLM with a reasoning parser does (the chain of thought in
`reasoning_content`, or `reasoning` since vLLM 0.11; usage without reasoning_tokens; its 400s)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.servers import control, running, start_gateway, start_mock, write_policy

THOUGHT = " ".join(f"step{i}" for i in range(40))


def r1_backend(name: str, mock) -> dict:
    """As policies/vllm-local.yaml declares its R1 distill on vLLM."""
    return {"name": name, "model": "hosted_vllm/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "api_base": mock.url + "/v1",
            "prices": {"input_per_mtok": 0.02, "output_per_mtok": 0.10}, "reasoning": True,
            "efforts": ["low", "medium", "high"], "effort_param": "thinking_budget", "max_retries": 1, "timeout_s": 5}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    policy = write_policy(tmp, {
        "name": "vllm",
        "arms": {"r1-low": {"backend": "r1", "effort": "low", "prior": 0.8},
                 "r1-vote": {"backend": "r1", "effort": "medium", "strategy": "self_consistency", "n": 3,
                             "temperature": 0.6}},
        "routes": [{"name": "all", "candidates": ["r1-low"]}],
        "exploration": {"share": 0.0},
        "overrides": {"strategy_header": ["single", "self_consistency"]},
    }, "vllm.yaml")
    with running(start_mock(tmp)) as mock, running(start_gateway(tmp, {
            # `r1-broken` for the tests that leave their backend cooling down
            "backends": [r1_backend(name, mock) for name in ("r1", "r1-broken")],
            "policy": policy}, name="vllm")) as gateway:
        yield gateway, mock


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_vllms_max_model_len_is_openais_context_length_error(client, mock, stream):
    """vLLM's 400 for a prompt over --max-model-len has `code: 400` (the status, not a string): the
    client got `upstream_error`, and an app that trims its history on `context_length_exceeded` did not."""
    control(mock, script=["too_long_vllm"])
    with pytest.raises(openai.BadRequestError) as refused:
        response = client.chat.completions.create(model="r1", messages=[{"role": "user", "content": "x"}],
                                                  stream=stream)
        list(response) if stream else None
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    assert "maximum context length is 32768 tokens" in refused.value.message


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_stream_broken_mid_thought_bills_the_thought(stack, client, mock, field):
    """A stream cut before vLLM's usage chunk is billed from what was streamed. The thought streamed
    as newer vLLM names it (`reasoning`) counted for nothing: a stream broken (or left by its client)
    after thousands of thinking tokens was billed for none of them."""
    control(mock, script=["reset_mid"], answers=[{"content": "The answer is 42", field: THOUGHT}])
    with pytest.raises(openai.APIError, match="broke before the answer was complete"):
        list(client.chat.completions.create(model="r1-broken", stream=True,
                                            messages=[{"role": "user", "content": "What is 6 x 7?"}]))
    recorded = httpx.get(stack[0].url + "/v1/ponder/requests?limit=1").json()["requests"][0]
    assert recorded["status"] == 502 and recorded["completion_tokens"] >= 10, recorded


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_streamed_vote_on_vllm_answers_the_majority_with_its_thought(client, mock, field):
    """The vote reads each sample's answer, not its chain of thought; a streamed vote's answer keeps
    the winner's thought under vLLM's own name (`reasoning` was dropped from synthesized streams)."""
    control(mock, answers=[{"content": "The answer is 42", field: "six sevens: 42"},
                           {"content": "The answer is 41", field: "it is 42, no, 41"},
                           {"content": "The answer is 42", field: "six sevens: 42"}])
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is 6 x 7?"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-ponder-strategy": "self_consistency"}))
    assert chunks[-1].model_extra["ponder"]["arm"] == "r1/medium/self_consistency/3"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42"
    assert "".join((c.choices[0].delta.model_extra or {}).get(field) or "" for c in chunks if c.choices) \
        == "six sevens: 42"
    # vLLM reports no reasoning_tokens: its completion_tokens, thoughts included, are what is billed
    assert chunks[-1].usage.completion_tokens == 3 * 4 + 3 + 5 + 3
