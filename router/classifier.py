"""Runtime task-type and difficulty classifier: features (numpy) + one onnxruntime session.

Imports only numpy, onnxruntime and the standard library (no scikit-learn): the gateway loads this
at startup and must be ready in well under 3 s. The session is created once, single-threaded (the
gateway's own concurrency is the parallelism; a thread pool per call would cost more than the model).
The model reads sparse input (router.features.onnx_feeds: the prompt's hashed n-gram columns and a
6 x n-grams matrix of log counts per block), so a call touches only the weights of the n-grams the
prompt has.

Nothing here raises into the request path: any failure gives SAFE_DEFAULT and one log line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence


from router import features as F
from router.messages import Prompt, messages_problem, prompt_from_messages, prompt_from_text
from router.types import TASK_TYPES, Classification

log = logging.getLogger("ponder.classifier")

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
CARD_NAME = "classifier.json"
# When the classifier cannot answer: chat (cheapest arm), no type favoured, difficulty unknown.
SAFE_DEFAULT = Classification(task="chat", task_probs={t: 1.0 / len(TASK_TYPES) for t in TASK_TYPES}, difficulty=0.5)


class ClassifierError(RuntimeError):
    """The artifact cannot be loaded (missing, corrupt, or built for other features)."""


class Classifier:
    def __init__(self, session: Any, card: dict[str, Any]):
        self._session = session
        self.card = card
        self.labels: tuple[str, ...] = tuple(card["labels"])
        self._outputs = ["task_probs", "difficulty"]
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Classifier":
        """Load an artifact: a directory holding classifier.json, the card itself, or the .onnx file.

        Raises ClassifierError (startup is the place to fail loudly; the request path never does).
        """
        import onnxruntime as ort

        card_path = _card_path(Path(path) if path else ARTIFACT_DIR)
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            onnx_path = card_path.parent / card["onnx"]
            if card.get("feature_version") != F.FEATURE_VERSION or card.get("n_features") != F.N_FEATURES:
                raise ClassifierError(
                    f"{card_path}: built for features v{card.get('feature_version')} ({card.get('n_features')}), "
                    f"this code computes v{F.FEATURE_VERSION} ({F.N_FEATURES}); retrain with `ponder train`"
                )
            if tuple(card["labels"]) != TASK_TYPES:
                raise ClassifierError(f"{card_path}: labels {card['labels']} differ from {TASK_TYPES}")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
            inputs = tuple(i.name for i in session.get_inputs())
            if inputs != F.ONNX_INPUTS:
                raise ClassifierError(
                    f"{onnx_path}: model inputs {inputs}, this code feeds {F.ONNX_INPUTS}; retrain with `ponder train`"
                )
        except ClassifierError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is the same failure to the caller
            raise ClassifierError(f"cannot load classifier from {card_path}: {exc}") from exc
        classifier = cls(session, card)
        classifier.classify_batch([[]])  # first run allocates; do it before the first request does
        return classifier

    def classify(self, messages: Any) -> Classification:
        """Classify one OpenAI `messages` list (system prompt, last user turn and turn counts).

        The request path: one prompt, one session call, no batch bookkeeping."""
        try:
            task_probs, difficulty = self._session.run(self._outputs, F.onnx_feeds_one(prompt_from_messages(messages)))
            return self._result(task_probs[0].tolist(), float(difficulty[0]))
        except Exception as exc:  # noqa: BLE001 - the request path gets a safe answer, never an error
            self._warn_once("run", exc)
            return SAFE_DEFAULT

    def classify_text(self, text: str, system: str = "") -> Classification:
        return self._run([prompt_from_text(text, system)])[0]

    def classify_batch(self, batch: Iterable[Any]) -> list[Classification]:
        try:
            prompts = [prompt_from_messages(m) for m in batch]
        except Exception as exc:  # noqa: BLE001 - e.g. a generator that raises
            self._warn_once("batch", exc)
            return [SAFE_DEFAULT]
        return self._run(prompts)

    def _run(self, prompts: Sequence[Prompt]) -> list[Classification]:
        if not prompts:
            return []
        try:
            results: list[Classification] = [SAFE_DEFAULT] * len(prompts)
            # one call for one prompt; a batch is sorted by length and cut into a few calls
            for rows, feeds in F.onnx_feeds(F.featurize_sparse(prompts)):
                task_probs, difficulty = self._session.run(self._outputs, feeds)
                for row, p, d in zip(rows.tolist(), task_probs.tolist(), difficulty.tolist()):
                    results[row] = self._result(p, d)
            return results
        except Exception as exc:  # noqa: BLE001 - the request path gets a safe answer, never an error
            self._warn_once("run", exc)
            return [SAFE_DEFAULT] * len(prompts)

    def _result(self, probs: list[float], difficulty: float) -> Classification:
        if not all(p == p for p in probs) or difficulty != difficulty:  # NaN guard
            return SAFE_DEFAULT
        best = max(range(len(probs)), key=probs.__getitem__)
        return Classification(
            task=self.labels[best],
            task_probs=dict(zip(self.labels, probs)),
            difficulty=min(max(difficulty, 0.0), 1.0),
        )

    def _warn_once(self, where: str, exc: BaseException) -> None:
        with self._lock:
            if where in self._warned:
                return
            self._warned.add(where)
        log.error("classifier failed in %s, answering the safe default: %r", where, exc)


def _card_path(path: Path) -> Path:
    if path.is_dir():
        return path / CARD_NAME
    if path.suffix == ".onnx":
        return path.with_suffix(".json")
    return path


_default: Classifier | None = None
_default_lock = threading.Lock()


def default_classifier() -> Classifier:
    """The shipped artifact, loaded once per process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Classifier.load()
        return _default


def classify(messages: Any) -> Classification:
    """Module-level shortcut on the shipped artifact; SAFE_DEFAULT if it cannot be loaded."""
    try:
        return default_classifier().classify(messages)
    except ClassifierError as exc:
        log.error("%s", exc)
        return SAFE_DEFAULT


def _as_json(c: Classification) -> dict[str, Any]:
    return {"task": c.task, "task_probs": {k: round(v, 6) for k, v in c.task_probs.items()}, "difficulty": round(c.difficulty, 6)}


def _read_rows(path: str) -> Iterable[tuple[dict[str, Any], Any, str | None]]:
    """(row, what to classify, why the row cannot be read or None), one per line, so that output line N
    is input line N: a blank line inside the file is an error row too (skipping it shifted every later
    row up one), blank lines at the end are none. Lines are decoded one by one, so one line in another
    encoding is one bad row; a leading byte-order mark is dropped."""
    blank: list[int] = []  # blank lines not yet known to be inside the file
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                line = None
            if line is not None and not line.strip():
                blank.append(n)
                continue
            for empty in blank:
                yield {"line": empty}, [], f"line {empty}: empty"
            blank.clear()
            yield _row(line, n) if line is not None else ({"line": n}, [], f"line {n}: not UTF-8")


def _row(line: str, n: int) -> tuple[dict[str, Any], Any, str | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"line": n}, [], f"line {n}: not JSON ({exc.msg})"
    if not isinstance(row, dict) or ("messages" not in row and "prompt" not in row):
        return {"line": n}, [], f'line {n}: not an object with "prompt" or "messages"'
    if "messages" in row:
        problem = messages_problem(row["messages"])
        return ({"line": n}, [], f"line {n}: {problem}") if problem else (row, row["messages"], None)
    if not isinstance(row["prompt"], str):  # null read as the text "None" and was classified
        return {"line": n}, [], f'line {n}: "prompt" must be a string'
    if not row["prompt"].strip():  # classified as a confident "chat" about nothing
        return {"line": n}, [], f'line {n}: "prompt" is empty'
    return row, row["prompt"], None


def _json_line(row: dict[str, Any]) -> str:
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape in the input): written escaped, as it came
        text = json.dumps(row)
    return text + "\n"


def positive_int(text: str) -> int:
    """An argparse type for counts such as --batch-size, where 0 or less means nothing sensible."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ponder classify",
        description="Print task type, task probabilities and difficulty as JSON.",
        epilog='Input rows: {"prompt": "..."} or {"messages": [...]}; output rows add "task", "task_probs", '
        '"difficulty" (or "line" and "error" for a row that is neither).',
    )
    parser.add_argument("text", nargs="?", help="the prompt to classify")
    parser.add_argument("--system", default="", help="system prompt to go with TEXT")
    parser.add_argument("--input", metavar="FILE.jsonl", help="classify every row of this file")
    parser.add_argument("--output", metavar="FILE.jsonl", help="where to write rows (default: stdout)")
    parser.add_argument("--artifact", default=None, help="artifact dir or classifier.json (default: shipped)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="rows classified together (default: 256)")
    args = parser.parse_args(argv)
    if (args.text is None) == (args.input is None):
        parser.error("give either TEXT or --input FILE.jsonl")
    if args.text is not None and not args.text.strip():  # `ponder classify "$UNSET"` printed a confident "chat"
        parser.error("TEXT is empty: nothing to classify")
    if args.system and args.input is not None:  # it was ignored: each row says its own
        parser.error("--system goes with TEXT; an --input row gives its system prompt in `messages`")
    try:
        classifier = Classifier.load(args.artifact)
    except ClassifierError as exc:
        print(f"ponder classify: {exc}", file=sys.stderr)
        return 1
    if args.text is not None:  # to --output when given (it was ignored: exit 0, the file never written)
        line = json.dumps(_as_json(classifier.classify_text(args.text, args.system)))
        try:
            if args.output:
                Path(args.output).write_text(line + "\n", encoding="utf-8")
            else:
                print(line)
        except OSError as exc:
            print(f"ponder classify: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        rows = list(_read_rows(args.input))  # all read before the output is opened: it may be the same file
    except OSError as exc:  # no such file, a directory, no permission: the input refused (argparse's status)
        print(f"ponder classify: {exc}", file=sys.stderr)
        return 2
    problems = []
    out = sys.stdout
    try:
        if args.output:
            out = open(args.output, "w", encoding="utf-8")
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            results = classifier.classify_batch([messages for _, messages, _ in chunk])
            for (row, _, problem), result in zip(chunk, results):
                # one output row per input row, so the two files line up; a bad row says why
                found = {"error": problem} if problem else _as_json(result)
                out.write(_json_line({**row, **found}))
                if problem:
                    problems.append(problem)
    except OSError as exc:
        print(f"ponder classify: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    if problems:
        print(f"ponder classify: {len(problems)} row(s) not classified: {'; '.join(problems[:5])}"
              + (" ..." if len(problems) > 5 else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
