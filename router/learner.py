"""The learner: Beta posteriors per (bucket, arm), Thompson sampling, utility as the policy's objective.

Pure functions over numbers handed in (stats come from telemetry/, priors from the policy), with a
seeded `random.Random`, so evals/ can replay a stream of outcomes through exactly this code.

How it learns (see docs/policies.md):
- Each (bucket, arm) has a Beta posterior on P(correct) over three levels: the route's prior, updated
  by the arm's outcomes in the other tasks' buckets, is the task's prior (worth `prior_strength`
  pseudo-outcomes); updated by the task's other tiers, the bucket's (worth `bucket_strength`: at
  least `prior_strength`, more where the snapshot's buckets differ from their task's other tiers
  no more than noise explains; `shared_levels`); then every scored outcome in the bucket adds its
  success score (router.learned.learned_numbers). Decay is the store's job (it shrinks `weight` and
  `successes` with `decay_factor`), so old outcomes fade and a provider that gets worse is noticed.
- Most requests go to the greedy arm: the highest posterior-mean utility. On a share of requests set
  by the policy, the request goes to a challenger (top-two Thompson sampling): among the other
  eligible arms costing at most the allowed extra over the greedy one, those whose optimistic
  utility (P(correct) at `PLAUSIBLE_SD` posterior sd above its mean) still beats the greedy arm's
  expected utility (the 8 most promising when there are more), one Thompson draw picks the arm.
  So every exploring request tests an arm that could still be better, an arm ruled out with
  confidence is not drawn again (its share goes to the arms still in doubt), exploration stops
  where no challenger is left, and it never exceeds what the policy allows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from policies.schema import Policy
from router.types import DIFFICULTY_TIERS, POOLED_BUCKET, POOLED_TIER, Arm, ArmStats, Classification, StatsSnapshot


def decay_factor(half_life: float | None, elapsed: float) -> float:
    """Weight left on an outcome after `elapsed` (same unit as `half_life`); 1.0 when there is no decay."""
    if half_life is None or half_life <= 0 or elapsed <= 0:
        return 1.0
    return math.exp(-math.log(2.0) * elapsed / half_life)


def posterior(prior: float, prior_strength: float, stats: ArmStats | None) -> tuple[float, float]:
    """Beta(alpha, beta) on P(correct): the prior as pseudo-outcomes plus the scored outcomes."""
    alpha = prior_strength * prior
    beta = prior_strength - alpha
    if stats is not None and stats.weight > 0:
        successes = min(max(stats.successes, 0.0), stats.weight)
        alpha += successes
        beta += stats.weight - successes
    # A prior of exactly 0 or 1 with no data would make the Beta degenerate; keep it proper.
    return max(alpha, 1e-6), max(beta, 1e-6)


def utility(accuracy: float, cost_usd: float, latency_ms: float, cost_weight: float, latency_weight: float) -> float:
    """The policy objective: P(correct) - lambda * cost_usd - mu * latency in seconds."""
    return accuracy - cost_weight * cost_usd - latency_weight * latency_ms / 1000.0


GAUSSIAN_ABOVE = 30.0  # alpha and beta both above this: a normal draw matches the Beta closely, 6x cheaper
EXPLORE_OPTIONS_LIMIT = 8  # at most this many arms enter one exploration draw (bounds its time)
PLAUSIBLE_SD = 2.0  # ruled out: an arm that cannot beat the greedy one even this many posterior sd above its mean


def sample_accuracy(alpha: float, beta: float, rng: random.Random) -> float:
    """One posterior draw of P(correct)."""
    if alpha > GAUSSIAN_ABOVE and beta > GAUSSIAN_ABOVE:
        total = alpha + beta
        mean = alpha / total
        draw = rng.gauss(mean, math.sqrt(mean * (1.0 - mean) / (total + 1.0)))
        return 0.0 if draw < 0.0 else 1.0 if draw > 1.0 else draw
    return rng.betavariate(alpha, beta)


def thompson_pick(
    options: Sequence[tuple[float, float, float, float]],
    cost_weight: float,
    latency_weight: float,
    rng: random.Random,
) -> int:
    """Index of the option with the best sampled utility; options are (alpha, beta, cost_usd, latency_ms)."""
    best, best_value = 0, -math.inf
    for index, (alpha, beta, cost, latency) in enumerate(options):
        value = utility(sample_accuracy(alpha, beta, rng), cost, latency, cost_weight, latency_weight)
        if value > best_value:
            best, best_value = index, value
    return best


def should_explore(share: float, rng: random.Random | None) -> bool:
    """One uniform draw per request, always taken when an rng is given, so replays stay aligned."""
    if rng is None:
        return False
    draw = rng.random()
    return share > 0 and draw < share


def explore_pool(greedy: int, eligible: Sequence[int], costs: Sequence[float], max_extra_cost: float | None) -> list[int]:
    """Eligible arms other than the greedy one whose expected cost stays within the exploration allowance."""
    if max_extra_cost is None:
        return [i for i in eligible if i != greedy]
    ceiling = costs[greedy] + max_extra_cost
    return [i for i in eligible if i != greedy and costs[i] <= ceiling]


def optimistic_accuracy(alpha: float, beta: float, sds: float = PLAUSIBLE_SD) -> float:
    """P(correct) `sds` posterior standard deviations above the Beta's mean (at most 1)."""
    total = alpha + beta
    mean = alpha / total
    return min(1.0, mean + sds * math.sqrt(mean * (1.0 - mean) / (total + 1.0)))


def most_optimism(prior_strength: float) -> float:
    """The most optimistic_accuracy can add to a posterior mean backed by at least `prior_strength`
    pseudo-outcomes (the sd of a Beta is at most 0.5 / sqrt(total + 1)). An arm whose expected utility
    is further than this below the greedy arm's cannot be a challenger, which saves computing its
    posterior on routes with many arms."""
    return PLAUSIBLE_SD * 0.5 / math.sqrt(prior_strength + 1.0)


def challengers(
    greedy_utility: float,
    options: Sequence[tuple[float, float, float, float]],
    cost_weight: float,
    latency_weight: float,
) -> list[int]:
    """Indices of the options (alpha, beta, cost_usd, latency_ms) that could still beat the greedy arm:
    their optimistic utility is above the greedy arm's expected utility. The most promising first, at
    most EXPLORE_OPTIONS_LIMIT (bounds the draw's time on routes with many arms).

    Ruling out arms that are worse with confidence is what makes a small exploration share enough on
    a route with many arms: the share then goes to the few arms still in doubt rather than being
    spread over all of them."""
    promising = []
    for index, (alpha, beta, cost, latency) in enumerate(options):
        best_case = utility(optimistic_accuracy(alpha, beta), cost, latency, cost_weight, latency_weight)
        if best_case > greedy_utility:
            promising.append((-best_case, index))
    promising.sort()
    return [index for _, index in promising[:EXPLORE_OPTIONS_LIMIT]]


_POOLED_CACHE: dict[int, tuple] = {}  # id(snapshot) -> (snapshot, pooled stats, per task): the last few
_POOLED_CACHE_SIZE = 16  # snapshots kept pooled (one per policy in use is what a gateway needs)


def _pool_snapshot(snapshot: StatsSnapshot) -> tuple[dict[str, ArmStats], dict[str, dict[str, ArmStats]]]:
    cached = _POOLED_CACHE.get(id(snapshot))
    if cached is not None and cached[0] is snapshot:
        return cached[1], cached[2]
    # One pass of float sums (count, successes, weight, cost, latency, max p95, estimates, errors, left) per arm,
    # everywhere and per task; ArmStats built at the end. Once per snapshot (a store refresh), about a
    # microsecond per (bucket, arm).
    totals: dict[str, list[float]] = {}
    per_task: dict[str, dict[str, list[float]]] = {}
    for bucket, arms in snapshot.items():
        task, _, tier = bucket.partition(":")
        if tier == POOLED_TIER:
            continue
        inside = per_task.get(task)
        if inside is None:
            inside = per_task[task] = {}
        for key, s in arms.items():
            values = (s.count, s.successes, s.weight, s.cost_usd, s.latency_ms, s.latency_p95_ms,
                      s.estimated_cost_usd, s.estimated_count, s.estimated_prompt_tokens, s.estimated_prompt_count,
                      s.errors, s.left)
            for level in (totals, inside):
                sums = level.get(key)
                if sums is None:
                    level[key] = list(values)
                else:
                    sums[0] += values[0]
                    sums[1] += values[1]
                    sums[2] += values[2]
                    sums[3] += values[3]
                    sums[4] += values[4]
                    if values[5] > sums[5]:
                        sums[5] = values[5]
                    sums[6] += values[6]
                    sums[7] += values[7]
                    sums[8] += values[8]
                    sums[9] += values[9]
                    sums[10] += values[10]
                    sums[11] += values[11]
    everywhere = {key: ArmStats(*sums) for key, sums in totals.items()}
    by_task = {task: {key: ArmStats(*sums) for key, sums in arms.items()} for task, arms in per_task.items()}
    if len(_POOLED_CACHE) >= _POOLED_CACHE_SIZE:
        _POOLED_CACHE.pop(next(iter(_POOLED_CACHE)), None)  # the oldest
    _POOLED_CACHE[id(snapshot)] = (snapshot, everywhere, by_task)
    return everywhere, by_task


def shared_levels(snapshot: StatsSnapshot, task: str) -> tuple[dict[str, ArmStats], dict[str, ArmStats]]:
    """The learner's shared levels for a request of `task`: every arm's stats summed over all the
    snapshot's buckets, and over the buckets of that task (every tier). An arm's record there is its
    prior in a bucket (router.learned.learned_numbers).

    A store may put these in the snapshot when it builds one, under POOLED_BUCKET (`*`) and
    `<task>:*`; they are then read as they are. Otherwise they are computed here once per snapshot
    object (snapshots are replaced, never edited, by the stores) and kept until the next one comes."""
    given = snapshot.get(POOLED_BUCKET)
    if given is not None:
        return given, snapshot.get(f"{task}:{POOLED_TIER}") or _EMPTY
    everywhere, by_task = _pool_snapshot(snapshot)
    return everywhere, by_task.get(task) or _EMPTY


def pooled_stats(snapshot: StatsSnapshot) -> dict[str, ArmStats]:
    """Every arm's stats summed over the snapshot's buckets (see shared_levels)."""
    given = snapshot.get(POOLED_BUCKET)
    return given if given is not None else _pool_snapshot(snapshot)[0]


_EMPTY: dict[str, ArmStats] = {}

STRENGTH_MAX = 1000.0  # the estimated bucket-level strength stays below this many pseudo-outcomes
STRENGTH_MIN_UNITS = 4  # fewer (bucket, arm) pairs with data on both sides: no estimate
STRENGTH_REFRESH = 0.01  # re-estimate when the snapshot's total weight has moved by this share
# The moment estimate weighs each pair at this between-bucket spread (the default prior_strength 10's),
# so the estimate belongs to the snapshot alone and the store can compute it off the request path.
STRENGTH_WEIGHT_RHO = 1.0 / 11.0
_STRENGTH_CACHE: dict[int, tuple] = {}  # id(snapshot) -> (snapshot, total weight, estimate)


def _strength(units: list[tuple[float, float, float, float, float]]) -> float | None:
    """Empirical-Bayes strength of a level from (n, p, n_rest, p_rest, v) per (child, arm): the child's
    weight and success rate, its siblings' (the parent less the child), and the arm's p(1 - p).

    Children of one parent with Beta(kappa m, kappa (1 - m)) rates differ from each other by
    rho = 1 / (kappa + 1) of m(1 - m) beyond binomial noise: method of moments on the squared
    child-vs-siblings differences less their expected noise. None with fewer than
    STRENGTH_MIN_UNITS pairs (a thin or cold snapshot cannot say how much buckets differ)."""
    if len(units) < STRENGTH_MIN_UNITS:
        return None
    num = den = 0.0
    for n, p, n_rest, p_rest, v in units:
        noise = 1.0 / n + 1.0 / n_rest
        w = 1.0 / (STRENGTH_WEIGHT_RHO + noise)
        num += w * ((p - p_rest) ** 2 / v - noise)
        den += w
    rho = num / den
    if rho <= 1.0 / (STRENGTH_MAX + 1.0):
        return STRENGTH_MAX
    return min(STRENGTH_MAX, 1.0 / rho - 1.0)


def bucket_strength(snapshot: StatsSnapshot, fallback: float) -> float:
    """How many pseudo-outcomes the prior a bucket inherits from its task's other tiers is worth,
    estimated from how much the snapshot's buckets differ from their task's other tiers (per arm,
    pooled over arms): where a task's tiers behave alike a sparse bucket leans on its task (its noise
    is what differs); where they differ it trusts its own outcomes sooner. Never below `fallback`
    (the policy's prior_strength: a low estimate must not let one bucket's first outcomes override
    everything else). router.learned.learned_numbers also caps it by what the task level knows."""
    found = estimated_strength(snapshot)
    return fallback if found is None else max(fallback, found)


def estimated_strength(snapshot: StatsSnapshot) -> float | None:
    """bucket_strength's estimate, computed once per snapshot (the stores call this in their refresh
    loop, so no request pays for it) and kept in a small cache."""
    pooled = snapshot.get(POOLED_BUCKET)
    total = sum(s.weight for s in pooled.values()) if pooled is not None else 0.0
    cached = _STRENGTH_CACHE.get(id(snapshot))
    # A store hands over a new snapshot per refresh; a replay (evals/routing.StatsBook) edits one in place,
    # keeping its pooled level current: re-estimate when that has moved (the strength moves slowly).
    if cached is not None and cached[0] is snapshot and (
            pooled is None or abs(total - cached[1]) <= STRENGTH_REFRESH * cached[1]):
        return cached[2]
    per_task: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for bucket, arms in snapshot.items():
        task, _, tier = bucket.partition(":")
        if tier == POOLED_TIER or bucket == POOLED_BUCKET:
            continue
        inside = per_task.setdefault(task, {})
        for key, s in arms.items():
            if s.weight > 0:
                inside.setdefault(key, []).append((s.weight, min(max(s.successes, 0.0), s.weight)))
    everywhere: dict[str, list[float]] = {}
    for arms in per_task.values():
        for key, records in arms.items():
            sums = everywhere.setdefault(key, [0.0, 0.0])
            sums[0] += sum(r[0] for r in records)
            sums[1] += sum(r[1] for r in records)
    units = []
    for arms in per_task.values():
        for key, records in arms.items():
            if len(records) < 2:
                continue
            n_all, k_all = everywhere[key]
            v = k_all / n_all * (1.0 - k_all / n_all)
            if v <= 0:
                continue
            n_task, k_task = sum(r[0] for r in records), sum(r[1] for r in records)
            for n, k in records:
                units.append((n, k / n, n_task - n, (k_task - k) / (n_task - n), v))
    found = _strength(units)
    if len(_STRENGTH_CACHE) >= _POOLED_CACHE_SIZE:
        _STRENGTH_CACHE.pop(next(iter(_STRENGTH_CACHE)), None)  # the oldest
    _STRENGTH_CACHE[id(snapshot)] = (snapshot, total, found)
    return found


def tier_midpoint(tier: str) -> float:
    lower = 0.0
    for name, upper in DIFFICULTY_TIERS:
        if name == tier:
            return (lower + min(upper, 1.0)) / 2
        lower = upper
    raise KeyError(f"unknown difficulty tier `{tier}`")


def typical_prompt_tokens(arms: Mapping[str, ArmStats]) -> int | None:
    """The mean prompt-token estimate of a bucket's requests (every arm's), None when none carries one."""
    tokens = sum(s.estimated_prompt_tokens for s in arms.values())
    count = sum(s.estimated_prompt_count for s in arms.values())
    return round(tokens / count) if count > 0 else None


def typical_output(arms: Mapping[str, ArmStats]) -> tuple[int | None, int]:
    """The client's `max_tokens` and `n` of a bucket's typical request: the mean cap when most of its
    requests send one (None when most do not), and the mean `n` rounded (1 where none is recorded)."""
    priced = sum(s.estimated_prompt_count for s in arms.values())
    capped = sum(s.capped_count for s in arms.values())
    cap = max(1, round(sum(s.output_cap_tokens for s in arms.values()) / capped)) if capped > priced / 2 else None
    choices = max(1, round(sum(s.estimated_choices for s in arms.values()) / priced)) if priced > 0 else 1
    return cap, choices


def current_choice(bucket: str, policy: Policy, stats: StatsSnapshot, alias: str = "auto") -> Arm:
    """The arm the learner would pick now for a bucket (`task:tier`), with no exploration and no budget
    pressure: what `ponder stats` and the dashboard show as the current choice.

    Priced for the bucket's own traffic: at the mean of its requests' prompt estimates (cost is linear
    in the prompt, so that arm has the best mean utility over them), else at decide()'s default, and
    for its typical request's `max_tokens` and `n` (typical_output): a bucket whose clients cap the
    output at 20 tokens pays for 20, and the dashboard showed an arm its requests never got."""
    from router.decide import decide  # decide uses this module's functions: avoid a cycle
    from router.request_hints import RequestHints

    task, _, tier = bucket.partition(":")
    classification = Classification(task=task, task_probs={task: 1.0}, difficulty=tier_midpoint(tier or "medium"))
    arms = stats.get(bucket) or _EMPTY
    max_output_tokens, choices = typical_output(arms)
    hints = RequestHints(prompt_tokens=typical_prompt_tokens(arms), max_output_tokens=max_output_tokens,
                         choices=choices)
    return decide(classification, policy, stats, alias=alias, request=hints, rng=None).arm
