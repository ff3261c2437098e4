"""What a request can cost at most: the bound a key's budget holds while the request runs.

Pure functions of the backends on offer (their prices, context windows and output limits) and the
request: `gateway/service.py` plans with them, `gateway/key_budgets.py` holds and advises with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

from gateway.backends import Backend
from gateway.prices import call_cost
from gateway.schemas import ChatRequest
from gateway.strategies import (
    OutputBound, cot_instruction_tokens, first_stage, judge_output_tokens, output_bound, uses_cot,
)
from router import prompts
from router.request_hints import RequestHints
from router.estimates import estimate_prompt_tokens, prompt_tokens_bound
from router.types import Arm, Decision

Backends = Mapping[str, Backend]

# An output limit the gateway sends leaves the prompt room in the context window. The prompt estimate
# (characters / 4) can undercount a tokenizer by a quarter, and a sample may carry the reasoning
# instruction; the limit never drops below MIN_OUTPUT_LIMIT (a prompt that near the window fails anyway).
PROMPT_UNDERCOUNT = 1.25
PROMPT_ADDITIONS = 256
MIN_OUTPUT_LIMIT = 256


def worst_case_usd(backends: Backends, arm: Arm, req: ChatRequest, prompt_tokens: int | None = None, *,
                   capped: bool = False, output_tokens: int | None = None) -> float:
    """What answering with this arm can cost at most (every sample writing as much as its call may:
    `output_bound`): what a budget must hold while the request runs, so that concurrent requests
    cannot overspend. `capped`: the key has a budget, so this must be a true bound (without
    max_tokens: the backend's maximum output, else the default length, then sent as the limit);
    without it, calls without max_tokens count a default length, only for a named backend's
    per-request cost caps. Every prompt counts what the gateway adds to it: the reasoning
    instruction of a sample that gets one, and a best-of-N judge's rubric, question and candidate
    answer. Prompts are counted by `prompt_counter`: for a key with a budget by their bound, not
    their estimate, which can be 8x under (digits, Chinese, emoji); `prompt_tokens`: the messages'
    count so made, if made. `output_tokens`: what each call would write with that max_tokens (for
    `affordable_max_tokens`; 0 prices the arm's prompts alone)."""
    backend = backends.get(arm.backend)
    if backend is None:
        return 0.0
    count = prompt_counter(capped)
    if prompt_tokens is None:
        prompt_tokens = count(req.messages, req.body)
    prompt = prompt_tokens
    if capped and backend.max_context is not None:  # a longer prompt is refused, and costs nothing
        prompt = min(prompt, backend.max_context)
    out = output_tokens if output_tokens is not None else \
        output_bound(backend, req.max_output_tokens, capped=capped).tokens
    # every sample a strategy may draw: self-consistency's extra round for a client's `n` replaces
    # failed samples (no output), and adaptive waves stop at max(n, the client's n)
    samples = max(arm.n, req.n)
    params = dict(arm.params)
    if uses_cot(arm if arm.strategy != "cascade" else first_stage(arm), backend.spec, params):
        prompt += cot_instruction_tokens(params.get("cot_template"), count)
    cost = call_cost(backend.prices, prompt, out) * samples
    if arm.strategy == "best_of_n":
        judge = backends.get(arm.verifier or arm.backend, backend)
        judged = count(prompts.judge_messages(prompts.last_user_text(req.messages), "")) + out
        cost += call_cost(judge.prices, judged, judge_output_tokens(judge.spec)) * samples
    return cost + sum(worst_case_usd(backends, stage, req, prompt_tokens, capped=capped, output_tokens=output_tokens)
                      for stage in arm.stages)


def cut_cost_usd(backends: Backends, arm: Arm, req: ChatRequest, prompt_tokens: int | None, *,
                 capped: bool = False) -> float:
    """What an arm that failed over to the next may have cost: the prompts of its calls. One may have
    been cut off mid-call (a timeout), and a cut call is billed its prompt (Backend.cut); what it had
    written never reaches the gateway, and its backend then cools down, so no second round follows."""
    return worst_case_usd(backends, arm, req, prompt_tokens, capped=capped, output_tokens=0)


def arm_bounds(backends: Backends, arms: Sequence[Arm], req: ChatRequest, prompt_tokens: int | None, *,
               capped: bool = False, output_tokens: int | None = None) -> list[float]:
    """What the request can cost at most if each of these arms, in fallback order, is the one that
    answers: its own worst case, plus what the arms before it may have cost (cut_cost_usd)."""
    bounds, cut_before = [], 0.0
    for index, arm in enumerate(arms):
        bounds.append(worst_case_usd(backends, arm, req, prompt_tokens, capped=capped,
                                     output_tokens=output_tokens) + cut_before)
        if index < len(arms) - 1:  # no arm follows the last: a single-arm plan prices one arm, once
            cut_before += cut_cost_usd(backends, arm, req, prompt_tokens, capped=capped)
    return bounds


def plan_worst_case_usd(backends: Backends, decision: Decision, req: ChatRequest, prompt_tokens: int | None, *,
                        capped: bool = False) -> float:
    """The most the decision can cost, whichever of its arms answers (arm_bounds)."""
    return max(arm_bounds(backends, (decision.arm, *decision.fallbacks), req, prompt_tokens, capped=capped))


def affordable_max_tokens(backends: Backends, arms: Sequence[Arm], req: ChatRequest, prompt_tokens: int | None,
                          usd: float, *, capped: bool = False) -> int | None:
    """The largest max_tokens with which these arms' bounds are at most `usd` (each is linear in it); 0
    when not even one token fits (the prompts alone cost more); None when the output is free, so no
    max_tokens would change it."""
    def bounds(tokens: int) -> list[float]:
        return arm_bounds(backends, arms, req, prompt_tokens, capped=capped, output_tokens=tokens)

    most: int | None = None
    for base, one in zip(bounds(0), bounds(1)):
        if base > usd:
            return 0
        if one > base:
            fits = int((usd - base) / (one - base) + 1e-6)
            most = fits if most is None else min(most, fits)
    # float rounding at the edge; the stores admit what passes the limit by less than 1e-9 USD
    while most and max(bounds(most)) > usd + 1e-9:
        most -= 1
    return most


def arms_within(backends: Backends, decision: Decision, req: ChatRequest, prompt_tokens: int | None,
                budget_left_usd: float) -> Decision:
    """The decision without the arms whose bound is more than the key has left. The budget hold covers
    every arm that may answer, so one costly fallback (eligible by its expected cost) would refuse a
    request whose chosen arm fits, and lock the key out for the rest of the period. The chosen arm
    goes too when a fallback fits in its place: it was chosen by its expected cost, and its worst case
    (a backend's whole maximum output, without max_tokens) can be far above that. When no arm fits,
    the chosen one stays, and the reservation says what to send instead."""
    arms = (decision.arm, *decision.fallbacks)
    kept: list[Arm] = []
    cut_before = 0.0  # what the arms kept before may have cost, as arm_bounds counts it
    for arm in arms:
        if worst_case_usd(backends, arm, req, prompt_tokens, capped=True) + cut_before <= budget_left_usd:
            kept.append(arm)
            cut_before += cut_cost_usd(backends, arm, req, prompt_tokens, capped=True)
    if len(kept) == len(arms):
        return decision
    kept = kept or [decision.arm]
    reasons = list(decision.reasons)
    left = f"the key's remaining {budget_left_usd:.6f} USD"
    if kept[0] is not decision.arm:
        reasons.append(f"{decision.arm.key} may cost more than {left}: {kept[0].key} answers instead")
    dropped = [arm.key for arm in decision.fallbacks if not any(arm is k for k in kept)]
    if dropped:
        reasons.append(f"fallbacks dropped: {', '.join(dropped)} may cost more than {left}")
    # an explored arm that gives way explores nothing: a fallback (the greedy arm, mostly) answers
    return dataclasses.replace(decision, arm=kept[0], fallbacks=tuple(kept[1:]), reasons=tuple(reasons),
                               explore=decision.explore and kept[0] is decision.arm)


def with_output_caps(backends: Backends, decision: Decision, req: ChatRequest, capped: bool,
                     prompt_tokens: int) -> tuple[Decision, dict[str, int]]:
    """The output limits the gateway sends this request's calls (output_bound: a key with a budget, no
    max_tokens, a backend whose maximum output is unknown), and the decision saying so. A limit leaves
    the prompt its room in the backend's context window: vLLM refuses a request whose prompt plus
    max_tokens is over it, which the request without the limit was not."""
    if not capped or req.max_output_tokens is not None:
        return decision, {}
    caps: dict[str, int] = {}
    for name in dict.fromkeys(backends_of((decision.arm, *decision.fallbacks))):
        backend = backends.get(name)
        bound = output_bound(backend, None, capped=True) if backend is not None else None
        if bound is not None and bound.sent:
            room = None if backend.max_context is None else \
                backend.max_context - int(prompt_tokens * PROMPT_UNDERCOUNT) - PROMPT_ADDITIONS
            caps[name] = bound.tokens if room is None else max(MIN_OUTPUT_LIMIT, min(bound.tokens, room))
    if not caps:
        return decision, caps
    sent = ", ".join(f"{tokens} to {name}" for name, tokens in caps.items())
    return dataclasses.replace(decision, reasons=(
        *decision.reasons, f"max_tokens sent ({sent}): the key has a budget, the request no max_tokens, "
                           "and the backend's maximum output is unknown, so the default length held is "
                           "sent as the limit")), caps


def held_without_max_tokens(bound: OutputBound | None, backend: str) -> str:
    """The advice to send a (lower) max_tokens, saying what a request without one held per call."""
    if bound is None or bound.source == "max_tokens":
        return "send a lower max_tokens"
    if bound.source == "backend":
        return f"without max_tokens each call holds {backend}'s maximum output ({bound.tokens:,} tokens); " \
               "send max_tokens"
    sent = " and is sent that as its max_tokens" if bound.sent else ""
    return f"without max_tokens each call holds {bound.tokens:,} tokens{sent} ({backend}'s maximum output is " \
           "unknown); send max_tokens"  # the client sent none: there is no lower one to send


def backends_of(arms: Sequence[Arm]) -> Iterator[str]:
    """The backends these arms send the client's body to: each arm's, and its cascade stages'."""
    for arm in arms:
        yield arm.backend
        yield from backends_of(arm.stages)


def held_prompt_tokens(req: ChatRequest, hints: RequestHints, capped: bool) -> int | None:
    """The request's prompt counted as its worst case counts it (prompt_counter): the bytes bound for a
    key with a budget, else the estimate the hints already made."""
    return prompt_tokens_bound(req.messages, req.body) if capped else hints.prompt_tokens


def prompt_counter(capped: bool) -> Callable[..., int]:
    """How a request's prompts are counted for its worst case: for a key with a budget, whose hold must
    be a bound, by their bytes (`prompt_tokens_bound`); else by the estimate the decision prices with."""
    return prompt_tokens_bound if capped else estimate_prompt_tokens
