"""evals/: table loaders, RouteLLM metrics on analytic cases, the replay's baselines and report files.

Fast on purpose (no classifier fit except one tiny one): routing runs use `--no-classifier` scores,
which only exercises the plumbing; the measured results live in docs/eval.md.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from evals import metrics
from evals.classification import Scores, leak_free_scores, length_scores
from evals.prices import find_price
from evals.tables import ArmInfo, OutcomeTable, load_routellm_csv, load_routerbench_csv, load_table

pytestmark = pytest.mark.timeout(120)


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# --- loaders -------------------------------------------------------------------------------------------


def test_routellm_csv_true_false_and_01_columns_several_files(tmp_path):
    header = ["id", "prompt", "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1",
              "mistralai/Mixtral-8x7B-Instruct-v0.1_response"]
    _write_csv(tmp_path / "algebra.csv", header, [["0", "What is 2+2?", "True", "1", "four" * 10],
                                                  ["1", "Integrate x dx", "False", "0", "x"]])
    _write_csv(tmp_path / "physics.csv", header, [["0", "Speed of light?", "True", "0.5", ""]])
    table = load_routellm_csv([str(tmp_path / "*.csv")])
    assert table.arm_names == ["gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"]
    assert table.scores.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.5]]
    assert table.groups == ["algebra", "algebra", "physics"]  # one file per subject, read as one table
    assert table.output_tokens[0, 1] == 10.0  # 40 characters of response / 4
    assert table.price_origins["gpt-4-1106-preview"].startswith("litellm:")  # column name is a litellm key
    assert table.has_costs
    named = load_routellm_csv([tmp_path / "algebra.csv"], models=["gpt-4-1106-preview", "id"])
    assert named.arm_names == ["gpt-4-1106-preview", "id"]  # a named column is used even if it looks like an id


@pytest.mark.parametrize("index", ["", "Unnamed: 0"])
def test_a_pandas_row_index_is_no_model(tmp_path, index):
    """pandas' to_csv writes the row index as an unnamed first column (`Unnamed: 0` once read and
    written again): in a table of one or two rows its 0 and 1 were read as a third model."""
    _write_csv(tmp_path / "t.csv", [index, "prompt", "gpt-4o-mini", "gpt-4o"],
               [["0", "What is 2+2?", "1", "1"], ["1", "Integrate x dx", "0", "1"]])
    assert load_table([tmp_path / "t.csv"]).arm_names == ["gpt-4o-mini", "gpt-4o"]


def test_model_names_with_a_bar_are_models_and_stay_whole_in_the_report(tmp_path):
    """Every `|` column was skipped as a RouterBench attribute, so `openai|gpt-4o` columns gave 'need at
    least two model columns; ... found []'; only `<column>|...` attributes of another column are skipped."""
    from evals.cli import cli

    _write_csv(tmp_path / "t.csv", ["prompt", "openai|gpt-4o-mini", "openai|gpt-4o", "openai|gpt-4o|model_response"],
               [[f"question {i}", i % 2, 1, "x" * 40] for i in range(6)])
    (tmp_path / "prices.yaml").write_text('models:\n  "openai|gpt-4o-mini": {input_per_mtok: 0.15, output_per_mtok: '
                                          '0.6, source: me}\n  "openai|gpt-4o": {input_per_mtok: 2.5, '
                                          'output_per_mtok: 10, source: me}\n')
    assert load_table([tmp_path / "t.csv"]).arm_names == ["openai|gpt-4o-mini", "openai|gpt-4o"]
    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", "--prices", str(tmp_path / "prices.yaml")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| openai\\|gpt-4o | 1.000 |" in markdown and "| openai\\|gpt-4o-mini | 0.500 |" in markdown


def test_routellm_published_header_is_priced(tmp_path):
    """RouteLLM's own files (gsm8k_responses.csv, mmlu/responses/*.csv) name their weak model
    `mixtral-8x7b-instruct-v0.1`, in lower case: it had no price, so nothing was replayed."""
    _write_csv(tmp_path / "gsm8k_responses.csv", ["prompt", "mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"],
               [["Janet's ducks lay 16 eggs per day.", "True", "True"], ["A robe takes 2 bolts.", "False", "True"]])
    table = load_table([tmp_path / "gsm8k_responses.csv"])
    assert table.has_costs
    assert table.price_origins["mixtral-8x7b-instruct-v0.1"] == find_price("Mixtral-8x7B-Instruct-v0.1").origin


def test_routellm_csv_rejects_out_of_range_scores(tmp_path):
    _write_csv(tmp_path / "t.csv", ["prompt", "a", "b"], [["p", "1", "2"]])
    with pytest.raises(ValueError):
        load_routellm_csv([tmp_path / "t.csv"], models=["a", "b"])


def test_routellm_csv_as_spreadsheets_write_it(tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark, CRLF line ends, a prompt with a line break in quotes) and
    NA cells: every model is read, an NA is a missing record, not a reason to drop the model."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,gpt-4o,gpt-4o-mini,gpt-3.5-turbo\r\n"
                     "\"Line one\r\nline two\",1,0,N/A\r\nWhat is 2+2?,1,NA,1\r\ncafé?,0,1,#N/A\r\n".encode())
    table = load_table([path])
    assert table.arm_names == ["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo"]
    assert table.prompts == ["Line one\r\nline two", "What is 2+2?", "café?"]
    assert np.isnan(table.scores[1, 1]) and np.isnan(table.scores[0, 2]) and np.isnan(table.scores[2, 2])
    assert table.scores[:, 0].tolist() == [1.0, 1.0, 0.0]


def test_routellm_csv_bad_cells_are_named(tmp_path):
    _write_csv(tmp_path / "t.csv", ["prompt", "a", "b", "c", "level"],
               [["p", "1", "0", "1", "1"], ["q", "0", "error", "1", "4"], ["r", "1", "1", "0", "2"]])
    with pytest.raises(ValueError, match=r"t.csv line 3, column `b`: 'error' is not a score"):
        load_routellm_csv([tmp_path / "t.csv"], models=["a", "b"])
    table = load_routellm_csv([tmp_path / "t.csv"])  # guessed: a column with a bad cell is left out, and said so
    assert table.arm_names == ["a", "c"]
    assert "`b` (" in table.description and "line 3: 'error' is not a score" in table.description
    assert "`level` (" in table.description


def test_a_hand_written_csv_with_spaces_after_the_commas(tmp_path):
    """"prompt, gpt-4o, gpt-4o-mini" named the models " gpt-4o" (no price found: no replay), and a
    quoted prompt after ", " was cut at its first comma."""
    (tmp_path / "t.csv").write_text('prompt, gpt-4o, gpt-4o-mini\nHi, 1, 0\n  "What, exactly, is 2+2?", 1, 1\n')
    table = load_table([tmp_path / "t.csv"])
    assert table.arm_names == ["gpt-4o", "gpt-4o-mini"] and table.has_costs
    assert table.prompts == ["Hi", "What, exactly, is 2+2?"] and table.scores.tolist() == [[1, 0], [1, 1]]
    # a spreadsheet header cell with a trailing space: 'no `prompt` column (columns: prompt , ...)'
    (tmp_path / "t.csv").write_text('prompt ,gpt-4o ,gpt-4o-mini\nHi,1,0\n')
    assert load_table([tmp_path / "t.csv"]).arm_names == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize("mark", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs(tmp_path, mark):
    """Excel's "CSV UTF-8" in a German or French locale separates cells with ';': it read as one column,
    'no `prompt` column (columns: prompt;gpt-4o;gpt-4o-mini)'."""
    rows = ["prompt", "gpt-4o", "gpt-4o-mini"], ["What, or which; is 2+2?", "1", "0"], ["Hi", "1", "1"]
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8-sig") as handle:
        csv.writer(handle, delimiter=mark, lineterminator="\r\n").writerows(rows)
    table = load_table([tmp_path / "t.csv"])
    assert table.arm_names == ["gpt-4o", "gpt-4o-mini"] and table.prompts == ["What, or which; is 2+2?", "Hi"]


@pytest.mark.parametrize("body, line, cells", [
    ("id,prompt,gpt-4o,gpt-4o-mini\n1,What?,1,0\n2\n", 3, "1 cell where the header has 4"),  # was a TypeError
    ("prompt,gpt-4o,gpt-4o-mini\nWhat is\nthe answer?,1,0\n", 2, "1 cell where the header has 3"),
])
def test_a_row_short_of_cells_is_named(tmp_path, body, line, cells):
    """A truncated row, or a line break in an unquoted prompt: the missing cells were None, so the prompt
    of the first was None (a TypeError traceback) and the second became two prompts with no records."""
    (tmp_path / "t.csv").write_text(body)
    with pytest.raises(ValueError, match=rf"t.csv line {line}: {cells} \(a line break in an unquoted prompt\?\)"):
        load_table([tmp_path / "t.csv"])


def test_a_column_named_twice_is_refused_not_half_read(tmp_path):
    """csv.DictReader keeps the last of two same-named columns: the first `gpt-4o`'s scores were
    silently replaced by the second's. Blank names (a spreadsheet's trailing empty columns) may repeat."""
    _write_csv(tmp_path / "t.csv", ["prompt", "gpt-4o", "gpt-4o-mini", "gpt-4o", "", ""],
               [["p", "1", "0", "0", "", ""], ["q", "1", "1", "0", "", ""]])
    with pytest.raises(ValueError, match=r"t.csv: `gpt-4o` named by two columns; rename one to read both"):
        load_table([tmp_path / "t.csv"])
    _write_csv(tmp_path / "t.csv", ["prompt", "gpt-4o", "gpt-4o-mini", "", ""], [["p", "1", "0", "", ""]])
    assert load_table([tmp_path / "t.csv"]).arm_names == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize("name, body", [
    ("t.csv", "prompt,gpt-4o,gpt-4o-mini\nWhat\u2019s 2+2?,1,0\n"),  # Excel's plain "CSV": Windows-1252
    ("t.jsonl", '{"prompt": "caf\xe9", "outcomes": {"a": 1, "b": 0}}\n'),
])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name, body):
    """It was the bare 'utf-8' codec can't decode byte 0x92 in position 30: which file, and what to do?"""
    (tmp_path / name).write_bytes(body.encode("cp1252"))
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text \(it holds the byte 0x(92|e9)\); save it as UTF-8"):
        load_table([tmp_path / name])


def test_several_csvs_each_need_a_prompt_column_and_blank_rows_are_no_prompts(tmp_path):
    _write_csv(tmp_path / "a.csv", ["prompt", "m1", "m2"], [["p", "1", "0"], ["", "", ""], ["q", "0", "1"]])
    _write_csv(tmp_path / "b.csv", ["question", "m1", "m2"], [["r", "1", "1"]])
    with pytest.raises(ValueError, match=r"b.csv: no `prompt` column \(columns: question, m1, m2\)"):
        load_table([str(tmp_path / "*.csv")])
    table = load_table([tmp_path / "a.csv"])  # the spreadsheet's empty row is not a prompt every model failed
    assert table.prompts == ["p", "q"]
    assert table.scores.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_a_file_named_twice_is_read_once(tmp_path):
    """`--table 'runs/*.csv' runs/b.csv` (a glob and a file it already matches) read b.csv twice."""
    _write_csv(tmp_path / "a.csv", ["prompt", "m1", "m2"], [["p", "1", "0"]])
    _write_csv(tmp_path / "b.csv", ["prompt", "m1", "m2"], [["q", "0", "1"], ["r", "1", "1"]])
    table = load_table([str(tmp_path / "*.csv"), str(tmp_path / "b.csv"), tmp_path / "." / "a.csv"])
    assert table.prompts == ["p", "q", "r"] and table.groups == ["a", "b", "b"]


def test_routerbench_csv_uses_recorded_costs(tmp_path):
    header = ["sample_id", "prompt", "eval_name", "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardLM-13B-V1.2|total_cost",
              "WizardLM/WizardLM-13B-V1.2|model_response", "gpt-4-1106-preview", "gpt-4-1106-preview|total_cost",
              "oracle_model_to_route_to"]
    _write_csv(tmp_path / "rb.csv", header, [["s1", "q1", "mmlu", "0.0", "0.0001", "abcd", "1.0", "0.003", "gpt"],
                                             ["s2", "q2", "gsm8k", "1.0", "0.0002", "", "1.0", "0.004", "wiz"]])
    table = load_table([tmp_path / "rb.csv"])  # format guessed from the |total_cost columns
    assert table.arm_names == ["WizardLM/WizardLM-13B-V1.2", "gpt-4-1106-preview"]
    assert table.cost_usd.tolist() == [[0.0001, 0.003], [0.0002, 0.004]]
    assert table.groups == ["mmlu", "gsm8k"]
    assert table.output_tokens[0, 0] == 1.0
    assert load_routerbench_csv([tmp_path / "rb.csv"]).ids == ["s1", "s2"]


def test_jsonl_per_arm_outcomes_and_samples(tmp_path):
    records = [
        {"id": "a", "prompt": "What is 6*7?", "task": "math", "outcomes": {
            "small": {"correct": False, "cost_usd": 0.001, "samples": [
                {"answer": "41", "correct": False}, {"answer": "42", "correct": True}, {"answer": "42", "correct": True}]},
            "big": 1}},
        {"id": "b", "messages": [{"role": "user", "content": "Capital of France?"}], "outcomes": {"small": 1, "big": 0.5}},
    ]
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    table = load_table([tmp_path / "o.jsonl"])
    assert table.arm_names == ["small", "small@vote3", "big"]
    assert table.scores[0].tolist() == [0.0, 1.0, 1.0]  # first sample wrong, majority "42" right
    assert math.isnan(table.scores[1, 1]) and table.scores[1, 2] == 0.5
    assert table.cost_usd[0, 1] == pytest.approx(0.003)  # three samples at the arm's cost
    assert table.prompts[1] == "Capital of France?"
    assert table.arms[1] == ArmInfo("small@vote3", "small", "self_consistency", 3)


def test_jsonl_prices_say_where_the_costs_came_from(tmp_path):
    """Every JSONL arm with a cost read 'recorded in the table', those priced from litellm or --prices
    too, and the replay's policy then decided on a stand-in price instead of that list price."""
    from evals.routing import build_policy

    records = [{"prompt": "p", "outcomes": {"gpt-4o-mini": 1, "gpt-4o": {"correct": 1, "cost_usd": 0.01},
                                            "gpt-4o-2024-08-06": {"correct": 0, "cost_usd": 0.002}}},
               {"prompt": "q", "outcomes": {"gpt-4o-mini": 0, "gpt-4o": {"correct": 1, "cost_usd": 0.02},
                                            "gpt-4o-2024-08-06": 1}}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = load_table([tmp_path / "t.jsonl"])
    assert table.price_origins == {"gpt-4o-mini": "litellm:gpt-4o-mini", "gpt-4o": "recorded in the table",
                                   "gpt-4o-2024-08-06": "recorded in the table, else litellm:gpt-4o-2024-08-06"}
    backends = {b.model: b.prices for b in build_policy(table, 1.0).backends}
    assert backends["eval/gpt-4o-mini"].input_per_mtok == find_price("gpt-4o-mini").input_per_mtok


def test_an_upper_case_extension_is_the_same_format(tmp_path):
    """RUNS.JSONL (a Windows habit) was read as a CSV: 'no `prompt` column (columns: {"prompt": ...'."""
    (tmp_path / "RUNS.JSONL").write_text(json.dumps({"prompt": "p", "outcomes": {"a": 1, "b": 0}}) + "\n")
    assert load_table([tmp_path / "RUNS.JSONL"]).arm_names == ["a", "b"]


def test_jsonl_one_sample_is_no_vote(tmp_path):
    """A row that kept one sample made an arm `small@vote1`, a self-consistency arm of n=1 that the
    replay's policy refuses: the whole run failed with 'self_consistency needs n >= 2 samples'."""
    one = {"correct": True, "samples": [{"answer": "42", "correct": True}]}
    three = {"correct": False, "samples": [{"answer": "1", "correct": False}, {"answer": "2", "correct": True},
                                           {"answer": "2", "correct": True}]}
    records = [{"prompt": f"question {i}", "outcomes": {"gpt-4o-mini": one if i % 2 else three, "gpt-4o": 1}}
               for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_table([tmp_path / "t.jsonl"]).arm_names == ["gpt-4o-mini", "gpt-4o-mini@vote3", "gpt-4o"]
    assert _table_cli(tmp_path) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [a["arm"] for a in report["arms"]] == ["gpt-4o-mini", "gpt-4o-mini@vote3", "gpt-4o"]


def test_jsonl_messages_with_content_parts_are_the_prompt(tmp_path):
    """OpenAI's content parts ([{"type": "text", "text": ...}], what logged chat requests hold) were read
    as no text: the prompt was empty, so it was scored as "" and billed no input tokens."""
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "Capital of France?"},
                                                        {"type": "image_url", "image_url": {"url": "data:,"}}]},
                           {"role": "assistant", "content": None, "tool_calls": []}],
              "outcomes": {"gpt-4o-mini": 1, "gpt-4o": 1}}
    (tmp_path / "o.jsonl").write_text(json.dumps(record) + "\n")
    table = load_table([tmp_path / "o.jsonl"])
    assert table.prompts == ["Be brief.\nCapital of France?"]
    assert table.prompt_tokens[0] == pytest.approx(len("Be brief.\nCapital of France?") / 4)


def test_jsonl_numbers_nulls_and_a_byte_order_mark(tmp_path):
    """Answers recorded as JSON numbers are voted on like text; null fields are not recorded."""
    records = [
        {"id": None, "prompt": "6*7?", "task": "math", "group": None, "outcomes": {
            "small": {"output_tokens": None, "cost_usd": None, "samples": [
                {"answer": 41, "correct": False}, {"answer": 42.0, "correct": True}, {"answer": 42, "correct": True}]},
            "big": {"correct": True, "cost_usd": 0.01, "output_tokens": 7}}},
    ]
    (tmp_path / "o.jsonl").write_text("\ufeff" + "\n".join(json.dumps(r) for r in records), encoding="utf-8")
    table = load_table([tmp_path / "o.jsonl"])
    assert table.arm_names == ["small", "small@vote3", "big"]
    assert table.scores[0].tolist() == [0.0, 1.0, 1.0]  # the first sample wrong, the majority 42 right
    assert table.output_tokens[0].tolist() == [300.0, 900.0, 7.0]
    assert table.groups == [""] and table.ids == ["0"]
    # Python's json writes a missing float as NaN: a missing record, as the string "nan" is
    (tmp_path / "n.jsonl").write_text(json.dumps({"prompt": "p", "outcomes": {"a": float("nan"), "b": 1}}) + "\n"
                                      + json.dumps({"prompt": "q", "outcomes": {"a": 1, "b": "nan"}}))
    scores = load_table([tmp_path / "n.jsonl"]).scores
    assert np.isnan(scores[0, 0]) and np.isnan(scores[1, 1]) and scores[0, 1] == scores[1, 0] == 1.0


@pytest.mark.parametrize("outcome, message", [
    ({"samples": "42"}, '"samples" must be a list of objects'),
    ({"samples": [1, 0]}, '"samples" must be a list of objects'),
    ({"samples": [{"answer": [4, 2], "correct": True}]}, "a sample's \"answer\" must be a string or a number"),
    ({"correct": 1, "output_tokens": "many"}, "output_tokens: could not convert string to float: 'many'"),
    ({"correct": 1, "cost_usd": -1}, "cost_usd: -1 is negative"),
    # correctness only: the @vote2 arm silently scored the first sample
    ({"samples": [{"correct": True}, {"correct": False}]}, 'no sample has an "answer" or a "text" to vote on'),
    ("maybe", "'maybe' is not a score"),
])
def test_table_run_names_a_bad_outcome_instead_of_a_traceback(tmp_path, capsys, no_scoring, outcome, message):
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "p", "outcomes": {"b": 1}}) + "\n"
                                      + json.dumps({"prompt": "q", "outcomes": {"a": outcome, "b": 1}}) + "\n")
    assert _table_cli(tmp_path) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ponder eval: error: {tmp_path / 't.jsonl'} line 2, arm `a`")
    assert message in err[0]


# --- RouteLLM metrics on cases known analytically ------------------------------------------------------


def _pair(n=1000, seed=0):
    """strong right on 60%, weak right on 20% and only where strong is: the gap is 0.4."""
    rng = np.random.default_rng(seed)
    strong = np.zeros(n)
    strong[:600] = 1
    weak = np.zeros(n)
    weak[:200] = 1
    order = rng.permutation(n)
    return weak[order], strong[order]


def test_perfect_router_metrics():
    weak, strong = _pair()
    share, quality = metrics.threshold_curve(strong - weak, weak, strong)
    m = metrics.routellm_metrics(share, quality, weak.mean(), strong.mean())
    # PGR(x) = x / 0.4 up to x = 0.4, then 1: CPT(50%) = 0.2, CPT(80%) = 0.32, APGR = 0.2 + 0.6 = 0.8
    assert m["cpt50"] == pytest.approx(0.2, abs=1e-9)
    assert m["cpt80"] == pytest.approx(0.32, abs=1e-9)
    assert m["apgr"] == pytest.approx(0.8, abs=1e-3)


def test_random_router_metrics_are_the_diagonal():
    weak, strong = _pair()
    share, quality = metrics.threshold_curve(np.zeros(len(weak)), weak, strong)  # all tied = expectation
    m = metrics.routellm_metrics(share, quality, weak.mean(), strong.mean())
    assert m == pytest.approx({"cpt50": 0.5, "cpt80": 0.8, "apgr": 0.5}, abs=1e-9)
    draws = [metrics.routellm_metrics(*metrics.threshold_curve(np.random.default_rng(s).random(len(weak)), weak, strong),
                                      weak.mean(), strong.mean())["apgr"] for s in range(20)]
    assert abs(np.mean(draws) - 0.5) < 0.02  # random scores agree with the expectation


def test_cpt_interpolates_sweep_points_and_hull_mixes_arms():
    assert metrics.cpt(np.array([0.5]), np.array([0.6]), 0.2, 0.6, 0.5) == pytest.approx(0.25)
    cost, acc = np.array([1.0, 2.0, 10.0, 3.0]), np.array([0.5, 0.54, 0.9, 0.5])
    assert metrics.pareto_frontier(cost, acc).tolist() == [0, 1, 2]
    assert metrics.upper_hull(cost, acc).tolist() == [0, 2]  # arm 1 lies below the 0-2 mix
    assert metrics.random_mix_accuracy(5.5, cost, acc) == pytest.approx(0.7)


# --- the replay ------------------------------------------------------------------------------------------


def _synthetic_table(n=400, seed=3) -> OutcomeTable:
    """Three priced arms; hard prompts (long) break the cheap arms."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.4
    prompts = [("Explain in detail why " * (8 if h else 1)) + f"case {i}?" for i, h in enumerate(hard)]
    p = np.c_[np.where(hard, 0.2, 0.8), np.where(hard, 0.4, 0.85), np.where(hard, 0.8, 0.9)]
    scores = (rng.random((n, 3)) < p).astype(float)
    arms = [ArmInfo(m, m) for m in ("Llama-2-7b-hf", "gemini-1.5-flash-002", "gemini-1.5-pro-002")]
    tokens = np.full((n, 3), 100.0)
    prompt_tokens = np.array([len(x) / 4 for x in prompts])
    cost = np.c_[[find_price(a.model).cost_usd(prompt_tokens, tokens[:, j]) for j, a in enumerate(arms)]].T
    return OutcomeTable("synthetic", arms, [str(i) for i in range(n)], prompts, ["g1" if h else "g2" for h in hard],
                        scores, cost, tokens, prompt_tokens, "synthetic",
                        price_origins={a.model: "litellm:test" for a in arms},
                        list_prices={a.model: find_price(a.model) for a in arms})


@pytest.mark.parametrize("rows", [
    [["p", "1", "1"], ["q", "0", "0"]],  # equally accurate: no gap to recover
    [["p", "1", ""], ["q", "", "0"]],  # never answered the same prompt
])
def test_pair_metrics_are_undefined_without_a_gap(tmp_path, rows):
    """They read CPT 100% and APGR 0.000 (a random router "scored" 0, not 0.5), or nan."""
    from evals.cli import cli

    _write_csv(tmp_path / "t.csv", ["prompt", "gpt-4o", "gpt-4o-mini"], rows)
    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(r[m] is None for r in report["pair"]["routers"].values() for m in ("cpt50", "cpt80", "apgr"))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "no gap, so no CPT or APGR" in markdown and "nan" not in markdown and "100.0% | 100.0%" not in markdown
    assert not (tmp_path / "out" / "pgr.png").exists()


def test_oracle_router_is_exact_when_an_arm_has_no_price(tmp_path):
    """Without a price for one arm, the oracle's cost tie-break made every score NaN: it routed in table
    order and read worse than random (CPT(50%) 52.6%, APGR 0.487 on RouteLLM's GSM8K file)."""
    from evals.cli import cli

    weak = [1, 0, 0, 1, 0, 0, 1, 0]
    strong = [1, 0, 0, 1, 1, 1, 1, 0]  # the gain sits in the last rows: table order is the worst order
    _write_csv(tmp_path / "t.csv", ["prompt", "my-own-model", "gpt-4o"],
               [[f"question {i}", w, s] for i, (w, s) in enumerate(zip(weak, strong))])
    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["note"].startswith("no prices for some arms")
    oracle = report["pair"]["routers"]["oracle"]
    # 2 of 8 prompts gain: half the gap at 1/8 of the calls, 80% at 1/8 + 0.6/8; APGR = 1 - 2/8 / 2
    assert oracle["cpt50"] == pytest.approx(1 / 8) and oracle["cpt80"] == pytest.approx(1.6 / 8)
    assert oracle["apgr"] == pytest.approx(0.875)


def test_an_arm_of_a_few_rows_is_no_reference(tmp_path):
    """Files with different model sets: o1, in a second file of 3 rows and right on all 3, was the
    'strongest' arm (acc 1.000), so every operating point read 'not reached' and the pair (gpt-4o vs o1)
    shared no prompt: no CPT. The references are the arms recorded on nearly every prompt."""
    from evals.cli import cli

    _write_csv(tmp_path / "a.csv", ["prompt", "gpt-4o-mini", "gpt-4o"],
               [[f"question {i}", int(i % 2 == 0), int(i % 5 != 0)] for i in range(300)])
    _write_csv(tmp_path / "b.csv", ["prompt", "gpt-4o-mini", "o1"], [[f"puzzle {i}", 0, 1] for i in range(3)])
    assert cli(["--table", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(tmp_path / "out"),
                "--no-classifier", "--steps", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    t = report["table"]
    assert (t["weak"], t["strong"], t["strongest"], t["cheapest"]) == ("gpt-4o-mini", "gpt-4o", "gpt-4o", "gpt-4o-mini")
    assert report["pair"]["rows"] == 300 and report["pair"]["routers"]["oracle"]["cpt50"] is not None
    assert report["methods"]["ponder warm (recorded, no exploration)"]["within_1pt"] is not None


def test_a_missing_price_is_said_before_the_scoring(tmp_path, capsys, no_scoring):
    """A model litellm does not price meant minutes of classifier fits before the report's note said only
    the call-share metrics were computed; it is said with what was read, before any scoring."""
    from evals.cli import cli

    _write_csv(tmp_path / "t.csv", ["prompt", "my-own-model", "gpt-4o"], [["p", "1", "0"], ["q", "0", "1"]])
    with pytest.raises(AssertionError, match="scored the table"):
        cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out")])
    assert ("ponder eval: no price for my-own-model (give prices with --prices FILE): only the two-arm call-share "
            "metrics (CPT/APGR) will be computed") in capsys.readouterr().err.splitlines()
    # RouterBench records costs (--prices does not apply): a missing one is said as such
    (tmp_path / "rb.csv").write_text("prompt,a,b,a|total_cost,b|total_cost\np,1,0,0.001,\nq,0,1,0.001,0.01\n")
    with pytest.raises(AssertionError, match="scored the table"):
        cli(["--table", str(tmp_path / "rb.csv"), "--out", str(tmp_path / "out")])
    assert ("ponder eval: a recorded score without its cost for b: only the two-arm call-share metrics (CPT/APGR) "
            "will be computed") in capsys.readouterr().err.splitlines()


def test_columns_with_the_same_policy_name_stay_two_arms(tmp_path):
    """"gpt 4o" and "gpt/4o" both clean to the policy name gpt-4o: one arm answered for both, so a
    router that always picked the always-right column scored as the always-wrong one."""
    from evals.cli import cli

    _write_csv(tmp_path / "t.csv", ["prompt", "gpt 4o", "gpt/4o"], [[f"q{i}", "1", "0"] for i in range(6)])
    (tmp_path / "prices.yaml").write_text("models:\n  gpt 4o: {input_per_mtok: 1, output_per_mtok: 2, source: me}\n"
                                          "  gpt/4o: {input_per_mtok: 1, output_per_mtok: 2, source: me}\n")
    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", "--prices", str(tmp_path / "prices.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    greedy = report["methods"]["ponder warm (recorded, no exploration)"]["points"]
    assert all(p["accuracy"] == 1.0 for p in greedy)  # equal prices: the warm learner keeps the right one


def test_oracle_beats_every_baseline_and_report_files(tmp_path):
    from evals.report import write_report
    from evals.routing import evaluate

    table = _synthetic_table()
    result = evaluate(table, length_scores(table.prompts), lambdas=(0.01, 0.3), bucket_modes=("classifier", "group"))
    oracle = result["oracle"]["accuracy"]
    accuracies = [a["accuracy"] for a in result["arms"]]
    accuracies += [p["accuracy"] for m in result["methods"].values() for p in m["points"]]
    accuracies += [max(r["accuracy"]) for r in result["pair"]["routers"].values()]
    assert oracle >= max(accuracies) - 1e-12
    kinds = ("warm (recorded)", "warm (recorded, no exploration)", "warm", "cold")
    assert set(result["methods"]) == {f"ponder {kind}{suffix}" for kind in kinds
                                      for suffix in ("", " [group buckets]")} | {"difficulty router"}
    assert set(result["pair"]["routers"]) == {"difficulty", "prompt length", "random", "oracle"}
    plots = write_report(result, tmp_path)
    for name in ("report.json", "report.md", *plots.values()):
        assert (tmp_path / name).stat().st_size > 0
    assert set(plots) == {"cost_accuracy", "pgr", "tiers", "regret"}
    assert "CPT(50%)" in (tmp_path / "report.md").read_text()


def test_a_user_table_replayed_on_group_buckets_only(tmp_path):
    """`ponder eval --table ... --buckets group`: every method is then named `... [group buckets]`, and the
    headline (tier table, regret curve, random mix at matched cost) is theirs; it failed after the whole
    replay with the bare message 'ponder warm (recorded)'."""
    from evals.cli import cli

    rows = ["prompt,gpt-4o-mini,gpt-4o"] + [f'"question {i} {"hard " * (i % 7)}",{i % 3 != 0:d},{i % 5 != 0:d}'
                                           for i in range(40)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    assert cli(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", "--buckets", "group"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["headline"] == "ponder warm (recorded) [group buckets]" in report["methods"]
    assert "ponder warm (recorded)" not in report["methods"] and report["by_tier"] and report["regret"]
    assert report["headline"] in next(iter(report["by_tier"].values()))


def test_an_out_folder_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path, capsys):
    from evals.cli import cli

    (tmp_path / "runs.csv").write_text('prompt,a,b\n"x",1,0\n')
    (tmp_path / "taken").write_text("a file where the report folder would go")
    assert cli(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "taken"), "--no-classifier"]) == 1
    assert "ponder eval: error:" in capsys.readouterr().err and (tmp_path / "taken").is_file()


@pytest.mark.parametrize("what", [["--suite", "mmlu-pro"], ["--suite", "sc-math"], ["--table", "runs.csv"]])
def test_no_datasets_folder_says_how_to_point_at_one(tmp_path, monkeypatch, capsys, what):
    """An installed ponder looks for ../shared/datasets beside site-packages, so a user's first `ponder eval`
    (a suite, or a --table, whose leak-free scores refit the classifier) found no file at a path inside
    their virtualenv, and the error named that file only; it says where it looked and what to set."""
    from evals.cli import cli

    (tmp_path / "runs.csv").write_text('prompt,a,b\n"x",1,0\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PONDER_DATASETS", str(tmp_path / "not-here"))
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))  # no cached scores to answer from
    assert cli([*what, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # only the eval's own way: it has no --datasets (`ponder eval --help`), so naming `ponder train`'s misled
    assert err == (f"ponder eval: error: no datasets folder at {tmp_path / 'not-here'}: set PONDER_DATASETS "
                   "to the folder that holds math/, gsm8k/, mmlu_pro/, ... (the default "
                   "is shared/datasets beside the folder ponder's code is in)")
    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "--datasets" not in capsys.readouterr().out


def test_group_hindsight_ceiling_beats_every_single_arm_at_each_k(tmp_path):
    from evals.report import write_report
    from evals.routing import arm_summary, evaluate, group_hindsight

    table = _synthetic_table()
    singles = arm_summary(table)
    unit = singles[2]["cost_usd"]
    for k, point in zip((0.001, 0.3, 50.0), group_hindsight(table, (0.001, 0.3, 50.0), unit)):
        lam = k / unit
        best_single = max(a["accuracy"] - lam * a["cost_usd"] for a in singles)
        assert point["accuracy"] - lam * point["cost_usd"] >= best_single - 1e-12
    # nearly free: per group its most accurate arm, so at least the most accurate single arm
    first = group_hindsight(table, (1e-6,), unit)[0]
    assert first["accuracy"] >= max(a["accuracy"] for a in singles)
    result = evaluate(table, length_scores(table.prompts), lambdas=(0.01, 0.3))
    assert len(result["group_hindsight"]["points"]) == 2
    write_report(result, tmp_path)
    assert "Ceiling of group buckets" in (tmp_path / "report.md").read_text()


def test_replay_uses_decide_fallbacks_for_missing_records():
    from evals.routing import build_policy, classify_rows, replay

    table = _synthetic_table(60)
    table.scores[:, 0] = np.nan  # the cheapest arm never answers: every request fails over
    classes = classify_rows(table, length_scores(table.prompts), "classifier")
    # flat cold priors, so the greedy pick is the cheapest arm
    run = replay(table, classes, build_policy(table, 1000.0, explore=0.0, price_prior=None), np.arange(60), None, None)
    assert run.failovers == 60 and (run.chosen != 0).all()


def test_mmlu_pro_small_run_reports_every_baseline(tmp_path):
    from evals.cli import cli

    assert cli(["--suite", "mmlu-pro", "--out", str(tmp_path), "--limit", "300", "--no-classifier", "--steps", "3"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["table"]["prompts"] == 300 and report["table"]["arms"] == 29
    assert {"ponder warm (recorded)", "ponder warm", "ponder cold", "ponder warm (recorded) [group buckets]",
            "difficulty router"} <= set(report["methods"])
    assert set(report["pair"]["routers"]) == {"difficulty", "prompt length", "random", "oracle"}
    assert report["oracle"] and report["random_matched"] and report["by_tier"] and report["regret"]
    names = {report["table"]["cheapest"], report["table"]["strongest"]}
    assert "gemini-1.5-pro-002" in names  # always-strongest
    assert all(a["price"] for a in report["arms"])  # every model priced, with its origin
    for png in ("cost_accuracy.png", "pgr.png", "tiers.png", "regret.png"):
        assert (tmp_path / png).exists()


def _outcomes_file(path, rows=6, missing_at=None):
    """A tiny JSONL table over arms `a` and `b`; the row at index `missing_at` has no outcomes."""
    records = [{"id": str(i), "prompt": "q" * (i + 1), "outcomes": {"a": i % 2, "b": 1}} for i in range(rows)]
    if missing_at is not None:
        del records[missing_at]["outcomes"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _table_cli(tmp_path, *extra):
    from evals.cli import cli

    return cli(["--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", *extra])


@pytest.fixture
def no_scoring(monkeypatch):
    """The checks come before any expensive work: scoring the table must not start."""
    def refuse(*args, **kwargs):
        raise AssertionError("scored the table before checking the arguments")

    monkeypatch.setattr("evals.cli._scores", refuse)


@pytest.mark.parametrize("flag", ["--limit", "--steps", "--train-subsample"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_table_run_refuses_counts_below_one(tmp_path, capsys, no_scoring, flag, value):
    _outcomes_file(tmp_path / "t.jsonl")
    with pytest.raises(SystemExit) as done:
        _table_cli(tmp_path, flag, value)
    assert done.value.code == 2
    assert f"argument {flag}: must be at least 1, not {value}" in capsys.readouterr().err


def test_table_run_names_the_line_without_outcomes(tmp_path, capsys, no_scoring):
    table = _outcomes_file(tmp_path / "t.jsonl", missing_at=2)
    assert _table_cli(tmp_path) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'ponder eval: error: {table} line 3: no "outcomes" object ({{arm: score, ...}})']
    assert not (tmp_path / "out" / "report.md").exists()


def test_table_loader_refuses_lines_that_are_not_records(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "x", "outcomes": {"a": 1}}) + "\n\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"t.jsonl line 3: not an object"):
        load_table([path])
    path.write_text(json.dumps({"prompt": "x", "outcomes": {"a": 1}}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"t.jsonl line 2: not JSON"):
        load_table([path])
    path.write_text(json.dumps({"prompt": "x", "outcomes": {}}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl: no row records an outcome"):
        load_table([path])
    # a "question" key and no prompt: it was scored and billed as the empty prompt
    path.write_text(json.dumps({"prompt": "x", "outcomes": {"a": 1, "b": 0}}) + "\n"
                    + json.dumps({"question": "y", "outcomes": {"a": 1, "b": 0}}) + "\n")
    with pytest.raises(ValueError, match=r'line 2: no "prompt" string or "messages" list \(keys: question, outcomes\)'):
        load_table([path])


@pytest.mark.parametrize("body, message", [
    ("gpt-4o:\n  input_per_mtok: 2.5\n  output_per_mtok: 10\n  source: mine\n",  # no `models:` level
     "expected a `models:` mapping of model name to prices"),
    ("models:\n  - gpt-4o\n", "expected a `models:` mapping"),
    ("models:\n  mine: {input_per_mtok: 1, output_per_mtok: 2, source: me\n", "line 3: not YAML (expected ','"),
    ("models:\n  mine:\n    input_per_mtok: 1\n    source: me\n", "`mine` has no 'output_per_mtok'"),
    ("models:\n  mine: 0.5\n", "`mine` must map to input_per_mtok, output_per_mtok and source"),
    ("models:\n  mine: {input_per_mtok: cheap, output_per_mtok: 2, source: me}\n", "`mine`: could not convert"),
])
def test_table_run_refuses_a_price_file_it_cannot_read(tmp_path, capsys, no_scoring, body, message):
    _outcomes_file(tmp_path / "t.jsonl")
    (tmp_path / "prices.yaml").write_text(body)
    assert _table_cli(tmp_path, "--prices", str(tmp_path / "prices.yaml")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ponder eval: error: {tmp_path / 'prices.yaml'}") and message in err[0]


def test_the_replay_decides_on_the_prices_given_with_prices_file(tmp_path):
    """--prices for a model litellm also prices (a self-hosted or discounted gpt-4o) made the costs but
    not the replay's policy, which kept litellm's list price: the cold learner thought gpt-4o 15x the
    price of gpt-4o-mini and answered everything with mini, though gpt-4o was cheaper and better."""
    from evals.routing import build_policy

    rows = [[f"question {i}", int(i % 2 == 0), 1] for i in range(40)]
    _write_csv(tmp_path / "t.csv", ["prompt", "gpt-4o-mini", "gpt-4o"], rows)
    (tmp_path / "prices.yaml").write_text("models:\n  gpt-4o: {input_per_mtok: 0.01, output_per_mtok: 0.02, "
                                          "source: self-hosted}\n")
    table = load_table([tmp_path / "t.csv"], prices_file=tmp_path / "prices.yaml")
    backends = {b.model: b.prices for b in build_policy(table, 1.0).backends}
    assert (backends["eval/gpt-4o"].input_per_mtok, backends["eval/gpt-4o"].output_per_mtok) == (0.01, 0.02)
    assert backends["eval/gpt-4o-mini"].input_per_mtok == table.list_prices["gpt-4o-mini"].input_per_mtok
    from evals.cli import cli

    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", "--prices", str(tmp_path / "prices.yaml")]) == 0
    cold = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]["ponder cold"]["points"]
    assert cold[-1]["accuracy"] > 0.9  # it was 0.5: always gpt-4o-mini


@pytest.mark.parametrize("flag", ["--strong", "--weak"])
def test_table_run_refuses_an_arm_the_table_lacks_before_replaying(tmp_path, capsys, no_scoring, flag):
    _outcomes_file(tmp_path / "t.jsonl")
    assert _table_cli(tmp_path, flag, "nope") == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ponder eval: error: {flag} nope: the table has no such arm (its arms: a, b)"]
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("name, body, message", [
    # an empty file: it said 'no `prompt` column (columns: none)'
    ("t.csv", "", "t.csv: empty file (no header line)"),
    ("t.jsonl", "\n", "t.jsonl: no row records an outcome"),
    # RouteLLM header only: it said 'need at least two model columns; missing [], found []'
    ("t.csv", "prompt,gpt-4o-mini,gpt-4o\n", "t.csv: no rows below the header"),
    # RouterBench header only: 'zero-size array to reduction operation maximum which has no identity'
    ("t.csv", "prompt,a,b,a|total_cost,b|total_cost\r\n", "t.csv: no rows below the header"),
    # one arm: a report comparing the arm with itself ("Weak a vs strong a")
    ("t.jsonl", '{"prompt": "x", "outcomes": {"a": 1}}\n', "every outcome is of one arm, `a`; routing needs two"),
])
def test_a_table_with_nothing_to_route_is_said_so(tmp_path, capsys, no_scoring, name, body, message):
    (tmp_path / name).write_text(body)
    from evals.cli import cli

    assert cli(["--table", str(tmp_path / name), "--out", str(tmp_path / "out"), "--no-classifier"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ponder eval: error: ") and message in err[0]
    assert not (tmp_path / "out" / "report.md").exists()


def test_the_pair_is_two_arms(tmp_path, capsys, no_scoring):
    """`--strong M --weak M` replayed a pair of one arm; `--weak` naming the most accurate arm made it
    the strong arm too."""
    _outcomes_file(tmp_path / "t.jsonl")
    assert _table_cli(tmp_path, "--strong", "b", "--weak", "b") == 2
    assert capsys.readouterr().err.splitlines() == [
        "ponder eval: error: --strong and --weak both name b: the pair needs two arms"]
    from evals.routing import pick_pair

    table = load_table([tmp_path / "t.jsonl"])
    assert pick_pair(table, weak="b") == (1, 0)  # b is the most accurate arm: the strong one is a


def _eval_cli(tmp_path, *tables, extra=()):
    from evals.cli import cli

    return cli(["--table", *map(str, tables), "--out", str(tmp_path / "out"), "--no-classifier", "--steps", "2",
                *extra])


@pytest.mark.parametrize("body, message", [
    # cost columns and no score columns: every score missing, then a TypeError deep in the replay
    ("prompt,a|total_cost,b|total_cost\nx,0.1,0.5\ny,0.2,0.01\n",
     "t.csv: no score column for `a`, `b` (each `<model>|total_cost` goes with a `<model>` column"),
    ("prompt,a,b,a|total_cost\nx,1,0,0.1\n",
     "t.csv: a RouterBench-style CSV needs `<model>|total_cost` columns for two or more models (found: `a|total_cost`)"),
    ("prompt,a,b,a|total_cost,b|total_cost\nx,1,,0.1,\ny,0,,0.2,\n", "t.csv: no score in any row of `b`"),
    ("prompt,a,b,a|total_cost,b|total_cost\nx,1,0,0.1,-0.5\n", "t.csv line 2, column `b|total_cost`: '-0.5' is negative"),
])
def test_a_routerbench_csv_without_its_scores_is_refused(tmp_path, capsys, no_scoring, body, message):
    (tmp_path / "t.csv").write_text(body)
    assert _eval_cli(tmp_path, tmp_path / "t.csv") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ponder eval: error: {tmp_path}") and message in err[0]


def test_a_model_named_with_models_and_never_scored_is_refused(tmp_path, capsys, no_scoring):
    """`--models a b` with b's column empty replayed b as an arm that fails every call, exit 0."""
    (tmp_path / "t.csv").write_text("prompt,a,b\nx,1,\ny,0,NA\n")
    assert _eval_cli(tmp_path, tmp_path / "t.csv", extra=["--models", "a", "b"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ponder eval: error: {tmp_path / 't.csv'}: no score in any row of `b`"]


@pytest.mark.parametrize("second, kind", [
    ("two.jsonl", "JSONL"),  # was 'two.jsonl: no `prompt` column (columns: {"prompt": "z", ...'
    ("two.csv", "a RouterBench-style CSV"),  # its recorded costs were ignored: read as a RouteLLM CSV
])
def test_files_of_two_formats_are_refused_not_misread(tmp_path, capsys, no_scoring, second, kind):
    (tmp_path / "one.csv").write_text("prompt,a,b\nx,1,0\ny,0,1\n")
    (tmp_path / "two.jsonl").write_text(json.dumps({"prompt": "z", "outcomes": {"a": 1, "b": 0}}) + "\n")
    (tmp_path / "two.csv").write_text("prompt,a,b,a|total_cost,b|total_cost\nz,1,0,0.1,0.01\n")
    assert _eval_cli(tmp_path, tmp_path / "one.csv", tmp_path / second) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ponder eval: error: --table mixes formats: {tmp_path / 'one.csv'} is a RouteLLM-style CSV; "
        f"{tmp_path / second} is {kind}; read files of one format together"]


def test_percentages_are_scores_and_a_rating_column_is_said(tmp_path, capsys):
    """A spreadsheet's percent format ("50%") kept the column out of the models without a word, and so
    did a column of numbers none of which was in [0, 1] (a 1-5 rating); a 0/1 column under a reserved
    name (`task`, `label`, ...) too."""
    (tmp_path / "t.csv").write_text("prompt,a,b,rating,label\nx,50%,0,3,1\ny,100%,1,5,0\nz,0%,1,4,1\n")
    assert _eval_cli(tmp_path, tmp_path / "t.csv") == 0
    said = capsys.readouterr().err.splitlines()[0]
    assert said.startswith("ponder eval: RouteLLM-style CSV, 1 file(s); columns not read as models: ")
    assert f"`rating` ({tmp_path / 't.csv'} line 2: '3' is not a score)" in said
    assert "`label` (a reserved column name: name it with --models to read it as a model)" in said
    assert said.endswith(": 3 prompts, arms a, b")
    arms = json.loads((tmp_path / "out" / "report.json").read_text())["arms"]
    assert [(arm["arm"], arm["accuracy"]) for arm in arms] == [("a", 0.5), ("b", pytest.approx(2 / 3))]
    (tmp_path / "t.csv").write_text("prompt,a,b\nx,150%,0\ny,1,1\n")
    assert _eval_cli(tmp_path, tmp_path / "t.csv", extra=["--models", "a", "b"]) == 2
    assert "t.csv line 2, column `a`: score '150%' is not in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("price, message", [
    ("-1", "input_per_mtok must be a number >= 0, not -1"),  # was a many-line pydantic error after the load
    (".nan", "input_per_mtok must be a number >= 0, not nan"),  # was 'no price for gpt-4o'
    ("true", "input_per_mtok must be a number, not True"),  # was 1 USD per million tokens
])
def test_a_price_that_is_no_price_is_refused(tmp_path, capsys, no_scoring, price, message):
    (tmp_path / "t.csv").write_text("prompt,gpt-4o-mini,gpt-4o\nx,1,0\ny,0,1\n")
    (tmp_path / "p.yaml").write_text(f"models:\n  gpt-4o: {{input_per_mtok: {price}, output_per_mtok: 2, source: me}}\n")
    assert _eval_cli(tmp_path, tmp_path / "t.csv", extra=["--prices", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ponder eval: error: {tmp_path / 'p.yaml'}: `gpt-4o`: {message}"]


def test_a_price_for_no_arm_of_the_table_is_said(tmp_path, capsys):
    """A typo in --prices (`gpt-4o-typo`) left gpt-4o on litellm's price without a word."""
    (tmp_path / "t.csv").write_text("prompt,gpt-4o-mini,gpt-4o\nx,1,0\ny,0,1\n")
    (tmp_path / "p.yaml").write_text("models:\n  gpt-4o-typo: {input_per_mtok: 1, output_per_mtok: 2, source: me}\n"
                                     "  GPT-4O-MINI: {input_per_mtok: 0.1, output_per_mtok: 0.2, source: me}\n")
    assert _eval_cli(tmp_path, tmp_path / "t.csv", extra=["--prices", str(tmp_path / "p.yaml")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"ponder eval: {tmp_path / 'p.yaml'}: no arm of the table is priced by gpt-4o-typo "
            "(its arms: gpt-4o-mini, gpt-4o)") in err
    (tmp_path / "rb.csv").write_text("prompt,a,b,a|total_cost,b|total_cost\nx,1,0,0.1,0.01\ny,0,1,0.2,0.02\n")
    assert _eval_cli(tmp_path, tmp_path / "rb.csv", extra=["--prices", str(tmp_path / "p.yaml")]) == 0
    assert f"ponder eval: {tmp_path / 'p.yaml'}: not used: the table's costs are taken as recorded" in \
        capsys.readouterr().err.splitlines()


def test_a_glob_that_matches_nothing_or_a_missing_file_is_refused(tmp_path, capsys, no_scoring):
    assert _eval_cli(tmp_path, tmp_path / "runs" / "*.csv") == 2
    assert capsys.readouterr().err.splitlines() == [f"ponder eval: error: no file matches {tmp_path / 'runs' / '*.csv'}"]
    assert _eval_cli(tmp_path, tmp_path / "runs.csv") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "No such file or directory" in err[0] and str(tmp_path / "runs.csv") in err[0]


def test_a_jsonl_model_name_with_an_at_sign_keeps_it(tmp_path, capsys):
    """Vertex AI names versions with an @ (`claude-3-5-sonnet@20240620`): the JSONL loader cut the name at
    the @, priced the arm as another model, and the report said its price was unknown."""
    arm = "vertex_ai/claude-3-5-sonnet@20240620"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "outcomes": {arm: 1, "gpt-4o-mini": i % 2}})
                                              + "\n" for i in range(4)))
    assert _table_cli(tmp_path) == 0
    arms = {a["arm"]: a for a in json.loads((tmp_path / "out" / "report.json").read_text())["arms"]}
    assert arms[arm]["price"] == f"litellm:{arm}"
    assert arms[arm]["cost_usd"] == pytest.approx(find_price(arm).cost_usd(0.5, 300))
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "q", "outcomes": {"a@vote3": 1, "a": 0}}) + "\n")
    capsys.readouterr()
    assert _table_cli(tmp_path) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ponder eval: error: {tmp_path / 't.jsonl'} line 1: arm `a@vote3`: a name ending in @voteN is kept for the "
        "vote arm made from an arm's samples; rename it"]


@pytest.mark.parametrize("name, body, message", [
    ("t.csv", "prompt,a,b\nx,1,0\n,0,1\n", "t.csv line 3: the `prompt` cell is empty"),
    ("t.jsonl", '{"prompt": "x", "outcomes": {"a": 1, "b": 0}}\n{"prompt": " ", "outcomes": {"a": 1, "b": 0}}\n',
     't.jsonl line 2: the prompt is empty (no text in its "prompt" or "messages")'),
    ("t.jsonl", '{"messages": [{"role": "user", "content": 42}], "outcomes": {"a": 1, "b": 0}}\n',
     't.jsonl line 1: "messages" item 1: "content" must be a string or a list of parts, not 42'),
    ("t.jsonl", '{"messages": [], "outcomes": {"a": 1, "b": 0}}\n', 't.jsonl line 1: "messages" must be a non-empty list'),
])
def test_a_row_without_a_prompt_is_refused(tmp_path, capsys, no_scoring, name, body, message):
    """Scores under an empty prompt cell, or messages with no text, were replayed and billed as the empty prompt."""
    (tmp_path / name).write_text(body)
    assert _eval_cli(tmp_path, tmp_path / name) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ponder eval: error: {tmp_path}") and message in err[0]


@pytest.mark.parametrize("name, body, models, message", [
    ("t.csv", "prompt,a,b\nx,1,0\n", ["a", "x"], "t.csv: no column `x` (columns: prompt, a, b)"),  # "missing ['x'], found ['a', 'x']"
    ("t.csv", "prompt,a,b\nx,1,0\n", ["a", "a"], "--models names `a` twice"),  # replayed a against itself, exit 0
    ("t.csv", "prompt,a,b,a|total_cost,b|total_cost\nx,1,0,0.1,0.2\n", ["b", "b"], "--models names `b` twice"),
    ("t.json", '[{"prompt": "x", "outcomes": {"a": 1, "b": 0}}]\n',
     None, "t.json line 1: not an object; one object per line is wanted (JSONL), not an array"),
    ("t.json", '[\n  {"prompt": "x", "outcomes": {"a": 1, "b": 0}}\n]\n',
     None, "t.json line 1: not JSON (Expecting value); one object per line is wanted (JSONL)"),
])
def test_models_named_wrong_and_a_json_array_are_said_so(tmp_path, capsys, no_scoring, name, body, models, message):
    (tmp_path / name).write_text(body)
    assert _eval_cli(tmp_path, tmp_path / name, extra=["--models", *models] if models else []) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ponder eval: error: ") and err[0].endswith(message)


def test_a_vote_under_an_unknown_task_is_refused(tmp_path, capsys, no_scoring):
    """"task": "algebra" (a group, not a task type) made router.voting treat the samples as open text: the
    given answers were ignored and the @vote arm scored a text medoid, exit 0. Rows without a vote may
    carry any task label; a known one in any letter case votes by the answers."""
    voted = {"samples": [{"answer": "41", "correct": False}, {"answer": "42", "correct": True},
                         {"answer": "42", "correct": True}]}
    rows = [{"prompt": "6*7?", "task": "Math", "outcomes": {"a": voted, "b": 0}},
            {"prompt": "Capital of France?", "task": "geography", "outcomes": {"a": 1, "b": 0}}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_table([tmp_path / "t.jsonl"]).scores[0].tolist() == [0.0, 1.0, 0.0]  # a, a@vote3, b
    rows[0]["task"] = "algebra"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _table_cli(tmp_path) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ponder eval: error: {tmp_path / 't.jsonl'} line 1: task 'algebra' "
                                               "is not a task type or answer format (chat, code, knowledge, math, ")
    assert err[0].endswith("so arm `a`'s samples could not be voted by their answers; put a label of your own in \"group\"")


@pytest.mark.parametrize("mark", [";", "\t"])
def test_a_decimal_comma_locale_writes_scores_and_costs_with_commas(tmp_path, capsys, mark):
    """Excel where cells are separated by ';' writes 0.5 as "0,5": a partial-credit column was "not a
    score" (no model left: refused) and a RouterBench cost "could not convert string to float". The prompt
    keeps its commas."""
    rows = [["prompt", "a", "b", "a|total_cost", "b|total_cost"], ["x, or y?", "0,5", "1", "0,0012", "0,5"],
            ["3,5", "1", "0,25", "0,002", "0,1"]]
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8-sig") as handle:
        csv.writer(handle, delimiter=mark, lineterminator="\r\n").writerows(rows)
    assert _eval_cli(tmp_path, tmp_path / "t.csv") == 0
    table = load_table([tmp_path / "t.csv"])
    assert table.prompts == ["x, or y?", "3,5"] and table.scores.tolist() == [[0.5, 1.0], [1.0, 0.25]]
    assert table.cost_usd.tolist() == [[0.0012, 0.5], [0.002, 0.1]]
    arms = json.loads((tmp_path / "out" / "report.json").read_text())["arms"]
    assert [arm["accuracy"] for arm in arms] == [0.75, 0.625]


def test_a_file_whose_name_looks_like_a_glob_is_that_file(tmp_path, capsys):
    """`results[1].csv` (a browser's name for a second download) was taken as a glob matching only
    `results1.csv`: 'no file matches ...' for a file that is there."""
    _write_csv(tmp_path / "results[1].csv", ["prompt", "a", "b"], [["p", "1", "0"], ["q", "0", "1"]])
    assert _eval_cli(tmp_path, tmp_path / "results[1].csv") == 0
    assert "RouteLLM-style CSV, 1 file(s): 2 prompts, arms a, b" in capsys.readouterr().err
    assert load_table([str(tmp_path / "results*.csv")]).prompts == ["p", "q"]  # a glob is still a glob


def test_a_vote_won_by_a_sample_without_its_correctness_is_refused(tmp_path, capsys, no_scoring):
    """The winning sample had an answer but no "correct": the @vote arm's record was missing, so the
    replay counted a failed call on that row, exit 0 (another sample said the answer was right)."""
    samples = [{"answer": "42"}, {"answer": "42", "correct": True}, {"answer": "41", "correct": False}]
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "p", "outcomes": {"a": 1, "b": 1}}) + "\n"
                                      + json.dumps({"prompt": "q", "outcomes": {"a": {"correct": False,
                                                                                      "samples": samples}, "b": 0}}) + "\n")
    assert _table_cli(tmp_path) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ponder eval: error: {tmp_path / 't.jsonl'} line 2, arm `a`, sample 1: the vote's winner has no \"correct\" "
        "(or \"score\"); every sample that answers needs one"]
    samples[0]["correct"] = None  # said not recorded: a missing record, as documented
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "q", "outcomes": {"a": {"samples": samples}, "b": 0}}) + "\n")
    assert math.isnan(load_table([tmp_path / "t.jsonl"]).scores[0, 1])


def test_table_run_with_a_limit_and_a_named_pair(tmp_path):
    _outcomes_file(tmp_path / "t.jsonl")
    assert _table_cli(tmp_path, "--limit", "4", "--strong", "b", "--weak", "a") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["table"]["prompts"] == 4 and (report["table"]["weak"], report["table"]["strong"]) == ("a", "b")


def test_learner_replay_small_stream_is_close_to_hindsight(tmp_path):
    """A smaller version of issue 5's proof (the full 5,000-request run is in docs/eval.md): 1,500
    BBH requests, two arms, plumbing scores. Bound measured, not tuned: the learner keeps >= 90%."""
    from evals.learner_replay import learner_replay
    from evals.suites import load_bbh_effort

    table = load_bbh_effort()
    result = learner_replay({"bbh": (table, length_scores(table.prompts))}, tmp_path, requests=1500,
                            cost_weights=(100.0,), sweep_seeds=(7, 8))
    stream = result["streams"]["bbh lambda=100"]
    assert stream["requests"] == 1500
    assert stream["ratio"] >= 0.90
    assert (tmp_path / "report.md").exists() and (tmp_path / stream["plot"]).exists()
    # the bar is judged on the mean over arrival orders; order 7 is the plotted run itself
    assert len(stream["sweep_ratios"]) == 2 and stream["sweep_ratios"][0] == stream["ratio"]
    assert stream["meets_bar"] == (stream["sweep_mean"] >= result["bar"])
    assert "Over arrival orders 7-8" in (tmp_path / "report.md").read_text()


def test_learner_replay_mmlu_pro_from_cold_price_priors():
    """Issue 5's MMLU-Pro stream at full length (5,000 requests, 29 priced arms, lambda 10) over the
    suite's eight arrival orders, on plumbing scores (length tiers; the classifier-scored run is in
    docs/eval.md): the default cold priors (rising with price) keep >= 95% of the hindsight utility
    on average, flat priors do not (measured 0.967 and 0.917)."""
    from evals.learner_replay import SWEEP_SEEDS, learner_replay
    from evals.suites import load_mmlu_pro

    table = load_mmlu_pro()
    streams = {"mmlu": (table, length_scores(table.prompts))}
    default = learner_replay(streams, None, cost_weights=(10.0,), sweep_seeds=SWEEP_SEEDS)["streams"]["mmlu lambda=10"]
    flat = learner_replay(streams, None, cost_weights=(10.0,), sweep_seeds=SWEEP_SEEDS,
                          policy_options={"price_prior": None})["streams"]["mmlu lambda=10"]
    assert default["requests"] == 5000 and default["arms"] == 29 and len(default["sweep_ratios"]) == 8
    assert default["sweep_mean"] >= 0.95 and default["meets_bar"]
    assert flat["sweep_mean"] < default["sweep_mean"] - 0.02


def test_leak_free_scores_never_train_on_the_source(monkeypatch, tmp_path):
    """A tiny source-out fit: the held-out source is absent from what the classifier is fitted on."""
    from router import train as T

    seen_sources = []
    real_fit = T.fit

    def spy(examples, X, seed=0, **options):
        seen_sources.extend({ex.source for ex in examples})
        return real_fit(examples, X, seed, **options)

    monkeypatch.setattr(T, "fit", spy)
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path))
    prompts = ["What is 17 * 23?", "Sort the words: pear apple fig", "Who wrote Hamlet?"]
    few = ["math", "humaneval", "bbh", "strategyqa", "nq_open", "self_instruct", "topical_chat"]  # all six task types
    scores = leak_free_scores(prompts, source="bbh", limit_per_source=40, sources=few)
    assert "bbh" not in seen_sources and {"math", "humaneval", "strategyqa", "topical_chat"} <= set(seen_sources)
    assert scores.difficulty.shape == (3,) and np.allclose(scores.task_probs.sum(axis=1), 1)
    assert "without the `bbh` source" in scores.how
    again = leak_free_scores(prompts, source="bbh", limit_per_source=40, sources=few)  # from the cache: no second fit
    assert np.allclose(again.difficulty, scores.difficulty)
    assert isinstance(again, Scores)


def test_leak_free_scores_of_a_user_table_say_what_they_fit(monkeypatch):
    """A user table has no source to leave out: the log said "without source `None`"."""
    from evals import classification

    monkeypatch.setattr(classification, "_fit_and_score",
                        lambda training, held, seed: (np.full((len(held), 6), 1 / 6), np.zeros(len(held)), 0))
    logs = []
    scores = leak_free_scores(["Who wrote Hamlet?"], source=None, sources=["humaneval"], use_cache=False,
                              log=logs.append)
    assert logs and logs[0].startswith("fitting the classifier on ") and "None" not in logs[0]
    assert "None" not in scores.how


def test_cross_fit_of_a_table_whose_prompts_fill_one_fold(monkeypatch):
    """`--leak-free cross-fit` on a one-row table fitted the empty fold too and failed with scikit-learn's
    'Found array with 0 sample(s) ... required by TfidfTransformer'."""
    from evals import classification

    def fit_and_score(training, held, seed):
        assert held, "fitted a fold with no prompt"
        return np.full((len(held), 6), 1 / 6), np.full(len(held), 0.5), 0

    monkeypatch.setattr(classification, "_fit_and_score", fit_and_score)
    scores = leak_free_scores(["What is 2+2?"], source=None, mode="cross-fit", sources=["humaneval"], use_cache=False)
    assert scores.difficulty.tolist() == [0.5]


def test_stats_book_pooled_level_is_the_sum_of_its_buckets():
    """The replay hands decide() the shared level a store's snapshot would give (router.learner.pooled_stats
    over the buckets), and new stats objects on every record, never edited ones."""
    from evals.routing import StatsBook
    from router.learner import pooled_stats
    from router.types import POOLED_BUCKET

    book = StatsBook()
    book.record("math:hard", "a", 1.0, 0.01)
    before = book.snapshot[POOLED_BUCKET]
    book.record("chat:easy", "a", 0.0, 0.03)
    book.record("chat:easy", "b", 1.0, 0.02)
    assert book.snapshot[POOLED_BUCKET] is not before and before["a"].count == 1
    buckets = {k: v for k, v in book.snapshot.items() if k != POOLED_BUCKET}
    summed = pooled_stats(buckets)
    for key, stats in book.snapshot[POOLED_BUCKET].items():
        assert (stats.count, stats.successes, stats.weight) == (summed[key].count, summed[key].successes,
                                                                 summed[key].weight)
        assert stats.cost_usd == pytest.approx(summed[key].cost_usd)


def test_sampling_headline_names_the_cheapest_method_within_half_a_point():
    """The summary row of a sampling suite: rows with no sample count (exact expectations) are
    skipped, never compared, and the cheapest method within 0.5 point of majority is named."""
    from evals.cli import sampling_headline

    def row(accuracy, samples):
        return {"random_orders": {"accuracy": accuracy, "mean_samples": samples}}

    result = {"methods": {"majority of 8": row(0.93, 8.0), "first sample": row(0.90, 1.0),
                          "gate + ESC window 2": row(0.928, 1.7), "first valid (expected)": row(0.93, None)}}
    (line,) = sampling_headline("sc-math", result)
    assert "gate + ESC window 2: acc 0.928 with 1.70 samples" in line and "majority of 8: acc 0.930" in line


def test_chat_arms_keep_chat_tuned_and_api_models_only():
    from evals.learner_replay import chat_arms

    names = ["Meta-Llama-3_1-70B", "Meta-Llama-3_1-70B-Instruct", "Qwen1.5-110B", "Qwen1.5-72B-Chat",
             "gemini-1.5-pro-002", "DeepSeek-Coder-V2", "Mistral-7B-v0.1", "Yi-6b-Chat"]
    assert chat_arms(names) == ["Meta-Llama-3_1-70B-Instruct", "Qwen1.5-72B-Chat", "gemini-1.5-pro-002",
                                "DeepSeek-Coder-V2", "Yi-6b-Chat"]


def test_group_buckets_go_through_the_client_task_label():
    """`[group buckets]` is what a client gets by sending its group as x-ponder-task: the replay's
    policy allows the labels and decide() keys the bucket on them."""
    from evals.routing import build_policy, classify_rows, replay, task_label

    assert task_label("Computer Science") == "computer-science" and task_label("boolean_expressions") == "boolean_expressions"
    table = _synthetic_table(40)
    table.groups[:] = ["Hard Ones" if g == "g1" else "easy" for g in table.groups]
    policy = build_policy(table, 1.0, explore=0.0)
    assert policy.overrides.task_header == ["easy", "hard-ones"]
    rows = classify_rows(table, length_scores(table.prompts), "group")
    run = replay(table, rows, policy, np.arange(40), None, None)
    expected = [row.bucket for row in rows]
    assert run.buckets == expected and {b.split(":")[0] for b in expected} == {"easy", "hard-ones"}


def test_groups_that_clean_to_one_label_stay_apart():
    """Groups in another script clean to nothing ('group') and "C++" / "C#" both to "c": the group
    buckets merged them, while the group ceiling kept them apart."""
    from evals.routing import build_policy, classify_rows

    table = _synthetic_table(40)
    table.groups[:] = ["数学" if g == "g1" else "物理" for g in table.groups]
    assert build_policy(table, 1.0).overrides.task_header == ["group", "group-2"]
    rows = classify_rows(table, length_scores(table.prompts), "group")
    assert {row.label for row, group in zip(rows, table.groups) if group == "物理"} == {"group-2"}
    from evals.routing import task_labels

    assert task_labels(["C++", "C#", "C++", ""]) == {"C++": "c", "C#": "c-2"}


def test_reports_are_strict_json_even_where_a_metric_has_nothing_to_average(tmp_path):
    """An arm missing on a whole group leaves some averages empty: the report says null there (it wrote a
    bare NaN, which JSON readers, the dashboard's included, refuse)."""
    from evals.cli import cli

    rows = [{"id": str(i), "prompt": "q" * (i + 1), "group": "g1" if i % 2 else "g2",
             "outcomes": {"a": i % 3 == 0, **({"b": 1} if i % 2 else {})}} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "3"]) == 0

    def refuse(constant: str):
        raise AssertionError(f"{constant} in report.json")

    report = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=refuse)
    assert report["table"]["prompts"] == 40


def test_an_arm_with_no_record_in_the_sample_reads_n_a(tmp_path, recwarn):
    """An arm recorded only outside a --limit sample (or only as nulls) printed numpy's 'Mean of empty
    slice' warning and 'nan' in report.md's single arms."""
    from evals.cli import cli

    rows = [{"prompt": f"question {i}", "outcomes": {"gpt-4o-mini": i % 2, "gpt-4o": 1, "o1": None}} for i in range(8)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "nan" not in markdown and markdown.rstrip().split("## Single arms")[1].count("| o1 | n/a | n/a | n/a | 0.0% |") == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["table"]["strongest"] == "gpt-4o"


@pytest.mark.parametrize("free", ["gpt-4o-mini", "gpt-4o"])
def test_a_free_self_hosted_arm_gets_a_report(tmp_path, free):
    """A model priced 0 (self-hosted, `--prices`) failed the run after the whole replay, no report
    written: 'Geometric sequence cannot include zero' (the cost plot's log axis), and a free strongest
    arm divided by zero in report.md."""
    from evals.cli import cli

    _write_csv(tmp_path / "t.csv", ["prompt", "gpt-4o-mini", "gpt-4o"],
               [[f"question {i}", int(i % 2 == 0), int(i % 5 != 0)] for i in range(40)])
    (tmp_path / "prices.yaml").write_text(f"models:\n  {free}: {{input_per_mtok: 0, output_per_mtok: 0, source: mine}}\n")
    assert cli(["--table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--no-classifier",
                "--steps", "2", "--prices", str(tmp_path / "prices.yaml")]) == 0
    assert (tmp_path / "out" / "cost_accuracy.png").stat().st_size > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Always-cheapest (gpt-4o" in markdown and "nan" not in markdown


def test_cross_fit_is_refused_for_a_users_table(tmp_path, capsys):
    """Cross-fitting keeps the other folds of the classifier's own training data; a user's prompts are not
    in it, so the mode ran the zero-shot fit per fold and called it in-distribution. Refused, before any
    fit, with the mode that applies."""
    from evals.cli import cli

    table = tmp_path / "t.csv"
    table.write_text("prompt,a,b\nWhat is 2+2?,1,0\nName a colour.,0,1\n", encoding="utf-8")
    assert cli(["--table", str(table), "--out", str(tmp_path / "out"), "--leak-free", "cross-fit"]) == 2
    err = capsys.readouterr().err
    assert "--leak-free cross-fit is for the built-in suites" in err and "source-out" in err
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("name", ["_fit", "_source_weights", "mix_difficulty"])
def test_the_score_cache_is_keyed_by_the_fitting_code_itself(monkeypatch, name):
    """The cache key hashed `fit`, a four-line wrapper: a change to the fitting (`_fit`: class weights,
    expert rows; the per-source weights; the expert mixture) reused the scores of the old fit."""
    from evals import classification
    from router import train as T

    before = classification._code_hash()

    def edited(*args, **kwargs):  # stands for an edit of the function's code
        return None

    monkeypatch.setattr(T, name, edited)
    assert classification._code_hash() != before


@pytest.mark.parametrize("module, line, edit", [("messages", "USER_TAIL_CHARS = 500", "USER_TAIL_CHARS = 400"),
                                                 ("features", "MAX_USER_BYTES = 4000", "MAX_USER_BYTES = 3000"),
                                                 ("handcrafted", '_DIGITS = b"0123456789"', '_DIGITS = b"0123456"')])
def test_the_score_cache_is_keyed_by_the_prompt_reading_and_hashing_code(tmp_path, monkeypatch, module, line, edit):
    """The features are router/messages.py's reading of the conversation plus router/features.py's
    hashing and router/handcrafted.py's numbers: an edit to any of them (here a truncation limit or the
    digits counted) must not reuse the old scores."""
    import importlib
    from pathlib import Path

    from evals import classification

    before = classification._code_hash()
    source = importlib.import_module(f"router.{module}")
    text = Path(source.__file__).read_text(encoding="utf-8")
    assert line in text
    edited = tmp_path / f"{module}.py"
    edited.write_text(text.replace(line, edit), encoding="utf-8")
    monkeypatch.setattr(source, "__file__", str(edited))  # inspect.getsource reads the module's file
    assert classification._code_hash() != before


def test_the_oracle_takes_the_cheapest_arm_that_is_right_by_hand():
    """Four prompts, a dear arm listed first and a cheap one: both right (the cheap one), only the dear
    one right, only the cheap one right, neither right (the cheap one: nothing is gained by paying)."""
    from evals.routing import oracle

    arms = [ArmInfo("dear", "dear"), ArmInfo("cheap", "cheap")]
    scores = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    cost = np.array([[10.0, 1.0]] * 4)
    tokens = np.array([[50.0, 5.0]] * 4)
    table = OutcomeTable("by-hand", arms, ["a", "b", "c", "d"], ["p"] * 4, ["g"] * 4, scores, cost, tokens,
                         np.full(4, 10.0), "hand")
    assert oracle(table) == pytest.approx({"accuracy": 0.75, "cost_usd": (1 + 10 + 1 + 1) / 4,
                                           "output_tokens": (5 + 50 + 5 + 5) / 4})
