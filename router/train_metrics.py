"""What `ponder train` measures and prints: task-type and difficulty metrics on held-out prompts,
on hand-written natural prompts (alone, under style-only system prompts, after earlier turns),
and the table of them the CLI shows.

Scores come from the ONNX model's own outputs where a model is given as bytes: what ships is what
is measured.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import f1_score, roc_auc_score

from router.train_data import Example, load_extra
from router.train_onnx import onnx_predict
from router.types import TASK_TYPES

NATURAL_PROMPTS_DIR = Path(__file__).resolve().parent / "data"


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return round(float(spearmanr(a, b).statistic), 4)


def reliability(pred: np.ndarray, target: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    table = []
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (pred >= lo) & ((pred < hi) if hi < 1 else (pred <= hi))
        if inside.any():
            table.append(
                {
                    "bin": f"{lo:.1f}-{hi:.1f}",
                    "n": int(inside.sum()),
                    "mean_predicted": round(float(pred[inside].mean()), 3),
                    "mean_observed": round(float(target[inside].mean()), 3),
                }
            )
    return table


def task_metrics(examples: Sequence[Example], probs: np.ndarray) -> dict[str, Any]:
    rows = [i for i, ex in enumerate(examples) if ex.task is not None]
    if not rows:
        return {}
    y = np.array([TASK_TYPES.index(examples[i].task) for i in rows])
    pred = probs[rows].argmax(1)
    labels = list(range(len(TASK_TYPES)))
    per_class = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    by_source: dict[str, list[bool]] = defaultdict(list)
    for i, p in zip(rows, pred):
        by_source[examples[i].source].append(TASK_TYPES[p] == examples[i].task)
    confusion = np.zeros((len(TASK_TYPES), len(TASK_TYPES)), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    return {
        "n": len(rows),
        "macro_f1": round(float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)), 4),
        "f1": {t: round(float(f), 4) for t, f in zip(TASK_TYPES, per_class)},
        "accuracy_by_source": {s: round(float(np.mean(v)), 4) for s, v in sorted(by_source.items())},
        "confusion": {"rows_true_cols_pred": list(TASK_TYPES), "matrix": confusion.tolist()},
    }


def difficulty_metrics(examples: Sequence[Example], diff: np.ndarray) -> dict[str, Any]:
    def graded(key: str, source: str | None = None) -> tuple[list[float], list[float]]:
        pairs = [(diff[i], ex.grades[key]) for i, ex in enumerate(examples) if key in ex.grades and (source is None or ex.source == source)]
        return [p for p, _ in pairs], [g for _, g in pairs]

    out: dict[str, Any] = {}
    p, g = graded("math_level", "math")
    out["spearman_math_level"] = _spearman(p, g)
    p, g = graded("mmlu_fail_share")
    out["spearman_mmlu_pro_failure_rate"] = _spearman(p, g)
    p, g = graded("gsm8k_fail_share")
    out["spearman_gsm8k_failure_share"] = _spearman(p, g)
    p, g = graded("crux_fail_share")
    out["spearman_cruxeval_failure_rate"] = _spearman(p, g)
    per_task: dict[str, list[float]] = defaultdict(list)
    task_fail: dict[str, float] = {}
    for i, ex in enumerate(examples):
        if "bbh_task_direct_fail" in ex.grades:
            per_task[ex.subset].append(float(diff[i]))
            task_fail[ex.subset] = ex.grades["bbh_task_direct_fail"]
    names = sorted(per_task)
    out["spearman_bbh_task_failure_rate"] = _spearman([float(np.mean(per_task[n])) for n in names], [task_fail[n] for n in names])
    p, g = graded("direct_wrong")
    out["auc_bbh_direct_wrong"] = round(float(roc_auc_score(g, p)), 4) if len(set(g)) == 2 else None
    p, g = graded("ref_wrong")
    out["auc_mmlu_pro_reference_wrong"] = round(float(roc_auc_score(g, p)), 4) if len(set(g)) == 2 else None
    out["reliability_mmlu_pro_reference_outcomes"] = reliability(np.array(p), np.array(g)) if p else []
    levels = defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.source == "math" and "math_level" in ex.grades:
            levels[int(ex.grades["math_level"])].append(float(diff[i]))
        elif ex.source == "gsm8k":
            levels[0].append(float(diff[i]))
    out["mean_by_math_level"] = {("gsm8k" if k == 0 else f"level_{k}"): round(float(np.mean(v)), 4) for k, v in sorted(levels.items())}
    by_source = defaultdict(list)
    for i, ex in enumerate(examples):
        by_source[ex.source].append(float(diff[i]))
    out["mean_by_source"] = {s: round(float(np.mean(v)), 4) for s, v in sorted(by_source.items())}
    rows = [i for i, ex in enumerate(examples) if ex.difficulty is not None]
    if rows:
        pred, target = diff[rows], np.array([examples[i].difficulty for i in rows])
        out["mae_vs_target"] = round(float(np.abs(pred - target).mean()), 4)
        out["spearman_vs_target"] = _spearman(list(pred), list(target))
        out["reliability_vs_target"] = reliability(pred, target)
    return out


GRADED_SOURCES = ("math", "gsm8k", "mmlu_pro", "bbh", "cruxeval")


# Style-only system prompts apps send, none of them in the training set (train_data's generic ones
# differ): they must not change what a request is.
STYLE_SYSTEM_PROMPTS = ("Keep answers short.", "Respond briefly.", "Be succinct and polite.",
                        "Answer in English.", "You are an assistant. Use short sentences.")


def natural_prompt_metrics(model_bytes: bytes) -> dict[str, Any]:
    """Task type on short prompts written as people type them (router/data/natural_prompts*.jsonl,
    hand-written for this check, never trained on): the benchmarks' formats are not how users ask.
    Each set is scored as it is and under each of STYLE_SYSTEM_PROMPTS."""
    out = {}
    for path in sorted(NATURAL_PROMPTS_DIR.glob("natural_prompts*.jsonl")):
        examples = load_extra(path)
        probs, _ = onnx_predict(model_bytes, examples)
        found = task_metrics(examples, probs)
        styled = {}
        for system in STYLE_SYSTEM_PROMPTS:
            with_system = [dataclasses.replace(ex, messages=[{"role": "system", "content": system}, *ex.messages])
                           for ex in examples]
            styled[system] = _accuracy(onnx_predict(model_bytes, with_system)[0], with_system)
        out[path.stem] = {"n": found["n"], "accuracy": _accuracy(probs, examples), "macro_f1": found["macro_f1"],
                          "f1": found["f1"], "accuracy_with_style_system_prompt": styled}
    return out


def multi_turn_metrics(model_bytes: bytes) -> dict[str, Any]:
    """The natural sets with k generic earlier exchanges in front (router/multiturn_check.py): a
    request must not turn into chat because the conversation is long."""
    from router.multiturn_check import multiturn_metrics

    return multiturn_metrics(lambda batch: onnx_predict(model_bytes, [Example("check", "check", list(m), None, None) for m in batch]))


def _accuracy(probs: np.ndarray, examples: Sequence[Example]) -> float:
    return round(float(np.mean([TASK_TYPES[p] == ex.task for p, ex in zip(probs.argmax(1), examples)])), 4)



def metrics_table(card: dict[str, Any]) -> str:
    held = card["metrics"]["held_out"]
    lines = [f"{'metric':<44}{'value':>10}  target", "-" * 64]

    def row(name: str, value: Any, target: str = "") -> None:
        text = "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<44}{text:>10}  {target}")

    row("task macro-F1 (held-out)", held["task"]["macro_f1"], ">= 0.90")
    for t, f in held["task"]["f1"].items():
        row(f"  F1 {t}", f)
    for name, found in card["metrics"].get("natural_prompts", {}).items():
        row(f"task macro-F1 ({name}, n={found['n']})", found["macro_f1"])
        styled = found.get("accuracy_with_style_system_prompt") or {}
        if styled:
            row("  accuracy, worst style system prompt", min(styled.values()))
    for k, found in (card["metrics"].get("multi_turn") or {}).get("by_k", {}).items():
        row(f"task macro-F1 (sets A+B+C, {k} earlier exchanges)", found["pooled"]["macro_f1"])
    loso = card["metrics"].get("leave_one_source_out")
    if loso:
        row("task macro-F1 (left-out sources, pooled)", loso["macro_f1_pooled"], ">= 0.80")
        for s, v in loso["by_source"].items():
            row(f"  accuracy left out: {s}", v["accuracy"])
    d = held["difficulty"]
    row("difficulty Spearman vs MATH level", d["spearman_math_level"], ">= 0.5")
    row("difficulty Spearman vs MMLU-Pro failure rate", d["spearman_mmlu_pro_failure_rate"], ">= 0.5")
    row("difficulty Spearman vs BBH task failure", d["spearman_bbh_task_failure_rate"])
    row("difficulty Spearman vs GSM8K failure share", d["spearman_gsm8k_failure_share"])
    row("difficulty Spearman vs CRUXEval failure", d["spearman_cruxeval_failure_rate"])
    row("difficulty AUC vs reference-model MMLU-Pro miss", d["auc_mmlu_pro_reference_wrong"])
    row("difficulty MAE vs target", d.get("mae_vs_target"))
    for k, v in d["mean_by_math_level"].items():
        row(f"  mean difficulty {k}", v)
    row("onnx vs sklearn max |diff|", max(card["onnx_vs_sklearn"]["task_probs_max_abs_diff"], card["onnx_vs_sklearn"]["difficulty_max_abs_diff"]), "<= 1e-4")
    return "\n".join(lines)
