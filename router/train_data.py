"""The labelled set for the classifier: prompts from ../shared/datasets, task labels, difficulty targets.

Difficulty means P(a cheap, non-reasoning answer is wrong). The reference "cheap model" is
Llama-3.1-8B-Instruct, because it is a typical cheap backend AND one of the 29 models whose
per-question correctness on MMLU-Pro is in the data, so its scale can be read off the data there.
Every source gets a target on that one scale (see DIFFICULTY_NOTES, also written into the card):

- Sources with per-item evidence (MMLU-Pro: 29 models; GSM8K test: 4 OpenAI solutions; CRUXEval: 10
  CodeLlama-7B samples; BBH: code-davinci-002 direct answer) get a smoothed per-item failure rate p_i.
  Where the evidence comes from models stronger or weaker than the reference, every item is moved by
  one logit shift (a Rasch-style ability difference) so the source mean equals the reference
  model's failure rate on that benchmark; the order of items within a source never changes.
- MATH has only its level 1-5: equal logit steps per level, anchored to the reference model's MATH score.
- Sources with no outcome data get one documented prior per source (they teach the model what
  "easy chat" or "hard trivia" looks like; they are marked as priors, not measurements).

Only prompts and numbers derived here feed training; no data row is written into the artifact.
The synthetic examples' text (system prompts, requests that name no task) is in
router/train_system_prompts.py, the short everyday requests in router/short_requests.py.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from router.messages import messages_problem
from router.short_requests import short_requests
from router.train_system_prompts import AMBIGUOUS_REQUESTS, GENERIC_SYSTEM_PROMPTS, TASK_SYSTEM_PROMPTS, synthetic_system_prompt

# --- reference scores (accuracy of the reference cheap model or a documented stand-in) ------------
REF_MODEL = "Meta-Llama-3_1-8B-Instruct"  # column name in mmlu_pro/correctness_matrix.csv
REF_MATH_ACCURACY = 0.519  # Llama-3.1-8B-Instruct MATH (0-shot CoT), Meta model card, July 2024
REF_GSM8K_ACCURACY = 0.845  # Llama-3.1-8B-Instruct GSM8K (8-shot CoT), Meta model card
REF_HUMANEVAL_ACCURACY = 0.726  # Llama-3.1-8B-Instruct HumanEval (0-shot), Meta model card
REF_ARC_ACCURACY = 0.834  # Llama-3.1-8B-Instruct ARC-Challenge, Meta model card
# HumanEval vs MBPP: code-davinci-002 pass@1 47.0 vs 58.1 (CodeT, Chen et al. 2022); MBPP keeps
# that logit gap below HumanEval's reference failure rate.
CODEX_HUMANEVAL, CODEX_MBPP = 0.470, 0.581
MATH_LEVEL_LOGIT_STEP = 0.75  # assumption: equal logit steps per MATH level (see DIFFICULTY_NOTES)
BBH_PRIOR_STRENGTH = 4.0  # one direct answer is one noisy draw; shrink it towards its task's rate
PRIORS = {  # no per-item outcomes in the data: documented priors, not measurements
    "commonsenseqa": 0.25,
    "strategyqa": 0.30,
    "nq_open": 0.65,  # closed-book exact answers: cheap models miss most
    "topical_chat": 0.05,  # a chit-chat reply is rarely "wrong"
    "self_instruct": 0.15,
}

DIFFICULTY_NOTES = {
    "definition": "P(a cheap non-reasoning answer is wrong); reference cheap model Llama-3.1-8B-Instruct",
    "mmlu_pro": "p_i=(misses+0.5)/(models+1) over the 29-model matrix, one logit shift so the mean equals "
    "the reference model's own failure rate in the matrix",
    "math": f"logit = a + {MATH_LEVEL_LOGIT_STEP}*(level-3), a set so the mean over MATH test = "
    f"1-{REF_MATH_ACCURACY} (reference MATH score); the step is an assumption (the repo's 100-problem "
    "Qwen sample is too strong to show a level gradient)",
    "gsm8k": "test: p_i=(misses+0.5)/5 over the 4 OpenAI solutions (6B/175B x finetune/verifier), one logit "
    f"shift so the mean = 1-{REF_GSM8K_ACCURACY}; train (no per-item data): 1-{REF_GSM8K_ACCURACY}",
    "bbh": f"(1-direct_correct_i + {BBH_PRIOR_STRENGTH}*task_direct_failure)/(1+{BBH_PRIOR_STRENGTH}), "
    "code-davinci-002 3-shot direct answers (no shift: a direct answer is the cheap answer)",
    "cruxeval": "p_i=(failed+0.5)/11 over 10 CodeLlama-7B samples (output and input prediction separately), no shift",
    "humaneval": f"1-{REF_HUMANEVAL_ACCURACY} (reference HumanEval)",
    "mbpp": f"HumanEval's reference logit minus the code-davinci-002 gap ({CODEX_HUMANEVAL} vs {CODEX_MBPP})",
    "arc_challenge": f"1-{REF_ARC_ACCURACY} (reference ARC-Challenge)",
    "priors": PRIORS,
}


@dataclass(slots=True)
class Example:
    source: str  # dataset (the unit left out in the leave-one-source-out evaluation)
    group: str  # problem id: everything sharing it stays on one side of the split
    messages: list[dict[str, Any]]
    task: str | None  # one of TASK_TYPES, None = difficulty-only
    difficulty: float | None  # target in [0,1], None = task-only
    subset: str = ""  # finer grouping for reports (BBH task, MATH subject, MMLU-Pro category)
    grades: dict[str, float] = field(default_factory=dict)  # evaluation-only signals


SYNTHETIC_SOURCE = "synthetic_system_prompt"
SHORT_SOURCE = "synthetic_short"
SYNTHETIC_SOURCES = frozenset({SYNTHETIC_SOURCE, SHORT_SOURCE})  # always trained on, never evaluated on
# Sources derived from another dataset: left out with it in the leave-one-source-out evaluation.
SOURCE_FAMILY = {"strategyqa_steps": "strategyqa"}


def family(source: str) -> str:
    return SOURCE_FAMILY.get(source, source)


def default_datasets_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("PONDER_DATASETS"):
        return Path(os.environ["PONDER_DATASETS"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def datasets_dir(override: str | os.PathLike[str] | None = None, *, flag: str | None = None) -> Path:
    """default_datasets_dir, refused when it is no folder: the default is beside the checkout, so an installed
    ponder looks inside its virtualenv, and the missing file's path alone would not say how to point elsewhere.
    `flag`: the calling command's own option for the folder, if it has one (`ponder eval` has none: a
    message naming another command's flag sent its user to the wrong command)."""
    root = default_datasets_dir(override)
    if not root.is_dir():
        raise FileNotFoundError(f"no datasets folder at {root}: set PONDER_DATASETS{f' (or {flag})' if flag else ''} "
                                "to the folder that holds math/, gsm8k/, mmlu_pro/, ... (the default is "
                                "shared/datasets beside the folder ponder's code is in)")
    return root


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit_shift_to_mean(values: list[float], target_mean: float, weights: list[float] | None = None) -> float:
    """The shift d so that mean(sigmoid(logit(v) + d)) == target_mean (bisection; monotone in d)."""
    logits = [_logit(v) for v in values]
    weights = weights or [1.0] * len(values)
    total = sum(weights)
    lo, hi = -15.0, 15.0
    for _ in range(80):
        mid = (lo + hi) / 2
        mean = sum(w * _sigmoid(x + mid) for x, w in zip(logits, weights)) / total
        lo, hi = (mid, hi) if mean < target_mean else (lo, mid)
    return (lo + hi) / 2


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")  # str seeds hash with sha512: stable across runs


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _multiple_choice(question: str, options: list[str], rng: random.Random) -> str:
    letters = "ABCDEFGHIJ"
    style = rng.choice(("{l}. {t}", "({l}) {t}", "{l}) {t}"))
    header = rng.choice(("", "Options:\n", "Choices:\n", "Answer choices:\n"))
    footer = rng.choice(("", "", "\nAnswer with the letter of the correct option.", "\nAnswer:"))
    lines = [style.format(l=letters[i], t=t) for i, t in enumerate(options[: len(letters)])]
    return f"{question}\n{header}" + "\n".join(lines) + footer


def _with_open_copies(examples: list[Example], questions: list[str], seed: int) -> list[Example]:
    """Add, for ~30% of multiple-choice items, the same question asked open (no options).

    People ask exam-style questions that way too, and a model that only knows "knowledge = lettered
    options" fails on open trivia (NQ, when left out). The copy carries the task label only: the
    difficulty evidence was measured with the options shown. Same group, so same side of the split.
    """
    out = list(examples)
    for ex, question in zip(examples, questions):
        if _rng(seed, "open:" + ex.group).random() < 0.3:
            out.append(Example(ex.source, ex.group, _user(question), ex.task, None, ex.subset))
    return out


# --- one loader per source -------------------------------------------------------------------------


def load_math(root: Path, seed: int) -> list[Example]:
    rows = [r for split in ("train", "test") for r in _jsonl(root / "math" / f"{split}.jsonl")]
    levels = [int(r["level"][-1]) for r in rows if r["level"][-1].isdigit()]
    test_levels = [int(r["level"][-1]) for r in rows if r["unique_id"].startswith("test/") and r["level"][-1].isdigit()]
    # a such that mean_test sigmoid(a + step*(L-3)) = 1 - REF_MATH_ACCURACY
    base = [_sigmoid(MATH_LEVEL_LOGIT_STEP * (lv - 3)) for lv in test_levels]
    a = logit_shift_to_mean(base, 1 - REF_MATH_ACCURACY)
    out = []
    for r in rows:
        level = int(r["level"][-1]) if r["level"][-1].isdigit() else None
        diff = _sigmoid(a + MATH_LEVEL_LOGIT_STEP * (level - 3)) if level else None
        grades = {"math_level": float(level)} if level else {}
        out.append(Example("math", "math:" + r["unique_id"], _user(r["problem"]), "math", diff, r["type"], grades))
    assert levels  # the file is there and has levels
    return out


def load_gsm8k(root: Path, seed: int) -> list[Example]:
    keys = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    solved = {}
    for r in _jsonl(root / "gsm8k" / "example_model_solutions.jsonl"):
        misses = sum(0 if r[k]["is_correct"] else 1 for k in keys)
        solved[r["question"]] = (misses, (misses + 0.5) / (len(keys) + 1))
    shift = logit_shift_to_mean([p for _, p in solved.values()], 1 - REF_GSM8K_ACCURACY)
    out = []
    for split in ("train", "test"):
        for r in _jsonl(root / "gsm8k" / f"{split}.jsonl"):
            q = r["question"]
            rng = _rng(seed, "gsm8k:" + q)
            text = q + rng.choice(("", "", "", "\nLet's think step by step."))
            if q in solved:
                misses, p = solved[q]
                diff, grades = _sigmoid(_logit(p) + shift), {"gsm8k_fail_share": misses / len(keys)}
            else:
                diff, grades = 1 - REF_GSM8K_ACCURACY, {}
            group = "gsm8k:" + hashlib.sha1(q.encode()).hexdigest()[:16]
            out.append(Example("gsm8k", group, _user(text), "math", diff, split, grades))
    return out


MMLU_REASONING = {"ori_mmlu-formal_logic", "ori_mmlu-logical_fallacies"}  # logic, not recall
MMLU_KNOWLEDGE = {"law", "other", "health", "philosophy", "psychology", "economics", "history", "biology", "business"}


def load_mmlu_pro(root: Path, seed: int) -> list[Example]:
    with open(root / "mmlu_pro" / "correctness_matrix.csv", encoding="utf-8") as handle:
        matrix = {int(r.pop("question_id")): r for r in csv.DictReader(handle)}
    stats = {}
    for qid, r in matrix.items():
        values = [int(v) for v in r.values() if v != ""]
        if values:
            misses = len(values) - sum(values)
            stats[qid] = (misses / len(values), (misses + 0.5) / (len(values) + 1), r.get(REF_MODEL, ""))
    ref = [int(s[2]) for s in stats.values() if s[2] != ""]
    shift = logit_shift_to_mean([s[1] for s in stats.values()], 1 - sum(ref) / len(ref))
    out, questions = [], []
    for q in _jsonl(root / "mmlu_pro" / "questions.jsonl.gz"):
        qid, category, src = q["question_id"], q["category"], q["src"]
        rng = _rng(seed, f"mmlu_pro:{qid}")
        if category == "math":
            task = "math"
        elif src in MMLU_REASONING:
            task = "reasoning"
        elif category in MMLU_KNOWLEDGE and src.startswith("ori_mmlu"):
            task = "knowledge"
        else:
            task = None  # physics/chemistry/engineering/CS and textbook-exercise items mix recall and calculation
        diff, grades = None, {}
        if qid in stats:
            share, p, ref_value = stats[qid]
            diff = _sigmoid(_logit(p) + shift)
            grades = {"mmlu_fail_share": share}
            if ref_value != "":
                grades["ref_wrong"] = 1.0 - int(ref_value)
        text = _multiple_choice(q["question"], q["options"], rng)
        out.append(Example("mmlu_pro", f"mmlu_pro:{qid}", _user(text), task, diff, category, grades))
        questions.append(q["question"])
    labelled = [(ex, qn) for ex, qn in zip(out, questions) if ex.task]
    return out + _with_open_copies([ex for ex, _ in labelled], [qn for _, qn in labelled], seed)[len(labelled) :]


def load_bbh(root: Path, seed: int) -> list[Example]:
    direct: dict[tuple[str, int], int] = {}
    with open(root / "bbh" / "code-davinci-002_cot_vs_direct.csv", encoding="utf-8") as handle:
        for r in csv.DictReader(handle):
            direct[(r["task"], int(r["index"]))] = int(r["direct_correct"])
    task_fail: dict[str, float] = {}
    for name in {t for t, _ in direct}:
        values = [v for (t, _), v in direct.items() if t == name]
        task_fail[name] = 1 - sum(values) / len(values)
    out = []
    for path in sorted((root / "bbh" / "bbh").glob("*.json")):
        name = path.stem
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        task = "math" if name == "multistep_arithmetic_two" else "reasoning"
        for i, ex in enumerate(examples):
            correct = direct.get((name, i))
            diff, grades = None, {}
            if correct is not None:
                k = BBH_PRIOR_STRENGTH
                diff = (1 - correct + k * task_fail[name]) / (1 + k)
                grades = {"bbh_task_direct_fail": task_fail[name], "direct_wrong": float(1 - correct)}
            out.append(Example("bbh", f"bbh:{name}:{i}", _user(ex["input"]), task, diff, name, grades))
    return out


def load_cruxeval(root: Path, seed: int) -> list[Example]:
    folder = root / "cruxeval"
    scored = {}
    for kind in ("output", "input"):
        data = json.loads((folder / f"sample_scored_codellama-7b_temp0.2_{kind}.json").read_text(encoding="utf-8"))
        scored[kind] = data["raw_scored_generations"]
    out = []
    for r in _jsonl(folder / "cruxeval.jsonl"):
        rng = _rng(seed, "cruxeval:" + r["id"])
        code = r["code"]
        prompts = {
            "output": rng.choice(
                (
                    f"```python\n{code}\n```\nWhat does f({r['input']}) return?",
                    f"Given the following Python function:\n{code}\n\nPredict the output of f({r['input']}).",
                    f"{code}\nassert f({r['input']}) == ??\nFill in the output.",
                )
            ),
            "input": rng.choice(
                (
                    f"Find an input such that executing f on it gives the output.\n```python\n{code}\n"
                    f"assert f(??) == {r['output']}\n```",
                    f"{code}\n\nWhat input x makes f(x) == {r['output']}?",
                )
            ),
        }
        for kind, text in prompts.items():
            bools = scored[kind].get(r["id"])
            diff, grades = None, {}
            if bools:
                failed = len(bools) - sum(bool(b) for b in bools)
                diff = (failed + 0.5) / (len(bools) + 1)
                grades = {"crux_fail_share": failed / len(bools)}
            out.append(Example("cruxeval", "cruxeval:" + r["id"], _user(text), "code", diff, kind, grades))
    return out


def load_humaneval(root: Path, seed: int) -> list[Example]:
    out = []
    for r in _jsonl(root / "humaneval" / "HumanEval.jsonl.gz"):
        rng = _rng(seed, r["task_id"])
        # A quarter as a plain-English request: code requests do not always arrive as code.
        described = re.search(r'(?:"""|\'\'\')\s*(.+?)(?:>>>|Example|For example|"""|\'\'\')', r["prompt"], re.S)
        plain = f"Write a Python function `{r['entry_point']}`: {' '.join(described.group(1).split())}" if described else r["prompt"]
        text = rng.choice(
            (
                r["prompt"],
                f"Complete the following Python function:\n```python\n{r['prompt']}```",
                f"{r['prompt']}\n# Implement the function above.",
                plain,
            )
        )
        out.append(Example("humaneval", r["task_id"], _user(text), "code", 1 - REF_HUMANEVAL_ACCURACY))
    return out


def load_mbpp(root: Path, seed: int) -> list[Example]:
    gap = _logit(CODEX_MBPP) - _logit(CODEX_HUMANEVAL)
    diff = _sigmoid(_logit(1 - REF_HUMANEVAL_ACCURACY) - gap)
    out = []
    for r in _jsonl(root / "mbpp" / "mbpp.jsonl"):
        rng = _rng(seed, f"mbpp:{r['task_id']}")
        text = r["text"]
        if rng.random() < 0.6:
            text += "\nYour code should pass these tests:\n" + "\n".join(r["test_list"])
        out.append(Example("mbpp", f"mbpp:{r['task_id']}", _user(text), "code", diff))
    return out


def load_nq_open(root: Path, seed: int) -> list[Example]:
    out = []
    for name in ("NQ-open.dev.jsonl", "NQ-open.efficientqa.dev.1.1.jsonl"):
        for r in _jsonl(root / "nq_open" / name):
            q = r["question"]
            rng = _rng(seed, "nq:" + q)
            if rng.random() < 0.5:  # NQ questions are lower-case search queries; people also type sentences
                q = q[:1].upper() + q[1:] + "?"
            group = "nq:" + hashlib.sha1(r["question"].encode()).hexdigest()[:16]
            out.append(Example("nq_open", group, _user(q), "knowledge", PRIORS["nq_open"]))
    return out


def load_arc(root: Path, seed: int) -> list[Example]:
    out, questions = [], []
    for r in _jsonl(root / "arc_challenge" / "test.jsonl"):
        text = _multiple_choice(r["question"], r["choices"]["text"], _rng(seed, r["id"]))
        out.append(Example("arc_challenge", "arc:" + r["id"], _user(text), "knowledge", 1 - REF_ARC_ACCURACY))
        questions.append(r["question"])
    return _with_open_copies(out, questions, seed)


def load_commonsenseqa(root: Path, seed: int) -> list[Example]:
    out, questions = [], []
    for r in _jsonl(root / "commonsenseqa" / "dev_rand_split.jsonl"):
        text = _multiple_choice(r["question"], r["choices"]["text"], _rng(seed, r["id"]))
        out.append(Example("commonsenseqa", "csqa:" + r["id"], _user(text), "knowledge", PRIORS["commonsenseqa"]))
        questions.append(r["question"])
    return _with_open_copies(out, questions, seed)


def load_strategyqa(root: Path, seed: int) -> list[Example]:
    """StrategyQA questions are reasoning (implicit multi-hop); the single-hop steps of their
    annotated decompositions ("How many kids did Julius Caesar have?") are plain factual questions,
    so they are knowledge examples. The pair teaches the difference between the two on the same
    topics, which the question text alone cannot. Steps that refer to other steps ("Is #2 > #1?")
    are not standalone questions and are skipped. The steps are source `strategyqa_steps`, same
    group as their question (same side of the split), in family `strategyqa` (left out together)."""
    out = []
    for split in ("train", "dev"):
        for r in _jsonl(root / "strategyqa" / f"{split}.jsonl"):
            group = "sqa:" + r["qid"]
            out.append(Example("strategyqa", group, _user(r["question"]), "reasoning", PRIORS["strategyqa"]))
            for step in r.get("decomposition") or []:
                step = " ".join(str(step).split())
                if "#" in step or len(step) < 12 or not step.endswith("?"):
                    continue
                out.append(Example("strategyqa_steps", group, _user(step), "knowledge", None))
    return out


def load_topical_chat(root: Path, seed: int, per_conversation: int = 8) -> list[Example]:
    out = []
    for conv in _jsonl(root / "topical_chat" / "test_freq_conversations.jsonl"):
        turns = [m["message"] for m in conv["messages"] if isinstance(m.get("message"), str) and m["message"].strip()]
        if not turns:
            continue
        rng = _rng(seed, conv["conversation_id"])
        picks = sorted({0, *rng.sample(range(len(turns)), min(per_conversation - 1, len(turns)))})
        for j in picks:
            # Earlier messages alternate so that turn j is the user's; a third are shown without history.
            history = [] if rng.random() < 0.3 else turns[:j]
            roles = ["assistant" if (j - i) % 2 else "user" for i in range(len(history))]
            messages = [{"role": r, "content": t} for r, t in zip(roles, history)]
            messages.append({"role": "user", "content": turns[j]})
            out.append(Example("topical_chat", "chat:" + conv["conversation_id"], messages, "chat", PRIORS["topical_chat"]))
    return out


CODE_APPS = {"StackOverflow", "Leetcode", "GeeksforGeeks", "w3schools", "Github"}
MATH_APPS = {"Wolfram alpha", "(Wolfram alpha)?"}
PUZZLE_APPS = {"Sudoku", "Wordle"}  # puzzles: reasoning


def _self_instruct_task(name: str) -> str | None:
    """Self-Instruct mixes everyday writing with some code and math; label those by their own words."""
    lowered = name.lower()
    if any(k in lowered for k in ("python", "code", "sql", "javascript", "htlm", "regular_expression", "program")):
        return "code"
    if any(k in lowered for k in ("math", "equation", "numbers", "conversion", "numerical")):
        return "math"
    if any(k in lowered for k in ("syllogism", "analogy", "riddle", "logic", "puzzle")):
        return "reasoning"
    if any(k in lowered for k in ("chess", "sorting", "largest")):
        return None
    return "writing"


def load_self_instruct(root: Path, seed: int) -> list[Example]:
    out = []
    folder = root / "self_instruct_eval"
    for r in _jsonl(folder / "user_oriented_instructions.jsonl"):
        app = r["motivation_app"]
        task = "code" if app in CODE_APPS else "math" if app in MATH_APPS else "reasoning" if app in PUZZLE_APPS else "writing"
        out += _self_instruct_examples("self_instruct_user", r, task)
    for r in _jsonl(folder / "seed_tasks.jsonl"):
        out += _self_instruct_examples("self_instruct_seed", r, _self_instruct_task(r["name"]))
    return out


def _self_instruct_examples(source: str, r: dict[str, Any], task: str | None) -> list[Example]:
    if task is None:
        return []
    diff = PRIORS["self_instruct"] if task == "writing" else None
    out = []
    for inst in r.get("instances") or [{"input": ""}]:
        text = r["instruction"].strip()
        if inst.get("input", "").strip():
            text += "\n\n" + inst["input"].strip()
        out.append(Example(source, f"{source}:{r['id']}", _user(text), task, diff))
    return out


def load_system_prompted(root: Path, seed: int, per_task: int = 150) -> list[Example]:
    """Synthetic, training only: a task's system prompt + a request that names no task.

    The datasets never carry a system prompt; without these the model learns to ignore it, and an
    app that sets "You are a coding assistant" and sends "can you help me?" would be classified as chat.
    """
    out = []
    for task, prompts in TASK_SYSTEM_PROMPTS.items():
        rng = _rng(seed, "system:" + task)
        for i in range(per_task):
            messages = [{"role": "system", "content": synthetic_system_prompt(task, rng)}, *_user(rng.choice(AMBIGUOUS_REQUESTS))]
            out.append(Example(SYNTHETIC_SOURCE, f"{SYNTHETIC_SOURCE}:{task}:{i}", messages, task, None))
    # And with no (or a generic) system prompt such a request is conversation, not a hidden task.
    rng = _rng(seed, "system:none")
    for i, request in enumerate(AMBIGUOUS_REQUESTS * 3):
        system = [] if i % 2 else [{"role": "system", "content": rng.choice(GENERIC_SYSTEM_PROMPTS)}]
        out.append(Example(SYNTHETIC_SOURCE, f"{SYNTHETIC_SOURCE}:none:{i}", [*system, *_user(request)], "chat", None))
    return out


def load_short_requests(root: Path, seed: int) -> list[Example]:
    """Synthetic, training only: short everyday requests of every type (router/short_requests.py)."""
    return [Example(SHORT_SOURCE, f"{SHORT_SOURCE}:{task}:{i}", _user(text), task, None)
            for i, (text, task) in enumerate(short_requests(seed))]


LOADERS = {
    "math": load_math,
    "gsm8k": load_gsm8k,
    "mmlu_pro": load_mmlu_pro,
    "bbh": load_bbh,
    "cruxeval": load_cruxeval,
    "humaneval": load_humaneval,
    "mbpp": load_mbpp,
    "nq_open": load_nq_open,
    "arc_challenge": load_arc,
    "commonsenseqa": load_commonsenseqa,
    "strategyqa": load_strategyqa,
    "topical_chat": load_topical_chat,
    "self_instruct": load_self_instruct,
    "system_prompted": load_system_prompted,
    "short_requests": load_short_requests,
}

# Files read above, hashed into the card so a model can be traced to its exact data.
DATA_FILES = (
    "math/train.jsonl",
    "math/test.jsonl",
    "gsm8k/train.jsonl",
    "gsm8k/test.jsonl",
    "gsm8k/example_model_solutions.jsonl",
    "mmlu_pro/questions.jsonl.gz",
    "mmlu_pro/correctness_matrix.csv",
    "bbh/code-davinci-002_cot_vs_direct.csv",
    "cruxeval/cruxeval.jsonl",
    "cruxeval/sample_scored_codellama-7b_temp0.2_output.json",
    "cruxeval/sample_scored_codellama-7b_temp0.2_input.json",
    "humaneval/HumanEval.jsonl.gz",
    "mbpp/mbpp.jsonl",
    "nq_open/NQ-open.dev.jsonl",
    "nq_open/NQ-open.efficientqa.dev.1.1.jsonl",
    "arc_challenge/test.jsonl",
    "commonsenseqa/dev_rand_split.jsonl",
    "strategyqa/train.jsonl",
    "strategyqa/dev.jsonl",
    "topical_chat/test_freq_conversations.jsonl",
    "self_instruct_eval/user_oriented_instructions.jsonl",
    "self_instruct_eval/seed_tasks.jsonl",
)


def data_hashes(root: Path) -> dict[str, str]:
    hashes = {}
    for rel in DATA_FILES:
        path = root / rel
        if path.exists():
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted((root / "bbh" / "bbh").glob("*.json")):
        hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


# Share of non-chat prompts given earlier turns; how many is drawn from the chat examples' own spread.
NON_CHAT_HISTORY_SHARE = 0.30
FALLBACK_HISTORY_LENGTHS = (2, 4, 6)  # messages (1-3 exchanges) when no chat example with history is loaded


def chat_history_lengths(examples: list[Example]) -> list[int]:
    """Messages before the last user turn in each chat example that has any (sorted): the spread
    the non-chat prompts' earlier turns are drawn from (Topical-Chat: 1-27 messages, median 9)."""
    lengths = []
    for ex in examples:
        if ex.task == "chat" and ex.source not in SYNTHETIC_SOURCES:
            n = sum(1 for m in ex.messages[:-1] if m.get("role") in ("user", "assistant"))
            if n:
                lengths.append(n)
    return sorted(lengths)


def augment(examples: list[Example], seed: int) -> None:
    """Add system prompts and earlier turns to some prompts, in place.

    The datasets are single-turn and system-less; real traffic is not. Generic system prompts and
    turn counts are added independently of the label so the model does not learn "has history =
    chat"; a few task-specific system prompts teach it that the system prompt carries the task.
    Earlier turns: NON_CHAT_HISTORY_SHARE of the non-chat prompts get as many earlier messages as a
    chat example drawn at random has (alternating, ending with the assistant's, as Topical-Chat's),
    so the turn counts of a long conversation are not a chat-only pattern either.
    """
    lengths = chat_history_lengths(examples) or list(FALLBACK_HISTORY_LENGTHS)
    for ex in examples:
        if ex.source == SYNTHETIC_SOURCE:
            continue
        rng = _rng(seed, "augment:" + ex.group + str(len(ex.messages)) + str(ex.messages[-1]["content"])[:64])
        roll = rng.random()
        if roll < 0.15:
            ex.messages.insert(0, {"role": "system", "content": rng.choice(GENERIC_SYSTEM_PROMPTS)})
        elif roll < 0.27 and ex.task:
            ex.messages.insert(0, {"role": "system", "content": rng.choice(TASK_SYSTEM_PROMPTS[ex.task])})
        if ex.task != "chat" and rng.random() < NON_CHAT_HISTORY_SHARE:
            n = rng.choice(lengths)
            earlier = [{"role": "assistant", "content": "(answer)"} if (n - i) % 2 else {"role": "user", "content": "(earlier question)"}
                       for i in range(n)]
            at = 1 if ex.messages[0]["role"] == "system" else 0
            ex.messages[at:at] = earlier


def load_examples(root: Path | None = None, seed: int = 0, sources: list[str] | None = None, *,
                  flag: str | None = None) -> list[Example]:
    """`flag`: the calling command's option for the datasets folder, named if it is missing (datasets_dir)."""
    root = datasets_dir(root, flag=flag)
    examples: list[Example] = []
    for name in sources or list(LOADERS):
        examples += LOADERS[name](root, seed)
    augment(examples, seed)
    return examples


def load_extra(path: str | os.PathLike[str]) -> list[Example]:
    """User-labelled prompts: JSONL rows {"prompt": str | "messages": [...], "task": str, "difficulty"?: float}.
    ValueError naming the file and line for a row that is not one (a byte-order mark is dropped)."""
    return load_extras([path])


def load_extras(paths: Sequence[str | os.PathLike[str]]) -> list[Example]:
    """The rows of every --extra file (a file named twice is read once), checked together: one
    conversation labelled two ways, in one file or two (a copy edited in one place), trained on both
    labels; it is refused, naming both lines. The same labels twice are kept."""
    out = []
    seen: dict[str, tuple[str, str | None, float | None]] = {}  # conversation -> (where, task, difficulty)
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        shown = next(p for p in paths if Path(p).resolve() == path)  # as the user wrote it
        for where, line in _lines(shown):
            example = _extra_example(line, where)
            first, task, difficulty = seen.setdefault(example.group, (where, example.task, example.difficulty))
            if (task, difficulty) != (example.task, example.difficulty):
                raise ValueError(f"{where}: the prompt of {first} again, labelled differently "
                                 f"(task {example.task!r}, difficulty {example.difficulty!r} here; "
                                 f"task {task!r}, difficulty {difficulty!r} there)")
            out.append(example)
    return out


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """(file:line, text) of each non-blank line, decoded one by one: a file not in UTF-8 was the bare
    "'utf-8' codec can't decode byte 0xe9 in position 12", naming neither the file nor the line."""
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 (the byte {raw[exc.start]:#04x}); save the file as "
                                 "UTF-8 or convert it, e.g. iconv -f cp1252 -t utf-8") from None
            if line.strip():
                yield f"{path}:{n}", line


def _extra_example(line: str, where: str) -> Example:
    from router.types import TASK_TYPES

    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f'{where}: expected an object like {{"prompt": "...", "task": "writing"}}')
    if "messages" in row:
        messages = row["messages"]
        problem = messages_problem(messages)
        if problem:
            raise ValueError(f"{where}: {problem}")
    elif isinstance(row.get("prompt"), str):
        if not row["prompt"].strip():  # a label on no text teaches the classifier nothing true
            raise ValueError(f'{where}: "prompt" is empty')
        messages = _user(row["prompt"])
    else:
        raise ValueError(f'{where}: a row needs "prompt" (a string) or "messages"')
    task = row.get("task")
    if task is not None and task not in TASK_TYPES:
        raise ValueError(f"{where}: task must be one of {TASK_TYPES}, got {task!r}")
    diff = row.get("difficulty")
    if diff is not None:
        # out of [0, 1] is refused, not clipped: 1.5 or -0.2 (a 0-100 or a centred scale) trained as 1 or 0
        if isinstance(diff, bool) or not isinstance(diff, (int, float)) or not 0.0 <= diff <= 1.0:
            raise ValueError(f"{where}: difficulty must be a number in [0, 1], got {diff!r}")
        diff = float(diff)
    if task is None and diff is None:
        raise ValueError(f"{where}: a row needs a task, a difficulty, or both")
    group = "extra:" + hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return Example("extra", group, messages, task, diff)
