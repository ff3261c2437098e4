"""One record per answered request: what was decided, what it cost, and whether it paid off.

An `Event` is plain data (a dataclass that orjson serialises natively) so it can go into a Redis
stream, a JSONL/sqlite log, and later be replayed offline by evals/. The gateway builds one per request
and hands it to `Store.record()`; nothing here does I/O.

Success signals and their weights (see docs/telemetry.md): an outcome's success score in [0, 1] comes
from one of three sources. Client feedback is ground truth and counts with full weight; the automatic
signals (agreement of a self-consistency vote, a verifier's score) are proxies, correlated with
correctness but biased (a confident majority can be wrong), so they count with a lower weight until
feedback replaces them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import orjson

from router.types import bucket_key

SuccessSource = Literal["vote", "verifier", "feedback"]

# An event's `error` is cut to this: an upstream's message may quote the request (OpenAI's "Invalid
# value: '...'" does), and one event must stay the 1-3 KB the store's retention is sized for.
MAX_ERROR_CHARS = 500

# The task of an embeddings request (POST /v1/embeddings): billed like any request (spend rollups, key
# budgets, metrics), but no arm answered a prompt, so it is no outcome to learn from or to chart.
EMBEDDING_TASK = "embedding"

# How much one scored outcome counts in an arm's `weight` (and `successes` = weight x score).
SIGNAL_WEIGHTS: dict[str, float] = {"feedback": 1.0, "verifier": 0.3, "vote": 0.3}


def signal_weight(source: str | None) -> float:
    """Weight of a success signal; 0 when there is no signal (the outcome only counts in `count`)."""
    if source is None:
        return 0.0
    return SIGNAL_WEIGHTS.get(source, 0.0)


@dataclass(slots=True)
class Event:
    """One answered (or failed) request. `calls` holds one dict per backend call:
    backend, prompt_tokens, completion_tokens, reasoning_tokens, cost_usd, latency_ms, ok, error."""

    request_id: str
    ts: float = field(default_factory=time.time)  # unix seconds when the request arrived
    key_id: str | None = None  # hashed API key id, never the key itself
    policy: str = "direct"
    alias: str = ""  # the `model` the client asked for
    task: str = "chat"
    task_probs: dict[str, float] = field(default_factory=dict)
    difficulty: float = 0.0
    bucket: str = ""  # task x difficulty tier; filled from task/difficulty when empty
    arm: str = ""  # Arm.key, e.g. "o4-mini/high/self_consistency/5"
    strategy: str = "single"
    effort: str | None = None
    n: int = 1
    explore: bool = False
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    # What the arm that answered cost, when arms failed before it (cut calls are billed their prompt):
    # its own calls only, which the learner's per-arm cost counts; cost_usd, the request's, is spend.
    arm_cost_usd: float | None = None
    estimated_cost_usd: float | None = None  # the policy's cost model for this request, before learning
    # The prompt's size as the decision estimated it (what priced the arms); its mean per bucket lets
    # the current choice be priced for the bucket's real prompts (router.learner.current_choice).
    estimated_prompt_tokens: int | None = None
    # What else the decision priced the arms for: the client's `max_tokens` (None: not capped) and `n`.
    # Their typical values per bucket price the current choice for the bucket's real requests.
    max_output_tokens: int | None = None
    choices: int = 1
    latency_ms: float = 0.0  # the request's, from its arrival to its answer's end
    # The answering arm's own time (from its start to the answer's end), when arms failed before it (a
    # timeout's wait is theirs): the learner's per-arm latency, as arm_cost_usd is its cost.
    arm_latency_ms: float | None = None
    status: int = 200  # HTTP status returned to the client
    error: str | None = None
    success: float | None = None  # automatic success score in [0, 1], None when there is none
    success_source: SuccessSource | None = None
    details: dict[str, Any] = field(default_factory=dict)  # votes, samples used, stop reason...

    def __post_init__(self) -> None:
        if self.error is not None and len(self.error) > MAX_ERROR_CHARS:
            self.error = self.error[:MAX_ERROR_CHARS] + "..."
        if not self.bucket:
            self.bucket = bucket_key(self.task, self.difficulty)
        if self.success is not None:
            self.success = min(1.0, max(0.0, float(self.success)))

    @property
    def success_weight(self) -> float:
        return signal_weight(self.success_source) if self.success is not None else 0.0

    @property
    def arm_outcome(self) -> bool:
        """Whether an arm answered (a chat request): what the per-arm aggregates and feedback count."""
        return self.task != EMBEDDING_TASK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        # default=str: a stray non-JSON value in `details` must not lose the whole event.
        return orjson.dumps(self, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Inverse of `to_dict`; unknown keys (from a newer writer) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
