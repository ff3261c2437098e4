"""Effort levels onto each provider's knob (the table is documented in docs/policies.md).

- `reasoning_effort`: OpenAI's parameter; litellm maps it to Anthropic and Gemini thinking budgets.
- `thinking_budget`: an explicit thinking-token budget (Anthropic-style `thinking` block, which
  litellm forwards; vLLM reasoning models read `chat_template_kwargs` plus the budget).
- `enable_thinking`: on/off models (DeepSeek V3.x hybrid, Qwen3 on vLLM): thinking on above `low`.
- `none`: the backend has no knob; effort only shapes the strategy.
"""

from __future__ import annotations

from typing import Any

from policies.backends import BackendSpec

# In increasing order; "xhigh" (OpenAI's level above high) is accepted from clients naming a backend
THINKING_BUDGET_TOKENS = {"none": 0, "minimal": 512, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}


def is_claude_api(spec: BackendSpec) -> bool:
    """Whether the backend is Claude on Anthropic's Messages API (litellm's `anthropic/` provider),
    which has no chat template and refuses fields it does not know."""
    return spec.model.partition("/")[0] == "anthropic"


def takes_reasoning_effort(spec: BackendSpec) -> bool:
    """Whether the backend's API has OpenAI's `reasoning_effort` (a non-reasoning OpenAI model
    answers it with a 400)."""
    return spec.effort_param == "reasoning_effort" and bool(spec.reasoning or spec.efforts)


def effective_effort(spec: BackendSpec, effort: str | None) -> str | None:
    """The effort this backend actually gets for `effort`: the closest level it declares, or None
    when it has no knob (what an arm key and telemetry should say was used)."""
    if effort is None or spec.effort_param == "none":
        return None
    if spec.effort_param == "reasoning_effort" and not takes_reasoning_effort(spec):
        return None
    if spec.efforts and effort not in spec.efforts:
        return _closest(effort, spec.efforts)
    return effort


def apply_effort(body: dict[str, Any], spec: BackendSpec, effort: str | None) -> dict[str, Any]:
    """Return the body with the effort knob set for this backend (the input is not modified).

    What is sent is the arm's effort, never the client's own `reasoning_effort` as it came: that was
    a routing hint, which the policy may not honour (then the arm has another effort, or none), and
    which the arm of a request naming a backend carries, translated for it (`x-ponder-arm` names the
    effort sent)."""
    if "reasoning_effort" in body:
        body = {k: v for k, v in body.items() if k != "reasoning_effort"}
    effort = effective_effort(spec, effort)
    if effort is None:
        return body
    body = dict(body)
    if spec.effort_param == "reasoning_effort":
        body["reasoning_effort"] = effort
    elif spec.effort_param == "thinking_budget":
        budget = THINKING_BUDGET_TOKENS.get(effort, 0)
        if not is_claude_api(spec):  # Anthropic answers a field it does not know with a 400
            kwargs = dict(body.get("chat_template_kwargs") or {})
            kwargs["enable_thinking"] = budget > 0
            body["chat_template_kwargs"] = kwargs
        if budget > 0:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    elif spec.effort_param == "enable_thinking":
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs["enable_thinking"] = effort not in ("none", "minimal", "low")
        body["chat_template_kwargs"] = kwargs
    return body


def _closest(effort: str, supported: list[str]) -> str:
    order = list(THINKING_BUDGET_TOKENS)
    want = order.index(effort) if effort in order else 2
    return min(supported, key=lambda e: abs(order.index(e) - want))
