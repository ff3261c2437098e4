"""Whether a cascade escalates: is the cheap arm's answer confident enough to return?

Three signals, each mapped to a confidence in [0, 1]; the combined confidence is the *lowest* of the
ones available (any one credible doubt escalates, because an escalation costs money but a wrong
answer costs the client):

- vote: the agreement of k cheap samples on one extracted answer (needs k >= 2);
- verifier: a verifier's or LLM judge's score, already normalised to [0, 1];
- stated uncertainty: the cheap model saying it is unsure ("I'm not sure", "I cannot verify").

No signal at all gives confidence 1.0 (nothing to doubt): a policy that wants a check must ask for
k >= 2 samples or a verifier.

A vote's or a verifier's confidence is also the learner's automatic success signal, weighted in
telemetry.events.SIGNAL_WEIGHTS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from router.voting import VoteResult, vote

_UNCERTAIN_PHRASES = (
    r"i(?:'| a)m not (?:entirely |completely |totally |100% )?(?:sure|certain|confident)",
    r"i am unsure|i'm unsure|not sure (?:if|whether|about)",
    r"i (?:don't|do not) know",
    r"i (?:can(?:no|')t|am unable to|'m unable to) (?:verify|confirm|determine|be certain|be sure)",
    r"i (?:might|may|could) be (?:wrong|mistaken)",
    r"(?:hard|difficult|impossible) to (?:say|determine|know) for (?:sure|certain)",
    r"(?:this|my answer) (?:is|may be) (?:a guess|uncertain|speculative)",
    r"i(?:'m| am) guessing|my best guess|i would guess",
    r"without more (?:information|context)|insufficient information",
    r"you (?:should|may want to|might want to) (?:verify|double[- ]check|confirm)",
)
_UNCERTAIN = re.compile("|".join(f"(?:{p})" for p in _UNCERTAIN_PHRASES), re.IGNORECASE)
_HEDGES = re.compile(r"\b(?:probably|possibly|perhaps|i think|i believe)\b", re.I)


def stated_uncertainty(text: str | None) -> float:
    """How strongly a model's reply states its own uncertainty, in [0, 1].

    An explicit admission ("I'm not sure", "I cannot verify") counts 0.8, each more one adds 0.1;
    soft hedges ("probably", "I think") add 0.1 each up to 0.3 on their own. 0.0 for a plain reply.
    """
    if not text:
        return 0.0
    explicit = len(_UNCERTAIN.findall(text))
    hedges = len(_HEDGES.findall(text))
    score = (0.8 + 0.1 * (explicit - 1) if explicit else 0.0) + min(0.3, 0.1 * hedges)
    return min(1.0, score)


def stated_confidence(text: str | None) -> float:
    """1 - stated_uncertainty(text): the confidence a single reply's own wording allows."""
    return 1.0 - stated_uncertainty(text)


@dataclass(frozen=True, slots=True)
class ConfidenceSignal:
    """What is known about the cheap answer; None = that signal was not measured."""

    vote_agreement: float | None = None  # share of valid samples agreeing with the winner (k >= 2)
    verifier_score: float | None = None  # in [0, 1]
    stated_uncertainty: float | None = None  # in [0, 1], see stated_uncertainty()
    method: str = "majority"  # the vote's method; a medoid's agreement is a similarity, not a vote

    @property
    def confidence(self) -> float:
        parts = [
            self.vote_agreement,
            self.verifier_score,
            None if self.stated_uncertainty is None else 1.0 - self.stated_uncertainty,
        ]
        known = [p for p in parts if p is not None]
        return min(known) if known else 1.0


def confidence_signal(
    texts: Sequence[str | None],
    task: str,
    *,
    verifier_scores: Sequence[float | None] | None = None,
    result: VoteResult | None = None,
) -> ConfidenceSignal:
    """The signal for the cheap arm's samples: vote agreement (k >= 2), the winner's verifier score
    and the winner's stated uncertainty. Pass ``result`` to reuse a vote already taken."""
    result = result or vote(texts, task)
    winner_text = texts[result.winner]
    agreement = result.agreement if result.n >= 2 else None
    if agreement is not None and result.n_valid < result.n:
        agreement *= result.n_valid / result.n  # failed samples are doubt too
    score = None
    if verifier_scores is not None and result.winner < len(verifier_scores):
        score = verifier_scores[result.winner]
    return ConfidenceSignal(
        vote_agreement=agreement,
        verifier_score=score,
        stated_uncertainty=stated_uncertainty(winner_text),
        method=result.method,
    )


def should_escalate(
    signal: ConfidenceSignal | float | Sequence[float | None] | None, threshold: float
) -> bool:
    """Escalate to the next arm when the cheap answer's confidence is below ``threshold``.

    ``signal``: a ConfidenceSignal, one confidence in [0, 1], or several (their minimum counts;
    None entries are ignored). None (nothing measured) does not escalate; a NaN does.
    """
    if signal is None:
        confidence = 1.0
    elif isinstance(signal, ConfidenceSignal):
        confidence = signal.confidence
    elif isinstance(signal, (int, float)):
        confidence = float(signal)
    else:
        known = [float(s) for s in signal if s is not None]
        confidence = min(known) if known else 1.0
    if confidence != confidence:  # NaN
        return True
    return confidence < threshold
