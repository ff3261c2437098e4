"""The learner: posteriors, decay, and Thompson sampling converging on a synthetic bandit."""

from __future__ import annotations

import random

import pytest

from policies.loader import parse_policy
from router.decide import decide
from router.estimates import compile_policy
from router.learner import (
    current_choice,
    decay_factor,
    explore_pool,
    posterior,
    thompson_pick,
    utility,
)
from router.types import ArmStats, Classification

# Three arms with known success rates and costs (cost_weight 10, so utility = p - 10 * cost):
#   a: p 0.50, $0.0002 -> 0.498     b: p 0.80, $0.002 -> 0.780 (best)     c: p 0.85, $0.02 -> 0.650
# The priors say nothing (0.5 each), so the greedy start is the cheapest arm, a.
BANDIT = """\
name: bandit
backends:
  - {name: a, model: t/a, prices: {input_per_mtok: 0, output_per_mtok: 0.2}}
  - {name: b, model: t/b, prices: {input_per_mtok: 0, output_per_mtok: 2}}
  - {name: c, model: t/c, prices: {input_per_mtok: 0, output_per_mtok: 20}}
arms:
  a: {backend: a, tokens: 1000}
  b: {backend: b, tokens: 1000}
  c: {backend: c, tokens: 1000}
routes:
  - name: all
    candidates: {a: 0.5, b: 0.5, c: 0.5}
objective: {cost_weight: 10, latency_weight: 0}
exploration: {share: 0.1, max_extra_cost_usd: 1.0}
learner: {prior_strength: 10}
"""
TRUE_RATE = {"a": 0.5, "b": 0.8, "c": 0.85}
COST = {"a": 0.0002, "b": 0.002, "c": 0.02}
QUESTION = Classification("math", {"math": 1.0}, 0.5)


def test_decay_factor():
    assert decay_factor(24.0, 24.0) == pytest.approx(0.5)
    assert decay_factor(24.0, 48.0) == pytest.approx(0.25)
    assert decay_factor(None, 1e9) == 1.0
    assert decay_factor(10.0, 0.0) == 1.0


def test_posterior_adds_outcomes_to_the_prior():
    assert posterior(0.7, 10, None) == pytest.approx((7.0, 3.0))
    assert posterior(0.7, 10, ArmStats(count=20, successes=5, weight=20)) == pytest.approx((12.0, 18.0))
    # successes beyond the scored weight are clamped (a late score can race a decay)
    assert posterior(0.5, 2, ArmStats(count=5, successes=9, weight=4)) == pytest.approx((5.0, 1.0))
    alpha, beta = posterior(0.5, 10, ArmStats(count=1000, successes=900, weight=1000))
    assert alpha / (alpha + beta) == pytest.approx(905 / 1010)
    alpha, beta = posterior(1.0, 10, None)
    assert alpha > 0 and beta > 0


def test_utility_and_pool():
    assert utility(0.9, 0.01, 2000, 10, 0.05) == pytest.approx(0.9 - 0.1 - 0.1)
    assert explore_pool(0, [0, 1, 2, 3], [1.0, 0.5, 1.2, 3.0], 0.5) == [1, 2]
    assert explore_pool(0, [0, 1, 2, 3], [1.0, 0.5, 1.2, 3.0], None) == [1, 2, 3]


def test_thompson_sampling_converges_on_a_bernoulli_bandit():
    rng = random.Random(11)
    rates, costs = [0.5, 0.8, 0.85], [0.0002, 0.002, 0.02]
    wins, losses = [0.0] * 3, [0.0] * 3
    picks = []
    for _ in range(3000):
        options = [(1 + wins[i], 1 + losses[i], costs[i], 0.0) for i in range(3)]
        i = thompson_pick(options, 10.0, 0.0, rng)
        picks.append(i)
        if rng.random() < rates[i]:
            wins[i] += 1
        else:
            losses[i] += 1
    assert picks[-1000:].count(1) / 1000 >= 0.85


def run_bandit(policy, rng, steps, rates, stats=None, half_life=None):
    """Feed `steps` requests through decide(); outcomes drawn from `rates`. Returns picks and stats."""
    compiled = compile_policy(policy)
    name_by_key = {arm.key: name for name, arm in compiled.arms.items()}
    stats = stats if stats is not None else {"math:medium": {}}
    bucket = stats["math:medium"]
    picks = []
    for _ in range(steps):
        if half_life is not None:  # the store's job in production: fade every aggregate a little each step
            keep = decay_factor(half_life, 1.0)
            for key, old in bucket.items():
                bucket[key] = ArmStats(count=old.count * keep, successes=old.successes * keep,
                                       weight=old.weight * keep, cost_usd=old.cost_usd * keep,
                                       latency_ms=old.latency_ms * keep)
        decision = decide(QUESTION, policy, stats, rng=rng)
        name = name_by_key[decision.arm.key]
        picks.append(name)
        success = 1.0 if rng.random() < rates[name] else 0.0
        old = bucket.get(decision.arm.key, ArmStats())
        bucket[decision.arm.key] = ArmStats(count=old.count + 1, successes=old.successes + success,
                                            weight=old.weight + 1, cost_usd=old.cost_usd + COST[name],
                                            latency_ms=old.latency_ms + 1000.0)
    return picks, stats


def test_decide_learns_the_best_arm_from_cold_priors():
    policy = parse_policy(BANDIT, "bandit.yaml")
    assert current_choice("math:medium", policy, {}) == compile_policy(policy).arms["a"].arm  # cold: cheapest
    picks, stats = run_bandit(policy, random.Random(2024), 4000, TRUE_RATE)
    assert current_choice("math:medium", policy, stats) == compile_policy(policy).arms["b"].arm
    assert picks[-1000:].count("b") / 1000 >= 0.85
    # cumulative utility close to always playing the best arm in hindsight
    earned = sum(TRUE_RATE[name] - 10 * COST[name] for name in picks)
    best = len(picks) * (TRUE_RATE["b"] - 10 * COST["b"])
    assert earned >= 0.93 * best


def test_decay_lets_the_learner_notice_a_provider_getting_worse():
    policy = parse_policy(BANDIT, "bandit.yaml")
    rng = random.Random(9)
    _, stats = run_bandit(policy, rng, 3000, TRUE_RATE, half_life=300)
    assert current_choice("math:medium", policy, stats) == compile_policy(policy).arms["b"].arm
    worse = dict(TRUE_RATE, b=0.3)
    picks, stats = run_bandit(policy, rng, 3000, worse, stats=stats, half_life=300)
    assert current_choice("math:medium", policy, stats) != compile_policy(policy).arms["b"].arm
    assert picks[-500:].count("b") / 500 <= 0.15


# `strong` is paid by the prompt token ($2000 per M): on a 15-token prompt it costs $0.03 (utility
# 0.90 - 0.03 = 0.87, against `cheap`'s 0.40); on decide()'s default 300-token prompt $0.60 (0.30).
PROMPT_PRICED = """\
name: prompt-priced
backends:
  - {name: cheap, model: t/cheap, prices: {input_per_mtok: 0, output_per_mtok: 0}}
  - {name: strong, model: t/strong, prices: {input_per_mtok: 2000, output_per_mtok: 0}}
arms:
  cheap: {backend: cheap, tokens: 1}
  strong: {backend: strong, tokens: 1}
routes:
  - name: all
    candidates: {cheap: 0.5, strong: 0.5}
objective: {cost_weight: 1, latency_weight: 0}
"""


def _short_prompt_traffic(with_estimates: bool) -> dict[str, dict[str, ArmStats]]:
    """1000 outcomes per arm on 15-token prompts, billed as the cost model said (each carries its
    estimate when `with_estimates`: records from before prompt estimates were kept carry none)."""
    def record(rate: float, cost: float) -> ArmStats:
        return ArmStats(count=1000, successes=1000 * rate, weight=1000, cost_usd=1000 * cost,
                        estimated_cost_usd=1000 * cost, estimated_count=1000,
                        estimated_prompt_tokens=15_000 if with_estimates else 0.0,
                        estimated_prompt_count=1000 if with_estimates else 0.0)

    return {"math:medium": {"cheap/-/single/1": record(0.4, 0.0), "strong/-/single/1": record(0.9, 0.03)}}


def test_current_choice_is_priced_for_the_buckets_own_prompts():
    """The dashboard's and `ponder stats`' current choice is what decide() picks for the bucket's real
    prompts, not for a 300-token prompt nobody sends."""
    from router.request_hints import RequestHints

    policy = parse_policy(PROMPT_PRICED, "prompt-priced.yaml")
    arms = compile_policy(policy).arms
    stats = _short_prompt_traffic(with_estimates=True)
    live = decide(QUESTION, policy, stats, request=RequestHints(prompt_tokens=15)).arm
    assert live == arms["strong"].arm
    assert current_choice("math:medium", policy, stats) == live
    # no estimate recorded (older records): priced at decide()'s default prompt, as before
    assert current_choice("math:medium", policy, _short_prompt_traffic(with_estimates=False)) == arms["cheap"].arm


def test_typical_prompt_is_the_mean_estimate_over_the_buckets_arms():
    from router.learner import typical_prompt_tokens

    arms = {"x": ArmStats(count=3, estimated_prompt_tokens=30, estimated_prompt_count=3),
            "y": ArmStats(count=2, estimated_prompt_tokens=1000, estimated_prompt_count=1),  # one old record
            "z": ArmStats(count=5)}  # only old records
    assert typical_prompt_tokens(arms) == 258  # (30 + 1000) / 4
    assert typical_prompt_tokens({"z": arms["z"]}) is None
    assert typical_prompt_tokens({}) is None


def test_posterior_draws_match_the_beta():
    from router.learner import sample_accuracy

    rng = random.Random(4)
    for alpha, beta in ((3.0, 7.0), (300.0, 700.0)):  # exact Beta, then its normal approximation
        draws = [sample_accuracy(alpha, beta, rng) for _ in range(20_000)]
        mean = sum(draws) / len(draws)
        var = sum((d - mean) ** 2 for d in draws) / len(draws)
        total = alpha + beta
        assert mean == pytest.approx(alpha / total, abs=0.005)
        assert var == pytest.approx(alpha * beta / (total ** 2 * (total + 1)), rel=0.1)
        assert all(0.0 <= d <= 1.0 for d in draws)


def test_pooled_stats_sum_buckets_once_per_snapshot():
    from router.learner import pooled_stats
    from router.types import POOLED_BUCKET

    a = ArmStats(count=2, successes=1, weight=2, cost_usd=0.2, latency_ms=100, latency_p95_ms=80,
                 estimated_prompt_tokens=40, estimated_prompt_count=2)
    b = ArmStats(count=3, successes=3, weight=3, cost_usd=0.3, latency_ms=300, latency_p95_ms=150,
                 estimated_prompt_tokens=600, estimated_prompt_count=1)
    snapshot = {"math:hard": {"x": a}, "chat:easy": {"x": b, "y": a}}
    pooled = pooled_stats(snapshot)
    assert pooled["x"] == ArmStats(count=5, successes=4, weight=5, cost_usd=pytest.approx(0.5), latency_ms=400,
                                   latency_p95_ms=150, estimated_prompt_tokens=640, estimated_prompt_count=3)
    assert pooled["y"] == a
    assert pooled_stats(snapshot) is pooled  # kept for the same snapshot object
    assert pooled_stats({**snapshot}) is not pooled  # a new snapshot is pooled anew
    given = {"x": b}
    assert pooled_stats({**snapshot, POOLED_BUCKET: given}) is given  # a store's own pooled level wins


def test_the_typical_request_caps_its_output_and_asks_n_as_most_of_the_buckets_requests_do():
    from router.learner import typical_output

    # three of four requests capped (mean 30 tokens), n = 2 or 3 (mean 2.25)
    capped = ArmStats(count=3, estimated_prompt_count=3, estimated_choices=7, output_cap_tokens=90, capped_count=3)
    plain = ArmStats(count=1, estimated_prompt_count=1, estimated_choices=2)
    assert typical_output({"x": capped, "y": plain}) == (30, 2)
    # one of four capped: the typical request is not
    few = ArmStats(count=3, estimated_prompt_count=3, estimated_choices=3)
    assert typical_output({"x": few, "y": ArmStats(count=1, estimated_prompt_count=1, estimated_choices=1,
                                                   output_cap_tokens=10, capped_count=1)}) == (None, 1)
    assert typical_output({}) == (None, 1)  # nothing recorded: decide()'s defaults


def test_shared_levels_per_task_and_per_snapshot():
    from router.learner import shared_levels

    a = ArmStats(count=2, successes=1, weight=2)
    b = ArmStats(count=3, successes=3, weight=3)
    one = {"math:hard": {"x": a}, "math:easy": {"x": b}, "chat:easy": {"x": a}}
    other = {"chat:easy": {"x": b}}
    everywhere, math = shared_levels(one, "math")
    assert everywhere["x"].count == 7 and math["x"].count == 5
    assert shared_levels(one, "code")[1] == {}
    assert shared_levels(other, "chat")[0]["x"] == b  # two snapshots (two policies) cached side by side
    assert shared_levels(one, "math")[0] is everywhere


# Two arms at the same price, so utility is P(correct): a is right 80% of the time, b 60%, on average.
TWIN = """\
name: twin
backends:
  - {name: a, model: t/a, prices: {input_per_mtok: 0, output_per_mtok: 1}}
  - {name: b, model: t/b, prices: {input_per_mtok: 0, output_per_mtok: 1}}
arms:
  a: {backend: a, tokens: 100}
  b: {backend: b, tokens: 100}
routes:
  - name: all
    candidates: {a: 0.5, b: 0.5}
objective: {cost_weight: 0, latency_weight: 0}
learner: {prior_strength: 10}
"""


def _twin_world(tiers_alike: bool, keys: tuple[str, str]) -> dict:
    """Six tasks with an easy and a medium bucket, 200 outcomes per arm each. Alike: a 0.8 and b 0.6 in
    both tiers; differ: a 0.95 / 0.65 and b 0.85 / 0.35 (the same averages). math:hard has only b's 15
    outcomes, all right (a lucky streak of the worse arm)."""
    rates = {"easy": (0.8, 0.6), "medium": (0.8, 0.6)} if tiers_alike else \
        {"easy": (0.95, 0.85), "medium": (0.65, 0.35)}
    snapshot = {}
    for task in ("math", "code", "chat", "qa", "logic", "write"):
        for tier, pair in rates.items():
            snapshot[f"{task}:{tier}"] = {key: ArmStats(count=200, successes=200 * p, weight=200, cost_usd=0.02)
                                          for key, p in zip(keys, pair)}
    snapshot["math:hard"] = {keys[1]: ArmStats(count=15, successes=15, weight=15, cost_usd=0.0015)}
    return snapshot


def test_bucket_strength_is_estimated_from_how_much_tiers_differ():
    from router.learner import STRENGTH_MAX, bucket_strength

    keys = ("x", "y")
    alike, differ = _twin_world(True, keys), _twin_world(False, keys)
    assert bucket_strength(alike, 10.0) >= 100  # tiers alike: a bucket's noise is what differs
    assert bucket_strength(alike, 10.0) <= STRENGTH_MAX
    assert bucket_strength(differ, 10.0) == 10.0  # tiers differ: never below the policy's prior_strength
    thin = {"math:easy": {"x": ArmStats(count=5, successes=5, weight=5)},
            "math:medium": {"x": ArmStats(count=5, successes=0, weight=5)}}
    assert bucket_strength(thin, 10.0) == 10.0  # two buckets cannot say how much buckets differ


def test_bucket_strength_is_estimated_once_per_snapshot_whatever_the_policy_floor():
    """The stores estimate it in their refresh loop; each policy then applies its own prior_strength."""
    from router.learner import bucket_strength, estimated_strength

    alike, differ = _twin_world(True, ("x", "y")), _twin_world(False, ("x", "y"))
    estimate = estimated_strength(alike)
    assert estimate is not None and bucket_strength(alike, 10.0) == estimate
    assert bucket_strength(alike, estimate + 50.0) == estimate + 50.0  # a higher floor wins
    assert estimated_strength(differ) < 10.0
    assert bucket_strength(differ, 10.0) == 10.0
    assert bucket_strength(differ, 3.0) == max(3.0, estimated_strength(differ))  # not the first floor's answer


def test_a_sparse_bucket_leans_on_its_task_only_where_tiers_behave_alike():
    policy = compile_policy(parse_policy(TWIN, "twin.yaml"))
    keys = (policy.arms["a"].key, policy.arms["b"].key)
    hard_math = Classification("math", {"math": 1.0}, 0.9)
    # Tiers alike: b's 15 lucky outcomes are noise against its 0.6 in the task's other tiers; a stays.
    assert decide(hard_math, policy, _twin_world(True, keys)).arm == policy.arms["a"].arm
    # Tiers differ as much as 0.3: the bucket's own outcomes are evidence that this tier is different.
    assert decide(hard_math, policy, _twin_world(False, keys)).arm == policy.arms["b"].arm
