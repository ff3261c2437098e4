"""Which sample wins: majority vote over extracted answers, a medoid for open text, best-of-N by score.

Rules (documented in docs/strategies.md):
- A sample whose answer cannot be extracted is *invalid*: it costs, but does not vote.
- Answers are grouped by ``answers_equivalent`` (so ``\\frac{1}{2}`` and ``0.5`` are one answer).
- Ties go to the answer that appeared first, and the representative sample of an answer is its first
  sample, so the same samples in the same order always give the same winner.
- When the task's answers are not comparable (writing, chat, code), or no sample has an extractable
  answer, the winner is the medoid: the sample most similar (token Jaccard) to all the others.
  ``method`` says which rule decided, and the medoid's confidence is only a similarity, a weaker
  signal than agreement on an extracted answer. A sample cut off at its length limit has no answer
  and is no medoid's either (``finished``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.answers import answers_equivalent, comparable, extract_answer


@dataclass(frozen=True, slots=True)
class VoteResult:
    """The outcome of one vote over ``n`` samples."""

    winner: int  # index into the texts of the representative (first) sample of the winning answer
    answer: str | None  # the winning extracted answer; None for a medoid vote
    counts: dict[str, int] = field(default_factory=dict)  # answer -> votes, in order of first appearance
    agreement: float = 0.0  # share of valid samples agreeing with the winner (medoid: mean similarity)
    confidence: float = 0.0  # [0, 1]: P(winner is the true majority) x share of valid samples
    method: str = "majority"  # "majority" | "weighted" | "medoid"
    n_valid: int = 0  # samples with an extractable answer (medoid: non-empty samples)
    n: int = 0  # all samples, invalid ones included


def extract(text: str | None, task: str) -> str | None:
    """``extract_answer`` that also takes a failed sample (None or empty text gives None)."""
    return extract_answer(text, task) if text else None


def sample_answer(text: str | None, task: str, finish_reason: str | None = None) -> str | None:
    """The answer a sample votes with: ``extract``, but none for a sample cut off at its length limit
    (``finish_reason`` "length"): a cut chain of thought ends on an intermediate result, not on its answer,
    and cut samples tend to stop at the same early step (they out-voted the finished ones)."""
    return None if finish_reason == "length" else extract(text, task)


# ---------------------------------------------------------------------------------------------
# Grouping answers
# ---------------------------------------------------------------------------------------------


def cluster_answers(answers: Sequence[str | None], task: str) -> list[int | None]:
    """For each answer, the index of the first answer equivalent to it (None for invalid ones).

    Exact duplicates are matched first; only distinct strings are compared with the (possibly slow)
    task equivalence, against one representative per group.
    """
    labels: list[int | None] = []
    representatives: list[int] = []  # first index of each group
    exact: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            labels.append(None)
            continue
        label = exact.get(answer)
        if label is None:
            for rep in representatives:
                if answers_equivalent(answers[rep], answer, task):  # type: ignore[arg-type]
                    label = rep
                    break
            if label is None:
                label = i
                representatives.append(i)
            exact[answer] = label
        labels.append(label)
    return labels


def leader_posterior(leader: float, runner_up: float, prior: tuple[float, float] = (1.0, 1.0)) -> float:
    """P(the leader's true share exceeds the runner-up's) given their vote counts.

    Adaptive-Consistency's Beta criterion: with p = p_leader / (p_leader + p_runner_up) and a
    Beta(prior) prior, the posterior is Beta(leader + a, runner_up + b); return its mass above 1/2.
    """
    a, b = leader + prior[0], runner_up + prior[1]
    return 1.0 - _regularized_beta(0.5, a, b)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) CDF at x (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return h


# ---------------------------------------------------------------------------------------------
# Votes
# ---------------------------------------------------------------------------------------------


def vote(texts: Sequence[str | None], task: str, *, answers: Sequence[str | None] | None = None,
         finished: Sequence[bool] | None = None) -> VoteResult:
    """Majority vote over the samples' extracted answers; medoid when answers are not comparable.

    ``texts`` may hold None for failed samples. ``answers`` (one per text) skips the extraction
    when the caller already has them. ``finished`` (one per text): False for a sample cut off at its
    length limit, which no medoid of a comparable task counts.
    """
    return weighted_vote(texts, None, task, answers=answers, finished=finished)


def weighted_vote(
    texts: Sequence[str | None],
    weights: Sequence[float | None] | None,
    task: str,
    *,
    answers: Sequence[str | None] | None = None,
    finished: Sequence[bool] | None = None,
) -> VoteResult:
    """Vote where each sample counts its weight (e.g. a verifier's probability) instead of 1.

    Weights must be >= 0; a None weight counts as 0 (an unscored sample still shows its answer in
    ``counts`` but cannot win over a scored one). With ``weights=None`` this is the plain majority.
    """
    n = len(texts)
    if n == 0:
        raise ValueError("vote needs at least one sample")
    if answers is None:
        answers = [extract(t, task) for t in texts]
    if len(answers) != n or (weights is not None and len(weights) != n):
        raise ValueError("texts, answers and weights must have the same length")
    if not comparable(task):
        return medoid_vote(texts)
    if all(a is None for a in answers):
        # No sample gave an answer (prose with no marker, say): the medoid of the samples that finished.
        # One cut off at its length limit is no answer at all: identical cut texts read as unanimous
        # (confidence 1.0), which kept a cascade from escalating a truncated answer and told the
        # learner the arm was right. All cut: the first is shown, and nothing vouches for it.
        if finished is not None:
            texts = [text if done else None for text, done in zip(texts, finished)]
        return medoid_vote(texts)

    labels = cluster_answers(answers, task)
    counts: dict[int, int] = {}
    mass: dict[int, float] = {}
    for i, label in enumerate(labels):
        if label is None:
            continue
        counts[label] = counts.get(label, 0) + 1
        w = 1.0 if weights is None else float(weights[i] or 0.0)
        if w < 0:
            raise ValueError("vote weights must be >= 0")
        mass[label] = mass.get(label, 0.0) + w
    # dicts keep insertion order = order of first appearance, so max() breaks ties by earliest sample
    winner = max(mass, key=lambda label: mass[label])
    n_valid = sum(counts.values())
    ranked = sorted(mass.values(), reverse=True)
    runner_up = ranked[1] if len(ranked) > 1 else 0.0
    if weights is not None:
        # express weighted mass in sample units so the posterior is on the same scale as counts
        total = sum(mass.values())
        scale = n_valid / total if total > 0 else 0.0
        top, second = mass[winner] * scale, runner_up * scale
    else:
        top, second = float(counts[winner]), runner_up
    confidence = leader_posterior(top, second) * (n_valid / n)
    return VoteResult(
        winner=winner,
        answer=answers[winner],
        counts={answers[label]: c for label, c in counts.items()},  # type: ignore[misc]
        agreement=counts[winner] / n_valid,
        confidence=confidence,
        method="majority" if weights is None else "weighted",
        n_valid=n_valid,
        n=n,
    )


_TOKEN = re.compile(r"\w+")


def _tokens(text: str) -> frozenset[str]:
    return frozenset(_TOKEN.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def medoid_vote(texts: Sequence[str | None]) -> VoteResult:
    """The sample with the highest mean token-Jaccard similarity to the other non-empty samples.

    Cheap (no model, no embeddings) and robust: it picks the "central" answer and drops outliers
    (truncated, off-topic or refused samples). Its agreement/confidence is that mean similarity,
    or 0.5 ("unknown") when there is a single sample to judge.
    """
    n = len(texts)
    valid = [i for i, t in enumerate(texts) if t and t.strip()]
    if not valid:
        return VoteResult(winner=0, answer=None, method="medoid", n_valid=0, n=n)
    token_sets = {i: _tokens(texts[i]) for i in valid}  # type: ignore[arg-type]
    if len(valid) == 1:
        return VoteResult(winner=valid[0], answer=None, agreement=1.0, confidence=0.5, method="medoid", n_valid=1, n=n)
    best, best_similarity = valid[0], -1.0
    for i in valid:
        similarity = sum(jaccard(token_sets[i], token_sets[j]) for j in valid if j != i) / (len(valid) - 1)
        if similarity > best_similarity + 1e-12:  # strict: ties keep the earliest sample
            best, best_similarity = i, similarity
    return VoteResult(
        winner=best,
        answer=None,
        agreement=best_similarity,
        confidence=best_similarity * len(valid) / n,
        method="medoid",
        n_valid=len(valid),
        n=n,
    )


def best_of_n(scores: Sequence[float | None]) -> int:
    """Index of the highest verifier score (earliest on ties); None marks a failed/unscored sample.

    When no sample has a score (the verifier failed every time) it returns 0, the first sample, so
    a best-of-N request still answers; the caller sees the None scores and should report them.
    Raises ValueError only for an empty list.
    """
    if len(scores) == 0:
        raise ValueError("best_of_n needs at least one sample")
    best: int | None = None
    for i, score in enumerate(scores):
        if score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        if best is None or score > scores[best]:  # type: ignore[operator]
            best = i
    return 0 if best is None else best


def ranked(texts: Sequence[str | None], task: str, result: VoteResult | None = None, *,
           answers: Sequence[str | None] | None = None) -> list[int]:
    """All sample indices, best first: for clients that asked for n > 1 choices.

    Majority: the winner, then the other answers' representatives by votes (ties: first seen), then
    the remaining samples of each answer, then invalid samples. Medoid: by mean similarity.
    ``answers``: the ones the vote counted, when the caller passed them to it.
    """
    result = result or vote(texts, task, answers=answers)
    n = len(texts)
    if result.method == "medoid":
        token_sets = [_tokens(t) if t else frozenset() for t in texts]

        def centrality(i: int) -> float:
            if not texts[i]:
                return -1.0
            others = [j for j in range(n) if j != i and texts[j]]
            return sum(jaccard(token_sets[i], token_sets[j]) for j in others) / len(others) if others else 0.0

        rest = sorted((i for i in range(n) if i != result.winner), key=lambda i: -centrality(i))
        return [result.winner, *rest]
    labels = cluster_answers([extract(t, task) for t in texts] if answers is None else answers, task)
    sizes: dict[int, int] = {}
    for label in labels:
        if label is not None:
            sizes[label] = sizes.get(label, 0) + 1
    winner_label = labels[result.winner]
    groups = sorted(sizes, key=lambda label: (label != winner_label, -sizes[label], label))
    representatives = list(groups)
    members = [i for label in groups for i in range(n) if labels[i] == label and i != label]
    invalid = [i for i in range(n) if labels[i] is None]
    return representatives + members + invalid
