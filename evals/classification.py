"""Leak-free classifier scores for an eval table: task probabilities and difficulty per prompt.

The shipped classifier (router/artifacts) was trained on the very outcome tables the suites replay
(MMLU-Pro's 29-model matrix, GSM8K's OpenAI solutions, BBH's direct answers), so its scores on those
prompts would leak the answers. Every score used by an eval therefore comes from a model fitted with
the classifier's own code (router.train_data.load_examples -> router.train.feature_matrix -> fit ->
Models.predict) on data that never saw the prompts being scored:

- ``source-out``: one fit without the suite's whole source (e.g. every MMLU-Pro prompt), and without
  any training prompt that is a near-duplicate of a table prompt (router.train.near_duplicates);
  for user tables, only the near-duplicates are dropped. Zero-shot: nothing learned on the table.
- ``cross-fit``: the table's rows are split into folds; fold f is scored by a fit that keeps the
  suite's other folds but drops every near-duplicate of fold f's prompts. In-distribution, still
  never scoring a prompt the model trained on.

A fit takes minutes on two cores, so scores are cached under $PONDER_CACHE (default
~/.cache/ponder/eval-scores), keyed by the prompts, the mode and the hash of the classifier's code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.types import TASK_TYPES, Classification

SUITE_SOURCES = {"mmlu-pro": "mmlu_pro", "mmlu-2": "mmlu_pro", "gsm8k-2": "gsm8k", "bbh-effort": "bbh"}


@dataclass
class Scores:
    task_probs: np.ndarray  # (n, len(TASK_TYPES))
    difficulty: np.ndarray  # (n,)
    how: str  # one sentence for the report: which model scored these prompts

    def classification(self, i: int) -> Classification:
        """The router's view of prompt i."""
        probs = self.task_probs[i]
        return Classification(task=TASK_TYPES[int(probs.argmax())],
                              task_probs={t: float(p) for t, p in zip(TASK_TYPES, probs)},
                              difficulty=float(self.difficulty[i]))

    @property
    def tasks(self) -> list[str]:
        return [TASK_TYPES[int(k)] for k in self.task_probs.argmax(axis=1)]


def cache_dir() -> Path:
    return Path(os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder")) / "eval-scores"


def _code_hash() -> str:
    """What decides the scores: the feature code (reading the prompt and hashing it), the labelled set,
    and the fitting code (not the rest of router/train.py, so edits to its CLI or metrics do not force
    minutes of refitting)."""
    import inspect

    from router import features, handcrafted, messages, short_requests, train, train_data, train_system_prompts

    # fit is a wrapper: the fitting itself is _fit with its weights, and predict mixes the experts
    fitting = (train.fit, train._fit, train._source_weights, train._logit, train.Models, train.mix_difficulty,
               train.make_preprocessor, train.feature_matrix, train.near_duplicates)
    digest = hashlib.sha256()
    for part in (*(inspect.getsource(module)
                   for module in (messages, features, handcrafted, train_data, train_system_prompts, short_requests)),
                 *(inspect.getsource(code) for code in fitting),
                 repr(sorted((k, v) for k, v in vars(train).items() if k.isupper() and isinstance(v, (int, float))))):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cache_key(prompts: Sequence[str], mode: str, source: str | None, folds: int, limit: str) -> str:
    digest = hashlib.sha256("\x00".join(prompts).encode())
    digest.update(f"{mode}|{source}|{folds}|{limit}|{_code_hash()}".encode())
    return digest.hexdigest()[:24]


def _as_examples(prompts: Sequence[str]):
    from router.train_data import Example

    return [Example("eval", f"eval:{i}", [{"role": "user", "content": p}], None, None) for i, p in enumerate(prompts)]


def _fit_and_score(training, held_prompts: Sequence[str], seed: int):
    """Fit the classifier's two heads on `training` minus near-duplicates of `held_prompts`; score them."""
    from router import train as T

    held = _as_examples(held_prompts)
    duplicate = T.near_duplicates(held, training)
    kept = [ex for ex, dup in zip(training, duplicate) if not dup]
    models = T.fit(kept, T.feature_matrix(kept), seed)
    task_probs, difficulty = models.predict(T.feature_matrix(held))
    return task_probs, difficulty, len(training) - len(kept)


def leak_free_scores(prompts: Sequence[str], *, source: str | None, mode: str = "source-out", folds: int = 2,
                     seed: int = 0, limit_per_source: int | None = None, sources: Sequence[str] | None = None,
                     use_cache: bool = True,
                     log: Callable[[str], None] = lambda _: None) -> Scores:
    """Scores for `prompts` from classifier fits that never saw them (see the module docstring).

    `source`: the router.train_data source the table comes from (None for a user table).
    `limit_per_source`, `sources`: subsample the training set (tests and quick looks; the report says so).
    """
    if mode not in ("source-out", "cross-fit"):
        raise ValueError(f"unknown leak-free mode `{mode}`; expected source-out or cross-fit")
    subset = f"{limit_per_source}" + (f":{','.join(sources)}" if sources else "")
    path = cache_dir() / f"{_cache_key(prompts, mode, source, folds, subset)}.npz"
    if use_cache and path.exists():
        saved = np.load(path, allow_pickle=False)
        return Scores(saved["task_probs"], saved["difficulty"], str(saved["how"]))

    from router.train_data import family, load_examples

    examples = load_examples(seed=seed, sources=list(sources) if sources else None)
    if limit_per_source is not None:  # an even subsample per source, deterministic
        by_source: dict[str, list] = {}
        for ex in examples:
            by_source.setdefault(ex.source, []).append(ex)
        examples = [ex for group in by_source.values() for ex in group[:: max(1, len(group) // limit_per_source)]]
    n = len(prompts)
    task_probs, difficulty = np.zeros((n, len(TASK_TYPES))), np.zeros(n)
    size = (f" (training subsampled to ~{limit_per_source} prompts per source)" if limit_per_source else
            f" (trained on the sources {', '.join(sources)} only)" if sources else "")
    if mode == "source-out":
        training = [ex for ex in examples if family(ex.source) != source]  # derived sources go with theirs
        left_out = f" without source `{source}`" if source else ""  # a user's table has no source to leave out
        log(f"fitting the classifier{left_out} on {len(training)} prompts (minutes)")
        task_probs[:], difficulty[:], dropped = _fit_and_score(training, prompts, seed)
        how = (f"classifier refitted with router.train.fit without the `{source}` source" if source else
               "classifier refitted with router.train.fit") + \
            f" and without {dropped} near-duplicates of the table's prompts: zero-shot, never trained on the table{size}"
    else:
        fold_of = np.array([int(hashlib.sha256(f"fold:{p}".encode()).hexdigest()[:8], 16) % folds for p in prompts])
        dropped = 0
        for fold in range(folds):
            rows = np.flatnonzero(fold_of == fold)
            if not len(rows):  # a small table's prompts may all hash to the other fold: nothing to score here
                continue
            log(f"cross-fit fold {fold + 1}/{folds}: fitting without {len(rows)} held prompts (minutes)")
            probs, diff, d = _fit_and_score(examples, [prompts[i] for i in rows], seed)
            task_probs[rows], difficulty[rows], dropped = probs, diff, dropped + d
        how = (f"classifier cross-fitted in {folds} folds with router.train.fit: each fold scored by a fit that "
               f"dropped its {dropped // folds} near-duplicate training prompts (the table's own rows of that "
               f"fold){size}")
    scores = Scores(task_probs, difficulty, how)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, task_probs=task_probs, difficulty=difficulty, how=np.array(how))
    return scores


def length_scores(prompts: Sequence[str]) -> Scores:
    """Not a classifier: log prompt length squashed to [0, 1], every prompt typed `reasoning`.
    Only for `--no-classifier` runs and tests of the plumbing; the report names it as such."""
    lengths = np.log1p(np.array([len(p) for p in prompts], dtype=float))
    span = lengths.max() - lengths.min() or 1.0
    probs = np.zeros((len(prompts), len(TASK_TYPES)))
    probs[:, TASK_TYPES.index("reasoning")] = 1.0
    return Scores(probs, (lengths - lengths.min()) / span, "prompt length (no classifier: plumbing test only)")
