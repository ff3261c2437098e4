"""When adaptive sampling may stop: the vote is settled, or more samples do not pay in this bucket.

``should_stop`` is called by the adaptive-consistency strategy after every wave with the answers
extracted so far (None for a sample without an answer or a failed one). Its checks, in order:

1. ``max_n`` reached: stop (the budget).
2. fewer than ``min_samples``: continue (a policy floor).
3. no valid answer yet: continue.
4. bucket gate: the learner's ``sample_value`` (expected accuracy gain of a vote over one sample in
   this bucket) is below ``min_gain``: stop at the first valid answer. This is how the router
   recognises buckets where more samples do not pay (e.g. correlated low-temperature samples,
   easy problems the model answers consistently).
5. decided: the leader cannot be overtaken by the remaining ``max_n - n`` samples, so the fixed-N
   majority would return the same answer (exact, no accuracy cost).
6. the rule:
   - ``beta`` (Adaptive-Consistency, Aggarwal et al. 2023): stop when P(leader's share > runner-up's
     share | counts) >= ``confidence`` under a Beta prior (uniform by default).
   - ``window`` (ESC, Li et al. 2024): sample in windows of ``window``; stop when every answer of the
     latest complete window is valid and the same.

``wave_size`` says how many samples to request next: the fewest that could let the rule stop if
they all agree, so a wave is never too small to decide nor larger than needed.

Where ``sample_value`` comes from: ``estimate_sample_value`` when per-request gains are known (the
offline replay), ``bucket_sample_value`` from the learner's per-(bucket, arm) stats in the live
gateway: the success of fixed-N voting arms of the same backend and effort minus that of their
one-sample arm, shrunk towards a small positive prior gain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from router.types import Arm, ArmStats
from router.voting import cluster_answers, leader_posterior

RULES: tuple[str, ...] = ("beta", "window")
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_GAIN = 0.01  # one accuracy point: below it, a vote is not worth its extra samples
PRIOR_GAIN = 0.02  # what a bucket without evidence is assumed to gain from a vote: it keeps voting
PRIOR_WEIGHT = 5.0  # ... with the weight of this many requests
VOTING_STRATEGIES: tuple[str, ...] = ("self_consistency",)  # fixed N: never gated, so unbiased evidence


@dataclass(frozen=True, slots=True)
class StopVerdict:
    stop: bool
    reason: str
    posterior: float  # P(leader's share > runner-up's) under the Beta model, whatever the rule
    leader: str | None = None  # the answer that would win now (None: no valid answer yet)
    n: int = 0  # samples seen, invalid ones included


@dataclass(frozen=True, slots=True)
class _Tally:
    leader: str | None
    leader_first: int  # index of the leader's first sample
    top: int
    runner_up: int
    runner_up_first: int  # -1 when there is no runner-up
    labels: tuple[int | None, ...]


def _tally(answers: Sequence[str | None], task: str | None) -> _Tally:
    if task is None:  # exact equality: the caller already normalised or clustered
        first: dict[str, int] = {}
        labels: list[int | None] = [None if a is None else first.setdefault(a, i) for i, a in enumerate(answers)]
    else:
        labels = cluster_answers(answers, task)
    counts: dict[int, int] = {}
    for label in labels:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return _Tally(None, -1, 0, 0, -1, tuple(labels))
    # counts keeps order of first appearance: sorting is stable, so ties keep the earliest answer first
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    leader, top = ranked[0]
    runner, second = ranked[1] if len(ranked) > 1 else (-1, 0)
    return _Tally(answers[leader], leader, top, second, runner, tuple(labels))


def _validate(rule: str, max_n: int, confidence: float, window: int) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown stopping rule {rule!r}; expected one of {RULES}")
    if max_n < 1 or window < 1:
        raise ValueError("max_n and window must be >= 1")
    if not 0.0 < confidence <= 1.0:
        raise ValueError("confidence must be in (0, 1]")


def should_stop(
    answers: Sequence[str | None],
    *,
    max_n: int,
    confidence: float = DEFAULT_CONFIDENCE,
    min_samples: int = 1,
    rule: str = "beta",
    window: int = 2,
    task: str | None = None,
    sample_value: float | None = None,
    min_gain: float = DEFAULT_MIN_GAIN,
    prior: tuple[float, float] = (1.0, 1.0),
) -> StopVerdict:
    """Whether adaptive sampling can stop after these answers (see the module docstring).

    ``task``: when given, answers are grouped with the task's equivalence (``\\frac12`` == ``0.5``);
    when None they are compared as strings. ``sample_value``: the learner's estimate for the
    bucket (see ``estimate_sample_value``); None means unknown, so no gate.
    """
    _validate(rule, max_n, confidence, window)
    n = len(answers)
    t = _tally(answers, task)
    posterior = leader_posterior(t.top, t.runner_up, prior) if t.top else 0.0

    def verdict(stop: bool, reason: str) -> StopVerdict:
        return StopVerdict(stop=stop, reason=reason, posterior=posterior, leader=t.leader, n=n)

    if n >= max_n:
        return verdict(True, f"max_n={max_n} reached")
    if n < min_samples:
        return verdict(False, f"below min_samples={min_samples}")
    if t.leader is None:
        return verdict(False, "no valid answer yet")
    if sample_value is not None and sample_value < min_gain:
        return verdict(True, f"bucket: extra samples do not pay (sample_value {sample_value:.3f} < {min_gain:.3f})")
    remaining = max_n - n
    lead = t.top - t.runner_up
    # an answer not seen yet first appears after the leader, so it loses a tie; a seen runner-up
    # that appeared earlier would win one
    runner_wins_ties = t.runner_up_first != -1 and t.runner_up_first < t.leader_first
    if lead > remaining or (lead == remaining and not runner_wins_ties):
        return verdict(True, f"decided: a lead of {lead} cannot be overturned by {remaining} more samples")
    if rule == "beta":
        if posterior >= confidence:
            return verdict(True, f"beta: P(leader is the majority) {posterior:.3f} >= {confidence}")
        return verdict(False, f"beta: P(leader is the majority) {posterior:.3f} < {confidence}")
    # ESC: only complete windows are judged, so the verdict does not depend on how waves were split
    if n % window == 0:
        last = t.labels[n - window :]
        if last[0] is not None and all(label == last[0] for label in last):
            return verdict(True, f"window: the last {window} samples agree")
    return verdict(False, f"window: the last {window} samples do not all agree yet")


def wave_size(
    answers: Sequence[str | None],
    *,
    max_n: int,
    max_wave: int | None = None,
    **rule_options: object,
) -> int:
    """How many samples to request next (0 when ``should_stop`` already says stop).

    The fewest k such that k new samples all agreeing with the current leader would let the rule
    stop, capped by ``max_n`` and ``max_wave``. Takes the same keyword options as ``should_stop``.
    Beta at 0.95 with no samples gives 4 (the fewest unanimous samples reaching 0.95), the window
    rule gives ``window``, a bucket gated by ``sample_value`` gives 1.
    """
    answers = list(answers)
    if should_stop(answers, max_n=max_n, **rule_options).stop:  # type: ignore[arg-type]
        return 0
    task = rule_options.get("task")
    leader = _tally(answers, task if isinstance(task, str) else None).leader
    hypothetical = leader if leader is not None else "\x00hypothetical answer"
    remaining = max_n - len(answers)
    k = remaining
    for extra in range(1, remaining + 1):
        if should_stop(answers + [hypothetical] * extra, max_n=max_n, **rule_options).stop:  # type: ignore[arg-type]
            k = extra
            break
    return max(1, min(k, max_wave or k))


def estimate_sample_value(
    gains: Iterable[float],
    *,
    prior_gain: float = PRIOR_GAIN,
    prior_weight: float = PRIOR_WEIGHT,
) -> float:
    """A bucket's expected accuracy gain of voting over a single sample, shrunk towards a prior.

    ``gains``: one value per past request of the bucket where both are known, in [-1, 1]:
    (vote correct) - (first sample correct), or its expectation over sample orders. The prior
    (a small positive gain, weight of 5 requests) keeps a new bucket voting until its own
    evidence says voting does not pay.
    """
    total, count = 0.0, 0
    for gain in gains:
        total += gain
        count += 1
    return (total + prior_gain * prior_weight) / (count + prior_weight)


def bucket_sample_value(
    stats: Mapping[str, ArmStats],
    arm: Arm,
    *,
    one_sample: str = "single",
    prior_gain: float = PRIOR_GAIN,
    prior_weight: float = PRIOR_WEIGHT,
) -> float | None:
    """The learner's ``sample_value`` for ``arm``'s bucket, from that bucket's arm stats.

    ``stats``: arm key -> ArmStats of one bucket (a ``StatsSnapshot`` entry). The gain of a vote is
    the mean success of the fixed-N voting arms (``self_consistency``, any n >= 2) of the same
    backend and effort, pooled, minus the mean success of the one-sample arm that samples the same
    way (``one_sample``: ``single``, or ``cot`` when the votes are over chain-of-thought samples).
    Adaptive arms are not evidence: once gated they answer with one sample, and would confirm the
    gate forever. The difference counts as ``1 / (1/w_vote + 1/w_one)`` requests (the weight of a
    difference of two independent means) and is shrunk like ``estimate_sample_value``.

    None when either side has no scored outcome: no evidence, so no gate.
    """
    one_key = Arm(arm.backend, one_sample, arm.effort, 1).key
    one = stats.get(one_key)
    vote_weight = vote_successes = 0.0
    prefix = f"{arm.backend}/{arm.effort or '-'}/"
    for key, arm_stats in stats.items():
        if not key.startswith(prefix):
            continue
        strategy, _, n = key[len(prefix) :].partition("/")
        if strategy in VOTING_STRATEGIES and n.isdigit() and int(n) >= 2:
            vote_weight += arm_stats.weight
            vote_successes += arm_stats.successes
    if one is None or one.weight <= 0 or vote_weight <= 0:
        return None
    gain = vote_successes / vote_weight - one.successes / one.weight
    weight = 1.0 / (1.0 / vote_weight + 1.0 / one.weight)
    return (gain * weight + prior_gain * prior_weight) / (weight + prior_weight)
