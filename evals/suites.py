"""The built-in suites: recorded outcomes from ../shared/datasets (or $PONDER_DATASETS), each read into an
OutcomeTable (evals/tables.py), as a user's table is.

- `mmlu-pro`: 29 models' 5-shot CoT correctness on 12,032 MMLU-Pro questions.
- `bbh-effort`: code-davinci-002 on BIG-Bench Hard, answering directly or with chain of thought.
- the two-model tables `gsm8k-2` (fine-tuned GPT-3 6B vs 175B) and `mmlu-2` (two of MMLU-Pro's models).

Costs are the models' list prices (evals/prices.py) times tokens estimated as characters / 4; each
loader says what it bills.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evals.prices import CHARS_PER_TOKEN, estimated_tokens, find_price, list_price_costs, price_table
from evals.tables import ArmInfo, OutcomeTable
from router.train_data import datasets_dir


def _mc_prompt(question: str, options: Sequence[str]) -> str:
    letters = "ABCDEFGHIJKLMNOP"
    return question + "\n" + "\n".join(f"{letters[i]}. {option}" for i, option in enumerate(options))


def load_mmlu_pro(limit: int | None = None, root: Path | None = None) -> OutcomeTable:
    """29 models' 5-shot CoT correctness on 12,032 MMLU-Pro questions, priced by evals/price_table.yaml.

    Billed prompt = the question with its options (what a gateway user sends; the recording's 5-shot
    exemplars are not billed); billed output = the recorded CoT length (generated_chars / 4)."""
    base = (root or datasets_dir()) / "mmlu_pro"
    questions = {}
    with gzip.open(base / "questions.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            q = json.loads(line)
            questions[int(q["question_id"])] = q
    order = sorted(questions)
    if limit is not None:
        order = order[:limit]
    row_of = {qid: i for i, qid in enumerate(order)}
    with open(base / "correctness_matrix.csv", encoding="utf-8") as handle:
        models = [name for name in next(csv.reader(handle)) if name != "question_id"]
    n, k = len(order), len(models)
    scores, output = np.full((n, k), np.nan), np.full((n, k), np.nan)
    col_of = {m: j for j, m in enumerate(models)}
    with gzip.open(base / "predictions_long.csv.gz", "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            i = row_of.get(int(row["question_id"]))
            if i is not None:
                j = col_of[row["model"]]
                scores[i, j] = float(row["correct"])
                output[i, j] = float(row["generated_chars"] or 0) / CHARS_PER_TOKEN
    prompts = [_mc_prompt(questions[q]["question"], questions[q]["options"]) for q in order]
    prompt_tokens = np.array([estimated_tokens(p) for p in prompts])
    cost, origins, list_prices = list_price_costs(models, prompt_tokens, np.nan_to_num(output), price_table())
    return OutcomeTable("mmlu-pro", [ArmInfo(m, m) for m in models], [str(q) for q in order], prompts,
                        [questions[q]["category"] for q in order], scores, cost, output, prompt_tokens,
                        "MMLU-Pro (TIGER-Lab), 29 models' recorded 5-shot CoT correctness", price_origins=origins,
                        list_prices=list_prices)


def load_bbh_effort(root: Path | None = None) -> OutcomeTable:
    """code-davinci-002 on BIG-Bench Hard, answering directly or with chain of thought.

    Cost = output length only (both arms are the same model; the prompt is the same question): CoT's
    recorded output characters, and the direct answer's characters."""
    base = (root or datasets_dir()) / "bbh"
    inputs: dict[str, list[dict]] = {}
    with open(base / "code-davinci-002_cot_vs_direct.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for task in {row["task"] for row in rows}:
        inputs[task] = json.loads((base / "bbh" / f"{task}.json").read_text(encoding="utf-8"))["examples"]
    prompts = [inputs[row["task"]][int(row["index"])]["input"] for row in rows]
    scores = np.array([[float(row["direct_correct"]), float(row["cot_correct"])] for row in rows])
    output = np.array([[max(1.0, estimated_tokens(row["direct_answer"])), int(row["cot_chars"]) / CHARS_PER_TOKEN]
                       for row in rows])
    price = find_price("code-davinci-002")
    cost = output * price.output_per_mtok / 1e6
    return OutcomeTable("bbh-effort", [ArmInfo("direct", "code-davinci-002", "single"),
                                       ArmInfo("cot", "code-davinci-002", "cot")],
                        [f"{row['task']}/{row['index']}" for row in rows], prompts, [row["task"] for row in rows],
                        scores, cost, output, np.array([estimated_tokens(p) for p in prompts]),
                        "BIG-Bench Hard, code-davinci-002 3-shot direct vs CoT (cost = output length)",
                        weak="direct", strong="cot", price_origins={"code-davinci-002": price.origin},
                        list_prices={"code-davinci-002": price},
                        bills_prompt=False)


def load_gsm8k_two_model(root: Path | None = None) -> OutcomeTable:
    """OpenAI's GSM8K test solutions: fine-tuned GPT-3 6B (weak) vs 175B (strong), one sample each."""
    path = (root or datasets_dir()) / "gsm8k" / "example_model_solutions.jsonl"
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    columns = (("gsm8k-6b", "6b_finetuning"), ("gsm8k-175b", "175b_finetuning"))
    prompts = [row["question"] for row in rows]
    scores = np.array([[float(row[c]["is_correct"]) for _, c in columns] for row in rows])
    output = np.array([[estimated_tokens(row[c]["solution"]) for _, c in columns] for row in rows])
    prompt_tokens = np.array([estimated_tokens(p) for p in prompts])
    cost, origins, list_prices = list_price_costs([m for m, _ in columns], prompt_tokens, output, price_table())
    return OutcomeTable("gsm8k-2", [ArmInfo(m, m) for m, _ in columns], [str(i) for i in range(len(rows))], prompts,
                        [""] * len(rows), scores, cost, output, prompt_tokens,
                        "GSM8K test, OpenAI fine-tuned GPT-3 6B vs 175B (one sample each)", weak="gsm8k-6b",
                        strong="gsm8k-175b", price_origins=origins, list_prices=list_prices)


MMLU_TWO_MODEL = ("Mixtral-8x7B-Instruct-v0.1", "gemini-1.5-pro-002")  # RouteLLM's weak model; the strongest here


def load_mmlu_two_model(limit: int | None = None, root: Path | None = None) -> OutcomeTable:
    table = load_mmlu_pro(limit, root).select_arms(MMLU_TWO_MODEL)
    table.name = "mmlu-2"
    table.description = f"MMLU-Pro, {MMLU_TWO_MODEL[0]} (weak) vs {MMLU_TWO_MODEL[1]} (strong)"
    keep = np.isfinite(table.scores).all(axis=1)
    return table.subset(np.flatnonzero(keep))


SUITE_LOADERS = {"mmlu-pro": load_mmlu_pro, "bbh-effort": load_bbh_effort, "gsm8k-2": load_gsm8k_two_model,
                 "mmlu-2": load_mmlu_two_model}
