"""Which arms compete for a request: the matched route's, widened where the client's override (or a
tool call, which must come from one plain call), an output cap too small for any arm's chain of thought,
or a prompt longer than the route's context windows leaves none that fit; and the arms ruled out, with
why. Part of router.decide.decide(), before its pass over the candidates.
"""

from __future__ import annotations

from router.estimates import (
    DEFAULT_PROMPT_TOKENS, CompiledAlias, CompiledArm, CompiledPolicy, CompiledRoute, candidate_row, exceeds_context,
)
from router.request_hints import RequestHints

_NO_CAP = 1 << 62  # max_output_tokens when the client sets none


class ContextTooLong(ValueError):
    """No arm's backend can hold the prompt: the gateway answers 400 `context_length_exceeded`."""

    def __init__(self, message: str, *, prompt_tokens: int, max_context: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


def context_message(prompt_tokens: int, max_context: int, model: str | None = None) -> str:
    """OpenAI's words for a prompt too long for the model, saying that the count is an estimate."""
    whose = f"The largest maximum context length of the models `{model}` may use here is" if model else \
        "This model's maximum context length is"
    return (f"{whose} {max_context} tokens. However, your messages resulted in about {prompt_tokens} tokens "
            "(estimated). Please reduce the length of the messages.")


def thinks_within(arm: CompiledArm, max_out: int) -> bool:
    """Whether a call of this arm thinks under the client's output cap (Claude does not under a small
    one: the gateway leaves its thinking off)."""
    return arm.thinks_above is not None and max_out > arm.thinks_above


def cut_short(arm: CompiledArm, max_out: int, tokens: float) -> bool:
    """Whether the client's cap cuts this arm before its answer: it reasons aloud or thinks, and the cap
    is below the output it is expected to write (its chain of thought, its thinking)."""
    return max_out < tokens and (arm.reasons_aloud or thinks_within(arm, max_out))


def candidate_rows(compiled: CompiledPolicy, view: CompiledAlias, route: CompiledRoute, rows: tuple, rule: str,
                   hints: RequestHints, strength: float, reasons: list[str],
                   ) -> tuple[tuple, str, dict[str, str], int, int]:
    """(rows, rule, ruled_out, max_out, prompt_tokens): the candidate rows and the rule's name with what
    widened them, the keys of those ruled out with why, the client's output cap (a huge number when it
    set none) and the prompt's estimated length. Appends to `reasons`. Raises ContextTooLong."""
    policy = compiled.policy
    overrides = policy.overrides

    # Client overrides narrow the candidates; an ignored one is said so.
    want_strategy = want_effort = None
    if hints.strategy is not None:
        if hints.strategy in overrides.strategy_header:
            want_strategy = hints.strategy
        else:
            reasons.append(f"ignored x-ponder-strategy={hints.strategy}: not allowed by policy `{policy.name}`")
    if hints.reasoning_effort is not None:
        if overrides.reasoning_effort:
            want_effort = hints.reasoning_effort
        else:
            reasons.append(f"ignored reasoning_effort={hints.reasoning_effort}: not honoured by policy `{policy.name}`")
    why = "client asked"
    if hints.exact_output is not None and want_strategy != "single":
        # Votes, reasoning instructions and cascades read and rewrite the answer's text: a tool call,
        # a JSON-mode object or logprobs must come back as the model wrote them, from one call.
        if want_strategy is not None:
            reasons.append(f"ignored x-ponder-strategy={want_strategy}: the request has {hints.exact_output}")
        want_strategy, why = "single", f"the request has {hints.exact_output}, so"
    ruled_out: dict[str, str] = {}  # arm key -> why: not what the client asked for, or the prompt is too long
    if want_strategy is not None or want_effort is not None:
        def fits(arm: CompiledArm) -> bool:
            return (want_strategy is None or arm.strategy == want_strategy) and (
                want_effort is None or arm.effort == want_effort)

        asked = ", ".join(f"{k}={v}" for k, v in (("strategy", want_strategy), ("effort", want_effort)) if v)
        if not any(fits(row[0]) for row in rows):
            present = {row[0] for row in rows}
            wider = tuple(candidate_row(arm, arm.prior, strength) for arm in view.arms if fits(arm) and arm not in present)
            if not wider and hints.exact_output is not None:
                # A tool call or JSON object must come from one plain call even when the alias itself
                # lists only votes: the policy's single arms serve it, else plain calls standing in
                # for its arms, when it has none there (docs/api.md)
                for pool in (compiled.arms.values(), compiled.plain_stand_ins):
                    wider = tuple(candidate_row(arm, arm.prior, strength) for arm in pool
                                  if fits(arm) and arm not in present)
                    if wider:
                        break
            if wider:
                reasons.append(f"{why} {asked}: no such arm in route `{route.name}`, using the policy's")
                rows, rule = rows + wider, f"{route.name}+override"
            else:
                reasons.append(f"{why} {asked}: the policy has no such arm; override ignored")
        if any(fits(row[0]) for row in rows):
            ruled_out = {row[1]: f"{why} {asked}" for row in rows if not fits(row[0])}

    max_out = hints.max_output_tokens if hints.max_output_tokens is not None else _NO_CAP
    live = [row for row in rows if row[1] not in ruled_out] if max_out < _NO_CAP and want_strategy is None else ()
    if live and all(cut_short(row[0], max_out, row[5]) for row in live):
        # The client's max_tokens cuts every arm short of its answer: the chain of thought it writes before
        # its "Final answer:" line, or the thinking its backend does first (a reasoning model cut while it
        # thinks answers empty content). A plain call to the same model that answers at once competes (the
        # policy's single arm there, else one standing in): at the arm's effort where the arm reasons
        # aloud, at an effort that turns thinking off where its backend thinks (policies/thinking.py
        # `unthinking_effort`; none where the backend has no such level). It wins where the cap leaves
        # little of the chains (their P(correct) is scaled in decide()). Not where the client asked for a
        # strategy, nor (for thinking) an effort: it gets what it asked for.
        present = {row[0] for row in rows}
        direct: dict[CompiledArm, float] = {}  # a stand-in is as likely right as the best arm it stands in for
        unthinking = False
        for carm, _, _, alpha, beta, *_ in live:
            if thinks_within(carm, max_out):
                plain = compiled.unthinking_calls.get(carm.backend) if want_effort is None else None
                if plain is None:
                    continue
                unthinking = True
            else:
                plain = compiled.plain_calls[carm.backend, carm.effort]
            prior = plain.prior if plain.name in compiled.arms else alpha / (alpha + beta)
            direct[plain] = max(prior, direct.get(plain, 0.0))
        wider = tuple(candidate_row(arm, prior, strength) for arm, prior in direct.items() if arm not in present)
        if wider:
            what = "the chain of thought or thinking" if unthinking else "the chain of thought"
            reasons.append(f"max_tokens {max_out} is below {what} every arm of route `{route.name}` is expected "
                           "to write: a direct call to the same model competes"
                           + (" (at an effort that does not think)" if unthinking else ""))
            rows, rule = rows + wider, f"{rule}+direct"

    prompt_tokens = hints.prompt_tokens if hints.prompt_tokens is not None else DEFAULT_PROMPT_TOKENS
    if prompt_tokens > compiled.context_floor:  # rare: some arm of the policy cannot hold this prompt
        def holds(arm: CompiledArm) -> bool:
            return not exceeds_context(prompt_tokens, arm.max_context)

        if not any(holds(row[0]) and row[1] not in ruled_out for row in rows):
            present = {row[0] for row in rows}
            wider = [arm for arm in view.arms if holds(arm) and arm not in present]
            if ruled_out:  # what the client's override (or a tool call) narrowed to, it narrows here too
                wider = [arm for arm in wider if fits(arm)]
            if not wider:
                # (a fitting row cannot hold it, or the override would have ruled none out)
                largest = max(row[0].max_context for row in rows if not holds(row[0]))
                raise ContextTooLong(context_message(prompt_tokens, largest, view.name), prompt_tokens=prompt_tokens,
                                     max_context=largest)
            reasons.append(f"no arm of route `{route.name}` holds a prompt of ~{prompt_tokens} tokens: "
                           f"using the alias's that do")
            rows, rule = rows + tuple(candidate_row(arm, arm.prior, strength) for arm in wider), f"{rule}+context"
        for row in rows:
            if not holds(row[0]):
                ruled_out[row[1]] = (f"prompt of ~{prompt_tokens} tokens (estimated) is over backend "
                                     f"`{row[0].backend}`'s context window of {row[0].max_context}")
    return rows, rule, ruled_out, max_out, prompt_tokens
