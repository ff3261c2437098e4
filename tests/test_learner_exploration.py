"""Exploration: the share goes to the arms still in doubt (top-two Thompson over plausible challengers)."""

from __future__ import annotations

import random

from policies.loader import parse_policy
from router.decide import decide
from router.estimates import compile_policy
from router.learner import EXPLORE_OPTIONS_LIMIT, challengers, current_choice, most_optimism, optimistic_accuracy
from router.types import ArmStats, Classification

QUESTION = Classification("math", {"math": 1.0}, 0.5)


def test_optimistic_accuracy_is_the_mean_plus_two_posterior_sd():
    assert optimistic_accuracy(30.0, 70.0) == (0.3 + 2 * (0.3 * 0.7 / 101) ** 0.5)
    assert optimistic_accuracy(300.0, 700.0) < optimistic_accuracy(3.0, 7.0)  # more evidence, less room
    assert optimistic_accuracy(1.0, 1.0) == 1.0  # capped


def test_challengers_rule_out_arms_worse_with_confidence():
    greedy_utility = 0.7
    options = [
        (16.0, 4.0, 0.0, 0.0),  # 0.80 on 20 outcomes: plausibly better
        (300.0, 700.0, 0.0, 0.0),  # 0.30 on 1000 outcomes: ruled out
        (1.0, 1.0, 0.0, 0.0),  # nothing known: could be anything
        (90.0, 10.0, 0.1, 0.0),  # accurate, but at lambda 10 its cost alone (1.0) rules it out
        (650.0, 350.0, 0.0, 0.0),  # 0.65 on 1000 outcomes: its best case (0.68) is below the greedy arm
    ]
    assert challengers(greedy_utility, options, 10.0, 0.0) == [2, 0]  # most promising first
    assert challengers(0.99, options, 10.0, 0.0) == [2]
    assert challengers(1.5, options, 10.0, 0.0) == []  # nothing can beat it: no exploration


def test_challengers_are_capped_cheapest_first_among_equals():
    options = [(5.0, 5.0, 0.001 * (20 - i), 0.0) for i in range(20)]  # same posterior, falling cost
    picked = challengers(0.5, options, 10.0, 0.0)
    assert len(picked) == EXPLORE_OPTIONS_LIMIT
    assert picked == list(range(19, 19 - EXPLORE_OPTIONS_LIMIT, -1))


# Three arms at the same price, so only P(correct) decides: the greedy arm is known to be right 80%
# of the time; "doubt" has few outcomes and could still be better; "junk" is known to be worse.
SAME_PRICE = """\
name: doubt
backends:
  - {name: b, model: t/b, prices: {input_per_mtok: 0, output_per_mtok: 1}}
arms:
  greedy: {backend: b, tokens: 100}
  doubt: {backend: b, tokens: 100, n: 2, strategy: self_consistency}
  junk: {backend: b, tokens: 100, n: 3, strategy: self_consistency}
routes:
  - name: all
    candidates: {greedy: 0.5, doubt: 0.5, junk: 0.5}
objective: {cost_weight: 0, latency_weight: 0}
exploration: {share: 0.5, max_extra_cost_usd: 1.0}
learner: {prior_strength: 10, half_life_hours: null}
"""


def _stats(policy, doubt: ArmStats) -> dict:
    arms = compile_policy(policy).arms
    return {"math:medium": {arms["greedy"].key: ArmStats(count=2000, successes=1600, weight=2000),
                            arms["junk"].key: ArmStats(count=2000, successes=600, weight=2000),
                            arms["doubt"].key: doubt}}


def _explored(policy, stats, draws: int, seed: int) -> list[str]:
    name_by_key = {arm.key: name for name, arm in compile_policy(policy).arms.items()}
    rng = random.Random(seed)
    decisions = [decide(QUESTION, policy, stats, rng=rng) for _ in range(draws)]
    return [name_by_key[d.arm.key] for d in decisions if d.explore]


def test_the_share_goes_to_the_arm_still_in_doubt():
    policy = parse_policy(SAME_PRICE, "doubt.yaml")
    stats = _stats(policy, ArmStats(count=8, successes=6, weight=8))  # 11/18 = 0.61 +- 0.11: could be > 0.8
    assert current_choice("math:medium", policy, stats) == compile_policy(policy).arms["greedy"].arm
    explored = _explored(policy, stats, 2000, seed=3)
    # every exploring request tests the doubtful arm: none is wasted on the known-worse one, and none
    # returns to the greedy arm, so the share is used up to the policy's allowance and not beyond
    assert set(explored) == {"doubt"}
    assert 0.45 < len(explored) / 2000 <= 0.55


def test_exploration_stops_once_no_arm_is_left_in_doubt():
    policy = parse_policy(SAME_PRICE, "doubt.yaml")
    stats = _stats(policy, ArmStats(count=400, successes=240, weight=400))  # 0.60 +- 0.02: ruled out
    assert _explored(policy, stats, 1000, seed=4) == []


# Twenty arms at one price: one right 80% of the time, two at 70%, the rest junk (20-40%), cold flat
# priors. Ruling the junk out is what lets a 5% share find the best arm.
MANY = "\n".join([
    "name: many",
    "backends:",
    *[f"  - {{name: b{i}, model: t/b{i}, prices: {{input_per_mtok: 0, output_per_mtok: 1}}}}" for i in range(20)],
    "arms:",
    *[f"  a{i}: {{backend: b{i}, tokens: 100}}" for i in range(20)],
    "routes:",
    "  - name: all",
    "    candidates: [" + ", ".join(f"a{i}" for i in range(20)) + "]",
    "objective: {cost_weight: 0, latency_weight: 0}",
    "exploration: {share: 0.05, max_extra_cost_usd: 1.0}",
    "learner: {prior_strength: 10, half_life_hours: null}",
    "",
])
RATES = {f"a{i}": 0.2 + 0.2 * (i % 3) / 2 for i in range(20)} | {"a13": 0.8, "a5": 0.7, "a16": 0.7}


def test_many_arms_the_share_ends_on_the_contenders():
    policy = parse_policy(MANY, "many.yaml")
    compiled = compile_policy(policy)
    name_by_key = {arm.key: name for name, arm in compiled.arms.items()}
    rng = random.Random(12)
    bucket: dict = {}
    stats = {"math:medium": bucket}
    picks, explored_late = [], []
    for step in range(6000):
        decision = decide(QUESTION, policy, stats, rng=rng)
        name = name_by_key[decision.arm.key]
        picks.append(name)
        if decision.explore and step >= 3000:
            explored_late.append(name)
        success = 1.0 if rng.random() < RATES[name] else 0.0
        old = bucket.get(decision.arm.key, ArmStats())
        bucket[decision.arm.key] = ArmStats(count=old.count + 1, successes=old.successes + success,
                                            weight=old.weight + 1)
        stats = {"math:medium": dict(bucket)}  # a new snapshot, as a store's refresh hands decide()
        bucket = stats["math:medium"]
    assert current_choice("math:medium", policy, stats) == compiled.arms["a13"].arm
    assert picks[-1000:].count("a13") >= 900
    # late exploration is spent on the arms still in doubt (the 70% ones), hardly on the junk
    junk = [name for name in explored_late if RATES[name] < 0.5]
    assert len(junk) <= 0.25 * len(explored_late)


def test_most_optimism_bounds_what_any_posterior_adds():
    """decide() skips arms further below the greedy one than this without computing their posterior."""
    rng = random.Random(5)
    for _ in range(2000):
        strength = rng.uniform(0.5, 50.0)
        total = strength + rng.choice([0.0, rng.uniform(0.0, 5.0), rng.uniform(0.0, 5000.0)])
        alpha = rng.uniform(1e-6, total - 1e-6)
        assert optimistic_accuracy(alpha, total - alpha) - alpha / total <= most_optimism(strength) + 1e-12
    assert optimistic_accuracy(5.0, 5.0) - 0.5 == most_optimism(10.0)  # reached at 0.5 with no outcomes


def test_the_exploration_draw_is_taken_whatever_the_share_so_replays_stay_aligned():
    """Two replays of one request stream, one with exploration off: each request still takes its one
    draw, so every later draw is the same in both and the runs differ by the share alone."""
    from router.learner import should_explore

    off, on, reference = random.Random(5), random.Random(5), random.Random(5)
    assert [should_explore(0.0, off) for _ in range(50)] == [False] * 50
    taken = [should_explore(0.3, on) for _ in range(50)]
    assert taken == [reference.random() < 0.3 for _ in range(50)] and any(taken)
    assert off.random() == on.random()
