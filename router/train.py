"""`ponder train`: fit the task-type and difficulty classifier, convert it to ONNX, measure it, ship it.

Pipeline (scikit-learn, then skl2onnx):
  router.features hashed counts -> ColumnTransformer(TF-IDF words | TF-IDF chars | scaled handcrafted)
    -> LogisticRegression (6 task types)          -> output "task_probs"
    -> Ridge, one output per task type (logit P(wrong) for that type)
    -> difficulty = sum_k task_probs[k] * sigmoid(expert_k)                      -> output "difficulty"
Both heads share one preprocessing graph in one .onnx file, so the runtime makes one session call.

Evaluation is kept honest: the held-out split is by problem id (all prompts made from one problem,
conversation or instruction stay on one side), test items that are near-duplicates of a training item
are dropped, and a leave-one-source-out run measures prompts unlike anything trained on.
The labelled set and the difficulty target are built in router/train_data.py, the ONNX graph in
router/train_onnx.py, the metrics in router/train_metrics.py; see docs/classifier.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from router import features as F
from router import handcrafted as H
from router import messages as P
from router.train_data import DIFFICULTY_NOTES, SOURCE_FAMILY, SHORT_SOURCE, SYNTHETIC_SOURCE, SYNTHETIC_SOURCES, Example, data_hashes, default_datasets_dir, family, load_examples, load_extras
from router.train_metrics import GRADED_SOURCES, difficulty_metrics, metrics_table, multi_turn_metrics, natural_prompt_metrics, task_metrics
from router.train_onnx import onnx_predict, reference_onnx, to_onnx
from router.types import TASK_TYPES

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
ONNX_NAME = "classifier.onnx"
CARD_NAME = "classifier.json"
DATASETS_FLAG = "`ponder train --datasets`"  # named when the datasets folder is missing
TEST_PERCENT = 20  # share of problem ids held out
SOURCE_CAP = 3000  # per-source weight cap, so MATH and GSM8K (21k prompts) do not drown the rest
TASK_C = 10.0
EXPERT_ALPHA = 3.0
EXPERT_MIN_WEIGHT = 0.02  # a difficulty-only prompt joins the experts of types with P(type) >= this
HANDCRAFTED_WEIGHT = 0.2
MAX_ITER = 200
SYNTHETIC_WEIGHT = 4.0
SHORT_WEIGHT = 2.0  # the short synthetic requests (1,000 against 64,000 dataset prompts)
LOSO_CAP = 1500  # prompts per source in each leave-one-source-out refit
SPLIT_SALT = "ponder-split-v1"  # fixed: the held-out set must not move when the seed changes
# Handcrafted numbers the task head does not read (its weights there are zero; the difficulty experts
# keep them). The turn counts: chat is the only class whose training prompts come with long
# histories, so a task head that reads them turns any request in a long conversation into chat.
TASK_HEAD_EXCLUDED = ("log_user_turns", "log_assistant_turns")


@dataclass
class Models:
    pre: ColumnTransformer
    task: LogisticRegression
    experts: Ridge  # one output per task type: logit of P(wrong) for prompts of that type

    def predict(self, X: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn predictions: (task probabilities (n, 6) in TASK_TYPES order, difficulty (n,))."""
        Z = self.pre.transform(X)
        probs = self.task.predict_proba(Z)
        return probs, mix_difficulty(probs, self.experts.predict(Z))


def mix_difficulty(task_probs: np.ndarray, expert_logits: np.ndarray) -> np.ndarray:
    """P(wrong) = sum over task types of P(type) * P(wrong | type): each type has its own expert,
    because what makes a math problem hard (level, steps) is not what makes trivia hard."""
    return (task_probs * (1.0 / (1.0 + np.exp(-expert_logits)))).sum(axis=1)


# --- split ---------------------------------------------------------------------------------------


def is_test_group(group: str) -> bool:
    if group.split(":", 1)[0] in SYNTHETIC_SOURCES:
        return False
    digest = hashlib.sha256(f"{SPLIT_SALT}:{group}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


def _last_user_text(ex: Example) -> str:
    for m in reversed(ex.messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def _shingles(text: str) -> set[int]:
    tokens = re.findall(r"\w+", text.lower())
    if len(tokens) < 5:
        return {hash(" ".join(tokens))}
    return {hash(" ".join(tokens[i : i + 5])) for i in range(len(tokens) - 4)}


def near_duplicates(train: Sequence[Example], test: Sequence[Example], threshold: float = 0.5) -> list[bool]:
    """For each test example: does one training prompt contain >= threshold of its word 5-grams?

    5-grams found in more than 20 training prompts are template text (BBH, MC headers) and are not
    evidence of duplication, so they are left out of both the overlap and the denominator.
    """
    train_sets = [_shingles(_last_user_text(ex)) for ex in train]
    df: Counter[int] = Counter(s for shingles in train_sets for s in shingles)
    postings: dict[int, list[int]] = defaultdict(list)
    for i, shingles in enumerate(train_sets):
        for s in shingles:
            if df[s] <= 20:
                postings[s].append(i)
    train_texts = {" ".join(_last_user_text(ex).lower().split()) for ex in train}
    flags = []
    for ex in test:
        text = _last_user_text(ex)
        if " ".join(text.lower().split()) in train_texts:
            flags.append(True)
            continue
        informative = [s for s in _shingles(text) if df.get(s, 0) <= 20]
        hits: Counter[int] = Counter(i for s in informative for i in postings.get(s, ()))
        best = max(hits.values()) if hits else 0
        flags.append(bool(informative) and best / len(informative) >= threshold)
    return flags


def split(examples: Sequence[Example]) -> tuple[list[Example], list[Example], Counter[str]]:
    """(train, test, near-duplicates dropped from test per source)."""
    train = [ex for ex in examples if not is_test_group(ex.group)]
    test = [ex for ex in examples if is_test_group(ex.group)]
    flags = near_duplicates(train, test)
    dropped = Counter(ex.source for ex, f in zip(test, flags) if f)
    return train, [ex for ex, f in zip(test, flags) if not f], dropped


# --- features and fitting ------------------------------------------------------------------------


def feature_matrix(examples: Sequence[Example], progress: Callable[[int], None] | None = None) -> sp.csr_matrix:
    """The scikit-learn training matrix: exactly router.features' vectors (featurize()), stored sparse."""
    blocks = []
    for start in range(0, len(examples), 512):
        chunk = examples[start : start + 512]
        sf = F.featurize_messages_sparse([ex.messages for ex in chunk])
        hashed = sp.csr_matrix((sf.tf, sf.indices, sf.bounds[::3]), shape=(len(chunk), F.N_HASHED))
        hand = sp.csr_matrix(sf.handcrafted)
        blocks.append(sp.hstack([hashed, hand], format="csr"))
        if progress:
            progress(len(chunk))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, F.N_FEATURES), dtype=np.float32)


def make_preprocessor() -> ColumnTransformer:
    return ColumnTransformer(
        [
            ("words", TfidfTransformer(), slice(0, F.N_WORD)),
            ("system", TfidfTransformer(), slice(F.SYSTEM_OFFSET, F.CHAR_OFFSET)),
            ("chars", TfidfTransformer(), slice(F.CHAR_OFFSET, F.N_HASHED)),
            ("handcrafted", StandardScaler(with_mean=False), slice(F.N_HASHED, F.N_FEATURES)),
        ],
        # Each TF-IDF block has unit norm; 24 standardised numbers at full scale would dominate the
        # row and make lbfgs crawl (300+ iterations). At 0.2 it converges in ~100, same accuracy.
        transformer_weights={"handcrafted": HANDCRAFTED_WEIGHT},
    )


def _source_weights(examples: Sequence[Example]) -> np.ndarray:
    counts = Counter(ex.source for ex in examples)
    # The synthetic system-prompt examples are few but the only ones whose label depends on the
    # system prompt alone; upweighted so that signal is not regularised away.
    boost = {SYNTHETIC_SOURCE: SYNTHETIC_WEIGHT, SHORT_SOURCE: SHORT_WEIGHT}
    return np.array([min(1.0, SOURCE_CAP / counts[ex.source]) * boost.get(ex.source, 1.0) for ex in examples])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def fit(examples: Sequence[Example], X: sp.csr_matrix, seed: int = 0, with_experts: bool = True) -> Models:
    with warnings.catch_warnings():  # lbfgs stopping at MAX_ITER is expected and measured, not news
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _fit(examples, X, seed, with_experts)


def _fit(examples: Sequence[Example], X: sp.csr_matrix, seed: int, with_experts: bool) -> Models:
    pre = make_preprocessor().fit(X)
    Z = pre.transform(X).tocsr()

    # Task head: sources capped, then classes balanced by weight (writing has ~300 prompts, math 20k).
    rows = [i for i, ex in enumerate(examples) if ex.task is not None]
    y = np.array([TASK_TYPES.index(examples[i].task) for i in rows])
    if len(set(y)) != len(TASK_TYPES):
        missing = sorted(set(TASK_TYPES) - {TASK_TYPES[k] for k in set(y)})
        raise ValueError(f"no training prompts for task types {missing}")
    w = _source_weights([examples[i] for i in rows])
    class_total = np.bincount(y, weights=w, minlength=len(TASK_TYPES))
    w = w * (w.sum() / (len(TASK_TYPES) * class_total[y]))
    excluded = [F.N_HASHED + H.HANDCRAFTED.index(name) for name in TASK_HEAD_EXCLUDED]
    keep = np.ones(Z.shape[1])
    keep[excluded] = 0.0
    task = LogisticRegression(C=TASK_C, max_iter=MAX_ITER, random_state=seed)
    task.fit(Z[rows] @ sp.diags(keep), y, sample_weight=w / w.mean())
    task.coef_[:, excluded] = 0.0  # already zero (all-zero columns); said outright for the ONNX graph

    # Difficulty experts: one ridge regression per task type on the logit of the target, fitted on
    # that type's prompts. Difficulty-only prompts (MMLU-Pro physics, chemistry, engineering, CS and
    # textbook items) have no type label; they join every expert weighted by the task head's
    # P(type | prompt), the same weights the mixture gives them at inference (a hard assignment to
    # the knowledge expert, used before, scored 0.422 vs 0.434 MMLU-Pro Spearman on a validation
    # split of the training set). Stacked as one multi-output Ridge so ONNX has one node.
    graded = [i for i, ex in enumerate(examples) if ex.difficulty is not None] if with_experts else []
    unlabelled = [i for i in graded if examples[i].task is None]
    soft = dict(zip(unlabelled, task.predict_proba(Z[unlabelled]))) if unlabelled else {}
    coefs, intercepts = [], []
    for k, name in enumerate(TASK_TYPES):
        rows, weights = [], []
        for i in graded:
            weight = soft[i][k] if i in soft else float(examples[i].task == name)
            if weight >= EXPERT_MIN_WEIGHT:
                rows.append(i)
                weights.append(weight)
        expert = Ridge(alpha=EXPERT_ALPHA, solver="sparse_cg", random_state=seed)
        if rows:
            expert.fit(Z[rows], _logit(np.array([examples[i].difficulty for i in rows])), sample_weight=np.array(weights))
            coefs.append(expert.coef_.astype(np.float64))
            intercepts.append(float(expert.intercept_))
        else:  # no graded prompt of this type (possible with --extra only data): neutral 0.5
            coefs.append(np.zeros(Z.shape[1]))
            intercepts.append(0.0)
    experts = Ridge(alpha=EXPERT_ALPHA)
    experts.coef_, experts.intercept_ = np.vstack(coefs), np.array(intercepts)
    experts.n_features_in_ = Z.shape[1]
    return Models(pre, task, experts)


# --- checks that refit or need the scikit-learn models ------------------------------------------


def agreement(models: Models, model_bytes: bytes, examples: Sequence[Example]) -> dict[str, float]:
    """Max absolute difference between scikit-learn and onnxruntime on the same prompts: the shipped
    sparse graph through the runtime's feature path, and skl2onnx's own dense conversion."""
    if not examples:
        return {"rows": 0, "task_probs_max_abs_diff": 0.0, "difficulty_max_abs_diff": 0.0, "task_argmax_agreement": 1.0}
    import onnxruntime as ort

    X = feature_matrix(examples)
    task_sk, diff_sk = models.predict(X)
    task_ox, diff_ox = onnx_predict(model_bytes, examples)
    reference = ort.InferenceSession(reference_onnx(models).SerializeToString(), providers=["CPUExecutionProvider"])
    task_ref, diff_ref = reference.run(["task_probs", "difficulty"], {"features": X.toarray().astype(np.float32)})
    return {
        "rows": len(examples),
        "task_probs_max_abs_diff": float(np.abs(task_sk - task_ox).max()),
        "difficulty_max_abs_diff": float(np.abs(diff_sk - diff_ox).max()),
        "task_argmax_agreement": float((task_sk.argmax(1) == task_ox.argmax(1)).mean()),
        "skl2onnx_reference_max_abs_diff": float(max(np.abs(task_sk - task_ref).max(), np.abs(diff_sk - diff_ref).max())),
    }


def leave_one_source_out(
    train: Sequence[Example], everything: Sequence[Example], X_all: sp.csr_matrix, seed: int, bar: Any = None
) -> dict[str, Any]:
    """Train without one source, test on all of it (both splits: none of it was seen).

    To keep 14 refits affordable each is trained on at most LOSO_CAP prompts per remaining source
    (seeded sample), and difficulty experts are refitted only when the left-out source is graded.
    """
    index = {id(ex): i for i, ex in enumerate(everything)}
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[Example]] = defaultdict(list)
    for ex in train:
        by_source[ex.source].append(ex)
    capped = []
    for source in sorted(by_source):
        items = by_source[source]
        keep = rng.permutation(len(items))[:LOSO_CAP]
        capped += [items[i] for i in sorted(keep)]
    real = [ex for ex in everything if ex.source != "extra" and ex.source not in SYNTHETIC_SOURCES]
    label_sources = defaultdict(set)
    for ex in real:
        if ex.task is not None:
            label_sources[ex.task].add(family(ex.source))
    # One fold per dataset; a source derived from another (SOURCE_FAMILY) is left out with it and
    # is not a fold of its own (the fold is scored on the original dataset's prompts only).
    sources = sorted({ex.source for ex in everything if ex.task is not None and ex.source != "extra" and ex.source not in SYNTHETIC_SOURCES} - set(SOURCE_FAMILY))
    pooled_true, pooled_pred, per_source, graded = [], [], {}, {}
    for source in sources:
        kept = [ex for ex in capped if family(ex.source) != source]
        held = [ex for ex in everything if ex.source == source]
        models = fit(kept, X_all[[index[id(ex)] for ex in kept]], seed, with_experts=source in GRADED_SOURCES)
        probs, diff = models.predict(X_all[[index[id(ex)] for ex in held]])
        labelled = [(ex.task, TASK_TYPES[p]) for ex, p in zip(held, probs.argmax(1)) if ex.task is not None]
        only_source = all(label_sources[t] == {source} for t, _ in labelled)
        per_source[source] = {
            "n": len(labelled),
            "accuracy": round(float(np.mean([t == p for t, p in labelled])), 4),
            "predicted": dict(Counter(p for _, p in labelled).most_common()),
            "label_has_other_sources": not only_source,
        }
        if not only_source:
            pooled_true += [t for t, _ in labelled]
            pooled_pred += [p for _, p in labelled]
        if source in GRADED_SOURCES:
            d = difficulty_metrics(held, diff)
            graded[source] = {k: v for k, v in d.items() if k.startswith(("spearman_", "auc_")) and v is not None and k != "spearman_vs_target"}
        if bar:
            bar.update(1)
    return {
        "macro_f1_pooled": round(float(f1_score(pooled_true, pooled_pred, labels=list(TASK_TYPES), average="macro", zero_division=0)), 4),
        "training_cap_per_source": LOSO_CAP,
        "note": "pooled over left-out sources whose label has another dataset to learn from; topical_chat "
        "is the only chat dataset (only the synthetic system-prompt chat rows remain), so it is reported but not pooled",
        "by_source": per_source,
        "difficulty": graded,
    }


# --- validation (for choosing settings without touching the held-out set) ------------------------

VALIDATION_SALT = "dev-val"


def validate(seed: int = 0, datasets: str | Path | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Fit on the training split minus 20% of its problem ids, score those ids (salt `dev-val`).
    `extra` rows (--extra) join the datasets' as in train().

    The held-out split is for reporting; settings (features, expert fitting) are compared here.
    """
    mine = load_extras(extra)  # a bad row is said before the datasets load
    examples = load_examples(default_datasets_dir(datasets), seed, flag=DATASETS_FLAG) + mine
    train_set = [ex for ex in examples if not is_test_group(ex.group)]

    def held(ex: Example) -> bool:
        digest = hashlib.sha256(f"{VALIDATION_SALT}:{ex.group}".encode()).digest()
        return ex.source not in SYNTHETIC_SOURCES and int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT

    fit_set = [ex for ex in train_set if not held(ex)]
    val_set = [ex for ex in train_set if held(ex)]
    models = fit(fit_set, feature_matrix(fit_set), seed)
    X_val = feature_matrix(val_set)
    probs, diff = models.predict(X_val)
    return {"ngrams_per_prompt": X_val.nnz / max(X_val.shape[0], 1), "task": task_metrics(val_set, probs), "difficulty": difficulty_metrics(val_set, diff)}


# --- the whole run -------------------------------------------------------------------------------


def train(
    out_dir: Path = ARTIFACT_DIR,
    seed: int = 0,
    datasets: str | Path | None = None,
    extra: Sequence[str] = (),
    loso: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.time()
    root = default_datasets_dir(datasets)
    mine = load_extras(extra)  # a bad row is said before the datasets load
    examples = load_examples(root, seed, flag=DATASETS_FLAG) + mine
    train_set, test_set, dropped = split(examples)
    everything = train_set + test_set
    steps = len(everything) // 512 + 5 + (len({ex.source for ex in everything}) if loso else 0)
    bar = tqdm(total=steps, desc="ponder train", unit="step", disable=not progress)
    X_all = feature_matrix(everything, progress=lambda n: bar.update(1) if n else None)
    X_train = X_all[: len(train_set)]
    bar.set_postfix_str("fitting")
    models = fit(train_set, X_train, seed)
    bar.update(1)
    model_bytes = to_onnx(models).SerializeToString()
    bar.update(1)
    sample = np.random.default_rng(seed).permutation(len(test_set))[:2000]
    agree = agreement(models, model_bytes, [test_set[i] for i in sample])
    if max(agree["task_probs_max_abs_diff"], agree["difficulty_max_abs_diff"], agree["skl2onnx_reference_max_abs_diff"]) > 1e-4:
        raise RuntimeError(f"ONNX and scikit-learn disagree: {agree}")
    # Metrics are computed on the ONNX model's own outputs: what ships is what is measured.
    task_probs, difficulty = onnx_predict(model_bytes, test_set)
    bar.update(1)
    metrics = {"held_out": {"task": task_metrics(test_set, task_probs), "difficulty": difficulty_metrics(test_set, difficulty)},
               "natural_prompts": natural_prompt_metrics(model_bytes), "multi_turn": multi_turn_metrics(model_bytes)}
    if loso:
        bar.set_postfix_str("leave-one-source-out")
        metrics["leave_one_source_out"] = leave_one_source_out(train_set, everything, X_all, seed, bar)
    bar.close()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ONNX_NAME).write_bytes(model_bytes)
    card = {
        "name": "ponder-classifier",
        "feature_version": F.FEATURE_VERSION,
        "n_features": F.N_FEATURES,
        "handcrafted_features": list(H.HANDCRAFTED),
        "labels": list(TASK_TYPES),
        "onnx": ONNX_NAME,
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "inputs": {"indices": [None, "slots"], "weights": [None, 6, "slots"], "handcrafted": [None, F.N_HANDCRAFTED],
                   "built_by": "router.features.onnx_feeds(router.features.featurize_sparse(prompts))"},
        "features": {
            "word_hash_bits": F.WORD_BITS,
            "system_hash_bits": F.SYSTEM_BITS,
            "char_hash_bits": F.CHAR_BITS,
            "char_ngrams": list(F.CHAR_NGRAMS),
            "user_chars_kept": f"first {P.USER_HEAD_CHARS} + last {P.USER_TAIL_CHARS} of the last user turn",
            "system_chars_kept": P.SYSTEM_CHARS,
        },
        "outputs": {"task_probs": "task type probabilities, columns = labels", "difficulty": "P(cheap answer wrong)"},
        "seed": seed,
        "hyperparameters": {"task_C": TASK_C, "expert_alpha": EXPERT_ALPHA, "expert_min_weight": EXPERT_MIN_WEIGHT, "handcrafted_weight": HANDCRAFTED_WEIGHT, "max_iter": MAX_ITER, "source_cap": SOURCE_CAP, "synthetic_weight": SYNTHETIC_WEIGHT, "short_weight": SHORT_WEIGHT, "task_head_excluded": list(TASK_HEAD_EXCLUDED)},
        "training_data": {
            "datasets_sha256": data_hashes(root),
            "extra_files_sha256": {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in extra},
            "examples": dict(Counter(ex.source for ex in examples)),
            "train": len(train_set),
            "test": len(test_set),
            "test_near_duplicates_dropped": dict(dropped),
            "split": f"sha256('{SPLIT_SALT}:' + problem id) % 100 < {TEST_PERCENT} -> test",
        },
        "difficulty_target": DIFFICULTY_NOTES,
        "onnx_vs_sklearn": agree,
        "leave_one_source_out_ran": loso,
        "metrics": metrics,
        "train_seconds": round(time.time() - started, 1),
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return card


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ponder train",
        description="Train the task-type and difficulty classifier and write the ONNX artifact + JSON card.",
        epilog='Extra JSONL rows: {"prompt": "..."} or {"messages": [...]}, "task": one of '
        + ", ".join(TASK_TYPES)
        + ', optional "difficulty": P(cheap answer wrong) in [0, 1].',
    )
    parser.add_argument("--out", default=str(ARTIFACT_DIR), help="artifact directory (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], metavar="FILE.jsonl", help="your own labelled prompts (repeatable)")
    parser.add_argument("--datasets", default=None, help="datasets dir (default: $PONDER_DATASETS or ../shared/datasets)")
    parser.add_argument("--loso", action="store_true", help="also run the leave-one-source-out evaluation (14 refits, several minutes)")
    parser.add_argument("--validate", action="store_true", help="only fit and score the validation split of the training set (writes nothing)")
    args = parser.parse_args(argv)
    if args.validate and args.loso:
        parser.error("--loso is a run of train (it writes the artifact); --validate only scores the validation split")
    try:  # the user's files first: refused (exit 2, as argparse's refusals) before minutes of loading
        load_extras(args.extra)
    except (OSError, ValueError) as exc:
        print(f"ponder train: {exc}", file=sys.stderr)
        return 2
    try:
        if args.validate:  # with the --extra rows (they were ignored: the same scores, a malformed file passed)
            result = validate(args.seed, args.datasets, args.extra)
            d = result["difficulty"]
            print(json.dumps({"ngrams_per_prompt": round(result["ngrams_per_prompt"], 1), "macro_f1": result["task"]["macro_f1"],
                              **{k: d[k] for k in ("spearman_math_level", "spearman_mmlu_pro_failure_rate", "spearman_gsm8k_failure_share", "spearman_cruxeval_failure_rate")}}))
            return 0
        card = train(Path(args.out), args.seed, args.datasets, args.extra, loso=args.loso)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"ponder train: {exc}", file=sys.stderr)
        return 1
    print(metrics_table(card))
    print(f"\nwrote {Path(args.out) / ONNX_NAME} and {CARD_NAME} in {card['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
