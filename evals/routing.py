"""Replay recorded outcomes through the gateway's own decision and learner code, and its baselines.

For each prompt of a table, in a seeded arrival order: the leak-free classification (evals/
classification.py) and the learned stats go into `router.decide.decide` with a Policy built for the
table's arms; the simulated backend answers from the recorded table (a missing record is a failed call
and the decision's fallbacks are tried in order, as the gateway does); the outcome is added to the
(bucket, arm) aggregates with telemetry's own update rule, which the next decision reads. Nothing
here re-implements a decision: utility, priors, exploration and Thompson draws are decide()'s.

Methods, each swept over the policy's cost weight lambda where it has one:
- ponder cold: flat priors (every arm 0.5), learning online from the first request;
- ponder warm: the same learner after a warm-up on the other half of the table (2 folds, so every
  prompt is measured once, by a learner that never saw it), still learning online; the warm-up is
  either online (the learner decided those prompts itself, bandit feedback) or recorded (every arm's
  recorded outcome on those prompts loaded into the aggregates, like a router trained on part of a
  table and tested on the rest);
- difficulty router (two-arm tables): decide() over difficulty-window routes whose priors come from the
  difficulty alone (weak arm 1 - d, strong arm 1 - RHO d), no learning; and the same score as a plain
  threshold for RouteLLM's CPT/APGR (zero-shot when the scores are `source-out`);
- baselines: prompt length (the longest prompts go to the strong arm), always-cheapest,
  always-strongest, every single arm, random at matched cost (the best random mix of single arms),
  and the oracle (per prompt, the cheapest arm that is right).
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evals.classification import Scores
from evals.metrics import random_mix_accuracy, routellm_metrics, threshold_curve
from evals.tables import OutcomeTable
from policies.backends import BackendSpec, Prices
from policies.schema import (
    ArmSpec, Exploration, LearnerSettings, Objective, Overrides, Policy, PricePrior, RouteMatch, RouteSpec,
)
from router.decide import decide
from router.estimates import CompiledPolicy, compile_policy
from router.request_hints import RequestHints
from router.types import DIFFICULTY_TIERS, POOLED_BUCKET, POOLED_TIER, Classification, bucket_key, difficulty_tier
from telemetry.aggregates import apply_delta, arm_stats

ARRIVAL_SEED = 7
WARM_FOLDS = 2
LAMBDA_STEPS = tuple(float(k) for k in np.geomspace(0.004, 2.0, 10))  # x 1 / mean cost of the strongest arm
RHO = 0.5  # difficulty-only prior of the strong arm: 1 - RHO * d (any RHO < 1 traces the same decisions over lambda)
WINDOW = 0.02  # difficulty-window width of the difficulty router's routes
HEADLINE = "ponder warm (recorded)"
SHORT_ANSWER_TOKENS = 5  # the policy's guess for a direct (no-CoT) arm, before costs are learned
Progress = Callable[[int], None]


def _name(text: str) -> str:
    """A policy-safe name (letters, digits, . _ : -)."""
    cleaned = re.sub(r"[^A-Za-z0-9._:-]+", "-", text).strip("-")
    return cleaned if cleaned[:1].isalnum() else "m" + cleaned


def _names(texts: Sequence[str]) -> dict[str, str]:
    """Each distinct text's policy-safe name, unique: columns that clean to the same name ("gpt 4o" and
    "gpt/4o") get -2, -3, ... rather than one arm answering for both."""
    names: dict[str, str] = {}
    for text in texts:
        if text not in names:
            name, k = _name(text), 2
            while name in names.values():
                name, k = f"{_name(text)}-{k}", k + 1
            names[text] = name
    return names


def _arm_keys(table: OutcomeTable, compiled: CompiledPolicy) -> list[str]:
    """The compiled policy's arm key of each table column, in column order."""
    names = _names(table.arm_names)
    return [compiled.arms[names[info.name]].key for info in table.arms]


# --- the policy ------------------------------------------------------------------------------------


def build_policy(table: OutcomeTable, cost_weight: float, windows: Sequence[tuple[float, float, list[float]]] = (),
                 explore: float = Exploration().share,
                 price_prior: PricePrior | None = LearnerSettings().price_prior) -> Policy:
    """A policy whose arms are the table's arms. Prices come from the price table; for a table that only
    records costs, the mean recorded cost per call stands in as the list price. Latency is not recorded,
    so its weight is zero; outcomes do not decay (a replay has no wall clock). The arms' cold priors are
    the policy default's (learner.price_prior: rising with price); `price_prior=None` makes them flat."""
    backends: dict[str, BackendSpec] = {}
    arms: dict[str, ArmSpec] = {}
    listed = _prices(table)
    # A priced model is one backend whatever its arms; an unpriced arm gets its own backend whose
    # stand-in list price makes 300 output tokens cost the arm's mean recorded cost.
    backend_of = [info.model if info.model in listed else info.name for info in table.arms]
    backend_names, arm_names = _names(backend_of), _names(table.arm_names)
    for j, info in enumerate(table.arms):
        backend = backend_names[backend_of[j]]
        if backend not in backends:
            mean_cost = float(np.nanmean(table.cost_usd[:, j]))
            prices = listed.get(info.model) or Prices(input_per_mtok=0.0, output_per_mtok=max(mean_cost, 0.0) * 1e6 / 300)
            backends[backend] = BackendSpec(name=backend, model=f"eval/{info.model}", prices=prices)
        if info.name == "direct" and info.strategy == "single":
            tokens = SHORT_ANSWER_TOKENS  # an operator knows a direct answer is a few tokens
        else:
            tokens = None if info.model in listed else 300
        arms[arm_names[info.name]] = ArmSpec(backend=backend, strategy=info.strategy, n=info.n, tokens=tokens)
    names = list(arms)
    routes = [RouteSpec(name=f"d{k}", when=RouteMatch(difficulty=(lo, hi)), candidates=dict(zip(names, priors)))
              for k, (lo, hi, priors) in enumerate(windows)]
    routes.append(RouteSpec(name="all", candidates=names))
    labels = sorted(set(task_labels(table.groups).values()))  # x-ponder-task, for group buckets
    return Policy(name=_name(f"eval-{table.name}"), backends=list(backends.values()), arms=arms, routes=routes,
                  objective=Objective(cost_weight=cost_weight, latency_weight=0.0),
                  overrides=Overrides(task_header=labels),
                  exploration=Exploration(share=explore),
                  learner=LearnerSettings(half_life_hours=None, price_prior=price_prior))


def _prices(table: OutcomeTable) -> dict[str, Prices]:
    """The list price of each model whose costs the table computed: the very price behind its costs
    (--prices included), so the policy's estimates and the recorded costs agree."""
    return {model: Prices(input_per_mtok=price.input_per_mtok if table.bills_prompt else 0.0,
                          output_per_mtok=price.output_per_mtok)
            for model, price in table.list_prices.items() if model in {info.model for info in table.arms}}


def zero_shot_windows(n_arms: int, weak: int, strong: int) -> list[tuple[float, float, list[float]]]:
    edges = np.round(np.arange(0.0, 1.0 + 1e-9, WINDOW), 6)
    windows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        d = (lo + hi) / 2
        priors = [0.5] * n_arms
        priors[weak], priors[strong] = 1 - d, 1 - RHO * d
        windows.append((float(lo), float(hi), priors))
    return windows


# --- the replay ------------------------------------------------------------------------------------


class StatsBook:
    """Per-(bucket, arm) aggregates kept with the stores' own update rule, as the snapshot decide() reads."""

    def __init__(self) -> None:
        self.fields: dict[tuple[str, str], dict[str, float]] = {}
        self.snapshot: dict = {}

    def record(self, bucket: str, arm_key: str, score: float, cost: float) -> None:
        delta = {"count": 1.0, "total": 1.0, "weight": 1.0, "successes": score, "cost_usd": cost, "spent_usd": cost}
        task = bucket.partition(":")[0]
        # the bucket, and the arm's record over its task's buckets and over all (the shared levels)
        for level in (bucket, f"{task}:{POOLED_TIER}", POOLED_BUCKET):
            fields = self.fields.setdefault((level, arm_key), {})
            apply_delta(fields, delta, 0.0, None)
            # A new dict rather than an edit, as a store's refresh hands decide() new stats objects
            # (decide keeps what it derived from them until they change).
            self.snapshot[level] = {**self.snapshot.get(level, {}), arm_key: arm_stats(fields, 0.0)}


@dataclass
class Run:
    rows: np.ndarray  # table rows in the order they were decided
    chosen: np.ndarray  # per row of the table: the arm column that answered (-1: every call failed)
    score: np.ndarray
    cost: np.ndarray
    tokens: np.ndarray
    buckets: list[str] = field(default_factory=list)  # per decided row, in decision order
    explored: int = 0
    failovers: int = 0

    def summary(self, rows: np.ndarray | None = None) -> dict:
        rows = self.rows if rows is None else rows
        return {"accuracy": float(self.score[rows].mean()), "cost_usd": float(self.cost[rows].mean()),
                "output_tokens": float(self.tokens[rows].mean())}


@dataclass(frozen=True, slots=True)
class Row:
    """What the gateway knows of a request before deciding: the classifier's view, and the task label
    a client may send in x-ponder-task (here: the table's group, for `[group buckets]`)."""

    classification: Classification
    label: str | None = None

    @property
    def bucket(self) -> str:
        """decide()'s bucket for this row (the label, allowed by build_policy's policies, replaces the task)."""
        return bucket_key(self.label or self.classification.task, self.classification.difficulty)


def task_label(group: str) -> str:
    """A table group as an x-ponder-task label: lowercase, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", group.lower()).strip("-._")[:64] or "group"


def task_labels(groups: Sequence[str]) -> dict[str, str]:
    """Each distinct group's label, unique: groups that clean to the same label ("C++" and "C#", or
    names in another script, which clean to nothing) get -2, -3, ... rather than sharing one bucket."""
    labels: dict[str, str] = {}
    for group in groups:
        if group and group not in labels:
            label, k = task_label(group), 2
            while label in labels.values():
                label, k = f"{task_label(group)[:60]}-{k}", k + 1
            labels[group] = label
    return labels


def classify_rows(table: OutcomeTable, scores: Scores, bucket_by: str) -> list[Row]:
    """The router's view of each row; `group` keys the learner on the table's own groups (e.g. the BBH
    task) the way a client would through the gateway: the group as its x-ponder-task label."""
    if bucket_by == "group":
        labels = task_labels(table.groups)
        return [Row(scores.classification(i), labels.get(table.groups[i])) for i in range(len(table))]
    return [Row(scores.classification(i)) for i in range(len(table))]


def replay(table: OutcomeTable, classes: list, policy: Policy | CompiledPolicy, rows: np.ndarray,
           book: StatsBook | None, rng: random.Random | None, run: Run | None = None,
           progress: Progress | None = None) -> Run:
    """Decide and answer `rows` in order; learn after each answer when a book is given."""
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    column = {key: j for j, key in enumerate(_arm_keys(table, compiled))}
    n = len(table)
    if run is None:
        run = Run(np.array([], dtype=int), np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n))
    empty: dict = {}
    for count, i in enumerate(rows):
        row = classes[i]
        hints = RequestHints(prompt_tokens=int(table.prompt_tokens[i]), task=row.label)
        decision = decide(row.classification, compiled, book.snapshot if book else empty, request=hints, rng=rng)
        run.explored += decision.explore
        for attempt, arm in enumerate((decision.arm, *decision.fallbacks)):
            j = column[arm.key]
            if np.isfinite(table.scores[i, j]):
                run.failovers += attempt > 0
                run.chosen[i], run.score[i], run.cost[i] = j, table.scores[i, j], table.cost_usd[i, j]
                run.tokens[i] = table.output_tokens[i, j]
                if book is not None:
                    book.record(decision.bucket, arm.key, float(table.scores[i, j]), float(table.cost_usd[i, j]))
                break
        run.buckets.append(decision.bucket)
        if progress and count % 500 == 499:
            progress(500)
    if progress:
        progress(len(rows) % 500)
    run.rows = np.r_[run.rows, rows].astype(int)
    return run


def arrival_order(n: int, seed: int = ARRIVAL_SEED) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def warm_folds(n: int, folds: int = WARM_FOLDS, seed: int = ARRIVAL_SEED) -> np.ndarray:
    return np.random.default_rng(seed + 1).permutation(n) % folds


def run_cold(table, classes, policy, seed: int = ARRIVAL_SEED, progress: Progress | None = None) -> Run:
    return replay(table, classes, policy, arrival_order(len(table), seed), StatsBook(), random.Random(seed),
                  progress=progress)


def run_warm(table, classes, policy, seed: int = ARRIVAL_SEED, progress: Progress | None = None,
             recorded: bool = False, explore: bool = True) -> Run:
    """Each fold is answered by a learner warmed up on the other folds, then still learning online.

    Online warm-up (default): the learner decided the other folds itself, with bandit feedback.
    Recorded warm-up: the other folds' recorded outcomes of every arm are loaded into the aggregates,
    as an operator would seed them from an offline benchmark of past traffic (RouteLLM-style training
    on one part of the table, testing on the rest)."""
    order, fold_of = arrival_order(len(table), seed), warm_folds(len(table), seed=seed)
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    keys = _arm_keys(table, compiled)
    run = None
    measured = []
    for fold in range(WARM_FOLDS):
        book, rng = StatsBook(), random.Random(seed + 100 + fold)
        others = order[fold_of[order] != fold]
        if recorded:
            for i in others:
                for j in np.flatnonzero(np.isfinite(table.scores[i])):
                    book.record(classes[i].bucket, keys[j], float(table.scores[i, j]), float(table.cost_usd[i, j]))
        else:
            replay(table, classes, compiled, others, book, rng, progress=progress)
        held = order[fold_of[order] == fold]
        run = replay(table, classes, compiled, held, book, rng if explore else None, run, progress=progress)
        measured.append(held)
    run.rows = np.concatenate(measured)
    return run


# --- baselines ---------------------------------------------------------------------------------------


def arm_summary(table: OutcomeTable) -> list[dict]:
    rows = []
    for j, info in enumerate(table.arms):
        have = np.isfinite(table.scores[:, j])
        if not have.any():  # no record here (e.g. a sparse arm outside a --limit sample): nothing to average
            rows.append({"arm": info.name, "model": info.model, "accuracy": None, "cost_usd": None,
                         "output_tokens": None, "coverage": 0.0, "price": table.price_origins.get(info.model, "")})
            continue
        rows.append({"arm": info.name, "model": info.model, "accuracy": float(np.nanmean(table.scores[:, j])),
                     "cost_usd": float(np.nanmean(table.cost_usd[:, j])) if np.isfinite(table.cost_usd[have, j]).all()
                     else None, "output_tokens": float(np.nanmean(table.output_tokens[:, j])),
                     "coverage": float(have.mean()), "price": table.price_origins.get(info.model, "")})
    return rows


FULL_COVERAGE = 0.99  # an arm recorded on this share of the prompts can stand for the whole table


def covering(table: OutcomeTable) -> np.ndarray:
    """Which arms may be a reference (always-strongest, the pair): those recorded on nearly every prompt,
    if any. An arm of a second file's 3 rows, right on all 3, is no reference for a 300-prompt table."""
    full = np.isfinite(table.scores).mean(axis=0) >= FULL_COVERAGE
    return full if full.any() else np.ones(len(table.arms), dtype=bool)


def pick_pair(table: OutcomeTable, strong: str | None = None, weak: str | None = None) -> tuple[int, int]:
    """(weak, strong) columns: as given, else the table's own, else the most accurate arm and the most
    accurate arm costing at most a fifth of it (the cheapest arm if none does), among the arms recorded
    on nearly every prompt."""
    names = table.arm_names
    with warnings.catch_warnings():  # an arm with no price has an all-NaN cost column: NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        acc = np.nanmean(table.scores, axis=0)
        cost = np.nanmean(table.cost_usd, axis=0)
    full = covering(table)
    if strong or table.strong:
        s = names.index(strong or table.strong)
    else:  # the most accurate arm, other than a weak arm named on its own
        s = int(np.argmax(np.where((np.array(names) == weak) | ~full, -np.inf, acc)))
    if weak or table.weak:
        return names.index(weak or table.weak), s
    cheap = [j for j in range(len(names)) if j != s and cost[j] <= cost[s] / 5 and full[j]]
    w = max(cheap, key=lambda j: acc[j]) if cheap else int(np.argmin(np.where(np.arange(len(names)) == s, np.inf, cost)))
    return w, s


def oracle(table: OutcomeTable) -> dict:
    """Per prompt the best recorded score, at the lowest cost among the arms reaching it."""
    scores = np.where(np.isfinite(table.scores), table.scores, -1.0)
    cost = np.where(np.isfinite(table.cost_usd), table.cost_usd, np.inf)
    best = scores.max(axis=1, keepdims=True)
    pick = np.argmin(np.where(scores >= best - 1e-12, cost, np.inf), axis=1)
    rows = np.arange(len(table))
    return {"accuracy": float(np.clip(best[:, 0], 0, 1).mean()), "cost_usd": float(cost[rows, pick].mean()),
            "output_tokens": float(table.output_tokens[rows, pick].mean())}


def pair_curves(table: OutcomeTable, weak: int, strong: int, difficulty: np.ndarray, seed: int = ARRIVAL_SEED) -> dict:
    """RouteLLM metrics and cost curves of the score routers on the weak/strong pair (rows with both records)."""
    rows = np.flatnonzero(np.isfinite(table.scores[:, [weak, strong]]).all(axis=1))
    w, s = table.scores[rows, weak], table.scores[rows, strong]
    cw, cs = table.cost_usd[rows, weak], table.cost_usd[rows, strong]
    routers = {
        "difficulty": difficulty[rows],
        "prompt length": np.array([len(table.prompts[i]) for i in rows], dtype=float),
        "random": np.zeros(len(rows)),  # all tied: the exact expectation over random orders
        # the gain, cheaper strong calls first among equal gains (an unpriced arm's NaN cost must not
        # make every score NaN: NaN scores sort as distinct, in table order, a worse-than-random oracle)
        "oracle": s - w - 1e-9 * np.nan_to_num(cs - cw),
    }
    if not len(rows):  # the two arms never answered the same prompt: nothing to compare
        return {"rows": 0, "weak_accuracy": None, "strong_accuracy": None, "routers": {}}
    out = {"rows": int(len(rows)), "weak_accuracy": float(w.mean()), "strong_accuracy": float(s.mean()),
           "routers": {}}
    for name, score in routers.items():
        share, quality = threshold_curve(score, w, s)
        _, cost = threshold_curve(score, cw, cs)
        metrics = routellm_metrics(share, quality, float(w.mean()), float(s.mean()))
        step = max(1, len(share) // 200)  # keep ~200 points for the plots and the JSON
        out["routers"][name] = {**metrics, "share": share[::step].tolist(), "accuracy": quality[::step].tolist(),
                                "cost_usd": cost[::step].tolist()}
    return out


def random_at_matched_cost(singles: list[dict], cost: float) -> float | None:
    priced = [a for a in singles if a["cost_usd"] is not None]
    if not priced:
        return None
    return random_mix_accuracy(cost, np.array([a["cost_usd"] for a in priced]), np.array([a["accuracy"] for a in priced]))


def by_tier(difficulty: np.ndarray, outcomes: dict[str, np.ndarray]) -> dict:
    """Accuracy per difficulty tier of the leak-free difficulty, for each method's per-row scores."""
    tiers = np.array([difficulty_tier(d) for d in difficulty])
    table = {}
    for name, _ in DIFFICULTY_TIERS:
        rows = tiers == name
        table[name] = {"n": int(rows.sum()), **{m: (float(v[rows].mean()) if rows.any() else None)
                                                for m, v in outcomes.items()}}
    return table


def regret_curve(table: OutcomeTable, run: Run, cost_weight: float, points: int = 200) -> dict:
    """Cumulative utility of a learner's stream vs the best fixed arm per bucket in hindsight.

    Utility = score - lambda x cost (the policy objective without latency). The hindsight arm of a bucket
    is the one whose summed recorded utility over that bucket's requests is highest (a missing record
    counts as a free failed call)."""
    rows = run.rows
    utility = run.score[rows] - cost_weight * run.cost[rows]
    per_arm = np.nan_to_num(table.scores[rows]) - cost_weight * np.nan_to_num(table.cost_usd[rows])
    buckets = np.array(run.buckets)
    best = np.zeros(len(rows))
    choice = {}
    for bucket in np.unique(buckets):
        inside = buckets == bucket
        j = int(np.argmax(per_arm[inside].sum(axis=0)))
        best[inside] = per_arm[inside, j]
        choice[str(bucket)] = table.arm_names[j]
    learner, hindsight = np.cumsum(utility), np.cumsum(best)
    step = max(1, len(rows) // points)
    at = np.r_[np.arange(step - 1, len(rows), step), len(rows) - 1]
    return {"cost_weight": cost_weight, "requests": (at + 1).tolist(), "learner_utility": learner[at].tolist(),
            "hindsight_utility": hindsight[at].tolist(), "hindsight_arms": choice,
            "final_ratio": float(learner[-1] / hindsight[-1]) if hindsight[-1] else None}


def group_hindsight(table: OutcomeTable, lambdas: Sequence[float], unit: float) -> list[dict]:
    """Not a router: per group (BBH task, MMLU-Pro category), the arm with the best utility on the whole
    table in hindsight (in-sample, every arm's outcome known), at each k of the sweep. What any learner
    keyed on the group could at best reach at those k values: it separates what the learner loses to
    noise from what the sweep's k values cannot express (a target between two of them)."""
    groups = np.array([g or "" for g in table.groups])
    scores, cost = np.nan_to_num(table.scores), np.nan_to_num(table.cost_usd)
    rows = np.arange(len(table))
    members = [groups == g for g in np.unique(groups)]
    points = []
    for k in lambdas:
        pick = np.zeros(len(table), dtype=int)
        for inside in members:
            pick[inside] = int(np.argmax(scores[inside].mean(axis=0) - k / unit * cost[inside].mean(axis=0)))
        points.append({"k": k, "lambda": k / unit, "accuracy": float(scores[rows, pick].mean()),
                       "cost_usd": float(cost[rows, pick].mean()),
                       "output_tokens": float(np.nan_to_num(table.output_tokens[rows, pick]).mean())})
    return points


# --- one table, every method -------------------------------------------------------------------------


def operating_points(points: list[dict], strongest: dict) -> dict:
    """Where a lambda sweep meets the targets, relative to the most accurate single arm."""
    acc, cost, tokens = strongest["accuracy"], strongest["cost_usd"], strongest["output_tokens"]

    def ratios(p: dict | None) -> dict | None:
        if p is None:
            return None
        return {"k": p["k"], "accuracy": p["accuracy"], "cost_ratio": p["cost_usd"] / cost if cost else None,
                "tokens_ratio": p["output_tokens"] / tokens if tokens else None}

    def cheapest(ok: Callable[[dict], bool]) -> dict | None:
        found = [p for p in points if ok(p)]
        return min(found, key=lambda p: p["cost_usd"]) if found else None

    affordable = [p for p in points if p["cost_usd"] <= cost * (1 + 1e-9)]
    best = max(affordable, key=lambda p: p["accuracy"]) if affordable else None
    return {"within_1pt": ratios(cheapest(lambda p: p["accuracy"] >= acc - 0.01 - 1e-12)),
            "at_least_strongest": ratios(cheapest(lambda p: p["accuracy"] >= acc - 1e-12)),
            "best_at_equal_cost": ratios(best)}


def evaluate(table: OutcomeTable, scores: Scores, *, bucket_modes: Sequence[str] = ("classifier",),
             lambdas: Sequence[float] = LAMBDA_STEPS, strong: str | None = None, weak: str | None = None,
             seed: int = ARRIVAL_SEED, progress: Progress | None = None) -> dict:
    """Every method and baseline on one table; the dict report.py writes out."""
    singles = arm_summary(table)
    w, s = pick_pair(table, strong, weak)
    priced = table.has_costs
    full = covering(table)  # the references (always-cheapest, always-strongest) answer nearly every prompt
    cheapest = min(np.flatnonzero(full), key=lambda j: singles[j]["cost_usd"] if priced else j)
    top = int(np.argmax([a["accuracy"] if full[j] and a["accuracy"] is not None else -np.inf
                         for j, a in enumerate(singles)]))
    result: dict = {
        "table": {"name": table.name, "description": table.description, "prompts": len(table),
                  "arms": len(table.arms), "weak": table.arm_names[w], "strong": table.arm_names[s],
                  "cheapest": table.arm_names[cheapest], "strongest": table.arm_names[top]},
        "classification": scores.how, "arrival_order": f"seeded shuffle (seed {seed})",
        "arms": singles, "oracle": oracle(table) if priced else None, "methods": {},
        "pair": pair_curves(table, w, s, scores.difficulty, seed),
    }
    strongest = singles[top]
    if not priced:
        result["note"] = "no prices for some arms: only the call-share metrics (CPT/APGR) are computed"
        return result
    unit = strongest["cost_usd"] or 1.0
    headline_runs: dict[str, dict[float, Run]] = {}
    for mode in bucket_modes:
        classes = classify_rows(table, scores, mode)
        suffix = "" if mode == "classifier" else " [group buckets]"
        runners = (("warm (recorded)", lambda *a: run_warm(*a, recorded=True)),
                   ("warm (recorded, no exploration)", lambda *a: run_warm(*a, recorded=True, explore=False)),
                   ("warm", run_warm), ("cold", run_cold))
        for kind, runner in runners:
            name, points = f"ponder {kind}{suffix}", []
            for k in lambdas:
                run = runner(table, classes, build_policy(table, k / unit), seed, progress)
                points.append({"k": k, "lambda": k / unit, **run.summary(), "explored": run.explored,
                               "failovers": run.failovers, "strong_share": float((run.chosen == s).mean())})
                headline_runs.setdefault(name, {})[k] = run
            result["methods"][name] = {"points": points, **operating_points(points, strongest)}
    pair_table = table.select_arms([table.arm_names[w], table.arm_names[s]])
    zero = build_policy(pair_table, 1.0, zero_shot_windows(2, 0, 1), explore=0.0)
    classes = classify_rows(pair_table, scores, "classifier")
    points = []
    for k in lambdas:
        policy = zero.model_copy(update={"objective": Objective(cost_weight=k / unit, latency_weight=0.0)})
        run = replay(pair_table, classes, policy, np.arange(len(table)), None, None, progress=progress)
        points.append({"k": k, "lambda": k / unit, **run.summary(), "strong_share": float((run.chosen == 1).mean())})
    result["methods"]["difficulty router"] = {"points": points, **operating_points(points, strongest)}
    if any(table.groups):
        ceiling = group_hindsight(table, lambdas, unit)
        result["group_hindsight"] = {"points": ceiling, **operating_points(ceiling, strongest)}

    # The operating point shown in the tier table and the regret curve: the cheapest point of the
    # recorded warm-up within one point of the strongest arm, else its most accurate one; the first
    # bucket mode's (with group buckets only, the methods are all named `... [group buckets]`).
    suffix = "" if bucket_modes[0] == "classifier" else " [group buckets]"
    headline, cold = HEADLINE + suffix, "ponder cold" + suffix
    warm = result["methods"][headline]
    pick = warm["within_1pt"] or max(warm["points"], key=lambda p: p["accuracy"])
    k = pick["k"]
    result["headline"], result["headline_k"] = headline, k
    outcomes = {"cheapest": np.nan_to_num(table.scores[:, cheapest]),
                "strongest": np.nan_to_num(table.scores[:, top]),
                headline: headline_runs[headline][k].score, cold: headline_runs[cold][k].score,
                "oracle": np.clip(np.nan_to_num(table.scores, nan=0.0).max(axis=1), 0, 1)}
    result["by_tier"] = by_tier(scores.difficulty, outcomes)
    result["regret"] = regret_curve(table, headline_runs[cold][k], k / unit)
    result["random_matched"] = [{"cost_usd": p["cost_usd"], "accuracy": random_at_matched_cost(singles, p["cost_usd"])}
                                for p in warm["points"]]
    return result
