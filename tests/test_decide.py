"""The decision engine's behaviour: routes, limits, budgets, overrides, learning and exploration."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from policies.loader import load_policy, parse_policy
from router.candidates import ContextTooLong
from router.decide import BudgetExhausted, UnknownAlias, decide
from router.estimates import compile_policy, estimate_prompt_tokens
from router.learner import current_choice
from router.request_hints import RequestHints
from router.types import DIFFICULTY_TIERS, POOLED_BUCKET, TASK_TYPES, ArmStats, Classification

POLICY = """\
name: test
backends:
  - {name: cheap, model: test/cheap, prices: {input_per_mtok: 0.1, output_per_mtok: 0.4},
     output_tokens_per_s: 100, first_token_ms: 200}
  - {name: mid, model: test/mid, prices: {input_per_mtok: 1, output_per_mtok: 4}, reasoning: true,
     efforts: [low, high], output_tokens_per_s: 80, first_token_ms: 300}
  - {name: strong, model: test/strong, prices: {input_per_mtok: 3, output_per_mtok: 15}, reasoning: true,
     efforts: [low, medium, high], supports_n: false, output_tokens_per_s: 50, first_token_ms: 800}
arms:
  quick:        {backend: cheap}
  quick-cot:    {backend: cheap, strategy: cot}
  mid-low:      {backend: mid, effort: low}
  mid-high:     {backend: mid, effort: high}
  strong-high:  {backend: strong, effort: high}
  strong-vote:  {backend: strong, effort: medium, strategy: self_consistency, n: 3}
routes:
  - name: hard-math
    when: {tasks: [math, reasoning], tiers: [hard]}
    candidates: {strong-high: 0.9, strong-vote: 0.92, mid-high: 0.85, mid-low: 0.7, quick-cot: 0.5}
  - name: catch-all
    candidates: {quick: 0.9, quick-cot: 0.88, mid-low: 0.9}
aliases:
  auto: {}
  auto-cheap: {arms: [quick, quick-cot], explore: false}
objective: {cost_weight: 1, latency_weight: 0.001}
exploration: {share: EXPLORE_SHARE, max_extra_cost_usd: 1.0}
budgets:
  degrade: {below_usd: 1.0, max_cost_usd: 0.001}
overrides:
  reasoning_effort: true
  strategy_header: [self_consistency]
"""

HARD_MATH = Classification("math", {"math": 1.0}, 0.9)
EASY_CHAT = Classification("chat", {"chat": 1.0}, 0.1)


def make_policy(share: float = 0.05, text: str = POLICY):
    return parse_policy(text.replace("EXPLORE_SHARE", str(share)), "test.yaml")


@pytest.fixture(scope="module")
def policy():
    return make_policy()


def name_of(policy, arm):
    return next(name for name, compiled in compile_policy(policy).arms.items() if compiled.arm == arm)


def candidate(decision, policy, name):
    arm = compile_policy(policy).arms[name].arm
    return next(c for c in decision.candidates if c.arm == arm)


def test_easy_chat_gets_the_cheap_arm(policy):
    decision = decide(EASY_CHAT, policy, {})
    assert name_of(policy, decision.arm) == "quick"
    assert decision.rule == "catch-all" and decision.policy == "test" and decision.bucket == "chat:easy"
    assert not decision.explore


def test_hard_math_gets_a_stronger_arm(policy):
    decision = decide(HARD_MATH, policy, {})
    assert name_of(policy, decision.arm) == "mid-high"
    assert decision.arm.effort == "high"
    assert decision.rule == "hard-math"
    # every candidate of the route is recorded with its numbers
    assert len(decision.candidates) == 5
    chosen = candidate(decision, policy, "mid-high")
    assert chosen.utility == max(c.utility for c in decision.candidates)
    assert chosen.expected_cost_usd == pytest.approx((300 * 1 + 6000 * 4) / 1e6)
    assert any("chose `mid-high`" in reason for reason in decision.reasons)


RANGE_ROUTES = """\
routes:
  - name: low-math
    when: {tasks: [math], difficulty: [0.0, 0.5]}
    candidates: {quick: 0.9}
  - name: high-math
    when: {tasks: [math], difficulty: [0.5, 1.0]}
    candidates: {mid-high: 0.9}
  - name: any-high
    when: {difficulty: [0.5, 1.0]}
    candidates: {strong-high: 0.9}
  - name: catch-all
    candidates: {quick: 0.9, mid-low: 0.9}
"""


def test_difficulty_ranges_are_half_open_and_the_first_matching_route_wins():
    """docs/policies.md: a route's `difficulty: [low, high)` range leaves out `high` (1.0 itself is in the
    last range), and the first matching route gives the candidates, later ones that match too do not."""
    start, end = POLICY.index("routes:"), POLICY.index("aliases:")
    policy = make_policy(0.0, POLICY[:start] + RANGE_ROUTES + POLICY[end:])

    def rule(task: str, difficulty: float) -> str:
        return decide(Classification(task, {task: 1.0}, difficulty), policy, {}).rule

    assert rule("math", 0.4999) == "low-math"
    assert rule("math", 0.5) == "high-math"  # 0.5 is the start of [0.5, 1.0), not in [0.0, 0.5)
    assert rule("math", 1.0) == "high-math"
    assert rule("chat", 0.7) == "any-high" and rule("chat", 0.2) == "catch-all"


def test_expected_cost_follows_prompt_and_output_tokens(policy):
    small = decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=100))
    big = decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=10_000))
    capped = decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=100, max_output_tokens=500))
    small, big, capped = (candidate(d, policy, "strong-vote").expected_cost_usd for d in (small, big, capped))
    assert small == pytest.approx(3 * (100 * 3 + 2500 * 15) / 1e6)  # no `n` upstream: the prompt goes thrice
    assert big > small > capped
    assert capped == pytest.approx(3 * (100 * 3 + 500 * 15) / 1e6)


def test_cost_cap_excludes_expensive_arms_with_a_reason(policy):
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(max_cost_usd=0.01))
    assert name_of(policy, decision.arm) == "mid-low"
    for name in ("mid-high", "strong-high", "strong-vote"):
        excluded = candidate(decision, policy, name).excluded
        assert excluded and "x-ponder-max-cost-usd" in excluded and "expected cost" in excluded
    assert candidate(decision, policy, "mid-low").excluded is None
    # a hard limit: an arm over it is no fallback, where one the latency cap alone ruled out is
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(max_cost_usd=0.01, max_latency_ms=10_000))
    assert name_of(policy, decision.arm) == "quick-cot"
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["mid-low"]


def test_cost_header_can_only_tighten(policy):
    capped = make_policy(text=POLICY.replace("objective: {", "objective: {max_cost_usd: 0.01, "))
    decision = decide(HARD_MATH, capped, {}, request=RequestHints(max_cost_usd=5.0))
    assert name_of(capped, decision.arm) == "mid-low"
    assert "policy max_cost_usd" in candidate(decision, capped, "mid-high").excluded


def test_a_cost_header_tighter_than_the_policy_wins_unless_the_policy_ignores_it(policy):
    capped = make_policy(text=POLICY.replace("objective: {", "objective: {max_cost_usd: 5.0, "))
    decision = decide(HARD_MATH, capped, {}, request=RequestHints(max_cost_usd=0.01))
    assert name_of(capped, decision.arm) == "mid-low"
    assert "x-ponder-max-cost-usd" in candidate(decision, capped, "mid-high").excluded
    deaf = make_policy(text=POLICY.replace("overrides:", "overrides:\n  max_cost_header: false"))
    decision = decide(HARD_MATH, deaf, {}, request=RequestHints(max_cost_usd=0.01))
    assert name_of(deaf, decision.arm) != "mid-low" and "ignored x-ponder-max-cost-usd" in " ".join(decision.reasons)


def test_latency_cap(policy):
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(max_latency_ms=30_000))
    assert name_of(policy, decision.arm) == "mid-low"
    assert "p95 latency" in candidate(decision, policy, "mid-high").excluded
    # nothing is fast enough: answer with the fastest affordable arm rather than refuse
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(max_latency_ms=10))
    assert name_of(policy, decision.arm) == "quick-cot"
    assert any("fastest" in reason for reason in decision.reasons)
    # a soft limit: the arms it alone ruled out stand in when the one fast enough fails, fastest first
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(max_latency_ms=20_000))
    assert name_of(policy, decision.arm) == "quick-cot"
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["mid-low", "strong-vote", "mid-high"]


def test_budget_degrades_then_refuses(policy):
    full = decide(HARD_MATH, policy, {}, budget_left_usd=50.0)
    assert name_of(policy, full.arm) == "mid-high"
    low = decide(HARD_MATH, policy, {}, budget_left_usd=0.5)
    assert name_of(policy, low.arm) == "quick-cot"
    assert any("degraded" in reason for reason in low.reasons)
    assert "degrade" in candidate(low, policy, "mid-high").excluded
    with pytest.raises(BudgetExhausted) as caught:
        decide(HARD_MATH, policy, {}, budget_left_usd=0.0001)
    assert caught.value.scope == "key" and caught.value.cheapest_usd == pytest.approx((300 * 0.1 + 600 * 0.4) / 1e6)
    with pytest.raises(BudgetExhausted, match="used up"):
        decide(HARD_MATH, policy, {}, budget_left_usd=0.0)


def test_degrade_without_a_cost_line_takes_the_cheapest():
    """Under the degrade line without `max_cost_usd` the cheapest arm answers; the other affordable arms
    are its fallbacks, other backends first, then cheapest first (there were none: a failed cheapest arm
    was the client's 502 or 503 although another arm within the key's budget answered). An arm the
    latency cap alone ruled out is no fallback (it costs more), nor one over what the key has left."""
    policy = make_policy(text=POLICY.replace("max_cost_usd: 0.001}", "max_cost_usd: null}"))
    decision = decide(EASY_CHAT, policy, {}, budget_left_usd=0.5)
    assert name_of(policy, decision.arm) == "quick"
    assert candidate(decision, policy, "mid-low").excluded == "budget low: cheapest arm only"
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["mid-low", "quick-cot"]
    slow = decide(HARD_MATH, policy, {}, budget_left_usd=0.5, request=RequestHints(max_latency_ms=30_000))
    assert "p95 latency" in candidate(slow, policy, "mid-high").excluded
    assert name_of(policy, slow.arm) == "quick-cot" and [name_of(policy, arm) for arm in slow.fallbacks] == ["mid-low"]
    # cheapest first: strong-vote (3 x medium) and strong-high cost more than mid-high, mid-low less
    uncapped = decide(HARD_MATH, policy, {}, budget_left_usd=0.5)
    assert [name_of(policy, arm) for arm in uncapped.fallbacks] == ["mid-low", "mid-high", "strong-high"]
    cost = {c.arm: c.expected_cost_usd for c in uncapped.candidates}
    assert [cost[arm] for arm in uncapped.fallbacks] == sorted(cost[arm] for arm in uncapped.fallbacks)
    # what the key has left bounds them, as every cost limit does
    tight = decide(HARD_MATH, policy, {}, budget_left_usd=0.01)
    assert all(c.expected_cost_usd <= 0.01 for c in tight.candidates if c.arm in (tight.arm, *tight.fallbacks))
    assert "strong-high" not in [name_of(policy, arm) for arm in tight.fallbacks]


def test_request_cap_that_nothing_fits_raises(policy):
    with pytest.raises(BudgetExhausted) as caught:
        decide(HARD_MATH, policy, {}, request=RequestHints(max_cost_usd=1e-7))
    assert caught.value.scope == "request"
    assert "x-ponder-max-cost-usd" in str(caught.value)


def test_strategy_override_only_when_allowed(policy):
    allowed = decide(HARD_MATH, policy, {}, request=RequestHints(strategy="self_consistency"))
    assert name_of(policy, allowed.arm) == "strong-vote"
    assert candidate(allowed, policy, "mid-high").excluded == "client asked strategy=self_consistency"
    refused = decide(HARD_MATH, policy, {}, request=RequestHints(strategy="cot"))
    assert name_of(policy, refused.arm) == "mid-high"
    assert any("ignored x-ponder-strategy=cot" in reason for reason in refused.reasons)
    # an allowed strategy the route lacks comes from the rest of the policy
    widened = decide(EASY_CHAT, policy, {}, request=RequestHints(strategy="self_consistency"))
    assert name_of(policy, widened.arm) == "strong-vote" and widened.rule == "catch-all+override"


def test_tools_or_json_mode_get_one_plain_answer(policy):
    """A vote or a reasoning instruction reads and rewrites the answer's text: a tool call or a JSON
    object must come from one plain call, whatever the route or the client's strategy header says."""
    preferred = decide(HARD_MATH, policy, {}, request=RequestHints(strategy="self_consistency"))
    assert preferred.arm.strategy == "self_consistency"
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(strategy="self_consistency", exact_output="tools"))
    assert decision.arm.strategy == "single" and all(arm.strategy == "single" for arm in decision.fallbacks)
    assert any("ignored x-ponder-strategy=self_consistency: the request has tools" in r for r in decision.reasons)
    assert candidate(decision, policy, "quick-cot").excluded == "the request has tools, so strategy=single"
    # a route with no single arm answers from the policy's single arms
    cot_only = make_policy(text=POLICY.replace("candidates: {quick: 0.9, quick-cot: 0.88, mid-low: 0.9}",
                                               "candidates: {quick-cot: 0.88}"))
    assert decide(EASY_CHAT, cot_only, {}).arm.strategy == "cot"
    json_mode = decide(EASY_CHAT, cot_only, {}, request=RequestHints(exact_output="response_format json_object"))
    assert json_mode.arm.strategy == "single" and json_mode.rule == "catch-all+override"
    # an alias that lists only a vote: its single arms are none, the policy's serve the tool call
    vote_only = make_policy(text=POLICY.replace("auto-cheap: {arms: [quick, quick-cot], explore: false}",
                                                "auto-vote: {arms: [strong-vote]}"))
    assert decide(HARD_MATH, vote_only, {}, alias="auto-vote").arm.strategy == "self_consistency"
    tools = decide(HARD_MATH, vote_only, {}, alias="auto-vote", request=RequestHints(exact_output="tools"))
    assert tools.arm.strategy == "single" and tools.rule == "hard-math+override"


def test_a_policy_with_no_single_arm_answers_tools_by_one_call_on_its_arms_backends():
    """A policy whose arms all vote or reason still answers a tool call or JSON object by one plain call:
    one standing in for its arms on their backend and effort (a tool call was voted on, and JSON mode
    asked for a 'Final answer:' line), priced by the cost model like any arm."""
    no_single = make_policy(share=0.0, text=POLICY.replace(
        """  quick:        {backend: cheap}
  quick-cot:    {backend: cheap, strategy: cot}
  mid-low:      {backend: mid, effort: low}
  mid-high:     {backend: mid, effort: high}
  strong-high:  {backend: strong, effort: high}
""", "  quick-cot:    {backend: cheap, strategy: cot}\n").replace(
        "candidates: {strong-high: 0.9, strong-vote: 0.92, mid-high: 0.85, mid-low: 0.7, quick-cot: 0.5}",
        "candidates: {strong-vote: 0.92, quick-cot: 0.5}").replace(
        "candidates: {quick: 0.9, quick-cot: 0.88, mid-low: 0.9}", "candidates: {quick-cot: 0.88}").replace(
        "auto-cheap: {arms: [quick, quick-cot], explore: false}", "auto-cheap: {arms: [quick-cot], explore: false}"))
    assert decide(HARD_MATH, no_single, {}).arm.strategy in ("self_consistency", "cot")
    for task in (HARD_MATH, EASY_CHAT):
        decision = decide(task, no_single, {}, request=RequestHints(exact_output="tools"))
        plain = [decision.arm, *decision.fallbacks]
        assert all(arm.strategy == "single" and arm.n == 1 for arm in plain)
        assert {(arm.backend, arm.effort) for arm in plain} <= {("cheap", None), ("strong", "medium")}
    compiled = compile_policy(no_single)
    assert compiled.estimated_cost_usd(decision.arm.key, 100, 50) > 0
    assert {arm.key for arm in compiled.plain_stand_ins} == {"cheap/-/single/1", "strong/medium/single/1"}


REASONING_ALOUD = """\
name: aloud
backends:
  - {name: cheap, model: test/cheap, prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: other, model: test/other, prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
arms:
  direct: {backend: cheap, prior: 0.6}
  think:  {backend: cheap, strategy: cot, prior: 0.9}
  vote:   {backend: other, strategy: self_consistency, n: 3, prior: 0.9}
routes:
  - name: all
    candidates: [direct, think]
aliases:
  think-only: {arms: [think]}
  vote-only: {arms: [vote]}
exploration: {share: 0.0}
overrides: {strategy_header: [cot]}
"""


def test_a_cap_too_small_to_reason_aloud_gets_a_direct_answer():
    """docs/policies.md: a client's max_tokens below an arm's expected chain of thought cuts the chain
    before its "Final answer:" line, so the arm's P(correct) is scaled by the share of the chain that
    fits (it was priced as cheaper, and won); where every arm of the route reasons aloud, a direct call
    to the same model competes: the policy's single arm there, else one standing in, as likely right
    as the arm it stands for. A client's own x-ponder-strategy still gets what it asked for."""
    aloud = parse_policy(REASONING_ALOUD, "aloud.yaml")
    math = Classification("math", {"math": 1.0}, 0.5)
    assert decide(math, aloud, {}).arm.strategy == "cot"
    assert decide(math, aloud, {}, request=RequestHints(max_output_tokens=600)).arm.strategy == "cot"
    capped = decide(math, aloud, {}, request=RequestHints(max_output_tokens=5))
    assert name_of(aloud, capped.arm) == "direct" and capped.rule == "all"
    assert candidate(capped, aloud, "think").expected_accuracy == pytest.approx(0.9 * 5 / 600)
    assert candidate(capped, aloud, "direct").expected_accuracy == pytest.approx(0.6)
    assert any("max_tokens 5 leaves room for part of a chain of thought" in r for r in capped.reasons)

    only_cot = decide(math, aloud, {}, alias="think-only", request=RequestHints(max_output_tokens=5))
    assert name_of(aloud, only_cot.arm) == "direct" and only_cot.rule == "all+direct"
    only_vote = decide(math, aloud, {}, alias="vote-only", request=RequestHints(max_output_tokens=5))
    assert only_vote.arm.key == "other/-/single/1" and only_vote.rule == "all+direct"
    assert [c.expected_accuracy for c in only_vote.candidates] == pytest.approx([0.9 * 5 / 600, 0.9])
    assert decide(math, aloud, {}, alias="vote-only", request=RequestHints(max_output_tokens=600)).arm.strategy \
        == "self_consistency"
    for alias in ("auto", "think-only"):  # (the route also has a direct arm; the alias only the cot arm)
        asked = decide(math, aloud, {}, alias=alias, request=RequestHints(max_output_tokens=5, strategy="cot"))
        assert asked.arm.strategy == "cot" and asked.rule in ("all", "all+override")


THINKING = """\
name: thinking
backends:
  - {name: plain, model: test/plain, prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: o, model: openai/o4-mini, reasoning: true, efforts: [none, low, high],
     prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: sonnet, model: anthropic/claude-x, reasoning: true, effort_param: thinking_budget, efforts: [high],
     prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
arms:
  direct: {backend: plain, prior: 0.6}
  high:   {backend: o, effort: high, prior: 0.9}
  low:    {backend: o, effort: low, prior: 0.8}
  none:   {backend: o, effort: none, prior: 0.5}
  claude: {backend: sonnet, effort: high, prior: 0.95}
routes:
  - {name: efforts, when: {tasks: [code]}, candidates: [none, high]}
  - {name: claude, when: {tasks: [chat]}, candidates: [claude, direct]}
  - {name: all, candidates: [direct, high, low]}
objective: {cost_weight: 0, latency_weight: 0}
exploration: {share: 0.0}
"""


def test_a_cap_too_small_to_think_within_prefers_an_arm_that_answers():
    """docs/policies.md: a reasoning backend spends its thinking within the client's max_tokens, and a
    call cut while it thinks answers nothing (empty content, finish_reason length): an arm whose backend
    thinks at its effort has its P(correct) scaled by the share of its expected tokens the cap leaves
    room for, as an arm that reasons aloud does (an effort `high` arm under max_tokens 50 won, and
    answered nothing). An effort that turns thinking off is not scaled, nor is Claude under a cap its
    thinking is left off for (it answers at once)."""
    policy = parse_policy(THINKING, "thinking.yaml")
    math = Classification("math", {"math": 1.0}, 0.5)
    assert name_of(policy, decide(math, policy, {}).arm) == "high"
    capped = decide(math, policy, {}, request=RequestHints(max_output_tokens=50))
    assert name_of(policy, capped.arm) == "direct"
    assert candidate(capped, policy, "high").expected_accuracy == pytest.approx(0.9 * 50 / 6000)
    assert candidate(capped, policy, "low").expected_accuracy == pytest.approx(0.8 * 50 / 1200)
    assert any("reasons aloud or thinks" in r for r in capped.reasons)
    room_for_low = decide(math, policy, {}, request=RequestHints(max_output_tokens=2000))
    assert name_of(policy, room_for_low.arm) == "low"
    assert candidate(room_for_low, policy, "high").expected_accuracy == pytest.approx(0.9 * 2000 / 6000)

    code, chat = Classification("code", {"code": 1.0}, 0.5), Classification("chat", {"chat": 1.0}, 0.5)
    unthinking = decide(code, policy, {}, request=RequestHints(max_output_tokens=50))
    assert name_of(policy, unthinking.arm) == "none"
    assert candidate(unthinking, policy, "none").expected_accuracy == pytest.approx(0.5)
    claude = decide(chat, policy, {}, request=RequestHints(max_output_tokens=50))
    assert name_of(policy, claude.arm) == "claude"
    assert candidate(claude, policy, "claude").expected_accuracy == pytest.approx(0.95)
    claude_thinking = decide(chat, policy, {}, request=RequestHints(max_output_tokens=2000))
    assert candidate(claude_thinking, policy, "claude").expected_accuracy == pytest.approx(0.95 * 2000 / 6000)


EVERY_ARM_THINKS = """\
name: thinkers
backends:
  - {name: o, model: test/o, reasoning: true, efforts: [none, low, high], prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: r, model: test/r, reasoning: true, efforts: [none, low, high], prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: deep, model: test/deep, reasoning: true, efforts: [low, high], prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
arms:
  high:      {backend: o, effort: high, prior: 0.9}
  low:       {backend: o, effort: low, prior: 0.8}
  none:      {backend: o, effort: none, prior: 0.55}
  r-high:    {backend: r, effort: high, prior: 0.85}
  deep-low:  {backend: deep, effort: low, prior: 0.8}
  deep-high: {backend: deep, effort: high, prior: 0.9}
routes:
  - {name: o-route, when: {tasks: [math]}, candidates: [high, low]}
  - {name: r-route, when: {tasks: [code]}, candidates: [r-high]}
  - {name: all, candidates: [deep-low, deep-high]}
objective: {cost_weight: 0, latency_weight: 0}
exploration: {share: 0.0}
overrides: {reasoning_effort: true}
"""


def test_a_cap_too_small_to_think_within_gets_a_call_at_an_effort_that_does_not_think():
    """docs/policies.md: where every arm of the route thinks and the client's max_tokens is below what
    each is expected to write, the lowest effort won through the scaling and a reasoning model given
    max_tokens 20 spent them thinking (empty content, finish_reason length). A plain call to the same
    model at an effort that turns thinking off competes (rule `<route>+direct`): the policy's single arm
    there with its own prior, else one standing in, as likely right as the best arm it stands for. None
    where the backend has no such level, nor where the client asked for an effort."""
    policy = parse_policy(EVERY_ARM_THINKS, "thinkers.yaml")
    math, code, chat = (Classification(task, {task: 1.0}, 0.5) for task in ("math", "code", "chat"))
    assert name_of(policy, decide(math, policy, {}, request=RequestHints(max_output_tokens=2000)).arm) == "low"
    capped = decide(math, policy, {}, request=RequestHints(max_output_tokens=20))
    assert name_of(policy, capped.arm) == "none" and capped.rule == "o-route+direct"
    assert capped.arm.effort == "none" and capped.arm.strategy == "single"
    assert candidate(capped, policy, "none").expected_accuracy == pytest.approx(0.55)  # its own prior
    assert any("at an effort that does not think" in r for r in capped.reasons), capped.reasons

    stand_in = decide(code, policy, {}, request=RequestHints(max_output_tokens=20))
    assert stand_in.rule == "r-route+direct" and stand_in.arm.key == "r/none/single/1"
    assert [round(c.expected_accuracy, 4) for c in stand_in.candidates] == [round(0.85 * 20 / 6000, 4), 0.85]

    # `deep` declares no level without thinking: nothing stands in, the cheapest chain still wins
    no_level = decide(chat, policy, {}, request=RequestHints(max_output_tokens=20))
    assert name_of(policy, no_level.arm) == "deep-low" and no_level.rule == "all"
    # a client's own reasoning_effort gets what it asked for
    asked = decide(math, policy, {}, request=RequestHints(max_output_tokens=20, reasoning_effort="high"))
    assert name_of(policy, asked.arm) == "high" and "+direct" not in asked.rule


def windowed(**windows: int):
    """POLICY with these backends' context windows (max_context) declared."""
    text = POLICY
    for backend, window in windows.items():
        text = text.replace(f"{{name: {backend}, ", f"{{name: {backend}, max_context: {window}, ")
    return make_policy(text=text)


def test_an_arm_whose_backend_cannot_hold_the_prompt_is_not_chosen_nor_a_fallback():
    policy = windowed(cheap=1000, mid=8000)
    long = RequestHints(prompt_tokens=5000)  # an estimate; cheap's window is 1000
    decision = decide(EASY_CHAT, policy, {}, request=long)
    assert name_of(policy, decision.arm) == "mid-low"
    assert decision.fallbacks == ()  # quick and quick-cot cannot take it either
    assert candidate(decision, policy, "quick").excluded == (
        "prompt of ~5000 tokens (estimated) is over backend `cheap`'s context window of 1000")
    # hard math: the strong backend (no max_context, and not in litellm's map) is never excluded
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=20_000))
    assert decision.arm.backend == "strong" and {arm.backend for arm in decision.fallbacks} == {"strong"}
    # a short prompt: nothing changes
    assert name_of(policy, decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=800)).arm) == "quick"


def test_a_borderline_prompt_still_goes_to_the_backend():
    """The estimate is ~4 characters a token: only a prompt clearly over the window is kept away from
    it, so one that may fit is sent, and the backend answers with its exact count."""
    policy = windowed(cheap=1000)
    decision = decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=1400))
    assert name_of(policy, decision.arm) == "quick"
    assert candidate(decision, policy, "quick").excluded is None


def test_the_prompt_estimate_counts_only_text_and_never_raises():
    """Content parts as clients send them, odd ones too (a part with no type and a number for text,
    an image): only string text counts, at ~4 characters a token plus 4 a message."""
    messages = [{"role": "user", "content": [{"text": 5}, {"text": None}, {"type": "image_url", "image_url": {}},
                                             {"type": "text", "text": "x" * 40}]},
                {"role": "assistant", "content": None}, "junk"]
    assert estimate_prompt_tokens(messages) == 40 // 4 + 4 * 3


def test_the_prompt_estimate_counts_tool_definitions_calls_and_the_response_schema():
    """What the provider bills as prompt besides message text: the body's tools (or functions) and
    response_format, and an assistant turn's tool calls, each as its JSON's length / 4."""
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "' + "y" * 400 + '"}'}}]
    messages = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": None, "tool_calls": call},
                {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "z" * 800, "parameters": {}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "w" * 400}}}
    text_only = (40 + 4) // 4 + 4 * 3
    with_calls = estimate_prompt_tokens(messages)
    assert with_calls - text_only == pytest.approx(len(orjson.dumps(call)) / 4, abs=1)
    whole = estimate_prompt_tokens(messages, {"messages": messages, "tools": tools, "response_format": schema})
    assert whole - with_calls == pytest.approx((len(orjson.dumps(tools)) + len(orjson.dumps(schema))) / 4, abs=1)
    assert estimate_prompt_tokens(messages, {"functions": tools}) > with_calls + 200


def test_a_route_none_of_whose_arms_holds_the_prompt_uses_the_aliass_that_do():
    policy = windowed(cheap=1000, mid=1000)
    decision = decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=5000))
    assert decision.arm.backend == "strong" and decision.rule == "catch-all+context"
    assert any("no arm of route `catch-all` holds a prompt of ~5000 tokens" in r for r in decision.reasons)


def test_no_arm_that_can_hold_the_prompt_is_context_too_long():
    policy = windowed(cheap=1000, mid=2000, strong=4000)
    with pytest.raises(ContextTooLong) as refused:
        decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=9000))
    assert refused.value.max_context == 4000 and refused.value.prompt_tokens == 9000
    assert "maximum context length of the models `auto` may use here is 4000 tokens" in str(refused.value)
    # an alias is held to its own arms
    with pytest.raises(ContextTooLong):
        decide(EASY_CHAT, windowed(cheap=1000), {}, alias="auto-cheap", request=RequestHints(prompt_tokens=5000))
    # a client's strategy override narrows what may hold it
    with pytest.raises(ContextTooLong):
        decide(HARD_MATH, windowed(strong=1000), {},
               request=RequestHints(prompt_tokens=5000, strategy="self_consistency"))


def test_reasoning_effort_override(policy):
    decision = decide(HARD_MATH, policy, {}, request=RequestHints(reasoning_effort="low"))
    assert name_of(policy, decision.arm) == "mid-low"
    closed = make_policy(text=POLICY.replace("reasoning_effort: true", "reasoning_effort: false"))
    decision = decide(HARD_MATH, closed, {}, request=RequestHints(reasoning_effort="low"))
    assert name_of(closed, decision.arm) == "mid-high"
    assert any("ignored reasoning_effort=low" in reason for reason in decision.reasons)


def test_failing_arm_loses_the_choice(policy):
    key = compile_policy(policy).arms["mid-high"].key
    stats = {"math:hard": {key: ArmStats(count=100, successes=20, weight=100, cost_usd=2.4, latency_ms=7.5e6)}}
    decision = decide(HARD_MATH, policy, stats)
    assert name_of(policy, decision.arm) != "mid-high"
    assert candidate(decision, policy, "mid-high").expected_accuracy == pytest.approx((8.5 + 20) / 110)
    # another bucket's record is this bucket's prior (the shared level), still worth prior_strength (10)
    # pseudo-outcomes, so the bucket's own outcomes soon outweigh it
    elsewhere = decide(HARD_MATH, policy, {"chat:easy": stats["math:hard"]})
    assert candidate(elsewhere, policy, "mid-high").expected_accuracy == pytest.approx((8.5 + 20) / 110)
    both = {"chat:easy": stats["math:hard"], "math:hard": {key: ArmStats(count=10, successes=10, weight=10)}}
    assert candidate(decide(HARD_MATH, policy, both), policy, "mid-high").expected_accuracy == pytest.approx(
        (10 * (8.5 + 20) / 110 + 10) / 20)


def test_shared_level_counts_no_outcome_twice(policy):
    """With outcomes in one bucket only, the pooled record is that bucket's own: nothing is added."""
    key = compile_policy(policy).arms["mid-high"].key
    own = ArmStats(count=100, successes=20, weight=100, cost_usd=2.4, latency_ms=7.5e6)
    with_pooled = {"math:hard": {key: own}, POOLED_BUCKET: {key: own}}
    for stats in ({"math:hard": {key: own}}, with_pooled):
        assert candidate(decide(HARD_MATH, policy, stats), policy, "mid-high").expected_accuracy == \
            pytest.approx((8.5 + 20) / 110)


def test_the_same_task_weighs_before_other_tasks(policy):
    """Three levels: other tasks' record -> the task's other tiers -> the bucket."""
    key = compile_policy(policy).arms["mid-high"].key
    stats = {"chat:easy": {key: ArmStats(count=100, successes=20, weight=100)},
             "math:easy": {key: ArmStats(count=100, successes=90, weight=100)}}
    task_prior = (8.5 + 20) / 110  # the route prior (0.85, strength 10) after the other task's record
    expected = (10 * task_prior + 90) / 110  # then the task's other tier's record
    assert candidate(decide(HARD_MATH, policy, stats), policy, "mid-high").expected_accuracy == \
        pytest.approx(expected)
    # a store may hand the levels in itself; then they are read as they are
    given = {**stats, POOLED_BUCKET: {key: ArmStats(count=200, successes=110, weight=200)},
             "math:*": {key: ArmStats(count=100, successes=90, weight=100)}}
    assert candidate(decide(HARD_MATH, policy, given), policy, "mid-high").expected_accuracy == \
        pytest.approx(expected)


def test_cost_calibration_carries_to_untried_arms(policy):
    """An arm whose cost came out 3x its estimate makes the route's untried arms' estimates 3x too
    (shrunk toward 1 by prior_strength observations)."""
    compiled = compile_policy(policy)
    tried = compiled.arms["mid-high"]
    stats = {"math:hard": {tried.key: ArmStats(count=990, successes=850, weight=990,
                                               cost_usd=990 * tried.cost_reference * 3)}}
    before = {c.arm: c.expected_cost_usd for c in decide(HARD_MATH, policy, {}).candidates}
    after = {c.arm: c.expected_cost_usd for c in decide(HARD_MATH, policy, stats).candidates}
    untried = [arm for arm in before if arm != tried.arm]
    assert untried
    for arm in untried:
        assert after[arm] == pytest.approx(before[arm] * (1 + 990 / 1000 * 2), rel=1e-6)


def test_observed_cost_and_latency_replace_the_estimates(policy):
    compiled = compile_policy(policy).arms["mid-high"]
    estimate = compiled.cost_reference
    stats = {"math:hard": {compiled.key: ArmStats(count=1000, successes=850, weight=1000,
                                                  cost_usd=1000 * estimate * 3, latency_ms=1000 * 5_000.0,
                                                  latency_p95_ms=9_000.0)}}
    seen = candidate(decide(HARD_MATH, policy, stats), policy, "mid-high")
    assert seen.expected_cost_usd == pytest.approx(estimate * 3, rel=0.05)
    # blended with the estimate, which counts as prior_strength (10) observations
    assert seen.expected_latency_ms == pytest.approx((10 * compiled.latency_ms + 1000 * 5_000) / 1010)


def test_fallbacks_prefer_other_backends(policy):
    decision = decide(HARD_MATH, policy, {})
    assert decision.arm not in decision.fallbacks
    assert 0 < len(decision.fallbacks) <= 3
    assert decision.fallbacks[0].backend != decision.arm.backend
    backends = [arm.backend == decision.arm.backend for arm in decision.fallbacks]
    assert backends == sorted(backends)  # other backends first, then the same one


def test_aliases(policy):
    cheap = decide(HARD_MATH, policy, {}, alias="auto-cheap", rng=random.Random(1))
    assert name_of(policy, cheap.arm) == "quick-cot"
    assert {name_of(policy, c.arm) for c in cheap.candidates} == {"quick-cot"}
    with pytest.raises(UnknownAlias, match="auto-cheap"):
        decide(HARD_MATH, policy, {}, alias="auto-deluxe")


def test_deterministic_given_seed():
    policy = make_policy(share=0.3)
    inputs = [Classification(TASK_TYPES[i % 6], {}, (i * 37 % 100) / 100) for i in range(300)]

    def run(seed):
        rng = random.Random(seed)
        return [decide(c, policy, {}, rng=rng) for c in inputs]

    first, second = run(7), run(7)
    assert first == second
    assert any(d.explore for d in first)
    assert run(8) != first


def test_no_rng_means_no_exploration():
    policy = make_policy(share=1.0)
    assert not any(decide(HARD_MATH, policy, {}).explore for _ in range(50))


def test_exploration_share_matches_the_allowance():
    policy = make_policy(share=0.1)
    rng = random.Random(42)
    draws = 20_000
    decisions = [decide(HARD_MATH, policy, {}, rng=rng) for _ in range(draws)]
    share = sum(d.explore for d in decisions) / draws
    # 10% of requests go to a challenger (an arm that could still beat the greedy one): with cold priors
    # every alternative is in doubt, so nearly all of the share is spent, never more than allowed
    assert 0.03 < share <= 0.1 + 0.01
    explored = {name_of(policy, d.arm) for d in decisions if d.explore}
    assert "mid-high" not in explored and len(explored) >= 2  # explores the alternatives, not the greedy arm


def test_a_clear_winner_keeps_the_draws():
    """Where the greedy arm is clearly best, the draw keeps it: exploration fades with evidence."""
    policy = make_policy(share=1.0)
    compiled = compile_policy(policy)
    stats = {"math:hard": {arm.key: ArmStats(count=2000, successes=(1900 if name == "mid-high" else 400), weight=2000)
                           for name, arm in compiled.arms.items()}}
    rng = random.Random(1)
    assert sum(decide(HARD_MATH, policy, stats, rng=rng).explore for _ in range(500)) == 0


def test_exploration_stays_within_the_extra_cost():
    policy = make_policy(share=0.5, text=POLICY.replace("max_extra_cost_usd: 1.0", "max_extra_cost_usd: 0.001"))
    rng = random.Random(3)
    greedy_cost = candidate(decide(HARD_MATH, policy, {}), policy, "mid-high").expected_cost_usd
    for _ in range(2000):
        decision = decide(HARD_MATH, policy, {}, rng=rng)
        if decision.explore:
            chosen = next(c for c in decision.candidates if c.arm == decision.arm)
            assert chosen.expected_cost_usd <= greedy_cost + 0.001


def test_no_exploration_while_degraded():
    policy = make_policy(share=1.0)
    rng = random.Random(5)
    assert not any(decide(HARD_MATH, policy, {}, budget_left_usd=0.5, rng=rng).explore for _ in range(100))


def test_an_arm_whose_backend_is_cooling_down_gives_way_and_is_planned_last(policy):
    """While `mid` cools down after failures, the best arm of another backend answers (not explored,
    the reasons say why), and mid-high, the best by merit, stays in the plan last, for a cool-down that
    ends before the others have failed. Its numbers are unchanged: the learner ranks it as before."""
    healthy = decide(HARD_MATH, policy, {})
    assert name_of(policy, healthy.arm) == "mid-high"
    decision = decide(HARD_MATH, policy, {}, cooling=frozenset({"mid"}))
    assert name_of(policy, decision.arm) == "strong-vote" and not decision.explore
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["quick-cot", "strong-high", "mid-high"]
    assert any("backend `mid` is cooling down" in reason for reason in decision.reasons)
    assert decision.candidates == healthy.candidates
    # a fallback's backend cooling down: the same arm answers, and an answering arm takes the fallback's place
    assert [name_of(policy, arm) for arm in healthy.fallbacks] == ["strong-vote", "strong-high", "quick-cot"]
    other = decide(HARD_MATH, policy, {}, cooling=frozenset({"cheap"}))
    assert other.arm == healthy.arm and other.reasons == healthy.reasons
    assert [name_of(policy, arm) for arm in other.fallbacks] == ["strong-vote", "strong-high", "mid-low"]


def test_a_cascade_whose_every_later_stage_cools_down_gives_way_as_a_cooling_arm_does():
    """A cascade ranked for its escalation cannot escalate while every backend of its later stages cools
    down (the gateway passes them over, and it answers with its first stage however unsure): the best
    arm that answers stands in, and the reasons say why; one stage of two still answering, or no other
    arm answering, the cascade serves."""
    text = POLICY.replace("  strong-vote:", "  escalate:     {backend: cheap, strategy: cascade, stages: [mid-high, "
                          "strong-high]}\n  strong-vote:").replace(
        "candidates: {strong-high: 0.9,", "candidates: {escalate: 0.99, strong-high: 0.9,")
    policy = make_policy(share=0.0, text=text)
    assert name_of(policy, decide(HARD_MATH, policy, {}).arm) == "escalate"
    assert name_of(policy, decide(HARD_MATH, policy, {}, cooling=frozenset({"mid"})).arm) == "escalate"
    decision = decide(HARD_MATH, policy, {}, cooling=frozenset({"mid", "strong"}))
    assert name_of(policy, decision.arm) == "quick-cot"  # the only arm that answers
    assert any("the backends its cascade escalates to (`mid`, `strong`) are cooling down" in reason
               for reason in decision.reasons), decision.reasons
    healthy = decide(HARD_MATH, policy, {})
    assert decision.candidates == healthy.candidates  # ranked as ever
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["mid-high", "strong-vote", "strong-high"]
    everything = decide(HARD_MATH, policy, {}, cooling=frozenset({"cheap", "mid", "strong"}))
    assert name_of(policy, everything.arm) == "escalate"


def test_every_backend_cooling_down_plans_as_if_none_were(policy):
    """No refusal in the decision when every arm's backend cools down: the gateway calls the first
    whose cool-down has ended by then, or answers 503 with when the soonest ends (Retry-After)."""
    assert decide(HARD_MATH, policy, {}, cooling=frozenset({"mid", "strong", "cheap"})) == decide(HARD_MATH, policy, {})


def test_an_arm_over_the_latency_limit_stands_in_when_every_eligible_backend_cools_down():
    """Latency is a soft limit: when the arms within it all cool down, the fastest arm over it whose
    backend answers serves, rather than a 503."""
    policy = make_policy(share=0.0)
    limited = RequestHints(max_latency_ms=25_000)  # quick-cot (p95 9.3 s) and mid-low (23 s) are within it
    assert name_of(policy, decide(HARD_MATH, policy, {}, request=limited).arm) == "mid-low"
    decision = decide(HARD_MATH, policy, {}, request=limited, cooling=frozenset({"cheap", "mid"}))
    assert name_of(policy, decision.arm) == "strong-vote"
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["strong-high", "mid-low", "quick-cot"]
    fastest = decide(HARD_MATH, policy, {}, request=RequestHints(max_latency_ms=10), cooling=frozenset({"cheap"}))
    assert name_of(policy, fastest.arm) == "mid-low"  # none within it: the fastest whose backend answers
    # the arm serving is not ruled out (the request's record marked it both chosen and excluded), as
    # when no arm meets the limit; the slower fallbacks still are, and the reasons say why it serves
    for served in (fastest, decision):
        excluded = {name_of(policy, c.arm): c.excluded for c in served.candidates}
        assert excluded[name_of(policy, served.arm)] is None
    assert excluded["strong-high"].startswith("expected p95 latency")  # decision's fallback
    assert any("`strong-vote`, over x-ponder-max-latency-ms 25000 ms, answers" in r for r in decision.reasons)


def test_no_exploration_of_an_arm_whose_backend_cools_down_nor_of_its_stand_in():
    """An explored arm whose backend cools down would be skipped (the fallback answering explores
    nothing), and the arm standing in for the greedy one answers anyway: neither is drawn."""
    policy = make_policy(share=1.0)
    rng = random.Random(3)
    drawn = Counter()
    for _ in range(300):
        decision = decide(HARD_MATH, policy, {}, rng=rng, cooling=frozenset({"mid"}))
        if decision.explore:
            drawn[name_of(policy, decision.arm)] += 1
    assert drawn and set(drawn) <= {"strong-high", "quick-cot"}, drawn
    assert not any(decide(HARD_MATH, policy, {}, rng=rng, cooling=frozenset({"strong"})).arm.backend == "strong"
                   for _ in range(300))


def test_degraded_takes_the_cheapest_arm_whose_backend_answers():
    policy = make_policy(text=POLICY.replace("max_cost_usd: 0.001}", "max_cost_usd: null}"))
    decision = decide(EASY_CHAT, policy, {}, budget_left_usd=0.5, cooling=frozenset({"cheap"}))
    assert name_of(policy, decision.arm) == "mid-low"
    # the cooling arms stay fallbacks, planned last (the gateway skips them while they cool down)
    assert [name_of(policy, arm) for arm in decision.fallbacks] == ["quick", "quick-cot"]
    assert any("cheapest arm whose backend is not cooling down" in reason for reason in decision.reasons)


def test_current_choice_is_the_greedy_arm(policy):
    assert current_choice("math:hard", policy, {}) == decide(HARD_MATH, policy, {}).arm
    assert current_choice("chat:easy", policy, {}) == compile_policy(policy).arms["quick"].arm


def test_arm_carries_strategy_params():
    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "local.yaml")
    adaptive = compile_policy(policy).arms["adaptive"].arm
    assert adaptive.param("confidence", 0) == 0.75 and adaptive.param("wave", 0) == 2
    assert adaptive.param("temperature", 0) == 0.7
    assert adaptive.key == "local/-/adaptive_consistency/8"


def test_cascade_arm_has_stages():
    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "cost-saver.yaml")
    cascade = compile_policy(policy).arms["nano-then-g5nano"].arm
    assert [stage.backend for stage in cascade.stages] == ["gpt-5-nano", "deepseek"]
    assert cascade.param("escalate_below", 0) == 0.6


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "policies").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_policy_decides_every_bucket(path):
    policy = load_policy(path)
    rng = random.Random(0)
    for alias in set(policy.aliases) | {"auto"}:
        for task in TASK_TYPES:
            for tier, upper in DIFFICULTY_TIERS:
                decision = decide(Classification(task, {}, upper - 0.01), policy, {}, alias=alias, rng=rng)
                assert decision.arm in [c.arm for c in decision.candidates if c.excluded is None]


def test_local_default_exercises_the_strategies():
    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "local.yaml")
    assert decide(HARD_MATH, policy, {}).arm.strategy in ("self_consistency", "adaptive_consistency")
    for simple in (EASY_CHAT, Classification("knowledge", {}, 0.5)):
        assert decide(simple, policy, {}).arm.strategy == "single"


def test_candidates_built_on_the_fast_path_equal_constructed_ones(policy, monkeypatch):
    import router.decide as engine

    fast = decide(HARD_MATH, policy, {}, request=RequestHints(max_cost_usd=0.01))
    monkeypatch.setattr(engine, "_CANDIDATE_SETTERS", None)
    plain = decide(HARD_MATH, policy, {}, request=RequestHints(max_cost_usd=0.01))
    assert fast.candidates == plain.candidates
    assert all(type(c) is type(p) for c, p in zip(fast.candidates, plain.candidates))
    assert hash(fast.candidates[0].arm) == hash(plain.candidates[0].arm)
    assert repr(fast.candidates[1]) == repr(plain.candidates[1])


def test_hints_from_a_request():
    from types import SimpleNamespace

    from router.request_hints import InvalidHint

    request = SimpleNamespace(messages=[{"role": "user", "content": "x" * 400},
                                        {"role": "user", "content": [{"type": "text", "text": "y" * 40}]}],
                              reasoning_effort="high", max_output_tokens=256)
    headers = {"x-ponder-max-cost-usd": "0.01", "x-ponder-max-latency-ms": "2500",
               "x-ponder-strategy": "self_consistency"}
    hints = RequestHints.from_request(request, headers)
    assert hints == RequestHints(max_cost_usd=0.01, max_latency_ms=2500.0, strategy="self_consistency",
                                 reasoning_effort="high", prompt_tokens=118, max_output_tokens=256)
    assert RequestHints.from_request(SimpleNamespace(messages=[]), {}) == RequestHints(
        prompt_tokens=0, reasoning_effort=None, max_output_tokens=None)
    for bad in ({"x-ponder-max-cost-usd": "cheap"}, {"x-ponder-max-latency-ms": "-5"},
                {"x-ponder-max-cost-usd": "nan"}, {"x-ponder-max-cost-usd": "inf"}, {"x-ponder-strategy": "mcts"}):
        with pytest.raises(InvalidHint, match=next(iter(bad))):
            RequestHints.from_request(request, bad)


def test_gateway_facing_helpers(policy):
    compiled = compile_policy(policy)
    assert compiled.name == "test"
    assert compiled.allows_override("reasoning_effort") and compiled.allows_override("strategy")
    assert not compiled.allows_override("policy") and not compiled.allows_override("anything-else")
    assert compiled.key_budgets() == {}
    budgeted = make_policy(text=POLICY.replace("budgets:\n", "budgets:\n  per_key_daily_usd: 2\n"))
    assert compile_policy(budgeted).key_budgets() == {"day": 2.0}
    local = load_policy(Path(__file__).resolve().parents[1] / "policies" / "local.yaml")
    adaptive = compile_policy(local).arms["adaptive"].arm
    assert dict(adaptive.params) == {"confidence": 0.75, "wave": 2.0, "temperature": 0.7}
    templated = make_policy(text=POLICY.replace("quick-cot:    {backend: cheap, strategy: cot}",
                                                 "quick-cot:    {backend: cheap, strategy: cot, cot_template: 'Go. {task}'}"))
    assert dict(compile_policy(templated).arms["quick-cot"].arm.params) == {"cot_template": "Go. {task}"}


def test_compile_policy_with_gateway_backends():
    from policies.backends import BackendSpec

    local = load_policy(Path(__file__).resolve().parents[1] / "policies" / "local.yaml")
    assert compile_policy(local, [local.backend("local")]) is compile_policy(local)  # nothing new: same tables
    moved = BackendSpec(name="local", model="openai/smollm2", api_base="http://127.0.0.1:9999/v1")
    compiled = compile_policy(local, [moved])
    assert compiled.policy.backend("local").api_base == "http://127.0.0.1:9999/v1"
    assert local.backend("local").api_base == "http://127.0.0.1:8080/v1"  # the loaded policy is untouched


def test_new_stats_are_never_served_from_the_cache():
    policy = make_policy()
    key = compile_policy(policy).arms["mid-high"].key
    for successes in (90.0, 10.0, 90.0):  # each a new ArmStats object, as after a store refresh
        stats = {"math:hard": {key: ArmStats(count=100, successes=successes, weight=100, cost_usd=2.4,
                                             latency_ms=7.5e6)}}
        seen = candidate(decide(HARD_MATH, policy, stats), policy, "mid-high")
        assert seen.expected_accuracy == pytest.approx((8.5 + successes) / 110)
    # the same object mutated in place is a different dict entry, still seen afresh
    stats["math:hard"][key] = ArmStats(count=100, successes=50, weight=100, cost_usd=2.4, latency_ms=7.5e6)
    assert candidate(decide(HARD_MATH, policy, stats), policy, "mid-high").expected_accuracy == \
        pytest.approx(58.5 / 110)


# --- cold priors ---------------------------------------------------------------------------------

PRICED = """\
name: priced
backends:
  - {name: free, model: local/free, prices: {input_per_mtok: 0, output_per_mtok: 0}}
  - {name: cheap, model: test/cheap, prices: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  - {name: mid, model: test/mid, prices: {input_per_mtok: 1, output_per_mtok: 4}}
  - {name: strong, model: test/strong, prices: {input_per_mtok: 10, output_per_mtok: 40}}
arms:
  local:  {backend: free}
  quick:  {backend: cheap}
  middle: {backend: mid}
  big:    {backend: strong}
  pinned: {backend: cheap, strategy: cot, prior: 0.3}
routes:
  - name: given
    when: {tasks: [math]}
    candidates: {big: 0.2, quick: null}
  - name: all
    candidates: {local: null, quick: null, middle: null, big: null, pinned: null}
objective: {cost_weight: 0, latency_weight: 0}
exploration: {share: 0}
LEARNER
"""


def _priced(learner: str = ""):
    return compile_policy(parse_policy(PRICED.replace("LEARNER", learner), "priced.yaml"))


def test_cold_priors_rise_with_price():
    """Without a prior of its own, an arm's cold P(correct) runs from learner.price_prior.low at the
    cheapest priced arm to .high at the priciest, linear in log cost per call; free arms get low."""
    import math

    compiled = _priced()
    arms = compiled.arms
    assert arms["quick"].prior == pytest.approx(0.4) and arms["big"].prior == pytest.approx(0.7)
    assert arms["local"].prior == pytest.approx(0.4)  # free: the low end
    assert arms["pinned"].prior == 0.3  # its own prior wins
    costs = {name: math.log(arms[name].cost_reference) for name in ("quick", "middle", "big")}
    share = (costs["middle"] - costs["quick"]) / (costs["big"] - costs["quick"])
    assert 0.0 < share < 1.0 and arms["middle"].prior == pytest.approx(0.4 + 0.3 * share)
    # With nothing learned and no cost in the objective, the priciest arm is the greedy choice.
    decision = decide(Classification("knowledge", {"knowledge": 1.0}, 0.5), compiled, {})
    assert decision.arm == arms["big"].arm
    # A route's own prior wins over both.
    math_route = compiled.aliases["auto"].route("math", 0.5, "medium")
    assert dict((arm.name, prior) for arm, prior in math_route.candidates) == {"big": 0.2, "quick": pytest.approx(0.4)}


def test_price_prior_bounds_and_off():
    custom = _priced("learner: {price_prior: {low: 0.2, high: 0.9}}").arms
    assert custom["quick"].prior == pytest.approx(0.2) and custom["big"].prior == pytest.approx(0.9)
    flat = _priced("learner: {price_prior: null}").arms
    assert {name: arm.prior for name, arm in flat.items()} == {
        "local": 0.5, "quick": 0.5, "middle": 0.5, "big": 0.5, "pinned": 0.3}
    with pytest.raises(Exception, match="must not be above high"):
        _priced("learner: {price_prior: {low: 0.8, high: 0.6}}")


# --- a client's task label -----------------------------------------------------------------------

LABELLED = POLICY.replace("  strategy_header: [self_consistency]\n",
                          "  strategy_header: [self_consistency]\n  task_header: [legal-qa, math]\n")


def test_client_task_label_keys_the_bucket():
    """x-ponder-task (allowed by the policy) replaces the classifier's task: a task type picks its
    routes, another label the catch-all route; the bucket is label x the classifier's tier."""
    policy = make_policy(0.0, LABELLED)
    chat = Classification("chat", {"chat": 1.0}, 0.9)
    labelled = decide(chat, policy, {}, request=RequestHints(task="legal-qa"))
    assert labelled.task == "legal-qa" and labelled.bucket == "legal-qa:hard" and labelled.rule == "catch-all"
    assert any("task legal-qa from x-ponder-task (the classifier said chat)" in r for r in labelled.reasons)
    as_math = decide(chat, policy, {}, request=RequestHints(task="math"))
    assert as_math.rule == "hard-math" and as_math.bucket == "math:hard"
    # the label's own record decides: what was learned under legal-qa:hard, not chat:hard
    arm = compile_policy(policy).arms["mid-low"].arm
    learned = {"legal-qa:hard": {arm.key: ArmStats(count=50, successes=50, weight=50, cost_usd=0.01)},
               "chat:hard": {arm.key: ArmStats(count=50, successes=0, weight=50, cost_usd=0.01)}}
    with_label = decide(chat, policy, learned, request=RequestHints(task="legal-qa"))
    without = decide(chat, policy, learned)
    assert candidate(with_label, policy, "mid-low").expected_accuracy > 0.8 > 0.2 > candidate(
        without, policy, "mid-low").expected_accuracy
    refused = decide(chat, policy, {}, request=RequestHints(task="tax"))
    assert refused.task == "chat" and any("ignored x-ponder-task=tax" in r for r in refused.reasons)
    assert decide(chat, make_policy(0.0), {}, request=RequestHints(task="math")).task == "chat"  # not allowed


@pytest.mark.parametrize("label", ["Legal", "a:b", "x" * 65, "*", "-lead", "two words"])
def test_malformed_task_label_is_a_bad_request(label):
    from router.request_hints import InvalidHint

    with pytest.raises(InvalidHint, match="x-ponder-task"):
        RequestHints.from_request(object(), {"x-ponder-task": label})


def test_every_sample_of_a_vote_pays_for_the_prompt():
    """The gateway draws each sample as its own call, on any backend: a 5-sample vote on a long
    prompt costs five prompts. The estimate took one prompt on a `supports_n` backend (one call with
    n=5, which the gateway never makes), so a vote over a 10,000-token prompt looked barely dearer
    than one answer and passed a cost cap it then overshot 4x (seen over HTTP: $0.0023 estimated,
    $0.0102 billed)."""
    policy = parse_policy(POLICY.replace("EXPLORE_SHARE", "0.0").replace(
        "  strong-vote:", "  mid-vote:     {backend: mid, effort: low, strategy: self_consistency, n: 5}\n"
                          "  mid-wave:     {backend: mid, effort: low, strategy: adaptive_consistency, n: 5, "
                          "wave: 2, expected_n: 4}\n  strong-vote:").replace("strong-vote: 0.92,",
                                                                              "mid-vote: 0.95,"), "test.yaml")
    compiled = compile_policy(policy)
    one = compiled.estimated_cost_usd(compiled.arms["mid-low"].key, 10_000, 5)
    assert compiled.estimated_cost_usd(compiled.arms["mid-vote"].key, 10_000, 5) == pytest.approx(5 * one)
    assert compiled.estimated_cost_usd(compiled.arms["mid-wave"].key, 10_000, 5) == pytest.approx(4 * one)
    capped = decide(HARD_MATH, policy, {}, request=RequestHints(prompt_tokens=10_000, max_output_tokens=5,
                                                                 max_cost_usd=3 * one))
    assert candidate(capped, policy, "mid-vote").excluded


def test_a_clients_n_choices_are_priced_as_more_samples():
    """A client's `n` is drawn as more samples (gateway/strategies.py): one call with `n` for a single
    arm on a backend that takes it (the prompt paid once), else one call per answer. The cost model
    priced every request as one answer, so a cost cap let an n=8 request through at 8x its cap, and
    the outcomes of n > 1 traffic, compared with one answer's estimate, read as the arm (and through
    the route's calibration every untried arm) costing several times what it does."""
    policy = make_policy(share=0.0)
    compiled = compile_policy(policy)
    quick, strong, vote = (compiled.arms[name] for name in ("quick", "strong-high", "strong-vote"))
    prompt_in, answer_out = 100 * 0.1 / 1e6, 300 * 0.4 / 1e6  # `quick`: one prompt, one 300-token answer
    assert compiled.estimated_cost_usd(quick.key, 100, None) == pytest.approx(prompt_in + answer_out)
    assert compiled.estimated_cost_usd(quick.key, 100, None, 4) == pytest.approx(prompt_in + 4 * answer_out)
    one_strong = compiled.estimated_cost_usd(strong.key, 100, None)  # `strong` takes no `n`: a call each
    assert compiled.estimated_cost_usd(strong.key, 100, None, 4) == pytest.approx(4 * one_strong)
    three = compiled.estimated_cost_usd(vote.key, 100, None)  # a 3-sample vote: 3 choices are free, 6 are 6
    assert compiled.estimated_cost_usd(vote.key, 100, None, 3) == pytest.approx(three)
    assert compiled.estimated_cost_usd(vote.key, 100, None, 6) == pytest.approx(2 * three)

    asked = decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=100, choices=4))
    assert candidate(asked, policy, "quick").expected_cost_usd == pytest.approx(prompt_in + 4 * answer_out)
    cap = 2 * (prompt_in + answer_out)
    assert decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=100, max_cost_usd=cap)).arm == quick.arm
    with pytest.raises(BudgetExhausted) as refused:
        decide(EASY_CHAT, policy, {}, request=RequestHints(prompt_tokens=100, choices=8, max_cost_usd=cap))
    assert refused.value.scope == "request"
    # outcomes recorded with their own (n = 4) estimates keep one answer's cost where it is
    record = ArmStats(count=50, successes=45, weight=50, cost_usd=50 * (prompt_in + 4 * answer_out),
                      latency_ms=50 * 500.0, estimated_cost_usd=50 * (prompt_in + 4 * answer_out), estimated_count=50)
    learned = decide(EASY_CHAT, policy, {"chat:easy": {quick.key: record}}, request=RequestHints(prompt_tokens=100))
    assert candidate(learned, policy, "quick").expected_cost_usd == pytest.approx(prompt_in + answer_out)


def test_learned_cost_compares_each_request_with_its_own_estimate():
    """Long prompts (8,000 tokens) that cost exactly what the cost model estimated for them: the
    learned cost stays that estimate. Compared with the estimate for a typical 300-token prompt
    instead, the same record read as ~6x over budget, and a cost cap then locked the arm out for
    good (an excluded arm gets no new outcome)."""
    policy = make_policy(share=0.0)
    compiled = compile_policy(policy)
    quick = compiled.arms["quick"]
    hints = RequestHints(prompt_tokens=8000, max_cost_usd=1.0)
    cold = candidate(decide(EASY_CHAT, policy, {}, request=hints), policy, "quick").expected_cost_usd
    true_cost = compiled.estimated_cost_usd(quick.key, 8000, None)
    assert cold == pytest.approx(true_cost)
    for n in (10, 100, 1000):
        record = ArmStats(count=n, successes=0.9 * n, weight=n, cost_usd=n * true_cost, latency_ms=n * 500.0,
                          estimated_cost_usd=n * true_cost, estimated_count=n)
        learned = decide(EASY_CHAT, policy, {"chat:easy": {quick.key: record}}, request=hints)
        assert candidate(learned, policy, "quick").expected_cost_usd == pytest.approx(true_cost, rel=1e-9)
    # a record that is really twice its estimates is read as twice, whatever the prompt length
    twice = ArmStats(count=1000, successes=900, weight=1000, cost_usd=2000 * true_cost, latency_ms=5e5,
                     estimated_cost_usd=1000 * true_cost, estimated_count=1000)
    learned = decide(EASY_CHAT, policy, {"chat:easy": {quick.key: twice}}, request=RequestHints(prompt_tokens=100))
    short = compiled.estimated_cost_usd(quick.key, 100, None)
    assert candidate(learned, policy, "quick").expected_cost_usd == pytest.approx(2 * short, rel=0.02)


def test_an_arm_ruled_out_by_its_record_elsewhere_is_not_explored():
    """`b` is worse than `a` on 2,000 outcomes in each of six other buckets, and new in math:hard: its
    P(correct) there rests on all of that, not on the route prior's 10 pseudo-outcomes, so it is no
    plausible challenger and exploration (share 1.0 here) leaves the request to `a`."""
    import random

    two = parse_policy(
        "name: two\n"
        "backends:\n  - {name: x, model: t/x, prices: {input_per_mtok: 1, output_per_mtok: 1}}\n"
        "arms:\n  a: {backend: x}\n  b: {backend: x, effort: null, strategy: cot}\n"
        "routes:\n  - {name: all, candidates: {a: 0.7, b: 0.7}}\n"
        "objective: {cost_weight: 0, latency_weight: 0}\n"
        "exploration: {share: 1.0}\nlearner: {prior_strength: 10, price_prior: null}\n", "two.yaml")
    keys = {name: arm.key for name, arm in compile_policy(two).arms.items()}
    stats = {f"{task}:{tier}": {keys["a"]: ArmStats(2000, 1600, 2000), keys["b"]: ArmStats(2000, 1200, 2000)}
             for task in ("math", "code", "chat") for tier in ("easy", "medium")}
    stats["math:hard"] = {keys["a"]: ArmStats(200, 160, 200)}
    rng = random.Random(7)
    decisions = [decide(HARD_MATH, two, stats, rng=rng) for _ in range(300)]
    assert not any(d.explore for d in decisions)
    assert all(name_of(two, d.arm) == "a" for d in decisions)
    # with no record anywhere, the same two arms are both in doubt: exploration does draw `b`
    cold = [decide(HARD_MATH, two, {}, rng=rng) for _ in range(300)]
    assert any(d.explore and name_of(two, d.arm) == "b" for d in cold)


def test_an_arms_own_cost_record_counts_once():
    """`quick` cost twice its estimates over 10 outcomes (prior_strength 10): its cost factor moves
    halfway, to 1.5; an untried arm of the route takes the same 1.5 from it. (Its own record was
    also inside the route-wide starting ratio, which put it at 1.75.)"""
    policy = make_policy(share=0.0)
    compiled = compile_policy(policy)
    quick, cot = compiled.arms["quick"], compiled.arms["quick-cot"]
    estimate = compiled.estimated_cost_usd(quick.key, 300, None)
    record = ArmStats(count=10, successes=9, weight=10, cost_usd=20 * estimate, latency_ms=10 * 500.0,
                      estimated_cost_usd=10 * estimate, estimated_count=10)
    decision = decide(EASY_CHAT, policy, {"chat:easy": {quick.key: record}}, request=RequestHints(prompt_tokens=300))
    assert candidate(decision, policy, "quick").expected_cost_usd == pytest.approx(1.5 * estimate, rel=1e-9)
    untried = compiled.estimated_cost_usd(cot.key, 300, None)
    assert candidate(decision, policy, "quick-cot").expected_cost_usd == pytest.approx(1.5 * untried, rel=1e-9)


def test_a_record_only_partly_estimated_is_compared_with_all_its_estimates():
    """1,000 outcomes from before estimates were kept (each on its typical-prompt estimate) and one new
    outcome with its own: the ratio stays 1 (dividing all the cost by the one new estimate read ~1000)."""
    policy = make_policy(share=0.0)
    compiled = compile_policy(policy)
    quick = compiled.arms["quick"]
    reference = compiled.estimated_cost_usd(quick.key, 300, None)
    mixed = ArmStats(count=1001, successes=900, weight=1001, cost_usd=1001 * reference, latency_ms=1001 * 500.0,
                     estimated_cost_usd=reference, estimated_count=1)
    decision = decide(EASY_CHAT, policy, {"chat:easy": {quick.key: mixed}}, request=RequestHints(prompt_tokens=300))
    assert candidate(decision, policy, "quick").expected_cost_usd == pytest.approx(reference, rel=1e-6)


def test_an_arm_widened_in_by_an_override_keeps_its_own_cost_ratio():
    """A strategy override brings in `strong-vote` from outside the catch-all route; it has cost 3x its
    estimates. Its starting ratio is the route's (its record was never in the route's sums, so none is
    taken out of them), and its own record then moves it toward 3, never below 1."""
    policy = make_policy(share=0.0)
    compiled = compile_policy(policy)
    vote, quick = compiled.arms["strong-vote"], compiled.arms["quick"]
    ref_vote = compiled.estimated_cost_usd(vote.key, 300, None)
    ref_quick = compiled.estimated_cost_usd(quick.key, 300, None)
    stats = {"chat:easy": {
        quick.key: ArmStats(count=100, successes=90, weight=100, cost_usd=100 * ref_quick, latency_ms=5e4,
                            estimated_cost_usd=100 * ref_quick, estimated_count=100),
        vote.key: ArmStats(count=5, successes=5, weight=5, cost_usd=15 * ref_vote, latency_ms=5e3,
                           estimated_cost_usd=5 * ref_vote, estimated_count=5)}}
    decision = decide(EASY_CHAT, policy, stats, request=RequestHints(strategy="self_consistency", prompt_tokens=300))
    factor = candidate(decision, policy, "strong-vote").expected_cost_usd / ref_vote
    assert 1.0 < factor < 3.0 and factor == pytest.approx(1 + 5 / 15 * 2, rel=0.05)


def test_a_bucket_record_below_zero_successes_counts_as_none(policy):
    """Feedback on a request from before a reset of the learned stats can leave a record's successes
    below 0 (the automatic score it replaces is gone): read as 0 right, as the shared levels read it."""
    key = compile_policy(policy).arms["mid-high"].key
    for successes in (-0.3, 0.0):
        stats = {"math:hard": {key: ArmStats(count=0, successes=successes, weight=0.7)}}
        assert candidate(decide(HARD_MATH, policy, stats), policy, "mid-high").expected_accuracy == \
            pytest.approx(8.5 / 10.7)
