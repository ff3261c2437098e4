"""Answer extraction and equivalence by task, and the prompt parsers (router/answers.py, router/prompts.py)."""

from __future__ import annotations

import threading

import pytest

from router.answers import answer_format, answers_equivalent, comparable, extract_answer, normalize_math
from router.prompts import (
    with_cot_instruction,
    cot_instruction,
    final_answer,
    judge_messages,
    last_user_text,
    parse_judge_score,
    reply_until_stop,
)


# --- math -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\dfrac12", "0.5"),
        ("12\\frac{3}{5}", "\\frac{63}{5}"),
        ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
        ("x=3", "3"),
        ("4a-2", "-2+4a"),
        ("10{,}000", "10000"),
        ("90^\\circ", "90"),
        ("(1,2)", "(1, 2)"),
    ],
)
def test_math_equivalent_forms(a: str, b: str) -> None:
    assert answers_equivalent(a, b, "math")
    assert answers_equivalent(b, a, "math")


@pytest.mark.parametrize(("a", "b"), [("\\frac{1}{2}", "\\frac{1}{3}"), ("0.333", "\\frac{1}{3}"), ("2", "-2"), ("a", "b")])
def test_math_different_answers(a: str, b: str) -> None:
    assert not answers_equivalent(a, b, "math")


def test_math_boxed_extraction_takes_the_last_balanced_box() -> None:
    text = "First try \\boxed{3}. Wait, recompute: the result is \\boxed{\\frac{7}{\\sqrt{2}}}."
    assert extract_answer(text, "math") == "\\frac{7}{\\sqrt{2}}"
    assert extract_answer("so we get $\\boxed{4:30 \\text{ p.m.}}$", "math") == "4:30"


def test_math_marker_and_last_number_fallbacks() -> None:
    assert extract_answer("3 + 4 = 7\nThe answer is $7$.", "math") == "7"
    assert extract_answer("She makes 9 * 2 = $<<9*2=18>>18\nA: 18", "math") == "18"
    assert extract_answer("Total: 1,250 apples.\n#### 1,250", "math") == "1250"
    assert extract_answer("we add 2 and 3 and get 5", "math") == "5"
    assert extract_answer("no numbers at all", "math") is None
    assert extract_answer("", "math") is None


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("$\\frac{1}{3}$", "\\frac{1}{3}"),
        ("The value is \\dfrac{15}{2}", "\\frac{15}{2}"),
        ("it is $\\sqrt{2}$", "\\sqrt{2}"),
        ("so we get \\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}"),
        ("the ratio is 3/4", "3/4"),
        ("the mean is 7.5", "7.5"),
        ("it drops to -3", "-3"),
        ("then 5-3 leaves 2 and 9-4", "4"),  # a minus between numbers is subtraction, not a sign
        ("x is -\\frac{1}{2}", "-\\frac{1}{2}"),
        ("The area is 2\\pi", "2\\pi"),  # the coefficient alone would be another answer
        ("we get \\pi", "\\pi"),
        ("so the population is 10^5", "10^5"),  # was 5: a power's exponent is not its value
        ("So we get $3 \\times 10^5$", "3\\times10^5"),
        ("the result is $2^{10}$", "2^{10}"),
        ("we are left with x^2", None),  # not "2"
        ("hence a_{3}", None),
        ("which is 2^n", None),
    ],
)
def test_math_fallback_takes_the_last_expression_whole(text: str, answer: str) -> None:
    # no \\boxed and no marker: the last math expression, not a number cut out of its LaTeX
    assert extract_answer(text, "math") == answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Final answer: The value is 7", "7"),
        ("Final answer: 10 apples", "10"),
        ("The answer is x = 5 meters", "5"),
        ("Final answer: 1,000 dollars", "1000"),
        ("Final answer: y = 2x + 1", "y=2x+1"),  # no prose: the expression as written
        ("The answer is 7 hours and 30 minutes", "7hoursand30minutes"),  # two numbers: not guessed
    ],
)
def test_math_worded_answer_after_a_marker_is_its_one_number(text: str, answer: str) -> None:
    # "The value is 7" and "7" must vote together; the words used to be glued onto the number
    assert extract_answer(text, "math") == answer
    assert answers_equivalent(extract_answer(text, "math"), "7", "math") == (answer == "7")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Final answer: 2 pi", "2pi"),
        ("Final answer: 2pi", "2pi"),
        ("Final answer: pi/2", "pi/2"),
        ("Final answer: sqrt(2)", "sqrt(2)"),
        ("Final answer: ln 2", "ln2"),
        ("The answer is 3.5 million", "3.5million"),
        ("The answer is 5 squared", "5squared"),
        ("Final answer: x^2 meters", "x^2meters"),
    ],
)
def test_math_worded_answer_whose_words_are_part_of_its_value_is_not_cut_to_a_number(text: str, answer: str) -> None:
    # "pi/2" and "sqrt(2)" are not 2: a vote of "2", "pi/2" and "sqrt(2)" must not agree on "2"
    assert extract_answer(text, "math") == answer
    assert not answers_equivalent(extract_answer(text, "math"), "2", "math")


@pytest.mark.parametrize(
    ("text", "fmt", "answer"),
    [
        ("**Final Answer:** 7", "math", "7"),
        ("**Answer: 7**", "math", "7"),
        ("**Final Answer**: 7", "math", "7"),
        ("__Answer:__ 7.", "math", "7"),
        ("*The answer is* 7", "math", "7"),
        ("**Answer: B**", "multiple_choice", "B"),
        ("**Final Answer:** Paris", "knowledge", "paris"),
        ("**Answer: 42**", "number", "42"),
    ],
)
def test_markdown_emphasis_is_not_part_of_the_answer(text: str, fmt: str, answer: str) -> None:
    assert extract_answer(text, fmt) == answer


def test_markdown_emphasis_does_not_split_equivalence() -> None:
    assert answers_equivalent("**7", "7", "math")
    assert answers_equivalent("7**", "7", "math")
    assert normalize_math("z^*") == "z^*"  # a starred exponent is not emphasis


def test_math_verify_runs_outside_the_main_thread() -> None:
    # math_verify's default signal-based timeout raises in threads; ours must not
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(answers_equivalent("\\frac{3}{4}", "0.75", "math")))
    worker.start()
    worker.join(timeout=30)
    assert results == [True]


def test_math_verify_is_not_handed_explosive_input() -> None:
    # sympy would evaluate this for a very long time; we fall back to string inequality
    assert not answers_equivalent("2^{2^{2^{2^{100000}}}}", "3", "math")


# --- other formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (C).", "C"),
        ("Answer: b", None),  # lower-case b is not an option letter
        ("Answer: B", "B"),
        ("(D)", "D"),
        ("J", "J"),
        ("Let's compare (A) and (B): only (B) fits.", "B"),
        ("\\boxed{\\text{(E)}}", "E"),
        ("I cannot tell.", None),
        ("The answer is B because the others fail.", "B"),
        ("Answer: I think (G)", "G"),
    ],
)
def test_multiple_choice_letters(text: str, letter: str | None) -> None:
    assert extract_answer(text, "multiple_choice") == letter


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Option B", "B"),
        ("The answer is option B.", "B"),
        ("Answer: choice (C)", "C"),
        ("b)", "B"),
        ("(b)", "B"),
        ("The answer is b)", "B"),
        ("Answer: (d) because the others fail", "D"),
        # still no letter: a bare lower-case letter is prose, "(i)" a roman numeral, an enumeration is no choice
        ("Answer: a", None),
        ("The answer is (i)", None),
        ("a) first we check 3, b) then 4", None),
        ("Options A and B both fail.", None),
    ],
)
def test_multiple_choice_letters_named_as_options_or_formatted_in_lower_case(text: str, letter: str | None) -> None:
    """"Option B", "The answer is option B." and a lower-case "b)" gave no letter: the sample did not vote."""
    assert extract_answer(text, "multiple_choice") == letter


def test_multiple_choice_equivalence() -> None:
    assert answers_equivalent("C", "c", "mc")
    assert not answers_equivalent("C", "D", "mc")


def test_numbers() -> None:
    assert extract_answer("Roughly 3,000.50 dollars", "number") == "3000.5"
    assert extract_answer("Final answer: 42 apples, 6 each", "number") == "42"
    assert answers_equivalent("0.5", "1/2", "number")
    assert answers_equivalent("1000000", "1000000.0000001", "number")
    assert not answers_equivalent("1", "2", "number")


@pytest.mark.parametrize("fmt", ["math", "number", "short_text"])
@pytest.mark.parametrize("text", ["The answer is \u22125", "\\boxed{\u22125}", "\u22125"])
def test_a_typographic_minus_is_a_sign(text: str, fmt: str) -> None:
    """U+2212 (the minus sign models write in prose) was dropped as a symbol: "−5" extracted as 5, and
    a vote of three "−5" against two "5" answered 5, unanimous."""
    answer = extract_answer(text, fmt)
    assert answers_equivalent(answer, "-5", fmt) and not answers_equivalent(answer, "5", fmt)
    assert extract_answer("So the temperature is \u22125", "math") == "-5"


@pytest.mark.parametrize(("text", "other"), [("The answer is -5 degrees", "The answer is 5 degrees"),
                                             ("It is \u22125", "It is 5"), ("-5 \u00b0C", "5 \u00b0C")])
def test_a_short_text_answer_keeps_its_minus_sign(text: str, other: str) -> None:
    """SQuAD normalisation dropped the minus with the punctuation: "-5 degrees" was "5 degrees"."""
    assert not answers_equivalent(extract_answer(text, "short_text"), extract_answer(other, "short_text"), "short_text")
    assert extract_answer("3-5 apples", "short_text") == "3 5 apples"  # a hyphen between words still goes


@pytest.mark.parametrize(
    ("text", "fmt", "value"),
    [
        ("It is 1.2e-3", "math", "0.0012"),  # was 3, the exponent
        ("The answer is 1.2e-3", "math", "0.0012"),
        ("\\boxed{1.2e-3}", "math", "0.0012"),  # was read by sympy as 1.2e - 3 (Euler's e)
        ("It is 1.2 \u00d7 10^-3", "math", "0.0012"),
        ("It is 1.2x10^3", "math", "1200"),  # was 10^3
        ("The answer is 1e3", "number", "1000"),  # was 1
        ("It is 1.2 \u00d7 10^-3", "number", "0.0012"),  # was -3
        ("The answer is 1.2x10^3", "number", "1200"),  # was 1.2
        ("1.2e-3", "number", "0.0012"),
        ("The answer is 1.5e3", "knowledge", "1500"),  # was the text "1 5e3"
    ],
)
def test_scientific_notation_is_one_number(text: str, fmt: str, value: str) -> None:
    answer = extract_answer(text, fmt)
    assert answers_equivalent(answer, value, fmt)
    assert not answers_equivalent(answer, "3", fmt) and not answers_equivalent(answer, "1", fmt)


def test_e_notation_that_may_be_eulers_number_is_left_to_sympy() -> None:
    # "2e-1" in a math answer is as likely 2e - 1 as 0.2: it is not read as scientific notation
    assert extract_answer("\\boxed{2e-1}", "math") == "2e-1"
    assert not answers_equivalent("2e-1", "0.2", "math")
    assert answers_equivalent("1e3", "1000", "math") and answers_equivalent("2e5", "200000", "math")


def test_a_huge_exponent_is_no_number_to_build() -> None:
    """Equivalence built 10**9999999 for the short answer "1e9999999" (seconds; minutes a digit more):
    the vote hung. Such a number is no number: a text on short-text tasks, no answer on the number task."""
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(answers_equivalent(
        extract_answer("The answer is 1e9999999", "knowledge"), "paris", "knowledge")), daemon=True)
    worker.start()
    worker.join(timeout=2)
    assert result == [False]
    assert extract_answer("The answer is 1e9999999", "number") is None  # not 1, its mantissa


@pytest.mark.parametrize(
    ("text", "fmt"),
    [("The answer is 3 1/2", "math"), ("It is 3 1/2", "math"), ("Final answer: 3 1/2 cups", "math"),
     ("The answer is 3 1/2", "number"), ("The answer is 3 1/2", "reasoning")],
)
def test_a_mixed_number_is_its_value(text: str, fmt: str) -> None:
    """"3 1/2" was 31/2 (math), 3 (number) and the text "3 1 2" (short text)."""
    answer = extract_answer(text, fmt)
    assert answers_equivalent(answer, "3.5", fmt) and answers_equivalent(answer, "7/2", fmt)
    assert answers_equivalent(extract_answer("The answer is -3 1/2", fmt), "-3.5", fmt)


@pytest.mark.parametrize("fmt", ["math", "number"])
@pytest.mark.parametrize("text", ["The answer is 3 7/2", "x = 3 2/2"])
def test_a_mixed_number_that_is_none_is_no_answer(text: str, fmt: str) -> None:
    """"3 7/2" reads as no mixed number: `number` gave no answer, and `math` glued the digits into 37/2
    (18.5), a vote for a value the sample never wrote."""
    assert extract_answer(text, fmt) is None


@pytest.mark.parametrize("task", ["reasoning", "knowledge"])
@pytest.mark.parametrize(
    "text",
    ["I'm sorry, but I can't help with that.", "I\u2019m sorry, but I can\u2019t assist with that request.",
     "I cannot answer that.", "Sorry, I can't provide that information.",
     "Final answer: I am unable to help with this."],
)
def test_a_refusal_is_no_answer(text: str, task: str) -> None:
    """Identical refusals were one answer and out-voted the real answers."""
    assert extract_answer(text, task) is None


@pytest.mark.parametrize(("text", "answer"), [("I'm sorry, I misread: 12", "i m sorry i misread 12"),
                                             ("Cannot be determined", "cannot be determined"), ("Sorry", "sorry")])
def test_answers_that_only_sound_like_a_refusal_stay_answers(text: str, answer: str) -> None:
    assert extract_answer(text, "reasoning") == answer


def test_python_expressions_compare_by_ast_without_executing() -> None:
    assert extract_answer("f('sea')", "python") == extract_answer('f("sea")', "python")
    assert answers_equivalent("[1,2]", "[1, 2]", "code_output")
    assert not answers_equivalent("f('a')", "f('b')", "python")
    assert extract_answer("```python\nassert f(1) == [1, 2]\n```", "python") == "[1, 2]"
    # a string that would do harm if run is only ever parsed
    assert extract_answer("__import__('os').system('false')", "python") == "__import__('os').system('false')"


def test_python_text_that_does_not_parse_is_no_answer() -> None:
    # a generation cut off inside a literal (max_tokens, runaway repetition) is dropped from the vote
    assert extract_answer("[1, 1, 1, 1, 1, 1, 1, 1", "python") is None
    assert extract_answer("f('abc', '99999", "python") is None
    assert extract_answer("[1, 2, 3]", "python") == "[1, 2, 3]"
    assert answers_equivalent("f(1 ,2)", "f(1, 2)", "python")  # equivalence of raw strings still works


def test_short_text_normalised() -> None:
    assert extract_answer("The answer is The Eiffel Tower.", "knowledge") == "eiffel tower"
    assert answers_equivalent("eiffel tower", "Eiffel  Tower!", "knowledge")
    assert extract_answer("Paris", "knowledge") == "paris"
    assert extract_answer("So the answer is 1,000.", "reasoning") == "1000"
    long_reply = "Paris is the capital of France and has been for many centuries, with a long history of art."
    assert extract_answer(long_reply, "knowledge") is None  # no marker and not short: no answer to vote on


def test_open_tasks_are_not_comparable() -> None:
    for task in ("writing", "chat", "code"):
        assert not comparable(task)
        assert extract_answer("Here is a poem about the sea.", task) is None
    for task in ("math", "reasoning", "knowledge", "multiple_choice", "number", "python"):
        assert comparable(task)
    assert answer_format("unknown-task") == "open"


# --- prompts ----------------------------------------------------------------------------------


def test_cot_instruction_and_application() -> None:
    assert "\\boxed{}" in cot_instruction("math")
    assert cot_instruction("chat", "Think. {format_hint}").startswith("Think. After the final answer marker")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    out = with_cot_instruction(messages, "math")
    assert out[1]["content"].startswith("2+2?\n\n") and "Final answer:" in out[1]["content"]
    assert messages[1]["content"] == "2+2?"  # the caller's list is not modified
    parts = with_cot_instruction([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "chat")
    assert parts[0]["content"][-1]["type"] == "text" and len(parts[0]["content"]) == 2


def test_last_user_text() -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
    ]
    assert last_user_text(messages) == "a\nb"
    assert last_user_text([{"role": "system", "content": "s"}]) == ""


def test_final_answer_extraction() -> None:
    assert final_answer("Step 1: 2+2=4.\nFinal answer: 4", "math") == "4"
    assert final_answer("Working...\n**Final answer:** $\\boxed{\\frac{1}{2}}$", "math") == "\\frac{1}{2}"
    assert final_answer("Plan...\nFinal answer:\nDear Anna,\nThank you.", "writing") == "Dear Anna,\nThank you."
    assert final_answer("No marker here, just the reply.", "chat") == "No marker here, just the reply."
    assert final_answer("Dangling marker. Final answer:", "chat") == "Dangling marker. Final answer:"
    assert final_answer(None, "chat") == ""


def test_final_answer_uses_the_answer_markers_of_answers_py() -> None:
    # the Minerva/lm-eval phrasing: the closing remark is not part of the answer
    assert final_answer("The final answer is $7$. I hope it is correct.", "math") == "$7$"
    assert final_answer("Final Answer: The final answer is $5$. I hope it is correct.", "math") == "$5$"
    # "Final answer check" is no marker: the last marker followed by an answer wins
    assert final_answer("Final answer: 7\n\nFinal answer check: verified", "math") == "7"
    assert final_answer("Final answer: 7\n\nFinal answer:", "math") == "7"
    assert final_answer("Final answer:\n$$\n\\boxed{5}\n$$", "math") == "5"  # a display block is one answer
    assert final_answer("**Final Answer**: 12", "number") == "12"
    assert final_answer("### Final Answer\n$\\boxed{9}$", "math") == "9"
    # an open reply is everything after the marker, its own closing words included
    assert final_answer("Plan.\nFinal answer:\nDear Anna,\nI hope this helps.", "writing") == "Dear Anna,\nI hope this helps."


def test_a_json_final_answer_is_handed_over_whole() -> None:
    """An app that asks for JSON in its prompt gets the object the chain ends on, whatever the task: a
    comparable task's answer line unwrapped the "the answer is" in one of its strings."""
    reply = '{"reasoning": "6 * 7 = 42, so the answer is 42", "answer": 42}'
    for task in ("math", "knowledge", "chat"):
        assert final_answer(f"Six sevens.\nFinal answer: {reply}\n\nI hope it is correct.", task).startswith(reply)
    fenced = f"```json\n{reply}\n```"
    assert final_answer(f"Six sevens.\nFinal answer:\n{fenced}", "math") == fenced
    assert final_answer("Final answer: The final answer is $5$. I hope it is correct.", "math") == "$5$"  # not JSON
    listed = '["so the answer is 42", 42]'  # an array too
    assert final_answer(f"Six sevens.\nFinal answer: {listed}", "math") == listed


def test_the_clients_stop_sequences_end_a_reasoning_chains_reply() -> None:
    chain = "Plan.\n\nFinal answer:\nDear Anna,\nSee you.\nEND\nP.S."
    # the first sequence met from the reply on (the answer after the first marker), not the first listed
    assert reply_until_stop(chain, ["\nP.S.", "END"]) == "Plan.\n\nFinal answer:\nDear Anna,\nSee you.\n"
    # a few-shot prompt's next question, and the answer the model gave it too, are no part of the reply
    few_shot = "3 + 4 = 7.\n\nFinal answer: 7\n\nQuestion: And 2 + 2?\nFinal answer: 4"
    assert final_answer(reply_until_stop(few_shot, ["Question:", "\n\n"]), "math") == "7"
    # no marker: the whole text is the reply, ended as an upstream ends it
    assert reply_until_stop("7 apples\n\nQuestion: x", "\n\n") == "7 apples"
    assert reply_until_stop("7 apples", None) == reply_until_stop("7 apples", "\n") == "7 apples"
    assert reply_until_stop("7 apples", ["", "ap"]) == "7 "  # an empty sequence stops nothing
    # a sequence on the answer's own line ends it there
    assert reply_until_stop("3 + 4 = 7.\nFinal answer: 7 Question: And 2 + 2?", "Question:") == "3 + 4 = 7.\nFinal answer: 7 "
    # the reply starts at the instruction's own marker, not at a chain's "the answer is" before it
    second_thoughts = "I think the answer is 6.\n\nNo: 3 + 4 = 7.\n\nFinal answer: 7"
    assert reply_until_stop(second_thoughts, "\n\n") == second_thoughts
    # cut off at its length limit before any answer: no reply to end, the chain stays cut
    assert reply_until_stop("Step 1.\n\nStep 2", "\n\n", finished=False) == "Step 1.\n\nStep 2"
    assert reply_until_stop("Final answer: 7\n\nQ", "\n\n", finished=False) == "Final answer: 7"


def test_judge_is_asked_for_the_score_first() -> None:
    # the gateway gives the judge 16 output tokens: a score after a justification would be cut off
    lines = judge_messages("q", "a")[0]["content"].splitlines()
    score_line = next(i for i, line in enumerate(lines) if line.startswith("Score:"))
    assert "first" in lines[score_line - 1] and score_line < len(lines) - 1  # a reason may follow it
    assert parse_judge_score("Score: 8\nCorrect, but the second step could say Score: 2 is wrong") == pytest.approx(7 / 9)
    assert parse_judge_score("**Score: 9/10**\nClear.") == pytest.approx(8 / 9)
    assert parse_judge_score("Score: 6") == pytest.approx(5 / 9)  # cut off after the score: still read
    # a reply that does not start with a score: the last one, so a quoted rubric does not count
    assert parse_judge_score("The rubric asks for Score: 1 to 10.\nScore: 7") == pytest.approx(6 / 9)


def test_judge_prompt_and_score_parsing() -> None:
    messages = judge_messages("What is 2+2?", "4")
    assert messages[0]["role"] == "system" and "Score:" in messages[0]["content"]
    assert "<answer>\n4\n</answer>" in messages[1]["content"]
    assert parse_judge_score("Correct and clear.\nScore: 10") == 1.0
    assert parse_judge_score("Score: 1") == 0.0
    assert parse_judge_score("The rubric says Score: <integer>. My verdict: score = 7/10") == pytest.approx(6 / 9)
    assert parse_judge_score("Rating: **4**") == pytest.approx(3 / 9)
    assert parse_judge_score("Score: 14") == 1.0  # clamped
    assert parse_judge_score("I refuse to grade.") is None
    assert parse_judge_score(None) is None
