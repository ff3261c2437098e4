"""The decision engine: which arm answers this request, and why.

Pure: the classification, the policy, the learned stats, the request's hints and the backends cooling
down (the gateway's health) go in, a `Decision` comes out; the same inputs and rng seed always give the
same decision, so evals/ can replay it.

For each candidate arm of the matching route it estimates
- P(correct): the route's prior blended with the learner's Beta posterior for the bucket;
- cost: prices x (prompt tokens + expected output tokens for the effort and strategy) x samples,
  scaled by the learned ratio of observed to estimated cost once outcomes accrue;
- latency: the backend's first-token time and decode speed x sequential rounds, blended with the
  observed mean and p95;
and maximises utility = P(correct) - lambda * cost - mu * latency within the cost and latency limits
(policy, alias, client headers, remaining budget). Each candidate is recorded with its numbers and,
when it could not win, the reason.

Speed: everything that does not depend on the request is computed once per policy (`CompiledPolicy`,
cached on the Policy object), and what the learned stats imply for an arm is kept until the store
hands in a new ArmStats object for it, so decide() is one light pass over the route's arms;
bench/bench_decision.py measures it on a 50-arm policy (target p99 <= 0.1 ms).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from policies.schema import TASK_LABEL_PATTERN, Policy
from router import learner
from router.estimates import (
    DEFAULT_PROMPT_TOKENS, P95_OVER_MEAN, CompiledArm, CompiledPolicy, CompiledRoute, candidate_row, compile_policy,
    estimate_prompt_tokens, exceeds_context,
)
from router.types import (
    STRATEGIES,
    ArmStats,
    Candidate,
    Classification,
    Decision,
    StatsSnapshot,
    difficulty_tier,
)

MAX_FALLBACKS = 3
_NO_STATS: dict[str, ArmStats] = {}
_NO_CAP = 1 << 62  # max_output_tokens when the client sets none


@dataclass(frozen=True, slots=True)
class RequestHints:
    """Client overrides and request facts, already parsed by the gateway. None means not given."""

    max_cost_usd: float | None = None  # x-ponder-max-cost-usd
    max_latency_ms: float | None = None  # x-ponder-max-latency-ms
    strategy: str | None = None  # x-ponder-strategy
    task: str | None = None  # x-ponder-task: the client's task label
    reasoning_effort: str | None = None  # body `reasoning_effort`
    prompt_tokens: int | None = None  # estimated
    max_output_tokens: int | None = None  # body `max_tokens` / `max_completion_tokens`
    choices: int = 1  # body `n`: the answers the client asks for
    exact_output: str | None = None  # why the answer must be the model's own ("tools"), if it must

    @classmethod
    def from_request(cls, request: Any, headers: Mapping[str, str], policy: Any = None) -> RequestHints:
        """Hints from a parsed chat request (anything with `messages`, `reasoning_effort`,
        `max_output_tokens`, and the `body`, whose tool definitions are prompt too) and its headers.
        Whether each is honoured is the policy's call, made in decide() where the reason is recorded.
        Raises InvalidHint (-> 400) on a malformed header."""
        strategy = headers.get("x-ponder-strategy") or None
        if strategy is not None and strategy not in STRATEGIES:
            raise InvalidHint(f"x-ponder-strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        task = headers.get("x-ponder-task") or None
        if task is not None and not _TASK_LABEL.match(task):
            raise InvalidHint(f"x-ponder-task must be a lowercase label of letters, digits, '_', '.' or '-' "
                              f"(at most 64); got {task[:80]!r}")
        return cls(
            task=task,
            max_cost_usd=_header_number(headers, "x-ponder-max-cost-usd"),
            max_latency_ms=_header_number(headers, "x-ponder-max-latency-ms"),
            strategy=strategy,
            reasoning_effort=getattr(request, "reasoning_effort", None),
            prompt_tokens=estimate_prompt_tokens(getattr(request, "messages", None) or [],
                                                 getattr(request, "body", None)),
            max_output_tokens=getattr(request, "max_output_tokens", None),
            choices=int(getattr(request, "n", None) or 1),
            exact_output=getattr(request, "exact_output", None),
        )


_NO_HINTS = RequestHints()
_TASK_LABEL = re.compile(TASK_LABEL_PATTERN)


class InvalidHint(ValueError):
    """A malformed client override (the gateway answers 400 with this message)."""


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidHint(f"{name} must be a number; got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidHint(f"{name} must be a non-negative number; got {raw!r}")
    return value


class BudgetExhausted(Exception):
    """No arm fits the money left: the gateway answers 429 with this message.

    scope: "key" when the API key's remaining budget is the limit, "request" when a per-request cap
    (policy, alias or x-ponder-max-cost-usd) is.
    """

    def __init__(self, message: str, *, scope: str, budget_left_usd: float | None, cheapest_usd: float | None):
        super().__init__(message)
        self.scope = scope
        self.budget_left_usd = budget_left_usd
        self.cheapest_usd = cheapest_usd


class UnknownAlias(LookupError):
    pass


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


def _candidate_setters() -> tuple | None:
    """Slot setters to build Candidate records without the frozen dataclass __init__, which routes
    every field through object.__setattr__: a third of the cost, and decide() builds one per arm.
    The slots are the dataclass's own, so the object equals what Candidate(...) builds (tested).
    None (use the constructor) if Candidate's fields ever change."""
    names = ("arm", "expected_accuracy", "expected_cost_usd", "expected_latency_ms", "utility", "excluded")
    if tuple(field.name for field in dataclasses.fields(Candidate)) != names:
        return None
    return (object.__new__, *(Candidate.__dict__[name].__set__ for name in names))


_CANDIDATE_SETTERS = _candidate_setters()


def _learned(seen: ArmStats | None, shared: ArmStats | None, alpha: float, beta: float, reference: float,
             latency: float, p95: float, prior_strength: float, calibration: tuple | None = None,
             task: ArmStats | None = None, bucket_strength: float | None = None, in_calibration: bool = True,
             ) -> tuple[float, float, float, float, float, float]:
    """What the learned stats make of one candidate: (P(correct), cost factor, cost addend, latency, p95,
    pseudo-outcomes behind P(correct): what exploration's optimism is measured against).

    Up to three levels (see router.learner.shared_levels): `shared` is the arm's record summed over
    every bucket, `task` over the buckets of this request's task (every tier), `seen` its record in
    this bucket. Outermost first, each level's record less the next one's (so no outcome counts
    twice) updates the prior, which is then worth `prior_strength` pseudo-outcomes again: the route's
    prior, updated by the other tasks' record, is the task's prior; updated by the task's other
    tiers, the bucket's, worth `bucket_strength` (learner.bucket_strength: more than prior_strength
    where the snapshot's tiers of a task behave alike, capped by what the task level knows); then the
    bucket's own scored outcomes are added and P(correct) is that Beta posterior's mean. So an arm's
    record elsewhere informs a bucket that has not tried it yet (nearer buckets more), and the
    bucket's own outcomes outweigh it after a few dozen (more where tiers are alike). Cost,
    latency and p95 move the same way from the estimate through the levels' observed means (each
    level counting what it inherits as `prior_strength` observations); cost via the
    observed/estimated ratio, so a long prompt still costs more than a short one. Before an arm has
    any outcome its cost ratio is what `calibration` (the route's sums, see _calibration) says of the
    route's *other* arms' estimates, since an estimate's error (e.g. the guessed output length) is
    usually shared by the arms of a route; the arm's own record then moves it level by level, counted
    once. Only costs that no price ever estimated (a replay's recorded costs of unpriced models) are
    learned as an amount added per request (the cost addend) instead.
    """
    # (an arm widened in from outside the route by an override was never in the route's sums)
    factor, addend = _others_ratio(calibration, shared if in_calibration else None, reference, prior_strength), 0.0
    if shared is not None:
        # the task's prior is worth prior_strength; the bucket's what learner.bucket_strength estimates
        levels = ((shared, task, prior_strength), (task, seen, bucket_strength or prior_strength)) \
            if task is not None else ((shared, seen, prior_strength),)
        for record, inner, strength in levels:
            # this level's record less the inner level's (counted there)
            weight, wins, count = record.weight, record.successes, record.count
            cost_usd, latency_ms, answered = record.cost_usd, record.latency_ms, record.answered
            estimated = _estimated_of(record, reference)
            if inner is not None:
                weight, wins, count = weight - inner.weight, wins - inner.successes, count - inner.count
                cost_usd, latency_ms = cost_usd - inner.cost_usd, latency_ms - inner.latency_ms
                answered -= inner.answered
                estimated -= _estimated_of(inner, reference)
            if weight > 1e-9:
                wins = min(max(wins, 0.0), weight)
                total = alpha + beta + weight
                mean = (alpha + wins) / total
                if strength > prior_strength:
                    # An estimated strength (learner.bucket_strength) must not claim more than the parent
                    # knows: the child's prior is uncertain twice over, children differ from the parent's
                    # mean and that mean is known to `total` pseudo-outcomes; the variances (1 / (n + 1)
                    # of m(1 - m) each) add. Never below the policy's prior_strength.
                    strength = max(prior_strength, 1.0 / (1.0 / (strength + 1.0) + 1.0 / (total + 1.0)) - 1.0)
                alpha, beta = strength * mean, strength * (1.0 - mean)
            if count > 1e-9:
                share = count / (prior_strength + count)
                # a ratio wherever a price stood behind the costs (then or now): an arm whose prices
                # were edited to 0 costs nothing, not the mean it was observed at the old price
                if reference > 0 or estimated > 1e-15:
                    factor += share * (_cost_ratio(cost_usd, estimated) - factor)
                else:
                    addend += share * (max(cost_usd, 0.0) / count - addend)
            if answered > 1e-9:  # latency: of the requests an arm answered (a fast failure is no answer's)
                share = answered / (prior_strength + answered)
                observed = max(latency_ms, 0.0) / answered
                p95 += share * ((record.latency_p95_ms or observed * P95_OVER_MEAN) - p95)
                latency += share * (observed - latency)
    if seen is not None:
        weight = seen.weight
        if weight > 0:
            wins = min(max(seen.successes, 0.0), weight)  # (as the levels above: a handed-in record may be off)
            alpha += wins
            beta += weight - wins
        count = seen.count
        if count > 0:
            share = count / (prior_strength + count)
            estimated = _estimated_of(seen, reference)
            if reference > 0 or estimated > 1e-15:
                factor += share * (_cost_ratio(seen.cost_usd, estimated) - factor)
            else:
                addend += share * (seen.cost_usd / count - addend)
        answered = seen.answered
        if answered > 0:
            share = answered / (prior_strength + answered)
            observed = seen.latency_ms / answered
            p95 += share * ((seen.latency_p95_ms or observed * P95_OVER_MEAN) - p95)
            latency += share * (observed - latency)
    alpha, beta = max(alpha, 1e-6), max(beta, 1e-6)
    return alpha / (alpha + beta), factor, addend, latency, p95, alpha + beta


def _cost_ratio(cost_usd: float, estimated_usd: float) -> float:
    """Observed / estimated cost of the same requests (1 when nothing was estimated)."""
    return max(cost_usd, 0.0) / estimated_usd if estimated_usd > 1e-15 else 1.0


def _calibration(route: CompiledRoute, pooled: Mapping[str, ArmStats], prior_strength: float) -> tuple:
    """(observed cost, estimated cost, outcomes) summed over the route's arms that have outcomes (their
    records over all buckets): what _others_ratio turns into each arm's starting cost ratio. Kept on
    the route until the pooled stats change (once per snapshot)."""
    cached = route.calibrated
    if cached is not None and cached[0] is pooled:
        return cached[1]
    observed = estimated = count = 0.0
    for row in route.rows:
        shared = pooled.get(row[1])
        if shared is not None and shared.count > 0 and row[8] > 0:
            observed += shared.cost_usd
            estimated += _estimated_of(shared, row[8])
            count += shared.count
    sums = (observed, estimated, count)
    route.calibrated = (pooled, sums)
    return sums


def _estimated_of(record: ArmStats, reference: float) -> float:
    """What the cost model estimated for a record's requests: their own estimates where they carry one
    (their prompt lengths, their max_tokens), a typical prompt's (`reference`) for the rest (records
    from before estimates were kept, replays that keep none): a mixed record is never divided by
    only part of its estimates."""
    return record.estimated_cost_usd + max(record.count - record.estimated_count, 0.0) * reference


def _others_ratio(calibration: tuple | None, own: ArmStats | None, reference: float, prior_strength: float) -> float:
    """Observed / estimated cost of the route's arms other than this one, shrunk toward 1 as if the
    estimate had `prior_strength` outcomes of its own: an arm's own record is its levels' to add."""
    if calibration is None:
        return 1.0
    observed, estimated, count = calibration
    if own is not None and own.count > 0 and reference > 0:
        observed, estimated, count = observed - own.cost_usd, estimated - _estimated_of(own, reference), count - own.count
    if estimated <= 1e-15 or count <= 1e-9:
        return 1.0
    return 1.0 + count / (prior_strength + count) * (observed / estimated - 1.0)


def _posterior_of(candidate: Candidate, evidence: float) -> tuple[float, float]:
    """Beta(alpha, beta) behind a candidate's expected accuracy: its mean, over the pseudo-outcomes
    every level gave it (the route's prior, the arm's record in other buckets, this bucket's own), so
    an arm ruled out by a thousand outcomes elsewhere is as sure as that evidence. Recovered here for
    the few explored requests rather than stored as a Beta for every arm on the hot path."""
    alpha = min(max(candidate.expected_accuracy * evidence, 1e-6), evidence - 1e-6)
    return alpha, evidence - alpha


# --- the decision ---------------------------------------------------------------------------------


def decide(
    classification: Classification,
    policy: Policy | CompiledPolicy,
    stats: StatsSnapshot,
    *,
    alias: str = "auto",
    request: RequestHints | None = None,
    budget_left_usd: float | None = None,
    rng: random.Random | None = None,
    cooling: Collection[str] = frozenset(),
) -> Decision:
    """Choose the arm for one request. Raises BudgetExhausted (-> 429) when nothing affordable fits, and
    ContextTooLong (-> 400) when no arm's backend can hold the prompt.

    `budget_left_usd` is what the API key has left (the lower of its day and month), None if unlimited.
    `rng` drives exploration; with None the decision is greedy (replays, `ponder stats`).
    `cooling`: the backends cooling down after failures now (the gateway's health). Arms are ranked by
    merit as ever; the best one whose backend answers then serves, and the cooling ones are planned
    last, never explored, and never the reason for a refusal (see _stand_in).
    """
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    policy = compiled.policy
    view = compiled.aliases.get(alias)
    if view is None:
        raise UnknownAlias(f"unknown routed model `{alias}`; this policy has: {', '.join(sorted(compiled.aliases))}")
    hints = request or _NO_HINTS
    overrides = policy.overrides
    objective = view.objective
    labelled = None
    if hints.task is not None:
        if hints.task in overrides.task_header:
            labelled = f"task {hints.task} from x-ponder-task (the classifier said {classification.task})"
            classification = dataclasses.replace(classification, task=hints.task)
        else:
            labelled = f"ignored x-ponder-task={hints.task}: not allowed by policy `{policy.name}`"
    task, difficulty = classification.task, classification.difficulty
    tier = difficulty_tier(difficulty)
    route = view.route(task, difficulty, tier)
    reasons = [f"{task}:{tier} (difficulty {difficulty:.2f}) -> route `{route.name}`"]
    if labelled:
        reasons.append(labelled)
    rule = route.name
    rows = route.rows
    strength = policy.learner.prior_strength

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
    if live and all(row[0].reasons_aloud and max_out < row[5] for row in live):
        # The client's max_tokens cuts every arm's chain of thought short of the answer line it ends on:
        # a plain call to the same model (the policy's single arm there, else one standing in) competes,
        # and wins where the cap leaves little of the chains (their P(correct) is scaled below). Not
        # where the client asked for a strategy: it gets what it asked for.
        present = {row[0] for row in rows}
        direct: dict[CompiledArm, float] = {}  # a stand-in is as likely right as the best arm it stands in for
        for carm, _, _, alpha, beta, *_ in live:
            plain = compiled.plain_calls[carm.backend, carm.effort]
            prior = plain.prior if plain.name in compiled.arms else alpha / (alpha + beta)
            direct[plain] = max(prior, direct.get(plain, 0.0))
        wider = tuple(candidate_row(arm, prior, strength) for arm, prior in direct.items() if arm not in present)
        if wider:
            reasons.append(f"max_tokens {max_out} is below the chain of thought every arm of route "
                           f"`{route.name}` is expected to write: a direct call to the same model competes")
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

    # Limits: the tightest of policy, alias, client header and the key's remaining budget.
    cost_cap, cost_cap_why = objective.max_cost_usd, "policy max_cost_usd"
    per_request = policy.budgets.per_request_usd
    if per_request is not None and (cost_cap is None or per_request < cost_cap):
        cost_cap, cost_cap_why = per_request, "budgets.per_request_usd"
    if hints.max_cost_usd is not None:
        if not overrides.max_cost_header:
            reasons.append("ignored x-ponder-max-cost-usd: not honoured by the policy")
        elif cost_cap is None or hints.max_cost_usd < cost_cap:
            cost_cap, cost_cap_why = hints.max_cost_usd, "x-ponder-max-cost-usd"
    degraded = False
    degrade = policy.budgets.degrade
    if budget_left_usd is not None:
        if budget_left_usd <= 0:
            raise BudgetExhausted(f"the API key's budget is used up (policy `{policy.name}`)", scope="key",
                                  budget_left_usd=budget_left_usd, cheapest_usd=None)
        if cost_cap is None or budget_left_usd < cost_cap:
            cost_cap, cost_cap_why = budget_left_usd, "the key's remaining budget"
        if budget_left_usd < degrade.below_usd:
            degraded = True
            reasons.append(f"degraded: {budget_left_usd:.4f} USD left < {degrade.below_usd:g}")
            if degrade.max_cost_usd is not None and degrade.max_cost_usd < cost_cap:
                cost_cap, cost_cap_why = degrade.max_cost_usd, "budgets.degrade.max_cost_usd (budget low)"
    latency_cap, latency_cap_why = objective.max_p95_latency_ms, "policy max_p95_latency_ms"
    if hints.max_latency_ms is not None:
        if not overrides.max_latency_header:
            reasons.append("ignored x-ponder-max-latency-ms: not honoured by the policy")
        elif latency_cap is None or hints.max_latency_ms < latency_cap:
            latency_cap, latency_cap_why = hints.max_latency_ms, "x-ponder-max-latency-ms"

    # One pass over the candidates: the numbers, then the verdict, then the Candidate record. This
    # loop is the hot path (up to 50 arms within a 0.1 ms budget): locals only, one dict lookup per
    # arm, learned numbers from the route's cache (`_learned`), the Candidate built in place
    # (see _candidate_setters).
    choices = hints.choices
    bucket_stats = stats.get(classification.bucket) or _NO_STATS
    pooled, within_task = learner.shared_levels(stats, task) if stats else (_NO_STATS, _NO_STATS)
    bucket_strength = learner.bucket_strength(stats, strength) if pooled else None
    cost_weight, latency_weight = objective.cost_weight, objective.latency_weight / 1000.0
    cost_limit = cost_cap if cost_cap is not None else math.inf
    latency_limit = latency_cap if latency_cap is not None else math.inf
    fast = _CANDIDATE_SETTERS is not None
    if fast:
        new, set_arm, set_acc, set_cost, set_latency, set_utility, set_excluded = _CANDIDATE_SETTERS
    candidates: list[Candidate] = []
    costs: list[float] = []
    utils: list[float] = []
    eligible: list[int] = []
    kinds: dict[int, int] = {}  # why an arm is out: 1 ruled out (override, context window), 2 cost, 3 latency
    add_candidate, add_cost, add_util, add_eligible = candidates.append, costs.append, utils.append, eligible.append
    evidences: list[float] = []  # pseudo-outcomes behind each candidate's P(correct), all levels counted
    add_evidence = evidences.append
    stats_for, shared_for, task_for = bucket_stats.get, pooled.get, within_task.get
    calibration = None
    if pooled:
        calibrated = route.calibrated
        calibration = calibrated[1] if calibrated is not None and calibrated[0] is pooled else \
            _calibration(route, pooled, strength)
    memo = None
    if rows is route.rows and (bucket_stats or pooled):
        # per row: (the bucket's ArmStats it was computed from, the numbers); the last three slots hold
        # what every entry assumed: the cost calibration with the bucket level's strength, and the shared
        # levels (replaced, never edited, like the snapshot: a new one starts a new memo)
        memo = route.learned.get(classification.bucket)
        assumed = (calibration, bucket_strength)
        if (memo is None or memo[-3] != assumed or memo[-2] is not pooled or memo[-1] is not within_task
                or len(route.learned) > 64):
            if len(route.learned) > 64:
                route.learned.clear()
            memo = route.learned[classification.bucket] = [None] * len(rows) + [assumed, pooled, within_task]
    i = -1
    chains_cut = False
    in_route = len(route.rows)  # rows past these were widened in by an override: not in the route's sums
    for carm, key, arm, alpha, beta, tokens, per_token, fixed, reference, latency, p95 in rows:
        i += 1
        seen = stats_for(key)
        if max_out < tokens:
            per_token, fixed, latency, p95 = carm.under_cap(max_out)
            acc, factor, addend, latency, p95, evidence = _learned(
                seen, shared_for(key), alpha, beta, reference, latency, p95, strength, calibration, task_for(key),
                bucket_strength, i < in_route)
            if carm.reasons_aloud or (carm.thinks_above is not None and max_out > carm.thinks_above):
                # A chain cut before its "Final answer:" line answers nothing (router.voting.sample_answer),
                # nor does a reasoning model cut while it thinks (empty content, finish_reason length): the
                # share of the expected chain that the cap leaves room for is its chance to end.
                acc *= max_out / tokens
                chains_cut = True
        elif memo is not None:
            found = memo[i]
            if found is None or found[0] is not seen:
                found = memo[i] = (seen, *_learned(seen, shared_for(key), alpha, beta, reference, latency, p95,
                                                   strength, calibration, task_for(key), bucket_strength))
            _, acc, factor, addend, latency, p95, evidence = found
        elif seen is None and not pooled:
            acc, factor, addend, evidence = alpha / (alpha + beta), 1.0, 0.0, alpha + beta  # nothing learned yet
        else:
            acc, factor, addend, latency, p95, evidence = _learned(
                seen, shared_for(key), alpha, beta, reference, latency, p95, strength, calibration, task_for(key),
                bucket_strength, i < in_route)
        if choices > 1:  # the client's `n`: more answers than the arm draws cost more samples
            prompt_scale, output_scale = carm.choice_scales(choices)
            cost = (per_token * prompt_tokens * prompt_scale + fixed * output_scale) * factor + addend * output_scale
        else:
            cost = (per_token * prompt_tokens + fixed) * factor + addend
        util = acc - cost_weight * cost - latency_weight * latency
        if ruled_out and key in ruled_out:
            verdict, kinds[i] = ruled_out[key], 1
        elif cost > cost_limit:
            verdict, kinds[i] = f"expected cost {cost:.6f} USD > {cost_cap:g} ({cost_cap_why})", 2
        elif p95 > latency_limit:
            verdict, kinds[i] = f"expected p95 latency {p95:.0f} ms > {latency_cap:g} ({latency_cap_why})", 3
        else:
            verdict = None
            add_eligible(i)
        if fast:
            candidate = new(Candidate)
            set_arm(candidate, arm)
            set_acc(candidate, acc)
            set_cost(candidate, cost)
            set_latency(candidate, latency)
            set_utility(candidate, util)
            set_excluded(candidate, verdict)
        else:
            candidate = Candidate(arm, acc, cost, latency, util, verdict)
        add_candidate(candidate)
        add_cost(cost)
        add_util(util)
        add_evidence(evidence)

    if chains_cut:
        reasons.append(f"max_tokens {max_out} leaves room for part of a chain of thought: the P(correct) of an "
                       "arm that reasons aloud or thinks is scaled by the share of its expected chain that fits")
    if not eligible:
        affordable = [i for i, kind in kinds.items() if kind == 3]
        if not affordable:
            priced = [costs[i] for i, kind in kinds.items() if kind == 2]
            cheapest = min(priced) if priced else None
            scope = "key" if cost_cap_why.startswith(("the key", "budgets.degrade")) else "request"
            raise BudgetExhausted(
                f"no arm of route `{route.name}` fits {cost_cap_why} of {cost_cap:g} USD"
                + (f"; the cheapest would cost {cheapest:.6f} USD" if cheapest is not None else ""),
                scope=scope, budget_left_usd=budget_left_usd, cheapest_usd=cheapest,
            )
        # Latency is a soft limit: rather than refuse, answer as fast as the money allows (with a
        # backend that answers now, where one does).
        fastest = min(_answering(affordable, rows, cooling) or affordable,
                      key=lambda i: (candidates[i].expected_latency_ms, -utils[i]))
        reasons.append(f"no arm meets {latency_cap_why} {latency_cap:g} ms: taking the fastest affordable one")
        candidates[fastest] = dataclasses.replace(candidates[fastest], excluded=None)
        eligible = [fastest]
    if degraded and degrade.max_cost_usd is None and len(eligible) > 1:
        def cheapest_of(indices: list[int]) -> int:
            return min(indices, key=lambda i: (costs[i], -utils[i]))

        cheapest_i = cheapest_of(eligible)
        if cooling and rows[cheapest_i][0].backend in cooling and (answering := _answering(eligible, rows, cooling)):
            cheapest_i = cheapest_of(answering)
            reasons.append(f"budget low: `{rows[cheapest_i][0].name}` is the cheapest arm whose backend is not "
                           "cooling down")
        for i in eligible:
            if i != cheapest_i:
                candidates[i] = dataclasses.replace(candidates[i], excluded="budget low: cheapest arm only")
        eligible = [cheapest_i]

    greedy = max(eligible, key=utils.__getitem__)
    chosen, explore = greedy, False
    ready = eligible
    if cooling:
        ready = _answering(eligible, rows, cooling)
        stand_in = _stand_in(ready, kinds, rows, cooling, candidates, utils, degraded) \
            if rows[greedy][0].backend in cooling else None
        if stand_in is not None:
            chosen = stand_in
            over_limit = ""
            if kinds.get(chosen) == 3:  # latency is a soft limit: the arm serving is not ruled out (as above)
                over_limit = f", over {latency_cap_why} {latency_cap:g} ms,"
                candidates[chosen] = dataclasses.replace(candidates[chosen], excluded=None)
            reasons.append(f"`{rows[greedy][0].name}` would win, but backend `{rows[greedy][0].backend}` is "
                           f"cooling down after failures: `{rows[chosen][0].name}`{over_limit} answers until it "
                           "is back")
    if not degraded and view.explore and learner.should_explore(policy.exploration.share, rng):
        # Top-two Thompson: one draw among the arms within the allowance that could still beat the
        # greedy arm (learner.challengers); where none can, the greedy arm keeps the request. An arm
        # whose backend is cooling down is no challenger (it would not be called), nor the one
        # standing in for the greedy arm while its backend is (it answers anyway).
        reach = utils[greedy] - learner.most_optimism(strength)
        pool = [i for i in learner.explore_pool(greedy, ready, costs, policy.exploration.max_extra_cost_usd)
                if utils[i] > reach and i != chosen]
        draws = [_posterior_of(candidates[i], evidences[i]) + (costs[i], candidates[i].expected_latency_ms)
                 for i in pool]
        shortlist = learner.challengers(utils[greedy], draws, cost_weight, objective.latency_weight)
        if shortlist:
            drawn = learner.thompson_pick([draws[k] for k in shortlist], cost_weight, objective.latency_weight, rng)
            chosen, explore = pool[shortlist[drawn]], True
    winner = rows[chosen][0]
    if explore:
        reasons.append(f"explore: Thompson draw chose `{winner.name}` among {len(shortlist)} arm(s) that could "
                       f"still beat greedy `{rows[greedy][0].name}` ({policy.exploration.share:.0%} of traffic)")
    picked = candidates[chosen]
    reasons.append(
        f"chose `{winner.name}` ({winner.key}): utility {picked.utility:.4f} = P(correct) "
        f"{picked.expected_accuracy:.3f} - {cost_weight:g} x {picked.expected_cost_usd:.6f} USD - "
        f"{objective.latency_weight:g} x {picked.expected_latency_ms / 1000:.2f} s"
    )

    # Fallbacks: the next best eligible arms, other backends first (a failing backend tends to fail
    # again), then the same backend.
    other_backend: list[int] = []
    same_backend: list[int] = []
    room = len(rows) if cooling else MAX_FALLBACKS  # cooling ones are moved last: rank them all
    for i in sorted(eligible, key=utils.__getitem__, reverse=True):
        if i == chosen:
            continue
        if rows[i][0].backend != winner.backend:
            other_backend.append(i)
            if len(other_backend) == room:
                break
        elif len(same_backend) < room:
            same_backend.append(i)
    fallbacks = other_backend + same_backend
    slow: list[int] = []
    if (cooling or len(fallbacks) < MAX_FALLBACKS) and not degraded:
        # Latency is a soft limit: an arm ruled out only by it answers, fastest first, when every
        # eligible one has failed, later than they would have rather than not at all (a 502 or 503).
        slow = sorted((i for i, kind in kinds.items() if kind == 3 and i != chosen),
                      key=lambda i: candidates[i].expected_latency_ms)
    if cooling:
        # Arms whose backend cools down come after all the others, in the same order: the gateway
        # skips them, unless the cool-down has ended by the time the others have failed.
        answering = set(_answering(fallbacks, rows, cooling) + _answering(slow, rows, cooling))
        fallbacks = sorted(fallbacks + slow, key=lambda i: i not in answering)[:MAX_FALLBACKS]
    else:
        fallbacks = (fallbacks[:MAX_FALLBACKS] + slow)[:MAX_FALLBACKS]
    return Decision(
        arm=winner.arm,
        task=task,
        difficulty=difficulty,
        task_probs=classification.task_probs,
        policy=policy.name,
        rule=rule,
        explore=explore,
        fallbacks=tuple(rows[i][2] for i in fallbacks),
        candidates=tuple(candidates),
        reasons=tuple(reasons),
    )


def _answering(indices: list[int], rows: tuple, cooling: Collection[str]) -> list[int]:
    """The candidates (by index) whose backend is not cooling down."""
    return [i for i in indices if rows[i][0].backend not in cooling] if cooling else indices


def _stand_in(ready: list[int], kinds: dict[int, int], rows: tuple, cooling: Collection[str],
              candidates: list[Candidate], utils: list[float], degraded: bool) -> int | None:
    """Who answers while the greedy arm's backend cools down: the best eligible arm whose backend
    answers now; else (latency being a soft limit, and not under the degrade line) the fastest one
    ruled out by the latency limit alone; else nobody but the greedy arm itself (None), whose cool-down
    may end before the request is served and whose refusal says when it ends (503 with Retry-After)."""
    if ready:
        return max(ready, key=utils.__getitem__)
    if not degraded:
        slow = _answering([i for i, kind in kinds.items() if kind == 3], rows, cooling)
        if slow:
            return min(slow, key=lambda i: (candidates[i].expected_latency_ms, -utils[i]))
    return None
