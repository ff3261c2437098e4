"""The router's vocabulary, declared once: classification, arm, candidate, decision.

Everything here is immutable and plain so decisions can be logged, replayed offline (evals/) and
compared in tests. See ../DESIGN.md for the words: backend, arm, decision, bucket, outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskType = Literal["math", "code", "reasoning", "knowledge", "writing", "chat"]
TASK_TYPES: tuple[str, ...] = ("math", "code", "reasoning", "knowledge", "writing", "chat")

Strategy = Literal["single", "cot", "self_consistency", "adaptive_consistency", "best_of_n", "cascade"]
STRATEGIES: tuple[str, ...] = (
    "single",
    "cot",
    "self_consistency",
    "adaptive_consistency",
    "best_of_n",
    "cascade",
)

# Effort levels in increasing order of spend. `None` on an arm means "do not send an effort knob".
Effort = Literal["none", "minimal", "low", "medium", "high"]
EFFORTS: tuple[str, ...] = ("none", "minimal", "low", "medium", "high")

# Difficulty tiers: the learner's bucket is task type x tier. Upper bounds, inclusive of the lower.
DIFFICULTY_TIERS: tuple[tuple[str, float], ...] = (("easy", 0.33), ("medium", 0.66), ("hard", 1.0))


def difficulty_tier(difficulty: float) -> str:
    for name, upper in DIFFICULTY_TIERS:
        if difficulty < upper:
            return name
    return DIFFICULTY_TIERS[-1][0]


def bucket_key(task: str, difficulty: float) -> str:
    """The learner's context: task type x difficulty tier, e.g. ``math:hard``."""
    return f"{task}:{difficulty_tier(difficulty)}"


@dataclass(frozen=True, slots=True)
class Classification:
    """What the classifier says about a prompt before any backend is called."""

    task: str
    task_probs: dict[str, float]
    difficulty: float  # P(a cheap non-reasoning answer is wrong), in [0, 1]

    @property
    def tier(self) -> str:
        return difficulty_tier(self.difficulty)

    @property
    def bucket(self) -> str:
        return bucket_key(self.task, self.difficulty)


@dataclass(frozen=True, slots=True)
class Arm:
    """One way to answer: backend + effort + strategy + n.

    `stages` is used by the cascade strategy only: the arms tried in order after this arm's own
    answer is judged not confident enough. `verifier` names the backend that scores best-of-N samples.
    """

    backend: str
    strategy: str = "single"
    effort: str | None = None
    n: int = 1
    stages: tuple[Arm, ...] = ()
    verifier: str | None = None
    # Strategy knobs from the policy, sorted by name so equal arms compare equal, e.g.
    # (("confidence", 0.8), ("wave", 2.0)) for adaptive_consistency. Not part of `key`: a policy may not
    # declare two arms that differ only in params (the learner keys its stats on `key`).
    params: tuple[tuple[str, float | str], ...] = ()  # str: cot_template

    def param(self, name: str, default: float) -> float:
        for key, value in self.params:
            if key == name:
                return value
        return default

    @property
    def key(self) -> str:
        """Stable id used in headers, telemetry and the learner, e.g. ``o4-mini/high/self_consistency/5``."""
        return f"{self.backend}/{self.effort or '-'}/{self.strategy}/{self.n}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One arm the decision engine considered, with the numbers it compared and its verdict."""

    arm: Arm
    expected_accuracy: float
    expected_cost_usd: float
    expected_latency_ms: float
    utility: float
    excluded: str | None = None  # why it could not win (over budget, too slow, ...), None if eligible


@dataclass(frozen=True, slots=True)
class Decision:
    """The arm chosen for one request, the arms to fall back to, and the reasons."""

    arm: Arm
    task: str = "chat"
    difficulty: float = 0.0
    task_probs: dict[str, float] = field(default_factory=dict)
    policy: str = "direct"
    rule: str = "direct"  # which policy route (or "direct" when the client named a backend)
    explore: bool = False
    fallbacks: tuple[Arm, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    reasons: tuple[str, ...] = ()

    @property
    def bucket(self) -> str:
        return bucket_key(self.task, self.difficulty)


@dataclass(frozen=True, slots=True)
class ArmStats:
    """Learned aggregates for one (bucket, arm), handed to the router (never fetched by it).

    `successes` is a summed success score in [0, count]; `weight` is the (possibly decayed) number of
    scored outcomes, which can be below `count` when some requests got no success signal yet.
    """

    count: float = 0.0
    successes: float = 0.0
    weight: float = 0.0
    cost_usd: float = 0.0  # summed
    latency_ms: float = 0.0  # summed
    latency_p95_ms: float = 0.0
    # What the policy's cost model estimated for these same requests (their prompts, their max_tokens),
    # before learning, summed over the `estimated_count` of them that carry one (records from before
    # estimates were kept carry none): how far the model was off is the learner's cost ratio.
    estimated_cost_usd: float = 0.0
    estimated_count: float = 0.0
    # The decision's prompt-token estimates for the `estimated_prompt_count` requests that carry one,
    # summed: their mean is the bucket's typical prompt (router.learner.current_choice prices it).
    estimated_prompt_tokens: float = 0.0
    estimated_prompt_count: float = 0.0
    # Requests no arm answered (an error other than the client leaving) and requests the client left
    # (499): in `count`, not in `latency_ms`, whose mean is over the other `answered` (a fast failure is
    # no answer's latency, and a client's hang-up says only that the answer took longer than it waited).
    errors: float = 0.0
    left: float = 0.0
    # What the decisions priced besides the prompt: the client's `n`, summed over the requests counted
    # in `estimated_prompt_count`, and its `max_tokens`, summed over the `capped_count` that sent one.
    # router.learner.current_choice prices the bucket's typical request with them.
    estimated_choices: float = 0.0
    output_cap_tokens: float = 0.0
    capped_count: float = 0.0

    @property
    def answered(self) -> float:
        """The requests `latency_ms` sums the time of."""
        return max(0.0, self.count - self.errors - self.left)


# bucket -> arm key -> stats
StatsSnapshot = dict[str, dict[str, ArmStats]]

# A snapshot may carry, under this key, every arm's aggregates summed over all buckets, and under
# `<task>:*` summed over that task's buckets (the learner's shared levels: see
# router.learner.shared_levels). Real buckets are `task:tier`, so neither can clash.
POOLED_BUCKET = "*"
POOLED_TIER = "*"
