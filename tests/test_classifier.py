"""Task-type and difficulty classifier: ONNX = scikit-learn, bad input never raises, sane answers.

Needs only the repo and ../shared/datasets (for the small retrain and the held-out checks).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from router import features as F
from router import handcrafted as H
from router.classifier import SAFE_DEFAULT, Classifier, ClassifierError
from router.classifier import cli as classify_cli
from router.messages import USER_HEAD_CHARS, USER_TAIL_CHARS, prompt_from_messages, prompt_from_text
from router.types import TASK_TYPES, Classification

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "router" / "artifacts"


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.load()


@pytest.fixture(scope="module")
def examples():
    from router.train_data import default_datasets_dir, load_examples

    if not default_datasets_dir().exists():
        pytest.skip("../shared/datasets not found")
    sources = ["math", "gsm8k", "mmlu_pro", "bbh", "mbpp", "humaneval", "nq_open", "topical_chat", "self_instruct"]
    return load_examples(sources=sources, seed=0)


def _valid(c: Classification) -> None:
    assert isinstance(c, Classification)
    assert c.task in TASK_TYPES
    assert set(c.task_probs) == set(TASK_TYPES)
    assert all(0.0 <= p <= 1.0 and not math.isnan(p) for p in c.task_probs.values())
    assert abs(sum(c.task_probs.values()) - 1.0) < 1e-3
    assert 0.0 <= c.difficulty <= 1.0
    assert c.tier in ("easy", "medium", "hard")


# --- ONNX agrees with scikit-learn ---------------------------------------------------------------


def test_onnx_matches_sklearn_on_held_out(examples):
    """Retrain a small model, convert it exactly as `ponder train` does, compare on held-out prompts:
    scikit-learn vs the shipped graph (through the runtime's feature path) and vs skl2onnx's raw output."""
    import onnxruntime as ort

    from router import train as T

    rng = random.Random(0)
    train_pool = [ex for ex in examples if not T.is_test_group(ex.group)]
    test_pool = [ex for ex in examples if T.is_test_group(ex.group)]
    small = []
    for task in TASK_TYPES:
        of_task = [ex for ex in train_pool if ex.task == task]
        small += rng.sample(of_task, min(150, len(of_task)))
    small += rng.sample([ex for ex in train_pool if ex.task is None], 100)  # difficulty-only rows
    held = rng.sample(test_pool, 300) + [ex for ex in test_pool if ex.messages[0]["role"] == "system"][:50]
    models = T.fit(small, T.feature_matrix(small), seed=0)
    # the task head reads no turn counts (issue #3); the difficulty experts do
    excluded = [F.N_HASHED + H.HANDCRAFTED.index(name) for name in T.TASK_HEAD_EXCLUDED]
    assert not models.task.coef_[:, excluded].any() and models.experts.coef_[:, excluded].any()

    model_bytes = T.to_onnx(models).SerializeToString()
    agree = T.agreement(models, model_bytes, held)  # shipped sparse graph and skl2onnx's dense one
    assert agree["rows"] == len(held)
    assert agree["task_probs_max_abs_diff"] < 1e-4
    assert agree["difficulty_max_abs_diff"] < 1e-4
    assert agree["skl2onnx_reference_max_abs_diff"] < 1e-4
    assert agree["task_argmax_agreement"] == 1.0

    # The sparse graph directly, on a batch mixing empty, system-prompted, long and junk prompts
    # (empty segments, a whole batch of empty rows), against scikit-learn on the dense matrix.
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for batch in ([ex.messages for ex in held[:40]] + BAD_INPUTS, [[], []], [[]]):
        prompts = [prompt_from_messages(m) for m in batch]
        task_ox, diff_ox = np.zeros((len(prompts), len(TASK_TYPES)), np.float32), np.zeros(len(prompts), np.float32)
        for rows, feeds in F.onnx_feeds(F.featurize_sparse(prompts)):
            task_ox[rows], diff_ox[rows] = session.run(["task_probs", "difficulty"], feeds)
        dense = F.featurize(prompts)
        import scipy.sparse as sp

        task_sk, diff_sk = models.predict(sp.csr_matrix(dense))
        assert np.abs(task_ox - task_sk).max() < 1e-4 and np.abs(diff_ox - diff_sk).max() < 1e-4


def test_sparse_features_are_the_dense_vector():
    """featurize_sparse (what the runtime feeds) holds exactly featurize's vector, row by row, and
    a row does not depend on the rest of its batch."""
    batch = [prompt_from_messages(m) for m in BAD_INPUTS[:20]] + [prompt_from_text("x " * i) for i in range(30)]
    sf = F.featurize_sparse(batch)
    assert sf.bounds[0] == 0 and sf.bounds[-1] == len(sf.indices) == len(sf.tf) and len(sf.bounds) == 3 * len(batch) + 1
    assert np.all(np.diff(sf.bounds) >= 0)
    dense = F.featurize(batch)
    for r in range(len(batch)):
        lo, hi = sf.bounds[3 * r], sf.bounds[3 * r + 3]
        row = np.zeros(F.N_FEATURES, np.float32)
        row[sf.indices[lo:hi]] = sf.tf[lo:hi]
        row[F.N_HASHED :] = sf.handcrafted[r]
        assert np.array_equal(row, dense[r])
        for block, (start, end) in enumerate(((0, F.SYSTEM_OFFSET), (F.SYSTEM_OFFSET, F.CHAR_OFFSET), (F.CHAR_OFFSET, F.N_HASHED))):
            cols = sf.indices[sf.bounds[3 * r + block] : sf.bounds[3 * r + block + 1]]
            assert np.all((cols >= start) & (cols < end)) and np.all(np.diff(cols) > 0)
        alone = F.featurize_sparse([batch[r]])
        assert np.array_equal(alone.indices, sf.indices[lo:hi]) and np.array_equal(alone.tf, sf.tf[lo:hi])
    # What the session is fed: calls covering every row once, each row's n-grams in its first slots
    # (padding: column 0, weight 0), its tf in its block's row of `weights`, the squares 3 rows below.
    calls = F.onnx_feeds(sf)
    assert sorted(np.concatenate([rows for rows, _ in calls]).tolist()) == list(range(len(batch)))
    for rows, feeds in calls:
        indices, weights = feeds["indices"], feeds["weights"]
        assert indices.shape[0] == len(rows) and weights.shape == (len(rows), 6, indices.shape[1]) and weights.dtype == np.float32
        assert np.array_equal(feeds["handcrafted"], sf.handcrafted[rows])
        assert np.array_equal(weights[:, 3:], weights[:, :3] ** 2)
        for i, r in enumerate(rows):
            lo, hi = sf.bounds[3 * r], sf.bounds[3 * r + 3]
            n = hi - lo
            assert np.array_equal(indices[i, :n], sf.indices[lo:hi]) and not indices[i, n:].any()
            assert not weights[i, :, n:].any()
            for block in range(3):
                a, b = sf.bounds[3 * r + block] - lo, sf.bounds[3 * r + block + 1] - lo
                assert np.array_equal(weights[i, block, a:b], sf.tf[lo + a : lo + b])
                assert not weights[i, block, :a].any() and not weights[i, block, b:n].any()
    rng = random.Random(0)
    varied = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(3000))  # thousands of distinct n-grams
    big = F.featurize_sparse([prompt_from_text(varied[i : i + 40 * i]) for i in range(64)])
    calls = F.onnx_feeds(big)
    assert len(calls) > 1  # long batches are cut, so padding and the weights input stay small
    assert all(f["indices"].size <= F.MAX_SLOTS for rows, f in calls if len(rows) > 1)


def test_native_hashing_is_the_numpy_reference(examples):
    """router/_ngrams.c (built by `pip install`) gives exactly the numpy path's columns, counts,
    handcrafted numbers and ONNX inputs: on held-out prompts of every source, on junk, and with
    system prompts."""
    if F._native is None:
        pytest.fail("router._ngrams is not built: run `pip install -e .` (scripts/install.sh does)")
    prompts = [prompt_from_messages(m) for m in BAD_INPUTS]
    prompts += [prompt_from_messages(ex.messages) for ex in examples[::7]]
    prompts += [
        prompt_from_text("Zürich 1234 snake_case\n(a) 12\n(B) x\x00y", system="You are\x00 terse. 42"),
        prompt_from_text("", system="only a system prompt"),
        prompt_from_text("ab"),
        prompt_from_text("\x00"),
    ]
    for p in prompts:
        native, reference = F._sparse_one(p), F._sparse_one_numpy(p)
        for name, a, b in zip(native._fields, native, reference):
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, p.user[:60])
        # and the request path's ONNX inputs, built in C, are the numpy path's feeds
        (_, expected), = F.onnx_feeds(reference)
        for name, a in F.onnx_feeds_one(p).items():
            b = expected[name]
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (name, p.user[:60])
    # the batch path is the single rows, concatenated
    batch = F.featurize_sparse(prompts[:200])
    native = F._native
    try:
        F._native = None
        reference = F.featurize_sparse(prompts[:200])
    finally:
        F._native = native
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(batch, reference))


def test_runtime_features_match_training_features(clf):
    """The runtime featurises a conversation exactly as training did (one code path, batch = single)."""
    batch = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "def f(x):\n    return x"}],
        "plain string prompt",
        [],
    ]
    together = F.featurize_messages(batch)
    alone = np.vstack([F.featurize_messages([m]) for m in batch])
    assert np.array_equal(together, alone)
    # A batch's segment sums come from one larger MatMul (other summation blocking), so a row's
    # numbers can differ from its single-prompt numbers in the last float32 bits; never more.
    for one, many in zip([clf.classify(m) for m in batch], clf.classify_batch(batch)):
        assert one.task == many.task and abs(one.difficulty - many.difficulty) < 1e-6
        assert all(abs(one.task_probs[t] - many.task_probs[t]) < 1e-6 for t in TASK_TYPES)


# --- bad input -----------------------------------------------------------------------------------

MEGABYTE = "The quick brown fox jumps over the lazy dog. " * 23302
JUNK = "".join(chr(random.Random(1).randrange(0, 0x3000)) for _ in range(5000)) + "\x00\ud800\udfff"
BAD_INPUTS = [
    [],
    [{"role": "system", "content": "You are a helpful assistant."}],
    [{"role": "user", "content": MEGABYTE}],
    [{"role": "user", "content": JUNK}],
    [{"role": "user", "content": bytes(range(256)) * 10}],
    [{"role": "user", "content": "这个问题的答案是什么？请详细解释量子力学的基本原理。"}],
    [{"role": "user", "content": "ما هي عاصمة فرنسا؟"}],
    [{"role": "user", "content": "Привет! Как дела? Что нового?"}],
    [{"role": "user", "content": "😀🎉🔥💯🙏" * 200}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": 42}],
    [{"role": "user"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Solve x^2 = 4"}, {"type": "input_audio"}, None, 7]}],
    [{"role": "user", "content": [{"type": "text", "text": None}, {"type": "text"}]}],
    [{"role": None, "content": "x"}, {"role": 5, "content": "y"}],
    [None, 1, "str", ["nested"], {"role": "user", "content": {"weird": "dict"}}],
    [{"role": "assistant", "content": "only the assistant spoke"}],
    [{"role": "tool", "content": "{}", "tool_call_id": "a"}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "hi"}] * 10_000,
    None,
    42,
    "a bare string",
    {"role": "user", "content": "a single message dict"},
    b"bytes",
    object(),
]


@pytest.mark.parametrize("messages", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_gives_valid_classification(clf, messages):
    _valid(clf.classify(messages))


def test_bad_inputs_in_one_batch(clf):
    results = clf.classify_batch(BAD_INPUTS)
    assert len(results) == len(BAD_INPUTS)
    for c in results:
        _valid(c)


def test_classify_text_and_features_on_junk(clf):
    for text in ("", MEGABYTE, JUNK, "\x00" * 1000, None, 3.5):
        _valid(clf.classify_text(text))  # type: ignore[arg-type]
        assert F.featurize([prompt_from_text(text)]).shape == (1, F.N_FEATURES)


def test_long_input_is_truncated_deterministically(clf):
    prompt = prompt_from_messages([{"role": "user", "content": MEGABYTE}])
    assert len(prompt.user) <= USER_HEAD_CHARS + USER_TAIL_CHARS + 1
    assert prompt.user_chars == len(MEGABYTE)
    assert clf.classify([{"role": "user", "content": MEGABYTE}]) == clf.classify([{"role": "user", "content": MEGABYTE}])


def test_a_long_paste_keeps_its_head_and_the_question_at_its_end():
    """Long pastes end with the actual question: the classifier reads the first 2,000 characters and the
    last 500, never the head alone; a prompt of exactly 2,500 characters is read whole."""
    question = "Given the log above, what is the probability that the job fails twice in a row?"
    paste = "INFO worker started; " * 400 + question
    user = prompt_from_messages([{"role": "user", "content": paste}]).user
    assert user == paste[:USER_HEAD_CHARS] + "\n" + paste[-USER_TAIL_CHARS:]
    assert user.endswith(question)
    whole = "x" * (USER_HEAD_CHARS + USER_TAIL_CHARS)
    assert prompt_from_messages([{"role": "user", "content": whole}]).user == whole


def test_internal_failure_returns_safe_default(clf):
    class BrokenSession:
        def run(self, *args, **kwargs):
            raise RuntimeError("boom")

    broken = Classifier(BrokenSession(), clf.card)
    assert broken.classify([{"role": "user", "content": "hi"}]) == SAFE_DEFAULT
    assert broken.classify_batch([[], []]) == [SAFE_DEFAULT, SAFE_DEFAULT]
    assert broken.classify_batch(x for x in [1, 2] if 1 / 0) == [SAFE_DEFAULT]  # a raising iterable


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ClassifierError):
        Classifier.load(tmp_path)  # no card
    card = json.loads((ARTIFACTS / "classifier.json").read_text())
    card["feature_version"] = -1
    (tmp_path / "classifier.json").write_text(json.dumps(card))
    with pytest.raises(ClassifierError, match="features"):
        Classifier.load(tmp_path)


# --- uses the conversation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "user,system,task",
    [
        # Wordings that appear nowhere in training (see train_system_prompts.TASK_SYSTEM_PROMPTS / TASK_ROLES).
        # ("How do I reverse a list?" was the programmer's case until the multi-turn refit read it as
        # code on its own, p 0.39 against 0.34 before: a list is a data structure, so that is right.)
        ("How do I reverse the order?", "You are a programming assistant that writes Python code.", "code"),
        # ("What is the answer?" was the math case until the task head stopped reading the turn
        # counts: under this system prompt it went from math 0.58 to 0.47, knowledge 0.53. With
        # "here" both models read it as math, 0.82 / 0.81; six other unseen short requests moved
        # by at most 0.05.)
        ("What is the answer here?", "You are a math homework helper. Always show the steps.", "math"),
        # ("Make it shorter." was the editor's case until the short synthetic requests taught the
        # model that it is a writing request on its own.)
        ("Improve this for me.", "You are an editor who rewrites text to be concise.", "writing"),
    ],
)
def test_system_prompt_changes_the_result(clf, user, system, task):
    alone = clf.classify([{"role": "user", "content": user}])
    with_system = clf.classify([{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert alone.task != task
    assert with_system.task == task
    assert with_system.task_probs[task] > alone.task_probs[task] + 0.3


def test_last_user_turn_is_what_is_classified(clf):
    convo = [
        {"role": "user", "content": "Hi there! How was your weekend?"},
        {"role": "assistant", "content": "Great, thanks for asking!"},
        {"role": "user", "content": "Find all real x such that $x^2 - 5x + 6 = 0$."},
    ]
    assert clf.classify(convo).task == "math"
    assert clf.classify(convo[:1]).task == "chat"


def test_an_agents_request_is_read_however_many_tool_round_trips_follow_it(clf):
    """An agent loop's last message is a tool result; the user's request can be hundreds of messages
    back. The last user turn was looked for among the last 256 messages only, so a coding agent past
    128 tool calls was classified as an empty prompt (chat, difficulty 0.08: the cheapest arm)."""
    request = "Refactor the payment module to use async Python and add unit tests"
    convo = [{"role": "system", "content": "You are a coding agent with shell access."}, {"role": "user", "content": request}]
    for i in range(200):
        convo += [{"role": "assistant", "content": None,
                   "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"}]
    assert prompt_from_messages(convo).user == request
    assert clf.classify(convo).task == "code"


def test_parts_content_is_read(clf):
    parts = [{"type": "text", "text": "Write a Python function"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "that returns the n-th Fibonacci number."}]
    assert clf.classify([{"role": "user", "content": parts}]).task == "code"


# --- sanity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,task",
    [
        ("Let $f(x) = 3x^2 - 2x + 1$. Compute $f(4) - f(-1)$.", "math"),
        ("A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How many miles does it travel in total?", "math"),
        ("Write a Python function `is_palindrome(s: str) -> bool` that ignores case and punctuation.", "code"),
        ("```python\ndef f(xs):\n    return sorted(xs)[::-1]\n```\nWhat does f([3, 1, 2]) return?", "code"),
        ("hey! how's it going? did you watch the game last night?", "chat"),
        ("I love hiking in the fall, the colors are amazing. Do you have a favorite season?", "chat"),
        ("who wrote the novel pride and prejudice", "knowledge"),
        ("Write a polite email to my landlord asking to fix the heating this week.", "writing"),
    ],
)
def test_clear_prompts(clf, text, task):
    assert clf.classify_text(text).task == task


def test_task_terms_count_distinct_words_of_each_list():
    hand = F.featurize_sparse([prompt_from_text("Implement quicksort in Rust, then RUST it in C++ and write an email")]).handcrafted[0]
    terms = {name: float(hand[H.HANDCRAFTED.index(f"log_{name}_terms")]) for name in H.TASK_TERMS}
    assert terms["code"] == pytest.approx(math.log1p(2))  # rust (once, whatever its case) and c++
    assert terms["writing"] == pytest.approx(math.log1p(1)) and terms["math"] == terms["reasoning"] == 0.0
    for a, b in [("code", "math"), ("code", "writing"), ("math", "writing"), ("math", "reasoning")]:
        assert not H.TASK_TERMS[a] & H.TASK_TERMS[b], (a, b)  # a word counts for one task only


def test_natural_prompts_are_read_as_people_type_them(clf):
    """Short prompts in everyday wording (router/data, hand-written, never trained on): the benchmarks'
    formats are not how users ask. Features v3 read 62% / 65% of sets A / B right, v4 77% / 80%, v4 with
    the short synthetic requests 83% / 80% (and set C 72%, 64% before them), with the multi-turn refit
    (shipped) 83% / 78% and set C 72% (docs/classifier.md). A style-only system prompt must not change what a request is: "Be brief."
    used to send most of them to knowledge (47% right)."""
    from router.train_metrics import STYLE_SYSTEM_PROMPTS
    from router.train_data import load_extra

    # Set C (480 prompts, written apart from the training data and never used to choose) is harder:
    # its everyday puzzles are read right a third of the time, so its floor per type is lower.
    type_floor = {"natural_prompts_c": 0.3}
    paths = sorted((REPO / "router" / "data").glob("natural_prompts*.jsonl"))
    assert [p.stem for p in paths] == ["natural_prompts", "natural_prompts_b", "natural_prompts_c"]
    for path in paths:
        examples = load_extra(path)
        for system, floor in ((None, 0.70), ("Be brief.", 0.65), *((s, 0.65) for s in STYLE_SYSTEM_PROMPTS)):
            prefix = [{"role": "system", "content": system}] if system else []
            predicted = clf.classify_batch([prefix + ex.messages for ex in examples])
            right = [c.task == ex.task for c, ex in zip(predicted, examples)]
            assert sum(right) / len(right) >= floor, (path.name, system)
            if system is None:  # and no type is lost on them
                for task in TASK_TYPES:
                    assert sum(r for r, ex in zip(right, examples) if ex.task == task) >= \
                        type_floor.get(path.stem, 0.4) * sum(ex.task == task for ex in examples), (path.name, task)


def _layout(text: str) -> dict[str, float]:
    hand = F.featurize_sparse([prompt_from_text(text)]).handcrafted[0]
    return {name: float(hand[H.HANDCRAFTED.index(name)]) for name in H.HANDCRAFTED if name.startswith(("log_stem", "log_option"))}


def test_multiple_choice_layout_features():
    """Option lines in any of the layouts the training set uses are counted, and the stem's length
    and digits are measured apart from the options'."""
    stem = "A car travels 120 km in 1.5 hours. What is its average speed?"
    for style in ("{l}. {t}", "({l}) {t}", "{l}) {t}"):
        options = "\n".join(style.format(l=l, t=t) for l, t in zip("ABCD", ("60 km/h", "80 km/h", "90 km/h", "100 km/h")))
        layout = _layout(f"{stem}\nOptions:\n{options}")
        assert layout["log_option_lines"] == pytest.approx(math.log1p(4))
        assert layout["log_stem_chars"] == pytest.approx(math.log1p(len(stem + "\nOptions:")) / 8.0)
        assert layout["log_stem_digits"] == pytest.approx(math.log1p(5))  # 120 and 1.5
        assert layout["log_option_digits"] == pytest.approx(math.log1p(9))
        assert layout["log_option_mean_bytes"] > 0
    plain = _layout(stem)  # no options: the whole turn is the stem
    assert plain["log_option_lines"] == plain["log_option_mean_bytes"] == plain["log_option_digits"] == 0.0
    assert plain["log_stem_chars"] == pytest.approx(math.log1p(len(stem)) / 8.0)
    assert _layout("Plan A) first, then plan B) second.")["log_option_lines"] == 0.0  # not at a line start


def test_mmlu_pro_difficulty_tracks_model_failures(clf, examples):
    """On held-out MMLU-Pro questions, predicted difficulty ranks like the share of the 29 models that miss."""
    from scipy.stats import spearmanr

    from router.train import is_test_group

    held = [ex for ex in examples if ex.source == "mmlu_pro" and is_test_group(ex.group) and "mmlu_fail_share" in ex.grades][:1500]
    assert len(held) > 1000
    predicted = [c.difficulty for c in clf.classify_batch([ex.messages for ex in held])]
    assert spearmanr(predicted, [ex.grades["mmlu_fail_share"] for ex in held])[0] > 0.4


def test_math_level5_harder_than_easy_gsm8k(clf, examples):
    from router.train import is_test_group

    held = [ex for ex in examples if is_test_group(ex.group)]
    level5 = [ex.messages for ex in held if ex.source == "math" and ex.grades.get("math_level") == 5][:300]
    level1 = [ex.messages for ex in held if ex.source == "math" and ex.grades.get("math_level") == 1][:300]
    easy_gsm8k = [ex.messages for ex in held if ex.source == "gsm8k" and ex.grades.get("gsm8k_fail_share") == 0][:300]
    assert len(level5) > 50 and len(easy_gsm8k) > 20
    mean = lambda batch: float(np.mean([c.difficulty for c in clf.classify_batch(batch)]))  # noqa: E731
    assert mean(level5) > mean(easy_gsm8k) + 0.15
    assert mean(level5) > mean(level1) + 0.1


# --- artifact and CLI ----------------------------------------------------------------------------


def test_artifact_is_small_and_documented():
    card = json.loads((ARTIFACTS / "classifier.json").read_text())
    size = sum(p.stat().st_size for p in ARTIFACTS.iterdir() if p.is_file())
    assert size <= 5 * 1024 * 1024
    assert card["labels"] == list(TASK_TYPES)
    assert card["feature_version"] == F.FEATURE_VERSION
    assert card["training_data"]["datasets_sha256"]
    assert card["difficulty_target"]["definition"]
    assert card["metrics"]["held_out"]["task"]["macro_f1"] >= 0.9
    assert set(card["metrics"]["natural_prompts"]) == {"natural_prompts", "natural_prompts_b", "natural_prompts_c"}


def test_runtime_does_not_import_sklearn_and_loads_fast():
    code = (
        "import sys, time; t = time.perf_counter(); from router.classifier import Classifier; "
        "c = Classifier.load(); c.classify([{'role': 'user', 'content': 'hi'}]); "
        "print(time.perf_counter() - t); assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 3.0  # gateway readiness budget; bench/ measures the real number


def test_cli_text_and_files(tmp_path, capsys):
    assert classify_cli(["Solve for x: 2x + 3 = 11."]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["task"] == "math" and set(row) == {"task", "task_probs", "difficulty"}
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        json.dumps({"prompt": "hello, how are you?", "id": 1}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "def add(a, b): return a + b  # add tests"}]}) + "\n"
        + "not json\n"
        + json.dumps({"text": "no prompt key"}) + "\n"
        + json.dumps({"prompt": None}) + "\n"  # was classified as the text "None"
    )
    assert classify_cli(["--input", str(src), "--output", str(dst)]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["id"] == 1 and rows[0]["task"] == "chat"
    assert rows[4] == {"line": 5, "error": 'line 5: "prompt" must be a string'}
    assert all(r["task"] in TASK_TYPES for r in rows[:2])
    # a row that cannot be read keeps its place and says why, instead of a guess about nothing
    assert rows[2] == {"line": 3, "error": "line 3: not JSON (Expecting value)"}
    assert rows[3]["line"] == 4 and "prompt" in rows[3]["error"] and "task" not in rows[3]
    assert "3 row(s) not classified" in capsys.readouterr().err


def test_cli_text_goes_to_output_and_system_does_not_go_with_input(tmp_path, capsys):
    """`ponder classify TEXT --output F` wrote to stdout and never F (exit 0); `--system` with --input
    was ignored (each row's messages carry their own): the one is done, the other refused."""
    dst = tmp_path / "one.jsonl"
    assert classify_cli(["Solve for x: 2x + 3 = 11.", "--output", str(dst)]) == 0
    assert json.loads(dst.read_text())["task"] == "math" and capsys.readouterr().out == ""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(SystemExit) as done:
        classify_cli(["--input", str(src), "--system", "You are terse."])
    assert done.value.code == 2 and "--system goes with TEXT" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-3", "two"])
def test_cli_refuses_a_batch_size_below_one(tmp_path, capsys, size):
    """0 used to write nothing and -3 every row twice, both exiting 0."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(SystemExit) as done:
        classify_cli(["--input", str(src), "--output", str(dst), "--batch-size", size])
    assert done.value.code == 2 and not dst.exists()
    assert "argument --batch-size: " in capsys.readouterr().err


def test_cli_small_batches_write_each_row_once(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}?", "id": i}) + "\n" for i in range(5)) + "not json\n")
    assert classify_cli(["--input", str(src), "--output", str(dst), "--batch-size", "2"]) == 0
    assert [json.loads(line).get("id", "bad") for line in dst.read_text().splitlines()] == [0, 1, 2, 3, 4, "bad"]


def test_cli_output_may_be_its_input_and_odd_lines_are_rows(tmp_path):
    """--output naming the --input file used to empty it before it was read (exit 0, every row lost); a
    byte-order mark, a line in another encoding and a lone surrogate escape were tracebacks or bad rows."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "What is 2+2?", "id": 1}).encode() + b"\n"
                     + b'{"prompt": "caf\xe9"}\n'  # Latin-1, not UTF-8
                     + b'{"prompt": "half an emoji \\ud83d"}\n'
                     + json.dumps({"prompt": "Write a haiku about rain", "id": 4}).encode() + b"\n")
    assert classify_cli(["--input", str(path), "--output", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r.get("id") for r in rows] == [1, None, None, 4]
    assert rows[0]["task"] in TASK_TYPES and rows[3]["task"] in TASK_TYPES
    assert rows[1] == {"line": 2, "error": "line 2: not UTF-8"}
    assert rows[2]["prompt"] == "half an emoji \ud83d" and rows[2]["task"] in TASK_TYPES


def test_cli_output_lines_up_with_the_input_lines(tmp_path, capsys):
    """A blank line inside the file was skipped, so every later output row sat one line above its input
    row; `messages` that were a string, null, empty or held a number for content were classified as an
    empty conversation (task chat) instead of being said. Blank lines at the end make no rows."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"prompt": "What is 2+2?", "id": 1}), "",
             json.dumps({"messages": "Write a poem"}), json.dumps({"messages": None}),
             json.dumps({"prompt": "x", "messages": []}),
             json.dumps({"messages": [{"role": "user", "content": 42}]}),
             json.dumps({"messages": [{"content": "no role"}]}), json.dumps({"prompt": " "}),
             json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "def f(): pass"}]}], "id": 8}),
             "", ""]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert classify_cli(["--input", str(src), "--output", str(dst)]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(rows) == 9 and [r.get("id") for r in rows] == [1, None, None, None, None, None, None, None, 8]
    assert rows[0]["task"] in TASK_TYPES and rows[8]["task"] in TASK_TYPES
    assert rows[1] == {"line": 2, "error": "line 2: empty"}
    must = '"messages" must be a non-empty list of {"role": ..., "content": ...} objects, not '
    assert [r["error"] for r in rows[2:7]] == [
        f"line 3: {must}'Write a poem'", f"line 4: {must}None", f"line 5: {must}[]",
        'line 6: "messages" item 1: "content" must be a string or a list of parts, not 42',
        "line 7: \"messages\" item 1 must be an object with a \"role\" string, not {'content': 'no role'}"]
    assert rows[7] == {"line": 8, "error": 'line 8: "prompt" is empty'}
    assert "7 row(s) not classified" in capsys.readouterr().err
    assert classify_cli(["--input", str(tmp_path / "nowhere.jsonl")]) == 2  # the input refused, as argparse's
    assert capsys.readouterr().err.startswith("ponder classify: [Errno 2] No such file or directory")


@pytest.mark.parametrize("text", ["", "  \n"])
def test_cli_refuses_empty_text(capsys, text):
    """`ponder classify "$UNSET"` printed a confident "chat" (0.94) about nothing, exit 0."""
    with pytest.raises(SystemExit) as done:
        classify_cli([text])
    assert done.value.code == 2 and "TEXT is empty: nothing to classify" in capsys.readouterr().err


def test_extra_jsonl_format(tmp_path):
    from router.train_data import load_extra

    good = tmp_path / "extra.jsonl"
    good.write_text(
        json.dumps({"prompt": "Summarise this memo", "task": "writing"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "task": "math", "difficulty": 0.01}) + "\n"
    )
    rows = load_extra(good)
    assert [r.task for r in rows] == ["writing", "math"] and rows[1].difficulty == 0.01
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "task": "poetry"}) + "\n")
    with pytest.raises(ValueError, match="task must be one of"):
        load_extra(bad)


@pytest.mark.parametrize("line, message", [
    ('{"text": "Summarise this memo", "task": "writing"}', 'a row needs "prompt" (a string) or "messages"'),
    ('{"messages": "Summarise this memo", "task": "writing"}', '"messages" must be a non-empty list'),
    ('["Summarise this memo", "writing"]', "expected an object"),
    ('{"prompt": "x", "difficulty": "hard"}', "difficulty must be a number in [0, 1], got 'hard'"),
    ('{"prompt": "x", "task": "math", "difficulty": NaN}', "difficulty must be a number in [0, 1], got nan"),
    ("{'prompt': 'x', 'task': 'math'}", "not JSON (Expecting property name"),
    # out of [0, 1] was clipped to 1 or 0 and trained on; an empty prompt or a number for content trained
    # a label on no text; one prompt labelled two ways trained on both labels
    ('{"prompt": "x", "difficulty": 1.5}', "difficulty must be a number in [0, 1], got 1.5"),
    ('{"prompt": "x", "task": "math", "difficulty": -0.2}', "difficulty must be a number in [0, 1], got -0.2"),
    ('{"prompt": " ", "task": "chat"}', '"prompt" is empty'),
    ('{"messages": [{"role": "user", "content": 42}], "task": "chat"}',
     '"messages" item 1: "content" must be a string or a list of parts, not 42'),
    ('{"messages": [{"role": "user", "content": "Fix my SQL join"}], "task": "math"}',
     "mine.jsonl:1 again, labelled differently (task 'math', difficulty None here; task 'code', "
     "difficulty None there)"),
])
def test_train_refuses_a_bad_extra_row_before_loading_the_datasets(tmp_path, monkeypatch, capsys, line, message):
    """A typo in the user's file used to train on an empty prompt ("text" for "prompt"), or fail after
    minutes (NaN), or be a traceback; now it is one line naming the file and line, at once."""
    from router import train as T

    monkeypatch.setattr(T, "load_examples", lambda *a, **k: pytest.fail("loaded the datasets first"))
    path = tmp_path / "mine.jsonl"
    path.write_text("\ufeff" + json.dumps({"prompt": "Fix my SQL join", "task": "code"}) + "\n\n" + line + "\n",
                    encoding="utf-8")
    assert T.cli(["--out", str(tmp_path / "art"), "--extra", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ponder train: {path}:3: ") and message in err and "\n" not in err
    assert not (tmp_path / "art").exists()
    assert T.cli(["--validate", "--extra", str(path)]) == 2  # --validate reads them too (it ignored them)
    assert capsys.readouterr().err.strip() == err


def test_train_reads_several_extra_files_as_one(tmp_path, monkeypatch, capsys):
    """A file not in UTF-8 was the bare "'utf-8' codec can't decode byte 0xe9" (no file, no line); one
    prompt labelled two ways in two files trained on both labels; a file named twice counted every row
    twice."""
    from router import train as T
    from router.train_data import load_extras

    monkeypatch.setattr(T, "load_examples", lambda *a, **k: pytest.fail("loaded the datasets first"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "Fix my SQL join", "task": "code"}\n{"prompt": "caf\xe9?", "task": "chat"}\n')
    assert T.cli(["--out", str(tmp_path / "art"), "--extra", str(latin)]) == 2
    assert capsys.readouterr().err == (f"ponder train: {latin}:2: not UTF-8 (the byte 0xe9); save the file as UTF-8 "
                                       "or convert it, e.g. iconv -f cp1252 -t utf-8\n")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text(json.dumps({"prompt": "Fix my SQL join", "task": "code"}) + "\n")
    two.write_text(json.dumps({"prompt": "Write a haiku", "task": "writing"}) + "\n"
                   + json.dumps({"prompt": "Fix my SQL join", "difficulty": 0.3, "task": "code"}) + "\n")
    assert T.cli(["--out", str(tmp_path / "art"), "--extra", str(one), "--extra", str(two)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ponder train: {two}:2: the prompt of {one}:1 again, labelled differently (task 'code', difficulty 0.3 "
        "here; task 'code', difficulty None there)")
    assert not (tmp_path / "art").exists()
    assert [ex.task for ex in load_extras([one, str(one), tmp_path / "." / "one.jsonl"])] == ["code"]


def test_train_validate_fits_and_scores_the_extra_rows_too(tmp_path, monkeypatch, capsys):
    """`ponder train --validate --extra F` is how an operator sees what their prompts change before
    writing an artifact: the rows join the fit and the validation split as in a training run (they
    were ignored: the same scores with or without them). A datasets dir that is not there is an error
    line, not a traceback."""
    from router import train as T
    from router.train_data import load_extra

    base = load_extra(REPO / "router" / "data" / "natural_prompts.jsonl")  # a small stand-in for the datasets
    monkeypatch.setattr(T, "load_examples", lambda *a, **k: list(base))
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": f"Draft a memo about item {i}", "task": "writing"}) + "\n"
                            for i in range(40)))
    alone, with_mine = T.validate(0), T.validate(0, extra=[str(mine)])
    assert with_mine["task"]["n"] > alone["task"]["n"]
    assert T.cli(["--validate", "--extra", str(mine)]) == 0 and json.loads(capsys.readouterr().out)["macro_f1"] > 0
    monkeypatch.undo()
    assert T.cli(["--validate", "--datasets", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ponder train: no datasets folder at {tmp_path / 'nowhere'}: set PONDER_DATASETS "
                          "(or `ponder train --datasets`) to the folder")  # its own flag, which `ponder eval` lacks


def test_datasets_path_override(monkeypatch, tmp_path):
    from router.train_data import default_datasets_dir

    monkeypatch.setenv("PONDER_DATASETS", str(tmp_path))
    assert default_datasets_dir() == tmp_path
    assert default_datasets_dir("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv("PONDER_DATASETS")
    assert default_datasets_dir() == REPO.parent / "shared" / "datasets"
    assert os.path.basename(os.path.dirname(default_datasets_dir())) == "shared"


def test_short_requests_are_seeded_labelled_and_apart_from_the_check_sets():
    """The synthetic short requests (training only) are the same every run, cover every type, and
    share no text with the natural prompt sets that check them (else the check would measure recall
    of training rows)."""
    from router.short_requests import PER_TASK, short_requests
    from router.train_data import load_extra

    rows = short_requests(0)
    assert rows == short_requests(0) and rows != short_requests(1)
    assert {task for _, task in rows} == set(TASK_TYPES) == set(PER_TASK)
    assert len({text for text, _ in rows}) == len(rows)
    checked = {" ".join(ex.messages[-1]["content"].lower().split())
               for path in (REPO / "router" / "data").glob("natural_prompts*.jsonl") for ex in load_extra(path)}
    assert not checked & {" ".join(text.lower().split()) for text, _ in rows}


# --- earlier turns (issue #3) --------------------------------------------------------------------


def test_multi_turn_check_builds_neutral_history():
    """router/multiturn_check.py puts k small-talk exchanges after the system prompt and before the
    prompt; its lines are its own (not from the check sets, the short requests or Topical-Chat)."""
    from router.multiturn_check import HISTORY_ASSISTANT, HISTORY_USER, with_history
    from router.short_requests import short_requests
    from router.train_data import load_extra

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Prove it."}]
    long = with_history(messages, 10)
    assert long[0] == messages[0] and long[-1] == messages[-1] and len(long) == 22
    assert [m["role"] for m in long[1:-1]] == ["user", "assistant"] * 10
    assert with_history(messages, 0) == messages and with_history(messages, 3) == with_history(messages, 3)
    lines = {" ".join(t.lower().split()) for t in HISTORY_USER + HISTORY_ASSISTANT}
    checked = {" ".join(str(m["content"]).lower().split())
               for path in (REPO / "router" / "data").glob("natural_prompts*.jsonl") for ex in load_extra(path)
               for m in ex.messages}
    assert not lines & checked
    assert not lines & {" ".join(text.lower().split()) for text, _ in short_requests(0)}


def test_multi_turn_check_on_the_shipped_model(clf):
    """The natural sets A, B, C with k generic earlier exchanges (docs/classifier.md, "Earlier turns").
    The model before the multi-turn refit read a long conversation as chat: pooled macro-F1 0.743 at
    k=0, 0.658 at k=10, 0.567 at k=30 (47% of the non-chat requests read as chat at k=30); the refit
    0.744 / 0.725 / 0.707 (15%). The shipped task head does not read the turn counts: 0.745 at every
    k, 6.9% read as chat. The floors are the rule that candidate was kept by."""
    import json as _json

    from router.multiturn_check import classifier_predict, multiturn_metrics

    found = multiturn_metrics(classifier_predict(clf), ks=(0, 3, 10, 30))["by_k"]
    card = _json.loads((ARTIFACTS / "classifier.json").read_text())["metrics"]["natural_prompts"]
    for name, stem in (("A", "natural_prompts"), ("B", "natural_prompts_b"), ("C", "natural_prompts_c")):
        assert abs(found["0"][name]["macro_f1"] - card[stem]["macro_f1"]) < 1e-3  # k=0 is the plain check
    assert found["0"]["pooled"]["macro_f1"] >= 0.734
    for k in ("3", "10", "30"):
        assert found[k]["pooled"]["macro_f1"] >= found["0"]["pooled"]["macro_f1"] - 0.01
    assert found["30"]["pooled"]["non_chat_read_as_chat"] <= 0.08


def test_earlier_turns_do_not_move_the_task(clf):
    """The task head has zero weight on the turn counts (train.TASK_HEAD_EXCLUDED), so earlier
    exchanges change no task probability; the difficulty experts may still read them."""
    from router.multiturn_check import with_history

    for text in ("Prove that sqrt(2) is irrational.", "What is the capital of Peru?", "hey, how's it going?"):
        alone = clf.classify([{"role": "user", "content": text}])
        for k in (1, 10, 30):
            later = clf.classify(with_history([{"role": "user", "content": text}], k))
            assert later.task == alone.task
            assert max(abs(later.task_probs[t] - alone.task_probs[t]) for t in alone.task_probs) < 1e-6


def test_a_hard_question_is_still_math_after_ten_exchanges(clf):
    """Issue #3's spot check: the multi-turn refit read it as chat after 10 exchanges."""
    from router.multiturn_check import with_history

    c = clf.classify(with_history([{"role": "user", "content": "Prove that sqrt(2) is irrational."}], 10))
    assert c.task == "math"


def test_short_proof_requests_are_math(clf):
    """Issue #3's weak spot: a short request for a proof read as chat (0.47 and 0.59) because the
    datasets hold one labelled proof request; router/short_requests.py now has proof templates,
    none of these statements among them."""
    for text in ("Prove that there are infinitely many primes.", "Prove that the sum of two even numbers is even."):
        c = clf.classify([{"role": "user", "content": text}])
        assert c.task == "math", (text, c.task_probs)
