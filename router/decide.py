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
from collections.abc import Collection

from policies.schema import Policy
from router import learner
from router.candidates import candidate_rows
from router.estimates import CompiledPolicy, compile_policy
from router.fallbacks import answering_now, cools, pick_stand_in, plan_fallbacks, what_cools
from router.learned import learned_numbers, posterior_of, route_calibration
from router.request_hints import RequestHints
from router.types import (
    ArmStats,
    Candidate,
    Classification,
    Decision,
    StatsSnapshot,
    difficulty_tier,
)

_NO_STATS: dict[str, ArmStats] = {}
_NO_HINTS = RequestHints()


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
    last, never explored, and never the reason for a refusal (see router.fallbacks.pick_stand_in).
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
    # Client overrides narrow the candidates (an ignored one is said so); where none fits, an override, a
    # tool call, the output cap or the prompt's length widens them.
    rows, rule, ruled_out, max_out, prompt_tokens = candidate_rows(compiled, view, route, rows, rule, hints,
                                                                   strength, reasons)

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
    # arm, learned numbers from the route's cache (`learned_numbers`), the Candidate built in place
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
            route_calibration(route, pooled, strength)
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
            acc, factor, addend, latency, p95, evidence = learned_numbers(
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
                found = memo[i] = (seen, *learned_numbers(seen, shared_for(key), alpha, beta, reference, latency,
                                                          p95, strength, calibration, task_for(key), bucket_strength))
            _, acc, factor, addend, latency, p95, evidence = found
        elif seen is None and not pooled:
            acc, factor, addend, evidence = alpha / (alpha + beta), 1.0, 0.0, alpha + beta  # nothing learned yet
        else:
            acc, factor, addend, latency, p95, evidence = learned_numbers(
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
        fastest = min(answering_now(affordable, rows, cooling) or affordable,
                      key=lambda i: (candidates[i].expected_latency_ms, -utils[i]))
        reasons.append(f"no arm meets {latency_cap_why} {latency_cap:g} ms: taking the fastest affordable one")
        candidates[fastest] = dataclasses.replace(candidates[fastest], excluded=None)
        eligible = [fastest]
    if degraded and degrade.max_cost_usd is None and len(eligible) > 1:
        def cheapest_of(indices: list[int]) -> int:
            return min(indices, key=lambda i: (costs[i], -utils[i]))

        cheapest_i = cheapest_of(eligible)
        if cooling and cools(rows[cheapest_i][0], cooling) and (answering := answering_now(eligible, rows, cooling)):
            cheapest_i = cheapest_of(answering)
            reasons.append(f"budget low: `{rows[cheapest_i][0].name}` is the cheapest arm whose backend is not "
                           "cooling down")
        for i in eligible:
            if i != cheapest_i:
                candidates[i] = dataclasses.replace(candidates[i], excluded="budget low: cheapest arm only")
        # They stay fallbacks, cheapest first, for when it fails: each is within the key's remaining
        # budget (an eligible arm's expected cost), and the gateway holds, and drops, their worst cases
        # as it does any fallback's (gateway/cost_bounds.py arms_within), so the key cannot overspend.
        degraded_fallbacks = sorted((i for i in eligible if i != cheapest_i), key=lambda i: (costs[i], -utils[i]))
        eligible = [cheapest_i]
    else:
        degraded_fallbacks = None

    greedy = max(eligible, key=utils.__getitem__)
    chosen, explore = greedy, False
    ready = eligible
    if cooling:
        ready = answering_now(eligible, rows, cooling)
        stand_in = pick_stand_in(ready, kinds, rows, cooling, candidates, utils, degraded) \
            if cools(rows[greedy][0], cooling) else None
        if stand_in is not None:
            chosen = stand_in
            over_limit = ""
            if kinds.get(chosen) == 3:  # latency is a soft limit: the arm serving is not ruled out (as above)
                over_limit = f", over {latency_cap_why} {latency_cap:g} ms,"
                candidates[chosen] = dataclasses.replace(candidates[chosen], excluded=None)
            reasons.append(f"`{rows[greedy][0].name}` would win, but {what_cools(rows[greedy][0], cooling)} "
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
        draws = [posterior_of(candidates[i], evidences[i]) + (costs[i], candidates[i].expected_latency_ms)
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

    fallbacks = plan_fallbacks(eligible, chosen, winner, rows, utils, kinds, candidates, cooling, degraded,
                               degraded_fallbacks)
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
