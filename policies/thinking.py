"""Which calls think before they answer: effort levels as each backend takes them.

Pure knowledge of the backends, shared by the gateway (gateway/effort.py sets the knobs) and the
router (router/estimates.py: an arm whose backend thinks spends its thinking within the client's
max_tokens).
"""

from __future__ import annotations

from policies.backends import BackendSpec

# In increasing order; "xhigh" (OpenAI's level above high) is accepted from clients naming a backend
THINKING_BUDGET_TOKENS = {"none": 0, "minimal": 512, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
# Claude's extended thinking: a budget of at least this, and below the call's max_tokens
CLAUDE_MIN_THINKING_BUDGET = 1024


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


def thinks_at(spec: BackendSpec, effort: str | None) -> bool:
    """Whether a call to this backend at this effort thinks before it answers, spending output tokens
    the answer never shows: a reasoning model does unless its knob turns thinking off."""
    if not spec.reasoning:
        return False
    effort = effective_effort(spec, effort)
    if effort is None:
        return True  # no knob (an always-thinking model on vLLM): it thinks at its own length
    if spec.effort_param == "thinking_budget":
        return THINKING_BUDGET_TOKENS.get(effort, 0) > 0
    if spec.effort_param == "enable_thinking":
        return effort not in ("none", "minimal", "low")
    return effort != "none"


def unthinking_effort(spec: BackendSpec) -> str | None:
    """The least effort at which a call to this backend answers at once, without thinking: a declared
    level that turns thinking off (`none` where the knob is a thinking budget or an on/off switch and no
    levels are declared). None where no level does: an OpenAI reasoning model that declares no `none`
    (o4-mini refuses it with a 400), a server without a knob."""
    if spec.efforts:
        levels = spec.efforts
    else:
        levels = ["none"] if spec.effort_param in ("thinking_budget", "enable_thinking") else []
    order = list(THINKING_BUDGET_TOKENS)
    for effort in sorted(levels, key=lambda e: order.index(e) if e in order else len(order)):
        if not thinks_at(spec, effort):
            return effort
    return None


def thinking_cap_floor(spec: BackendSpec, effort: str | None) -> int | None:
    """The client's output cap above which a call at this effort thinks (None: it never does). Claude
    thinks only above its least budget: under a lower cap the gateway leaves its thinking off
    (gateway.effort.fit_claude_thinking), and it answers at once."""
    if not thinks_at(spec, effort):
        return None
    return CLAUDE_MIN_THINKING_BUDGET if is_claude_api(spec) else 0


def _closest(effort: str, supported: list[str]) -> str:
    """The declared level nearest `effort`; between two as near, the cheaper, but never "none" for a
    request that asked for some thinking: "minimal" on a backend with none and low is low."""
    order = list(THINKING_BUDGET_TOKENS)
    want = order.index(effort) if effort in order else 2
    return min(supported, key=lambda e: (abs(order.index(e) - want), e == "none" != effort, order.index(e)))
