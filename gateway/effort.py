"""Effort levels onto each provider's knob (the table is documented in docs/policies.md).

- `reasoning_effort`: OpenAI's parameter; litellm maps it to Anthropic and Gemini thinking budgets.
- `thinking_budget`: an explicit thinking-token budget (Anthropic-style `thinking` block, which
  litellm forwards; vLLM reasoning models read `chat_template_kwargs` plus the budget).
- `enable_thinking`: on/off models (DeepSeek V3.x hybrid, Qwen3 on vLLM): thinking on above `low`.
- `none`: the backend has no knob; effort only shapes the strategy.

Claude refuses some calls while it thinks; `fit_claude_thinking` makes a call to it fit.
"""

from __future__ import annotations

from typing import Any

from policies.backends import BackendSpec
from policies.thinking import (  # re-exported: the gateway's effort knowledge, also the router's
    CLAUDE_MIN_THINKING_BUDGET, THINKING_BUDGET_TOKENS, effective_effort, is_claude_api, takes_reasoning_effort,
)

# top_p Claude takes while it thinks: from this to 1
CLAUDE_THINKING_MIN_TOP_P = 0.95


def lowest_effort(spec: BackendSpec) -> str:
    """The least thinking this backend can be asked for: its lowest declared level; with none declared,
    "none" where the knob turns thinking off (a thinking budget, thinking on/off), else "low" (the
    lowest level every OpenAI reasoning model takes)."""
    if spec.efforts:
        order = list(THINKING_BUDGET_TOKENS)
        return min(spec.efforts, key=order.index)
    return "none" if spec.effort_param in ("thinking_budget", "enable_thinking") else "low"


def apply_effort(body: dict[str, Any], spec: BackendSpec, effort: str | None) -> dict[str, Any]:
    """Return the body with the effort knob set for this backend (the input is not modified).

    What is sent is the arm's effort, never the client's own `reasoning_effort` as it came: that was
    a routing hint, which the policy may not honour (then the arm has another effort, or none), and
    which the arm of a request naming a backend carries, translated for it (`x-ponder-arm` names the
    effort sent). `verbosity`, the other knob of OpenAI's reasoning models (gpt-5), reaches only a
    backend that takes `reasoning_effort`: OpenAI's chat models refuse any but `medium` with a 400."""
    if "reasoning_effort" in body or ("verbosity" in body and not takes_reasoning_effort(spec)):
        body = {k: v for k, v in body.items()
                if k != "reasoning_effort" and (k != "verbosity" or takes_reasoning_effort(spec))}
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


def fit_claude_thinking(body: dict[str, Any], thinking: dict[str, Any] | None, *,
                        thoughts_left_out: bool = False) -> dict[str, Any]:
    """The body as Claude takes it while it thinks (the input is not modified). `thinking` is what the
    call turns on: the body's own `thinking` block, or what litellm makes of its `reasoning_effort`.

    Anthropic refuses with a 400 a thinking budget not below max_tokens, a temperature other than 1,
    top_k, a top_p under 0.95, and a forced tool call while thinking. The effort is the gateway's
    choice (a routed arm's, a vote's sampling temperature), so the client's own request must not fail
    for it: a budget under Claude's least (1,024; `minimal` is 512) is raised to it, as litellm maps
    `minimal`; the budget is cut to fit the client's output limit (as OpenAI's reasoning models spend
    reasoning within max_completion_tokens), thinking is left off where no budget fits or a tool call is
    forced or the conversation's last tool calls come without the thinking that led to them
    (`thoughts_left_out`: Claude continues a tool loop only from its signed thinking blocks), and
    sampling knobs Claude cannot take while thinking are left out (it samples at 1)."""
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return body
    limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int)]
    limit = min(limits) if limits else None
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and budget < CLAUDE_MIN_THINKING_BUDGET and body.get("thinking") is thinking:
        budget = CLAUDE_MIN_THINKING_BUDGET
        thinking = {**thinking, "budget_tokens": budget}
        body = {**body, "thinking": thinking}
    tool_choice = body.get("tool_choice")
    forced = tool_choice == "required" or (isinstance(tool_choice, dict) and tool_choice.get("type") == "function")
    if forced or thoughts_left_out or (limit is not None and isinstance(budget, int) and limit <= CLAUDE_MIN_THINKING_BUDGET):
        body = {k: v for k, v in body.items() if k != "thinking"}
        if "reasoning_effort" in body:
            body["reasoning_effort"] = "none"
        return body
    body = dict(body)
    if limit is not None and isinstance(budget, int) and budget >= limit:
        body.pop("reasoning_effort", None)
        body["thinking"] = {**thinking, "budget_tokens": limit - 1}
    if body.get("temperature") not in (None, 1):
        del body["temperature"]
    body.pop("top_k", None)
    if isinstance(body.get("top_p"), (int, float)) and body["top_p"] < CLAUDE_THINKING_MIN_TOP_P:
        del body["top_p"]
    return body


def thoughts_left_out(messages: list[dict[str, Any]]) -> bool:
    """Whether the conversation's last assistant turn called tools without the thinking blocks that led
    to them (and no turn has any: Claude refuses those without thinking): Claude continues a tool loop
    only from its signed thinking, and refuses to think on from such a turn. A Responses API client
    sends no thought back (reasoning items are dropped), nor does a chat app that writes its turns
    itself. Only the last assistant turn counts, as Anthropic's rule says: a tool loop that ended in
    an answer earlier in the conversation leaves the next question free to think (litellm's own test,
    under its `modify_params`, looks at the last turn that called tools, however far back)."""
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if last is None or not last.get("tool_calls") or last.get("thinking_blocks"):
        return False
    return not any(isinstance(m, dict) and m.get("role") == "assistant" and m.get("thinking_blocks") for m in messages)
