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

THINKING_BUDGET_TOKENS = {"none": 0, "minimal": 512, "low": 1024, "medium": 4096, "high": 16384}


def apply_effort(body: dict[str, Any], spec: BackendSpec, effort: str | None) -> dict[str, Any]:
    """Return the body with the effort knob set for this backend (the input is not modified)."""
    if effort is None or spec.effort_param == "none":
        return body
    if spec.efforts and effort not in spec.efforts:
        effort = _closest(effort, spec.efforts)
    body = dict(body)
    if spec.effort_param == "reasoning_effort":
        if spec.reasoning or spec.efforts:
            body["reasoning_effort"] = effort
    elif spec.effort_param == "thinking_budget":
        budget = THINKING_BUDGET_TOKENS.get(effort, 0)
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
