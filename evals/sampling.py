"""Replay recorded samples through the strategies' judgements: voting, stopping, best-of-N, cascade.

Suites (datasets in ../shared/datasets, or $PONDER_DATASETS):
- ``sc-math``: Qwen2.5-Math, 100 MATH problems x 8 CoT samples with correctness and reward scores.
- ``sc-cruxeval``: CodeLlama-7B, 800 CRUXEval problems x 10 scored samples, input and output tasks.
- ``gsm8k-verifier``: OpenAI's GSM8K solutions, 6B/175B x (one fine-tuned sample | verifier best-of-100).

Every judgement is the router's: answers are extracted from the raw texts with ``extract_answer``,
grouped with ``answers_equivalent``, voted with ``vote``, sampled adaptively with ``wave_size`` and
``should_stop`` exactly as the adaptive strategy does, ranked with ``best_of_n``. A replayed answer is
correct when the sample that won was recorded as correct (nothing model-written is ever executed).

Sample order matters for everything that stops early or breaks ties, so each method is reported on the
recorded order and as a mean over seeded random orders (samples are exchangeable draws, so the random
orders are the honest estimate; the recorded order is what the issue's bars were measured on).

The bucket gate (stop at one sample where voting does not pay) needs the learner's ``sample_value`` per
bucket. Two honest ways to get it, both reported:
- cross-fitted (``gate + ...``): problems are split into folds, and a problem's bucket value is
  estimated only from the *other* folds. Nothing is fitted on the problem it is applied to.
- online (``online gate + ...``): problems arrive one by one (dataset order for the recorded row, a
  seeded shuffle per random order), and each problem's value comes from the gateway's own function,
  ``bucket_sample_value``, over the stats of the problems that arrived *before* it: each past problem
  added its single-sample outcome to the one-sample arm and its fixed-N vote to the voting arm, as
  requests with feedback would. The first problems of a bucket see only the prior, so they vote.

Order noise: the random-order rows are means over a finite number of shuffles, so each row also
gives its paired difference to fixed-N majority with a standard error over problems, and methods
that do not depend on order are given exactly (expected over all orders).

    python -m evals.sampling --suite sc-math --out out/sampling
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.answers import extract_answer
from router.cascade import confidence_signal, should_escalate
from router.stopping import bucket_sample_value, estimate_sample_value, should_stop, wave_size
from router.train_data import datasets_dir
from router.types import Arm, ArmStats, bucket_key
from router.voting import best_of_n, cluster_answers, vote, weighted_vote

SUITES: tuple[str, ...] = ("sc-math", "sc-cruxeval", "gsm8k-verifier")
DEFAULT_ORDERS = 20
DEFAULT_FOLDS = 5
SEED = 1234


@dataclass(frozen=True)
class Problem:
    """One prompt with its recorded samples, as the adaptive strategy would have seen them."""

    id: str
    bucket: str
    task: str  # the answer format the samples are judged by
    texts: tuple[str, ...]
    correct: tuple[bool, ...]
    answers: tuple[str | None, ...]  # extract_answer of each text
    scores: tuple[float, ...] | None = None  # reward-model scores, when recorded


def _problem(pid: str, bucket: str, task: str, texts: Sequence[str], correct: Sequence[bool], scores=None) -> Problem:
    answers = tuple(extract_answer(t, task) for t in texts)
    return Problem(pid, bucket, task, tuple(texts), tuple(bool(c) for c in correct), answers, scores)


def load_qwen_math(root: Path | None = None) -> list[Problem]:
    path = (root or datasets_dir()) / "qwen_math_rm_maj_samples" / "math_cot_100.jsonl"
    problems = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        level = int(row["level"].split()[-1])
        # MATH level 1..5 -> difficulty 0..1 -> the router's tier (easy: 1-2, medium: 3, hard: 4-5)
        bucket = bucket_key("math", (level - 1) / 4)
        scores = tuple(float(s[0]) for s in row["pred_score"])
        problems.append(_problem(str(row["idx"]), bucket, "math", row["code"], row["score"], scores))
    return problems


def load_cruxeval(kind: str, root: Path | None = None) -> list[Problem]:
    path = (root or datasets_dir()) / "cruxeval" / f"sample_scored_codellama-7b_temp0.2_{kind}.json"
    data = json.loads(path.read_text())
    scored = data["raw_scored_generations"]
    return [
        _problem(pid, f"code:{kind}", "python", texts, scored[pid])
        for pid, texts in sorted(data["raw_generations"].items(), key=lambda kv: int(kv[0].split("_")[1]))
    ]


# ---------------------------------------------------------------------------------------------
# Replays of one problem under one sample order
# ---------------------------------------------------------------------------------------------


def _ordered(problem: Problem, order: Sequence[int]) -> tuple[list[str], list[str | None], list[bool]]:
    return ([problem.texts[i] for i in order], [problem.answers[i] for i in order], [problem.correct[i] for i in order])


def replay_vote(problem: Problem, order: Sequence[int], n: int) -> tuple[bool, int]:
    texts, answers, correct = _ordered(problem, order)
    result = vote(texts[:n], problem.task, answers=answers[:n])
    return correct[result.winner], n


def replay_adaptive(problem: Problem, order: Sequence[int], **options) -> tuple[bool, int]:
    """The adaptive strategy's loop: request a wave, extract, ask should_stop, repeat; then vote."""
    texts, answers, correct = _ordered(problem, order)
    max_n = len(order)
    n = 0
    while True:
        n += wave_size(answers[:n], max_n=max_n, task=problem.task, **options)
        if should_stop(answers[:n], max_n=max_n, task=problem.task, **options).stop:
            break
    result = vote(texts[:n], problem.task, answers=answers[:n])
    return correct[result.winner], n


def replay_best_of_n(problem: Problem, order: Sequence[int]) -> tuple[bool, int]:
    _, _, correct = _ordered(problem, order)
    scores = [problem.scores[i] for i in order]  # type: ignore[index]
    return correct[best_of_n(scores)], len(order)


def replay_reward_weighted(problem: Problem, order: Sequence[int]) -> tuple[bool, int]:
    """Vote where each sample counts sigmoid(reward): the RM's logit read as P(correct)."""
    texts, answers, correct = _ordered(problem, order)
    weights = [1.0 / (1.0 + math.exp(-problem.scores[i])) for i in order]  # type: ignore[index]
    result = weighted_vote(texts, weights, problem.task, answers=answers)
    return correct[result.winner], len(order)


# ---------------------------------------------------------------------------------------------
# The learner's view: value of a vote per bucket, cross-fitted
# ---------------------------------------------------------------------------------------------


def vote_gain(problem: Problem) -> float:
    """E over random orders of (majority-of-N correct) - (first valid sample correct) for one problem:
    what a vote adds over the one answer the gate would return.

    Ties are broken by the earliest sample, which under a random order is each tied answer with
    equal chance, so the tied answers' accuracies are averaged.
    """
    labels = cluster_answers(problem.answers, problem.task)
    groups: dict[int, list[bool]] = {}
    for label, ok in zip(labels, problem.correct):
        if label is not None:
            groups.setdefault(label, []).append(ok)
    single = first_valid_expected(problem)
    if not groups:
        return 0.0
    top = max(len(g) for g in groups.values())
    tied = [statistics.fmean(g) for g in groups.values() if len(g) == top]
    return statistics.fmean(tied) - single


def cross_fitted_sample_values(problems: Sequence[Problem], folds: int, seed: int) -> tuple[list[float], dict]:
    """Per problem, its bucket's sample_value learned from the other folds only."""
    rng = random.Random(seed)
    fold_of = [i % folds for i in range(len(problems))]
    rng.shuffle(fold_of)
    gains = [vote_gain(p) for p in problems]
    values: list[float] = [0.0] * len(problems)
    learned: dict[str, list[float]] = {}
    for fold in range(folds):
        by_bucket: dict[str, list[float]] = {}
        for p, f, g in zip(problems, fold_of, gains):
            if f != fold:
                by_bucket.setdefault(p.bucket, []).append(g)
        estimate = {b: estimate_sample_value(gs) for b, gs in by_bucket.items()}
        for i, (p, f) in enumerate(zip(problems, fold_of)):
            if f == fold:
                values[i] = estimate.get(p.bucket, estimate_sample_value([]))
        for b, v in estimate.items():
            learned.setdefault(b, []).append(round(v, 4))
    return values, {"per_bucket_by_fold": learned, "folds": folds}


_REPLAY_ARM = Arm("replay", "adaptive_consistency", None, 0)  # the arm whose bucket value is asked
_ONE_KEY = Arm("replay", "single", None, 1).key
_VOTE_KEY = Arm("replay", "self_consistency", None, 2).key


def online_outcomes(problems: Sequence[Problem], orders: Sequence[Sequence[int]], arrival: Sequence[int],
                    **options) -> tuple[list[tuple[bool, int]], dict[str, float]]:
    """The gate learned online: problems arrive in ``arrival`` order; each is replayed (sample order
    ``orders[i]``) with the sample_value ``bucket_sample_value`` gives on the stats of the problems
    that arrived before it, then adds its own single-sample and fixed-N-vote outcomes to them.

    Returns the outcome per problem (indexed like ``problems``) and the final value per bucket."""
    stats: dict[str, dict[str, list[float]]] = {}  # bucket -> arm key -> [successes, weight]
    outcomes: list[tuple[bool, int]] = [(False, 0)] * len(problems)
    for i in arrival:
        p, order = problems[i], orders[i]
        bucket = stats.setdefault(p.bucket, {_ONE_KEY: [0.0, 0.0], _VOTE_KEY: [0.0, 0.0]})
        snapshot = {k: ArmStats(count=w, successes=s, weight=w) for k, (s, w) in bucket.items()}
        value = bucket_sample_value(snapshot, _REPLAY_ARM)
        outcomes[i] = replay_adaptive(p, order, sample_value=value, **options)
        first_ok, _ = replay_adaptive(p, order, sample_value=0.0)  # the first valid answer
        vote_ok, _ = replay_vote(p, order, len(order))
        for key, ok in ((_ONE_KEY, first_ok), (_VOTE_KEY, vote_ok)):
            bucket[key][0] += ok
            bucket[key][1] += 1.0
    final = {}
    for b, arms in stats.items():
        snapshot = {k: ArmStats(count=w, successes=s, weight=w) for k, (s, w) in arms.items()}
        final[b] = bucket_sample_value(snapshot, _REPLAY_ARM)
    return outcomes, final


def first_valid_expected(problem: Problem) -> float:
    """E over orders of the correctness of the first sample with an answer (what the gate returns)."""
    valid = [ok for a, ok in zip(problem.answers, problem.correct) if a is not None]
    return statistics.fmean(valid) if valid else 0.0


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------

Method = Callable[[Problem, Sequence[int], int], tuple[bool, int]]  # (problem, order, problem index)


def _methods(problems: Sequence[Problem], sample_values: Sequence[float]) -> dict[str, Method]:
    n = len(problems[0].texts)
    methods: dict[str, Method] = {
        "first sample": lambda p, o, i: replay_vote(p, o, 1),
        f"majority of {n}": lambda p, o, i: replay_vote(p, o, n),
        "adaptive beta 0.95": lambda p, o, i: replay_adaptive(p, o, rule="beta", confidence=0.95),
        "ESC window 2": lambda p, o, i: replay_adaptive(p, o, rule="window", window=2),
        "gate + beta 0.95": lambda p, o, i: replay_adaptive(
            p, o, rule="beta", confidence=0.95, sample_value=sample_values[i]
        ),
        "gate + ESC window 2": lambda p, o, i: replay_adaptive(
            p, o, rule="window", window=2, sample_value=sample_values[i]
        ),
    }
    if problems[0].scores is not None:
        methods[f"reward best-of-{n}"] = lambda p, o, i: replay_best_of_n(p, o)
        methods[f"reward-weighted vote of {n}"] = lambda p, o, i: replay_reward_weighted(p, o)
    return methods


ONLINE_METHODS: dict[str, dict] = {
    "online gate + beta 0.95": {"rule": "beta", "confidence": 0.95},
    "online gate + ESC window 2": {"rule": "window", "window": 2},
}


def evaluate(problems: Sequence[Problem], *, orders: int = DEFAULT_ORDERS, folds: int = DEFAULT_FOLDS, seed: int = SEED) -> dict:
    """Every method on the recorded order and on ``orders`` seeded random orders."""
    n = len(problems[0].texts)
    sample_values, learned = cross_fitted_sample_values(problems, folds, seed)
    rng = random.Random(seed)
    # one order per problem per replicate, shared by all methods (paired comparison)
    per_problem = [[list(range(n))] + [rng.sample(range(n), n) for _ in range(orders)] for _ in problems]
    arrival_rng = random.Random(seed + 1)
    arrivals = [list(range(len(problems)))] + [arrival_rng.sample(range(len(problems)), len(problems)) for _ in range(orders)]
    methods = _methods(problems, sample_values)
    outcomes_by_method: dict[str, list[list[tuple[bool, int]]]] = {}  # name -> replicate -> per problem
    for name, method in methods.items():
        outcomes_by_method[name] = [[method(p, per_problem[i][r], i) for i, p in enumerate(problems)]
                                    for r in range(orders + 1)]
    online_values: dict[str, dict] = {}
    for name, options in ONLINE_METHODS.items():
        runs = [online_outcomes(problems, [per_problem[i][r] for i in range(len(problems))], arrivals[r], **options)
                for r in range(orders + 1)]
        outcomes_by_method[name] = [outcomes for outcomes, _ in runs]
        online_values[name] = {b: round(statistics.fmean(v[b] for _, v in runs[1:]), 4) if orders else None
                               for b in runs[0][1]}
    majority = outcomes_by_method[f"majority of {n}"]
    rows = {}
    for name, replicates in outcomes_by_method.items():
        accuracies = [sum(ok for ok, _ in out) / len(problems) for out in replicates]
        samples = [sum(k for _, k in out) / len(problems) for out in replicates]
        random_acc, random_n = accuracies[1:], samples[1:]
        row = {
            "recorded_order": {"accuracy": round(accuracies[0], 4), "mean_samples": round(samples[0], 3)},
            "random_orders": {
                "accuracy": round(statistics.fmean(random_acc), 4) if random_acc else None,
                "accuracy_sd": round(statistics.pstdev(random_acc), 4) if random_acc else None,
                "mean_samples": round(statistics.fmean(random_n), 3) if random_n else None,
            },
        }
        if orders:
            # paired over problems: each problem's mean (method - majority) over the random orders
            diffs = [statistics.fmean(replicates[r][i][0] - majority[r][i][0] for r in range(1, orders + 1))
                     for i in range(len(problems))]
            row["random_orders"]["minus_majority"] = round(statistics.fmean(diffs), 4)
            row["random_orders"]["minus_majority_se"] = round(statistics.stdev(diffs) / math.sqrt(len(diffs)), 4)
        rows[name] = row
    pass_at_1 = statistics.fmean(sum(p.correct) / n for p in problems)
    # the exact expectations over orders, free of the noise of a finite number of shuffles:
    # a single sample, the first valid one (what the gate returns in a bucket it stops at 1), the majority of n
    first_valid = statistics.fmean(map(first_valid_expected, problems))
    rows["pass@1 (mean over samples)"] = _fixed(pass_at_1, 1)
    rows["first valid answer, expected over orders"] = _fixed(first_valid, None)
    rows[f"majority of {n}, expected over orders"] = _fixed(first_valid + statistics.fmean(map(vote_gain, problems)), n)
    rows[f"oracle pass@{n}"] = _fixed(sum(any(p.correct) for p in problems) / len(problems), n)
    buckets = sorted({p.bucket for p in problems})
    return {
        "problems": len(problems),
        "samples_per_problem": n,
        "orders": orders,
        "seed": seed,
        "buckets": {b: sum(p.bucket == b for p in problems) for b in buckets},
        "invalid_answers": sum(a is None for p in problems for a in p.answers),
        "sample_value": learned,
        "online_sample_value": online_values,
        "methods": rows,
    }


# The target: fixed-N majority's accuracy with fewer samples on average than ESC window 2
# measured on the recorded order (2.38 on qwen math, 2.3 on cruxeval).
SAMPLE_BARS = {"sc-math": 2.38, "sc-cruxeval": 2.3}
TARGET_METHODS = ("gate + ESC window 2", "online gate + ESC window 2")


def target_checks(result: dict, bar: float) -> list[dict]:
    """Per gated method, on random orders: accuracy minus majority's (paired, with its se) and samples.

    ``verdict``: PASS when not below majority and under the sample bar; TIE when below majority by
    less than two paired standard errors (indistinguishable on this data) and under the bar; else MISS.
    """
    n = result["samples_per_problem"]
    checks = []
    for name in TARGET_METHODS:
        row = result["methods"][name]["random_orders"]
        diff, se, samples = row["minus_majority"], row["minus_majority_se"], row["mean_samples"]
        under = samples < bar
        verdict = "PASS" if diff >= 0 and under else "TIE" if diff > -2 * se and under else "MISS"
        checks.append({"method": name, "verdict": verdict, "minus_majority": diff, "se": se,
                       "mean_samples": samples, "sample_bar": bar, "majority": f"majority of {n}"})
    return checks


def _fixed(accuracy: float, samples: int | None) -> dict:
    """A method that does not depend on order (samples None: not a fixed number)."""
    row = {"accuracy": round(accuracy, 4), "mean_samples": samples}
    return {"recorded_order": row, "random_orders": {**row, "accuracy_sd": 0.0}}


def _bucket_summary(problems: Sequence[Problem]) -> dict:
    """Per bucket: how much a vote gains over one sample, and single-sample accuracy."""
    out = {}
    for bucket in sorted({p.bucket for p in problems}):
        subset = [p for p in problems if p.bucket == bucket]
        gains = [vote_gain(p) for p in subset]
        out[bucket] = {
            "problems": len(subset),
            "mean_vote_gain": round(statistics.fmean(gains), 4),
            "first_sample_recorded": round(sum(p.correct[0] for p in subset) / len(subset), 4),
            "pass@1": round(statistics.fmean(sum(p.correct) / len(p.correct) for p in subset), 4),
        }
    return out


def run_sc_math(orders: int, seed: int) -> dict:
    problems = load_qwen_math()
    report = evaluate(problems, orders=orders, seed=seed)
    if orders:
        report["targets"] = target_checks(report, SAMPLE_BARS["sc-math"])
    report["per_bucket"] = _bucket_summary(problems)
    report["source"] = "qwen_math_rm_maj_samples/math_cot_100.jsonl (Qwen2.5-Math, 8 CoT samples, reward scores)"
    report["extraction_agreement"] = _extraction_agreement(problems)
    return report


def _extraction_agreement(problems: Sequence[Problem]) -> dict:
    """How often our extraction + equivalence with the gold answer matches the recorded correctness."""
    from router.answers import answers_equivalent

    root = datasets_dir() / "qwen_math_rm_maj_samples" / "math_cot_100.jsonl"
    gold = {str(json.loads(line)["idx"]): json.loads(line)["gt"] for line in root.read_text().splitlines()}
    agree = total = 0
    for p in problems:
        g = extract_answer("\\boxed{" + gold[p.id] + "}", "math")
        for answer, ok in zip(p.answers, p.correct):
            total += 1
            agree += answers_equivalent(answer, g, "math") == ok if answer and g else (not ok)
    return {"samples": total, "agree_with_recorded_correctness": agree}


def run_sc_cruxeval(orders: int, seed: int) -> dict:
    report: dict = {"source": "cruxeval/sample_scored_codellama-7b_temp0.2_{input,output}.json (temp 0.2, 10 samples)"}
    for kind in ("input", "output"):
        report[kind] = evaluate(load_cruxeval(kind), orders=orders, seed=seed)
        if orders:
            report[kind]["targets"] = target_checks(report[kind], SAMPLE_BARS["sc-cruxeval"])
    return report


def run_gsm8k_verifier(orders: int, seed: int) -> dict:
    """Verifier re-ranking and a cascade, on OpenAI's recorded GSM8K solutions.

    Only the re-ranked winners are recorded (no per-sample verifier scores), so best-of-100 is the
    recorded result; what we replay is our extraction/equivalence against the recorded grades and a
    cascade: answer with 6B (its fine-tuned and verifier-ranked answers as two cheap samples), escalate
    to 175B-verifier when the two disagree.
    """
    from router.answers import answers_equivalent

    path = datasets_dir() / "gsm8k" / "example_model_solutions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    systems = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    accuracy = {s: round(sum(r[s]["is_correct"] for r in rows) / len(rows), 4) for s in systems}
    agree = {s: 0 for s in systems}
    for r in rows:
        gold = extract_answer(r["ground_truth"], "math")
        for s in systems:
            ours = answers_equivalent(extract_answer(r[s]["solution"], "math"), gold, "math") if gold else False
            agree[s] += ours == r[s]["is_correct"]
    cascade = {}
    for threshold in (0.75,):
        correct = escalated = 0
        for r in rows:
            cheap = [r["6b_finetuning"]["solution"], r["6b_verification"]["solution"]]
            signal = confidence_signal(cheap, "math")
            if should_escalate(signal, threshold):
                escalated += 1
                correct += r["175b_verification"]["is_correct"]
            else:
                winner = vote(cheap, "math").winner
                correct += r[("6b_finetuning", "6b_verification")[winner]]["is_correct"]
        cascade[f"6B pair -> 175B verifier (escalate below {threshold})"] = {
            "accuracy": round(correct / len(rows), 4),
            "escalation_rate": round(escalated / len(rows), 4),
        }
    return {
        "source": "gsm8k/example_model_solutions.jsonl (OpenAI, 1319 test problems)",
        "problems": len(rows),
        "recorded_accuracy": accuracy,
        "verifier_gain": {
            "6B: best-of-100 by verifier - single fine-tuned sample": round(accuracy["6b_verification"] - accuracy["6b_finetuning"], 4),
            "175B: best-of-100 by verifier - single fine-tuned sample": round(
                accuracy["175b_verification"] - accuracy["175b_finetuning"], 4
            ),
        },
        "oracle_any_of_4": round(sum(any(r[s]["is_correct"] for s in systems) for r in rows) / len(rows), 4),
        "extraction_agreement": {s: f"{agree[s]}/{len(rows)}" for s in systems},
        "cascade": cascade,
        "not_replayable": "one recorded solution per system and no per-sample verifier scores: "
        "fixed-N majority, adaptive stopping and our best_of_n cannot be replayed on this file",
    }


RUNNERS = {"sc-math": run_sc_math, "sc-cruxeval": run_sc_cruxeval, "gsm8k-verifier": run_gsm8k_verifier}


def run_suite(name: str, out_dir: Path | None = None, *, orders: int = DEFAULT_ORDERS, seed: int = SEED) -> dict:
    """Run one suite; with ``out_dir``, write report.json and report.md there."""
    if name not in RUNNERS:
        raise ValueError(f"unknown suite {name!r}; expected one of {SUITES}")
    started = time.perf_counter()
    report = {"suite": name, **RUNNERS[name](orders, seed)}
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        from evals.report import json_text  # matplotlib comes with it: only when writing

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json_text(report, indent=2))
        (out_dir / "report.md").write_text(render_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _method_table(result: dict) -> list[str]:
    lines = [
        "| method | accuracy (recorded order) | samples | accuracy (random orders, mean ± sd) | samples "
        "| − majority (random orders, ± paired se) |",
        "|---|---|---|---|---|---|",
    ]

    def count(x) -> str:
        return "—" if x is None else f"{x:.2f}"

    for name, row in result["methods"].items():
        rec, rnd = row["recorded_order"], row["random_orders"]
        diff = f"{rnd['minus_majority']:+.4f} ± {rnd['minus_majority_se']:.4f}" if "minus_majority" in rnd else "exact"
        lines.append(
            f"| {name} | {rec['accuracy']:.4f} | {count(rec['mean_samples'])} | "
            f"{rnd['accuracy']:.4f} ± {rnd['accuracy_sd']:.4f} | {count(rnd['mean_samples'])} | {diff} |"
        )
    values = {b: statistics.fmean(v) for b, v in result["sample_value"]["per_bucket_by_fold"].items()}
    lines.append("")
    lines.append(
        "Cross-fitted sample_value per bucket (mean over folds): "
        + ", ".join(f"{b} {v:+.4f}" for b, v in sorted(values.items()))
    )
    for c in result.get("targets", []):
        lines.append(
            f"{c['verdict']}  {c['method']} vs {c['majority']} (random orders): {c['minus_majority']:+.4f} "
            f"± {c['se']:.4f} accuracy, {c['mean_samples']:.2f} samples (bar {c['sample_bar']})"
        )
    online = result.get("online_sample_value", {}).get("online gate + ESC window 2", {})
    if online:
        lines.append(
            "Online sample_value per bucket after the last arrival (mean over random orders): "
            + ", ".join(f"{b} {v:+.4f}" for b, v in sorted(online.items()) if v is not None)
        )
    return lines


def render_markdown(report: dict) -> str:
    name = report["suite"]
    lines = [f"# Sampling replay: {name}", "", f"Source: {report.get('source', '')}", ""]
    if name == "sc-math":
        lines += [f"{report['problems']} problems x {report['samples_per_problem']} samples; {report['orders']} random orders (seed {report['seed']}).", ""]
        lines += _method_table(report)
        lines += ["", "| bucket | problems | mean vote gain | first sample | pass@1 |", "|---|---|---|---|---|"]
        for b, row in report["per_bucket"].items():
            lines.append(f"| {b} | {row['problems']} | {row['mean_vote_gain']:+.4f} | {row['first_sample_recorded']:.3f} | {row['pass@1']:.3f} |")
        ea = report["extraction_agreement"]
        lines += ["", f"Extraction: {ea['agree_with_recorded_correctness']}/{ea['samples']} samples judged as recorded."]
    elif name == "sc-cruxeval":
        for kind in ("input", "output"):
            r = report[kind]
            lines += [f"## {kind} prediction", "", f"{r['problems']} problems x {r['samples_per_problem']} samples; {r['orders']} random orders.", ""]
            lines += _method_table(r) + [""]
    else:
        lines += ["| system | accuracy (recorded) | our extraction agrees |", "|---|---|---|"]
        for s, acc in report["recorded_accuracy"].items():
            lines.append(f"| {s} | {acc:.3f} | {report['extraction_agreement'][s]} |")
        lines += ["", "Verifier gain: " + "; ".join(f"{k}: {v:+.3f}" for k, v in report["verifier_gain"].items())]
        lines += [f"Oracle (any of the 4 correct): {report['oracle_any_of_4']:.3f}", ""]
        for k, v in report["cascade"].items():
            lines.append(f"Cascade {k}: accuracy {v['accuracy']:.3f}, escalated {v['escalation_rate']:.1%}")
        lines += ["", f"Not replayable: {report['not_replayable']}."]
    lines += ["", f"Reproduce: `python -m evals.sampling --suite {name} --out DIR` ({report['seconds']} s)", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.json and report.md")
    parser.add_argument("--orders", type=int, default=DEFAULT_ORDERS, help="random sample orders to average")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name in SUITES if args.suite == "all" else (args.suite,):
        out = None if args.out is None else (args.out / name if args.suite == "all" else args.out)
        report = run_suite(name, out, orders=args.orders, seed=args.seed)
        sys.stdout.write(render_markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
