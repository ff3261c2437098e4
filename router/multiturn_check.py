"""Multi-turn check: does a request read the same after earlier exchanges?

Real chat apps send the conversation so far, so a hard question asked in a long chat must not turn
into `chat` because of the turn count. This scores the natural check sets (router/data/natural_prompts*.jsonl:
sets A, B, C; hand-written, never trained on) with k earlier exchanges put in front of each prompt
(after its system prompt, if any): k generic user lines of everyday small talk, each answered by a
generic assistant line (HISTORY_USER / HISTORY_ASSISTANT below, written for this check: not from
Topical-Chat, the short requests or the check sets). Reported per k: accuracy and macro-F1 per set and
pooled over A + B + C, the share read as chat, and the mean predicted difficulty per labelled task.

    python -m router.multiturn_check [--artifact DIR] [--json]

The model reads the system prompt, the last user turn and the number of user and assistant turns
(router/messages.py), so the earlier turns' wording does not enter the features; the lines are
plain anyway, so the check stays fair if that changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from router.types import TASK_TYPES

DATA_DIR = Path(__file__).resolve().parent / "data"
SET_NAMES = {"natural_prompts": "A", "natural_prompts_b": "B", "natural_prompts_c": "C"}
K_VALUES = (0, 1, 3, 10, 30)

HISTORY_USER = (
    "Good morning, how are you doing today?",
    "I just got back from a walk in the park.",
    "The weather has been lovely this week.",
    "I made pancakes for breakfast.",
    "My neighbour's cat keeps visiting our garden.",
    "We are thinking about repainting the kitchen.",
    "I finally finished the book I was reading.",
    "Traffic was slow on the way in this morning.",
    "My sister is coming to visit next weekend.",
    "I started learning to play the guitar.",
    "The coffee shop near me changed its opening hours.",
    "I watered the plants on the balcony.",
)
HISTORY_ASSISTANT = (
    "That sounds nice! Thanks for sharing.",
    "Glad to hear it. How did it go?",
    "That's lovely. Anything else on your mind?",
    "Sounds like a good start to the day.",
    "Oh, how fun! Tell me more whenever you like.",
    "That's great to hear.",
    "I hope you enjoyed it!",
    "Nice. Is there anything I can help you with?",
)

# Spot checks from the issue: a hard request that must stay what it is after many exchanges.
SPOT_PROMPTS = (("Prove that sqrt(2) is irrational.", "math"), ("Implement quicksort in Rust.", "code"))

Predict = Callable[[Sequence[list[dict[str, Any]]]], tuple[np.ndarray, np.ndarray]]


def history(k: int, offset: int = 0) -> list[dict[str, str]]:
    """k earlier exchanges (user small talk + assistant reply), deterministic for (k, offset)."""
    out = []
    for i in range(k):
        out.append({"role": "user", "content": HISTORY_USER[(i + offset) % len(HISTORY_USER)]})
        out.append({"role": "assistant", "content": HISTORY_ASSISTANT[(i + offset) % len(HISTORY_ASSISTANT)]})
    return out


def with_history(messages: list[dict[str, Any]], k: int, offset: int = 0) -> list[dict[str, Any]]:
    at = 0
    while at < len(messages) and messages[at].get("role") in ("system", "developer"):
        at += 1
    return messages[:at] + history(k, offset) + messages[at:]


def load_sets() -> dict[str, list[tuple[list[dict[str, Any]], str]]]:
    from router.train_data import load_extra

    out = {}
    for stem, name in SET_NAMES.items():
        out[name] = [(ex.messages, ex.task) for ex in load_extra(DATA_DIR / f"{stem}.jsonl")]
    return out


def _macro_f1(truth: list[str], pred: list[str]) -> float:
    scores = []
    for t in TASK_TYPES:
        tp = sum(a == t and b == t for a, b in zip(truth, pred))
        fp = sum(a != t and b == t for a, b in zip(truth, pred))
        fn = sum(a == t and b != t for a, b in zip(truth, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def multiturn_metrics(predict: Predict, ks: Sequence[int] = K_VALUES) -> dict[str, Any]:
    """predict(list of messages) -> (task probabilities n x 6 in TASK_TYPES order, difficulty n)."""
    sets = load_sets()
    by_k: dict[str, Any] = {}
    for k in ks:
        rows: dict[str, Any] = {}
        pooled_truth: list[str] = []
        pooled_pred: list[str] = []
        pooled_diff: list[float] = []
        for name, items in sets.items():
            probs, diff = predict([with_history(m, k, offset=i) for i, (m, _) in enumerate(items)])
            pred = [TASK_TYPES[j] for j in np.asarray(probs).argmax(1)]
            truth = [t for _, t in items]
            rows[name] = {"accuracy": round(float(np.mean([a == b for a, b in zip(truth, pred)])), 4),
                          "macro_f1": round(_macro_f1(truth, pred), 4)}
            pooled_truth += truth
            pooled_pred += pred
            pooled_diff += [float(d) for d in diff]
        rows["pooled"] = {
            "accuracy": round(float(np.mean([a == b for a, b in zip(pooled_truth, pooled_pred)])), 4),
            "macro_f1": round(_macro_f1(pooled_truth, pooled_pred), 4),
            "read_as_chat": round(float(np.mean([p == "chat" for p in pooled_pred])), 4),
            "non_chat_read_as_chat": round(float(np.mean([p == "chat" for t, p in zip(pooled_truth, pooled_pred) if t != "chat"])), 4),
        }
        rows["mean_difficulty"] = {t: round(float(np.mean([d for d, tt in zip(pooled_diff, pooled_truth) if tt == t])), 4)
                                   for t in TASK_TYPES}
        spots_probs, spots_diff = predict([with_history([{"role": "user", "content": text}], k) for text, _ in SPOT_PROMPTS])
        rows["spot"] = {text: {"task": TASK_TYPES[int(np.asarray(p).argmax())], "difficulty": round(float(d), 3)}
                        for (text, _), p, d in zip(SPOT_PROMPTS, spots_probs, spots_diff)}
        by_k[str(k)] = rows
    return {"n": {name: len(items) for name, items in sets.items()}, "history": "k generic small-talk exchanges before the prompt", "by_k": by_k}


def classifier_predict(clf: Any) -> Predict:
    def predict(batch: Sequence[list[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray]:
        out = clf.classify_batch(list(batch))
        return (np.array([[c.task_probs[t] for t in TASK_TYPES] for c in out]), np.array([c.difficulty for c in out]))

    return predict


def table(found: dict[str, Any]) -> str:
    lines = ["k   | A F1  | B F1  | C F1  | pooled F1 | pooled acc | non-chat read as chat | mean difficulty " + " ".join(TASK_TYPES)]
    for k, rows in found["by_k"].items():
        diff = " ".join(f"{rows['mean_difficulty'][t]:.3f}" for t in TASK_TYPES)
        lines.append(f"{k:<3} | {rows['A']['macro_f1']:.3f} | {rows['B']['macro_f1']:.3f} | {rows['C']['macro_f1']:.3f} | "
                     f"{rows['pooled']['macro_f1']:.3f}     | {rows['pooled']['accuracy']:.3f}      | "
                     f"{rows['pooled']['non_chat_read_as_chat']:.3f}                 | {diff}")
    lines.append("spot checks (task, difficulty) by k:")
    for text, _ in SPOT_PROMPTS:
        cells = ", ".join(f"k={k}: {rows['spot'][text]['task']} {rows['spot'][text]['difficulty']:.2f}" for k, rows in found["by_k"].items())
        lines.append(f"  {text!r}: {cells}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    from router.classifier import Classifier

    parser = argparse.ArgumentParser(prog="python -m router.multiturn_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=None, help="artifact directory (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    found = multiturn_metrics(classifier_predict(Classifier.load(args.artifact)))
    print(json.dumps(found, indent=1) if args.json else table(found))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
