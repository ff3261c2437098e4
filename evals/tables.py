"""Recorded outcome tables: one row per prompt, one column per arm (model or effort arm).

Every format becomes one `OutcomeTable`: for each prompt and arm, the recorded score in [0, 1] (NaN
where the arm has no record: the replay treats that as a failed call), the cost in USD and the output
tokens. Formats (docs/eval.md has examples):

- RouteLLM-style CSV: a `prompt` column and one column per model holding 0/1, True/False, a 0..1
  score or a percentage (NA-style cells are missing records). Other columns (`<model>_response`, ids, ...) are ignored
  unless named with `models=`; a `<model>_response` column, when present, gives that model's output length. Several files (or a
  glob, e.g. one CSV per subject) are read as one table.
- RouterBench-style CSV: per-model score columns plus `<model>|total_cost`; `eval_name` (if present)
  is the row's group.
- JSONL: {"id", "prompt" or "messages", "group"?, "task"?, "outcomes": {arm: score | {"score" or
  "correct", "cost_usd"?, "output_tokens"?, "samples"?: [{"answer" or "text", "correct"}]}}}. An arm
  with samples also yields `<arm>@vote<N>`: the majority vote of its N samples, grouped by
  router.voting exactly as the self-consistency strategy does.

Costs: a table that records them (RouterBench, JSONL) is taken as is; otherwise cost = prompt tokens
x input price + output tokens x output price from evals/prices.py, with tokens = characters / 4.
The built-in suites (evals/suites.py) are read into the same OutcomeTable.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.prices import ModelPrice, estimated_tokens, find_price, list_price_costs, price_table
from router.answers import FORMATS, TASK_FORMATS, answer_format
from router.messages import messages_problem

DEFAULT_OUTPUT_TOKENS = 300.0  # when a table records neither output text nor length (policies' DIRECT_TOKENS)
NOT_MODEL_COLUMNS = frozenset({"prompt", "id", "idx", "index", "question_id", "sample_id", "eval_name", "group",
                               "task", "category", "subject", "label", "answer", "target", "oracle_model_to_route_to"})
# Cells that mean "no record": empty, and the NA spellings of spreadsheets, R and pandas (a hand-edited
# table says NA or N/A where pandas' to_csv leaves the cell empty).
MISSING_CELLS = frozenset({"", "nan", "-nan", "none", "null", "na", "n/a", "#n/a", "<na>"})
VOTE_ARM = re.compile(r"(.+)@vote(\d+)")  # the arm load_jsonl makes from an arm's N samples
DECIMAL_COMMA = re.compile(r"^\s*([+-]?\d*),(\d+(?:[eE][+-]?\d+)?%?)\s*$")  # "0,5", "-1,25e-3", "50,5%"
csv.field_size_limit(1 << 28)


@dataclass(frozen=True)
class ArmInfo:
    """What the policy needs to know about one arm: the backend model it calls and how."""

    name: str
    model: str
    strategy: str = "single"
    n: int = 1


@dataclass
class OutcomeTable:
    name: str
    arms: list[ArmInfo]
    ids: list[str]
    prompts: list[str]
    groups: list[str]
    scores: np.ndarray  # (prompts, arms), NaN = no record
    cost_usd: np.ndarray  # (prompts, arms), NaN = price unknown
    output_tokens: np.ndarray  # (prompts, arms)
    prompt_tokens: np.ndarray  # (prompts,)
    description: str = ""
    strong: str | None = None
    weak: str | None = None
    price_origins: dict[str, str] = field(default_factory=dict)
    tasks: list[str] | None = None  # a task type recorded with each prompt (JSONL), else None
    bills_prompt: bool = True  # False: the table's costs count output tokens only (bbh-effort)
    # the list price each model's costs were computed from (the shipped table merged with --prices);
    # none for models whose costs the table records
    list_prices: dict[str, ModelPrice] = field(default_factory=dict)

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    def index(self, arm: str) -> int:
        return self.arm_names.index(arm)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_costs(self) -> bool:
        return bool(np.isfinite(self.cost_usd[np.isfinite(self.scores)]).all())

    def subset(self, rows: Sequence[int] | np.ndarray) -> OutcomeTable:
        rows = np.asarray(rows, dtype=int)
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return OutcomeTable(self.name, self.arms, pick(self.ids), pick(self.prompts), pick(self.groups),
                            self.scores[rows], self.cost_usd[rows], self.output_tokens[rows], self.prompt_tokens[rows],
                            self.description, self.strong, self.weak, self.price_origins,
                            pick(self.tasks) if self.tasks is not None else None, self.bills_prompt,
                            list_prices=self.list_prices)

    def select_arms(self, names: Sequence[str]) -> OutcomeTable:
        cols = [self.index(name) for name in names]
        table = OutcomeTable(self.name, [self.arms[c] for c in cols], self.ids, self.prompts, self.groups,
                             self.scores[:, cols], self.cost_usd[:, cols], self.output_tokens[:, cols],
                             self.prompt_tokens, self.description, None, None,
                             {k: v for k, v in self.price_origins.items()
                              if k in {self.arms[c].model for c in cols}}, self.tasks, self.bills_prompt,
                             list_prices={k: v for k, v in self.list_prices.items()
                                          if k in {self.arms[c].model for c in cols}})
        if len(names) == 2:
            table.weak, table.strong = names[0], names[1]
        return table


# --- parsing helpers ---------------------------------------------------------------------------------


def _score(value: object) -> float:
    """0/1, True/False, yes/no or a number in [0, 1]; NaN for empty; ValueError for anything else."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isnan(number):  # what Python's json writes for a missing float: a missing record
            return math.nan
    else:
        text = str(value).strip().lower()
        if text in MISSING_CELLS:
            return math.nan
        if text in ("true", "yes", "correct"):
            return 1.0
        if text in ("false", "no", "incorrect"):
            return 0.0
        percent = text.endswith("%")  # a spreadsheet's percent format writes 0.5 as "50%"
        try:
            number = float(text.removesuffix("%")) / (100.0 if percent else 1.0)
        except ValueError:
            raise ValueError(f"{value!r} is not a score (0/1, True/False, a number in [0, 1] or a percentage)") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"score {value!r} is not in [0, 1]")
    return number


def _number(value: object) -> float:
    """A recorded cost or token count: a number >= 0, NaN for a missing cell, ValueError for anything else."""
    if value is None or isinstance(value, str) and value.strip().lower() in MISSING_CELLS:
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)  # type: ignore[arg-type]
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


def _read(parse, value: object, where: str) -> float:
    """parse(value), with the place of a bad value in the error (a user's table can be thousands of rows)."""
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _is_number(value: object) -> bool:
    try:
        float(str(value).strip().removesuffix("%"))
    except ValueError:
        return False
    return True


def _all_scores(values: Sequence[object]) -> bool:
    parsed = [_score_or_none(value) for value in values]
    return None not in parsed and any(not math.isnan(score) for score in parsed)


def _score_or_none(value: object) -> float | None:
    try:
        return _score(value)
    except ValueError:
        return None


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    found: list[Path] = []
    for item in paths:
        text = str(item)
        # a file that is there is that file: `runs[1].csv` was read as a glob matching only `runs1.csv`
        globbed = any(ch in text for ch in "*?[") and not Path(text).exists()
        matches = sorted(glob.glob(text)) if globbed else [text]
        if not matches:
            raise FileNotFoundError(f"no file matches {text}")
        found += [Path(match) for match in matches]
    # once each: `runs/*.csv runs/extra.csv` read extra.csv twice, every one of its rows counted double
    once: dict[Path, Path] = {}
    for path in found:
        once.setdefault(path.resolve(), path)
    return list(once.values())


def _read_csv_rows(paths: Sequence[Path], required: Sequence[str] = ("prompt",),
                   ) -> tuple[list[str], list[dict[str, str]], list[tuple[Path, int]]]:
    """Rows of several CSVs as one; the header is the union; each row remembers its file and line.
    utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark, which would otherwise
    become part of the first column's name. Every file must have the `required` columns; a row with
    every cell empty (",,," from a spreadsheet) is no prompt and is skipped."""
    header: list[str] = []
    rows: list[dict[str, str]] = []
    origins: list[tuple[Path, int]] = []
    for path in paths:
        with _open_csv(path) as handle, _utf8(path):
            reader = _csv_reader(handle)
            names = reader.fieldnames or []
            if not names:  # it said "no `prompt` column (columns: none)"
                raise ValueError(f"{path}: empty file (no header line)")
            absent = [column for column in required if column not in names]
            if absent:
                raise ValueError(f"{path}: no {', '.join(f'`{c}`' for c in absent)} column "
                                 f"(columns: {', '.join(names) or 'none'})")
            # a row holds one value per name: a second `gpt-4o` column silently replaced the first's scores
            twice = sorted({name for name in names if name.strip() and names.count(name) > 1})
            if twice:
                raise ValueError(f"{path}: {', '.join(f'`{c}`' for c in twice)} named by two columns; "
                                 "rename one to read both")
            for name in names:
                if name not in header:
                    header.append(name)
            decimal_comma = reader.reader.dialect.delimiter != ","  # a locale that separates cells with ';'
            for row in reader:
                if decimal_comma:  # writes 0.5 as "0,5": it was "not a score", and a cost "not a float"
                    row = {name: DECIMAL_COMMA.sub(r"\1.\2", value) if name != "prompt" and isinstance(value, str)
                           else value for name, value in row.items()}
                if any(value and value.strip() for value in row.values() if isinstance(value, str)):
                    if None in row.values():  # DictReader's filler for cells the line lacks
                        cells = sum(value is not None for key, value in row.items() if key is not None)
                        raise ValueError(f"{path} line {reader.line_num}: {cells} cell{'s' * (cells != 1)} where "
                                         f"the header has {len(names)} (a line break in an unquoted prompt?)")
                    if "prompt" in required and not (row.get("prompt") or "").strip():
                        # a row of scores under an empty prompt was replayed as the empty prompt
                        raise ValueError(f"{path} line {reader.line_num}: the `prompt` cell is empty")
                    rows.append(row)
                    origins.append((path, reader.line_num))
    return header, rows, origins


def _open_csv(path: Path):
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def _csv_reader(handle) -> csv.DictReader:
    """A DictReader for the ways people save tables: cells separated by ',', or by ';' (Excel in a
    locale whose decimal mark is a comma) or tabs, as the header line shows; spaces after a separator
    skipped (a hand-written "prompt, gpt-4o" named its model " gpt-4o", and broke the quotes of
    `, "a prompt, with commas"`); header names trimmed (a spreadsheet cell "prompt ")."""
    header_line = handle.readline()
    handle.seek(0)
    delimiter = next((mark for mark in (",", ";", "\t") if mark in header_line), ",")
    reader = csv.DictReader(handle, delimiter=delimiter, skipinitialspace=True)
    if reader.fieldnames:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    return reader


@contextlib.contextmanager
def _utf8(path: Path):
    """A file that is not UTF-8 (Excel's plain "CSV" is the Windows code page) named, with the way out."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (it holds the byte {exc.object[exc.start]:#04x}); save it as "
                         'UTF-8 (Excel: "CSV UTF-8") or convert it, e.g. iconv -f cp1252 -t utf-8') from None


def _where(origin: tuple[Path, int]) -> str:
    return f"{origin[0]} line {origin[1]}"


# --- user formats ------------------------------------------------------------------------------------


def _not_a_model(name: str, header: Sequence[str]) -> bool:
    """Columns a RouteLLM-style table holds besides its models: ids and labels, a model's response
    (`<model>_response`, `<model>|model_response`), and the row index pandas' to_csv writes (an unnamed
    column, `Unnamed: 0` once read and written again), which a table of one or two rows would
    otherwise turn into a model that scored its row numbers."""
    return (name.lower() in NOT_MODEL_COLUMNS or name.endswith("_response") or not name.strip()
            or re.fullmatch(r"Unnamed: \d+", name) is not None
            or "|" in name and name.rsplit("|", 1)[0] in header)


def _some_rows(files: Sequence[Path], rows: list) -> None:
    """A header and nothing below it is said as such, not as a column or array error further on."""
    if not rows:
        raise ValueError(f"{', '.join(map(str, files))}: no rows below the header")


def _each_scored(models: Sequence[str], scores: np.ndarray, files: Sequence[Path]) -> None:
    """A model column with no score in any row (named with --models, or a RouterBench column left
    empty) was replayed as an arm that fails every call."""
    empty = [m for m, column in zip(models, scores.T) if np.isnan(column).all()]
    if empty:
        raise ValueError(f"{', '.join(map(str, files))}: no score in any row of "
                         f"{', '.join(f'`{m}`' for m in empty)}")


def load_routellm_csv(paths: Sequence[str | Path], models: Sequence[str] | None = None,
                      prices_file: str | Path | None = None) -> OutcomeTable:
    files = expand_paths(paths)
    header, rows, origins = _read_csv_rows(files)
    _some_rows(files, rows)
    ignored = []
    if models is None:
        models = []
        for name in header:
            values = [row.get(name) for row in rows]
            if _not_a_model(name, header):
                if name.lower() in NOT_MODEL_COLUMNS - {"prompt"} and _all_scores(values):
                    ignored.append(f"`{name}` (a reserved column name: name it with --models to read it as a model)")
                continue
            parsed = [_score_or_none(value) for value in values]
            bad = next((i for i, score in enumerate(parsed) if score is None), None)
            scored = any(score is not None and not math.isnan(score) for score in parsed)
            if bad is None:
                if scored:
                    models.append(name)
            elif scored or _is_number(values[bad]):
                # scores in some rows, or numbers out of range (a 1-5 rating): said, with the cell that
                # kept it out, where a column of 2s and 3s used to vanish without a word (text columns do)
                ignored.append(f"`{name}` ({_where(origins[bad])}: {values[bad]!r} is not a score)")
    where = ", ".join(map(str, files))
    missing = [m for m in models if m not in header]
    if missing:  # named with --models: it said "missing ['x'], found ['a', 'x']"
        raise ValueError(f"{where}: no column {', '.join(f'`{m}`' for m in missing)} (columns: {', '.join(header)})")
    twice = sorted({m for m in models if list(models).count(m) > 1})
    if twice:  # `--models a a` replayed a against itself
        raise ValueError(f"--models names {', '.join(f'`{m}`' for m in twice)} twice")
    if len(models) < 2:
        raise ValueError(f"{where}: need at least two model columns, found {', '.join(f'`{m}`' for m in models) or 'none'}"
                         + (f"; not read as models: {', '.join(ignored)}" if ignored else ""))
    prompt_tokens = np.array([estimated_tokens(row["prompt"]) for row in rows])
    scores = np.array([[_read(_score, row.get(m), f"{_where(origins[i])}, column `{m}`") for m in models]
                       for i, row in enumerate(rows)], dtype=float)
    _each_scored(models, scores, files)
    output = np.array([[estimated_tokens(row.get(f"{m}_response")) if f"{m}_response" in header
                        else DEFAULT_OUTPUT_TOKENS for m in models] for row in rows], dtype=float)
    cost, origins_of_prices, list_prices = list_price_costs(models, prompt_tokens, output, price_table(prices_file))
    group_column = next((g for g in ("group", "eval_name", "subject", "category") if g in header), None)
    groups = [row.get(group_column, "") if group_column else (origins[i][0].name.split(".")[0] if len(files) > 1 else "")
              for i, row in enumerate(rows)]
    ids = [row.get("id") or row.get("idx") or str(i) for i, row in enumerate(rows)]
    description = f"RouteLLM-style CSV, {len(files)} file(s)"
    if ignored:
        description += f"; columns not read as models: {', '.join(ignored)}"
    return OutcomeTable(" + ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else ""),
                        [ArmInfo(m, m) for m in models], ids, [row["prompt"] for row in rows], groups, scores,
                        cost, output, prompt_tokens, description, price_origins=origins_of_prices,
                        list_prices=list_prices)


def load_routerbench_csv(paths: Sequence[str | Path], models: Sequence[str] | None = None) -> OutcomeTable:
    files = expand_paths(paths)
    header, rows, origins = _read_csv_rows(files)
    _some_rows(files, rows)
    if models is None:
        models = [name[: -len("|total_cost")] for name in header if name.endswith("|total_cost")]
    where = ", ".join(map(str, files))
    twice = sorted({m for m in models if list(models).count(m) > 1})
    if twice:
        raise ValueError(f"--models names {', '.join(f'`{m}`' for m in twice)} twice")
    if len(models) < 2:
        raise ValueError(f"{where}: a RouterBench-style CSV needs `<model>|total_cost` columns for two or more models "
                         f"(found: {', '.join(f'`{m}|total_cost`' for m in models) or 'none'})")
    # a cost column without its score column read every score as missing, and the replay failed with a TypeError
    scoreless = [m for m in models if m not in header]
    if scoreless:
        raise ValueError(f"{where}: no score column for {', '.join(f'`{m}`' for m in scoreless)} "
                         f"(each `<model>|total_cost` goes with a `<model>` column of 0/1 or 0..1 scores)")
    prompt_tokens = np.array([estimated_tokens(row["prompt"]) for row in rows])
    scores = np.array([[_read(_score, row.get(m), f"{_where(origins[i])}, column `{m}`") for m in models]
                       for i, row in enumerate(rows)], dtype=float)
    _each_scored(models, scores, files)
    cost = np.array([[_read(_number, row.get(f"{m}|total_cost"), f"{_where(origins[i])}, column `{m}|total_cost`")
                      for m in models] for i, row in enumerate(rows)], dtype=float)
    output = np.array([[estimated_tokens(row.get(f"{m}|model_response")) for m in models] for row in rows], dtype=float)
    ids = [row.get("sample_id") or str(i) for i, row in enumerate(rows)]
    return OutcomeTable(files[0].name, [ArmInfo(m, m) for m in models], ids, [row["prompt"] for row in rows],
                        [row.get("eval_name", "") for row in rows], scores, cost, output, prompt_tokens,
                        "RouterBench-style CSV (costs as recorded)",
                        price_origins={m: "recorded in the table" for m in models})


def _content_text(content: object) -> str:
    """A message's text: a string, or the text of OpenAI content parts ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _prompt_text(record: dict) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    messages = record.get("messages") or []
    texts = (_content_text(m.get("content")) for m in messages if isinstance(m, dict))
    return "\n".join(text for text in texts if text)


def _jsonl_record(line: str, path: Path, n: int) -> dict:
    """One line of an outcomes file; ValueError naming the file and line when it is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        # a .json file of one array, or pretty-printed objects, fails on its first line: say what is wanted
        hint = "; one object per line is wanted (JSONL)" if line.strip() in ("[", "{") else ""
        raise ValueError(f"{path} line {n}: not JSON ({exc.msg}){hint}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {n}: not an object"
                         + ("; one object per line is wanted (JSONL), not an array" if isinstance(record, list) else ""))
    if not isinstance(record.get("outcomes"), dict):
        raise ValueError(f'{path} line {n}: no "outcomes" object ({{arm: score, ...}})')
    if record.get("task") is not None and not isinstance(record["task"], str):
        raise ValueError(f'{path} line {n}: "task" must be a string, not {record["task"]!r}')
    if not isinstance(record.get("prompt"), str) and not isinstance(record.get("messages"), list):
        raise ValueError(f'{path} line {n}: no "prompt" string or "messages" list (keys: {", ".join(record)})')
    if not isinstance(record.get("prompt"), str) and (problem := messages_problem(record["messages"])):
        raise ValueError(f"{path} line {n}: {problem}")
    if not _prompt_text(record).strip():  # scored and billed as the empty prompt
        raise ValueError(f'{path} line {n}: the prompt is empty (no text in its "prompt" or "messages")')
    made = next((arm for arm in record["outcomes"] if VOTE_ARM.fullmatch(arm)), None)
    if made is not None:  # it would be read as that vote arm (and its model as the part before @vote)
        raise ValueError(f"{path} line {n}: arm `{made}`: a name ending in @voteN is kept for the vote arm "
                         "made from an arm's samples; rename it")
    record["outcomes"] = {arm: _jsonl_outcome(outcome, f"{path} line {n}, arm `{arm}`")
                          for arm, outcome in record["outcomes"].items()}
    return record


def _known_task(task: str) -> bool:
    key = task.strip().lower()
    return key in TASK_FORMATS or key in FORMATS or answer_format(key) != "open"


def _model_and_votes(arm: str) -> tuple[str, str, int]:
    """(model, strategy, n) of an arm: `<arm>@voteN` is the vote of N samples of <arm>. Only that
    suffix is cut: a model name may hold an @ itself (Vertex AI's `claude-3-5-sonnet@20240620`), which
    was cut off, so the arm was priced as another model and its price said to be unknown."""
    vote = VOTE_ARM.fullmatch(arm)
    return (vote[1], "self_consistency", int(vote[2])) if vote else (arm, "single", 1)


def _answer(value: object, where: str) -> str | None:
    """A sample's answer as the voting code reads it: text. JSON numbers are answers too (42, 0.5)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f'{where}: a sample\'s "answer" must be a string or a number, not {value!r}')


def _jsonl_outcome(outcome: object, where: str) -> dict:
    """One arm's outcome as a dict with checked fields (a bare value is its score); null means not recorded."""
    if not isinstance(outcome, dict):
        outcome = {"score": outcome}
    samples = outcome.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(sample, dict) for sample in samples):
        raise ValueError(f'{where}: "samples" must be a list of objects like {{"answer": "42", "correct": true}}')
    checked = {key: _read(_number, outcome.get(key), f"{where}, {key}") for key in ("cost_usd", "output_tokens")}
    samples = [{**sample, "answer": _answer(sample.get("answer"), where),
                "cost_usd": _read(_number, sample.get("cost_usd"), f"{where}, a sample's cost_usd")}
               for sample in samples]
    if any(not isinstance(sample.get("text"), (str, type(None))) for sample in samples):
        raise ValueError(f'{where}: a sample\'s "text" must be a string')
    return {**outcome, **{key: None if math.isnan(value) else value for key, value in checked.items()},
            "samples": [{**sample, "cost_usd": None if math.isnan(sample["cost_usd"]) else sample["cost_usd"]}
                        for sample in samples]}


def _jsonl_records(files: Sequence[Path]) -> list[tuple[str, dict]]:
    """(where, record) for every non-empty line; utf-8-sig reads a file saved with a byte-order mark."""
    records = []
    for path in files:
        with open(path, encoding="utf-8-sig") as handle, _utf8(path):
            records += [(f"{path} line {n}", _jsonl_record(line, path, n))
                        for n, line in enumerate(handle, 1) if line.strip()]
    return records


def _votes(outcome: dict) -> bool:
    """Whether an arm's samples make a vote arm: two or more (one sample is the arm itself, and a
    self-consistency arm needs n >= 2)."""
    return len(outcome["samples"]) >= 2


def load_jsonl(paths: Sequence[str | Path], prices_file: str | Path | None = None) -> OutcomeTable:
    from router.voting import vote  # the self-consistency strategy's own grouping of answers

    files = expand_paths(paths)
    located = _jsonl_records(files)
    records = [record for _, record in located]
    arms: list[str] = []
    for record in records:
        for arm, outcome in record["outcomes"].items():
            for name in [arm] + ([f"{arm}@vote{len(outcome['samples'])}"] if _votes(outcome) else []):
                if name not in arms:
                    arms.append(name)
    if not arms:  # nothing to replay: said here rather than as an empty argmax deep in the replay
        raise ValueError(f"{', '.join(map(str, files))}: no row records an outcome")
    if len(arms) < 2:  # nothing to route between (the report compared the arm with itself)
        raise ValueError(f"{', '.join(map(str, files))}: every outcome is of one arm, `{arms[0]}`; "
                         "routing needs two or more")
    n, k = len(records), len(arms)
    scores, cost, output = np.full((n, k), np.nan), np.full((n, k), np.nan), np.full((n, k), np.nan)
    recorded = np.zeros((n, k), dtype=bool)  # a cost the line gives, not one computed from a price
    prompts = [_prompt_text(r) for r in records]
    prompt_tokens = np.array([estimated_tokens(p) for p in prompts])
    prices = price_table(prices_file)
    price_of: dict[str, ModelPrice | None] = {}  # per arm, looked up once (100k rows x arms)
    for i, (where, record) in enumerate(located):
        task = record.get("task") or "reasoning"
        for arm, outcome in record["outcomes"].items():
            j = arms.index(arm)
            samples = outcome["samples"]
            first = samples[0] if samples else {}
            raw = outcome.get("score", outcome.get("correct", first.get("score", first.get("correct"))))
            scores[i, j] = _read(_score, raw, f"{where}, arm `{arm}`")
            tokens = outcome["output_tokens"]
            output[i, j] = (tokens if tokens is not None
                            else estimated_tokens(first.get("text")) or DEFAULT_OUTPUT_TOKENS)
            if arm not in price_of:
                price_of[arm] = find_price(arm, prices)
            price = price_of[arm]
            one = outcome["cost_usd"]
            recorded[i, j] = one is not None
            if one is None and price is not None:
                one = price.cost_usd(prompt_tokens[i], output[i, j])
            cost[i, j] = float(one) if one is not None else math.nan
            if _votes(outcome):
                answers = [s["answer"] for s in samples]
                texts = [s.get("text") or s["answer"] for s in samples]
                if all(text is None for text in texts):  # the vote would be "the first sample", silently
                    raise ValueError(f'{where}, arm `{arm}`: no sample has an "answer" or a "text" to vote on')
                if not _known_task(task):  # "algebra" is no format: answers given were ignored for a text medoid
                    raise ValueError(f"{where}: task {task!r} is not a task type or answer format ("
                                     f"{', '.join(sorted({*TASK_FORMATS, *FORMATS}))}), so arm `{arm}`'s samples "
                                     "could not be voted by their answers; put a label of your own in \"group\"")
                winner = vote(texts, task, answers=answers if any(a is not None for a in answers) else None).winner
                v = arms.index(f"{arm}@vote{len(samples)}")
                verdict = samples[winner].get("correct", samples[winner].get("score"))
                if "correct" not in samples[winner] and "score" not in samples[winner]:
                    # left out (a null is "not recorded", as documented): the vote arm "failed" the row unsaid
                    raise ValueError(f'{where}, arm `{arm}`, sample {winner + 1}: the vote\'s winner has no "correct" '
                                     '(or "score"); every sample that answers needs one')
                scores[i, v] = _read(_score, verdict, f"{where}, arm `{arm}`, sample {winner + 1}")
                sample_costs = [s["cost_usd"] for s in samples]
                recorded[i, v] = all(c is not None for c in sample_costs)
                cost[i, v] = sum(sample_costs) if recorded[i, v] else cost[i, j] * len(samples)
                output[i, v] = output[i, j] * len(samples)
    infos = [ArmInfo(a, *_model_and_votes(a)) for a in arms]
    origins = {}
    for j, a in enumerate(arms):  # what the report's price column says: recorded, or whose list price
        price = price_of.get(_model_and_votes(a)[0])
        listed = price.origin if price is not None else "unknown: add it with --prices FILE"
        answered = np.isfinite(scores[:, j])
        origins[a] = ("recorded in the table" if recorded[answered, j].all() else
                      listed if not recorded[:, j].any() else f"recorded in the table, else {listed}")
    # the list price the policy decides on, for models whose every cost came from it (as for a CSV)
    list_prices = {a: price_of[a] for j, a in enumerate(arms)
                   if price_of.get(a) is not None and not recorded[:, j].any()}
    tasks = [r.get("task") for r in records]
    return OutcomeTable(Path(str(paths[0])).name, infos,
                        [str(i if r.get("id") is None else r["id"]) for i, r in enumerate(records)], prompts,
                        [str(r.get("group") or "") for r in records], scores, cost, output, prompt_tokens,
                        "JSONL outcomes", price_origins=origins, tasks=tasks if any(tasks) else None,
                        list_prices=list_prices)


FORMAT_NAMES = {"jsonl": "JSONL", "routerbench": "a RouterBench-style CSV", "routellm": "a RouteLLM-style CSV"}


def _guessed_format(path: Path) -> str:
    if path.suffix.lower() in (".jsonl", ".json"):  # RUNS.JSONL from Windows too
        return "jsonl"
    with _open_csv(path) as handle, _utf8(path):
        header = _csv_reader(handle).fieldnames or []  # the header only: the loader reads the rows
    return "routerbench" if any(name.endswith("|total_cost") for name in header) else "routellm"


def load_table(paths: Sequence[str | Path], fmt: str | None = None, models: Sequence[str] | None = None,
               prices_file: str | Path | None = None) -> OutcomeTable:
    """Any user table; the format is guessed from the extension and the header when not given."""
    files = expand_paths(paths)
    if fmt is None:
        # each file's own: the first file's format used to be every file's, so a JSONL after a CSV was
        # "no `prompt` column", and a RouterBench CSV after a RouteLLM one had its recorded costs ignored
        formats = {path: _guessed_format(path) for path in files}
        if len(set(formats.values())) > 1:
            raise ValueError("--table mixes formats: " + "; ".join(f"{path} is {FORMAT_NAMES[kind]}"
                                                                     for path, kind in formats.items())
                             + "; read files of one format together")
        fmt = formats[files[0]]
    if fmt == "jsonl":
        return load_jsonl(files, prices_file)
    if fmt == "routerbench":
        return load_routerbench_csv(files, models)
    if fmt == "routellm":
        return load_routellm_csv(files, models, prices_file)
    raise ValueError(f"unknown format `{fmt}`; expected routellm, routerbench or jsonl")
