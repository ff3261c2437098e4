"""Answer extraction and equivalence by task type: the first judgement of every multi-sample strategy.

A vote is only as good as its notion of "the same answer". Each task maps to an answer *format*:

- ``math``: the last ``\\boxed{...}``, else an answer marker ("The answer is", "Final answer:",
  "#### ", "A: "), else the last math expression whole (a fraction, root, decimal: never a digit
  cut out of LaTeX); markdown emphasis around a marker or answer dropped; normalised LaTeX;
  equivalence by ``math_verify`` (so ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` are one answer),
  with string equality as fallback.
- ``multiple_choice``: a letter A-J ("Option B" too; lower case only as "(b)" or "b)").
- ``number``: a plain number (scientific notation and mixed numbers whole), compared with a small
  relative tolerance.
- ``python``: a Python expression (e.g. a predicted call ``f('x')`` or value), compared by its AST
  (only parsed, never executed), so ``'a'`` and ``"a"`` are one answer. Text that does not parse as
  an expression (a generation cut off mid-literal, a runaway repetition) is no answer: it is dropped
  from the vote like a failed sample, and adaptive sampling draws another.
- ``short_text``: a short final answer (knowledge, reasoning), normalised like SQuAD (case,
  punctuation, articles); numbers compared as numbers; a refusal is no answer.
- ``open``: writing, chat and code: no comparable answer; voting falls back to a medoid.

The router's task types map to formats in ``TASK_FORMATS``; a format name is also accepted as a task.
Everything here is pure (equivalence verdicts and parses are cached), safe to call from any thread (math_verify's signal-based timeouts
are disabled, so it is guarded by a size/shape check instead: see ``_math_verify_safe``).
"""

from __future__ import annotations

import ast
import logging
import re
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache

TASK_FORMATS: dict[str, str] = {
    "math": "math",
    "reasoning": "short_text",
    "knowledge": "short_text",
    "code": "open",
    "writing": "open",
    "chat": "open",
}
FORMATS: tuple[str, ...] = ("math", "multiple_choice", "number", "python", "short_text", "open")
_ALIASES = {"mc": "multiple_choice", "code_output": "python", "expression": "python", "text": "short_text"}

# Text longer than this without an answer marker is not a "short answer": we refuse to guess one.
_SHORT_ANSWER_WORDS = 12
# math_verify (sympy) has no timeout here, so only hand it answers that cannot explode. It says so
# in a WARNING on first use ("Timeout is disabled ..."): known and intended, not for operators' logs.
logging.getLogger("math_verify").setLevel(logging.ERROR)
_MATH_VERIFY_MAX_CHARS = 120


def answer_format(task: str) -> str:
    """The answer format a task type (or a format name, or an alias) is judged by."""
    key = task.strip().lower()
    if key in FORMATS:
        return key
    return _ALIASES.get(key) or TASK_FORMATS.get(key, "open")


def comparable(task: str) -> bool:
    """Whether answers of this task can be extracted and compared (so a majority vote makes sense)."""
    return answer_format(task) != "open"


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# "Final answer:", "The final answer is"; markdown emphasis may close the marker ("**Final Answer**:")
_FINAL = r"final\s+answer[*_]*\s*(?:is\b|[:：])"  # a full-width colon too
_MARKER = re.compile(
    rf"(?:{_FINAL}|the\s+(?:correct\s+)?answer[*_]*\s+is|answer[*_]*\s*:|^\s*####|^\s*A\s*:)"
    r"[*_]*\s*:?[*_]*\s*(.+)",
    re.IGNORECASE | re.MULTILINE,
)
# Only the CoT prompt's own marker, also as a heading line ("### Final Answer", "**Final Answer**"):
# a heading is a marker only on a line of its own, so "Final answer check: ..." is none.
_FINAL_MARKER = re.compile(
    rf"(?:{_FINAL}|^[#*_\s]*final\s+answer[*_\s]*$)[*_]*\s*:?[*_]*\s*(.+)",
    re.IGNORECASE | re.MULTILINE,
)
# The Minerva/lm-eval sign-off after an answer ("$5$. I hope it is correct."): never part of it
_CLOSING_REMARK = re.compile(r"\.?\s*\b(?:I\s+)?hope\s+(?:it|this|that)\s+is\s+correct\s*[.!]?\s*$", re.IGNORECASE)
# Scientific notation ("1.2e-3", "1.2 × 10^-3", "1.2x10^3", "1.2 \times 10^{-3}"): one number, never its
# mantissa or exponent alone (an exponent of 4 digits or more is taken whole, to be no number: see _parse_number)
_E_NOTATION = r"\d+(?:\.\d+)?[eE][-+]?\d+(?!\w|\.\d)"
_TIMES = r"(?:\\times|\\cdot|[×xX*·])"
_TIMES_TEN = rf"\d+(?:\.\d+)?\s*{_TIMES}\s*10\s*\^\s*(?:\{{\s*[-+]?\d+\s*\}}|[-+]?\d+)"
# A mixed number ("3 1/2" is 3.5, not 31/2 or 3): a whole number, a space, a fraction written tight
_MIXED = r"\d+[ \t]+\d+/\d+(?![\d.])"
_NUMBER = re.compile(
    rf"[-+]?(?:{_TIMES_TEN}|{_E_NOTATION}|{_MIXED})"
    r"|[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
)
# A whole math expression for the math fallback: a LaTeX fraction, root or pi (with an optional
# coefficient, "12\frac{3}{5}", "2\sqrt{3}", "2\pi"), a plain fraction, a decimal. Digits inside LaTeX are
# never taken alone, and a minus right after a number, letter or bracket is a subtraction, not a sign.
_BRACED = r"\{(?:[^{}]|\{[^{}]*\})*\}"  # one level of nesting: \frac{\sqrt{2}}{2}
_LATEX_TERM = (rf"\\[dt]?frac\s*(?:{_BRACED}\s*{_BRACED}|\d\s*\d)|\\sqrt\s*(?:\[[^\]]*\])?\s*(?:{_BRACED}|\d+)"
               r"|\\pi(?![A-Za-z])")  # "2\pi": the coefficient alone would be another answer
_PLAIN_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+"
_SIGN = r"(?:(?<![\w)}\]])[-+])?"
# A power ("10^5", "2^{10}", "3 \times 10^5") whole: its exponent or base alone is another answer; and
# nothing is taken out of an exponent or subscript ("x^2", "a_{3}") or off a power's base ("2^n")
_POWER = r"(?:\d+(?:\.\d+)?\s*(?:\\times|\\cdot|×)\s*)?\d+(?:\.\d+)?\s*\^\s*(?:\{\s*[-+]?\d+\s*\}|[-+]?\d+)"
_MATH_EXPRESSION = re.compile(
    rf"(?<!\^)(?<!\^\{{)(?<!_)(?<!_\{{){_SIGN}"
    rf"(?:{_TIMES_TEN}|{_POWER}|(?:\d+(?:\.\d+)?)?(?:{_LATEX_TERM})|{_E_NOTATION}|{_MIXED}|{_PLAIN_NUMBER})"
    r"(?![\d.]*\s*\^)")
# A letter on its own ("C", "(C)", "C.", "C) text"); after an answer marker also "C because ..."
# (but not "I think ...": the pronoun is not option I)
_LETTER = re.compile(r"^\(?([A-J])\)?(?:[.:),]|$)|^\(([A-J])\)")
_LETTER_IN_SPAN = re.compile(r"^([A-HJ])\s")
# "Option B", "choice (C)": the word names an option, so the letter after it is one
_OPTION_LETTER = re.compile(r"^(?i:option|choice)\s*\(?([A-J])\)?(?!\w)")
# A lower-case letter only where an option is formatted: "(b)", "b)" after a marker or as the whole reply
# (a bare "a" or "b" is prose, and "(i)" a roman numeral)
_LOWER_LETTER = re.compile(r"^\(([a-hj])\)|^([a-hj])\)")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5": a single token after a space
        rest = text[start:].split(None, 2)
        return rest[1].rstrip("$.") if len(rest) > 1 else None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def last_marker(text: str, *, final_only: bool = False) -> re.Match[str] | None:
    """The last answer marker followed by an answer (group 1 starts it); ``final_only``: only the
    CoT prompt's "Final answer" marker, in any of its forms, heading included."""
    matches = list((_FINAL_MARKER if final_only else _MARKER).finditer(text))
    return matches[-1] if matches else None


def first_marker(text: str, *, final_only: bool = False) -> re.Match[str] | None:
    """The first answer marker followed by an answer (group 1 starts it); ``final_only`` as for last_marker."""
    return (_FINAL_MARKER if final_only else _MARKER).search(text)


def answer_line(span: str) -> str:
    """The answer in the line after a marker: a nested marker unwrapped, the closing remark dropped.

    "The final answer is $5$. I hope it is correct." -> "$5$"
    """
    span = span.strip()
    for _ in range(3):
        inner = _MARKER.search(span)
        if not inner:
            break
        span = inner.group(1).strip()
    return _CLOSING_REMARK.sub("", span).strip()


def _marked_span(text: str) -> str | None:
    """The answer after the last answer marker ("The answer is", "Final answer:", ...)."""
    marker = last_marker(text)
    if marker is None:
        return None
    span = answer_line(marker.group(1))
    math = re.search(r"\$+([^$]+)\$+", span)
    if math:
        return math.group(1).strip() or None
    span = re.split(r"(?<=[^\d\s])\.\s|\.\s+(?=[A-Z])", span, maxsplit=1)[0]  # first sentence
    return span.strip() or None


# Markdown emphasis at the edges ("**7", "7**."); a "^*" (conjugate, optimum) is LaTeX, not emphasis
_EMPHASIS_EDGES = re.compile(r"^[*_]+\s*|\s*(?<![\^*_])[*_]+(?=\.?$)")


def _strip_wrappers(s: str) -> str:
    s = _EMPHASIS_EDGES.sub("", s.strip())
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s.rstrip(".").strip()


def extract_answer(text: str, task: str) -> str | None:
    """The final answer in a model output, normalised for its task's format; None if there is none.

    Open-ended tasks (writing, chat, code) have no comparable answer and always give None.
    """
    if not text or not text.strip():
        return None
    fmt = answer_format(task)
    if fmt != "python":  # in code it may be a string literal's character
        # U+2212, the typographic minus models write in prose ("−5"), is a sign: dropped as a symbol,
        # "−5" voted with 5
        text = text.replace("\u2212", "-")
    return _extract(text, fmt)


def _extract(text: str, fmt: str) -> str | None:
    # not cached: texts are long (a cache would hold whole CoTs) and extraction is a few linear scans
    if fmt == "math":
        return _extract_math(text)
    if fmt == "multiple_choice":
        return _extract_letter(text)
    if fmt == "number":
        return _extract_number(text)
    if fmt == "python":
        return _extract_python(text)
    if fmt == "short_text":
        return _extract_short_text(text)
    return None


def _extract_math(text: str) -> str | None:
    span = _last_boxed(text)
    if span is None:
        span = _marked_span(text)
        if span is not None:
            span = _last_boxed(span) or _number_in_prose(span) or span
    if span is None:
        expressions = _MATH_EXPRESSION.findall(text)
        span = expressions[-1] if expressions else None
    if span is None:
        return None
    mixed = _MIXED_PARTS.fullmatch(span.strip())
    if mixed and not 0 < int(mixed.group(3)) < int(mixed.group(4)):
        return None  # "3 7/2" is no mixed number (as `number` reads it): not 37/2, its digits glued
    normalized = normalize_math(span)
    return normalized or None


# A plain word of two or more letters, not a LaTeX command's name ("\\frac")
_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
# Words that are part of the answer's value, not prose around it: "2 pi", "sqrt(2)", "ln 2",
# "3.5 million", "5 squared" are not 2, 2, 2, 3.5 and 5.
_VALUE_WORDS = frozenset(
    "pi tau inf infinity sqrt cbrt root roots ln log lg exp sin cos tan cot sec csc arcsin arccos arctan sinh cosh "
    "tanh mod choose factorial squared cubed power times over plus minus divided dozen dozens hundred hundreds "
    "thousand thousands million millions billion billions trillion trillions half halves third thirds quarter "
    "quarters".split()
)
# A number written onto something ("2x", "x^2", "(2)", "2/pi"): not a number standing alone in prose
_GLUED_BEFORE = re.compile(r"[\w^_/*(\\]$")
_GLUED_AFTER = re.compile(r"^[\w^_/*(!]")


def _number_in_prose(span: str) -> str | None:
    """The one number or expression in a worded answer ("The value is 7", "10 apples" -> "7", "10").

    With several ("7 hours and 30 minutes"), or one the words are part of ("2 pi", "sqrt(2)",
    "3 million", "x^2 meters"), it is not clear what is meant: None.
    """
    words = _PROSE_WORD.findall(span)
    if not words or any(word.lower() in _VALUE_WORDS for word in words):
        return None
    found = list(_MATH_EXPRESSION.finditer(span))
    if len(found) != 1:
        return None
    number = found[0]
    if _GLUED_BEFORE.search(span[: number.start()]) or _GLUED_AFTER.match(span[number.end() :]):
        return None
    return number.group(0)


def _extract_letter(text: str) -> str | None:
    candidates = [(_last_boxed(text), True), (_marked_span(text), True), (text.strip(), False)]
    for candidate, marked in candidates:
        if not candidate:
            continue
        candidate = _strip_wrappers(re.sub(r"\\text\{([^{}]*)\}", r"\1", candidate))
        match = _LETTER.match(candidate) or _OPTION_LETTER.match(candidate)
        if not match and marked:
            match = _LETTER_IN_SPAN.match(candidate) or _LOWER_LETTER.match(candidate)
        if not match and re.fullmatch(r"\(?[a-hj]\)", candidate):
            match = _LOWER_LETTER.match(candidate)
        if match:
            return next(g for g in match.groups() if g).upper()
    # "... so (C) is right": the last parenthesised letter in the text
    letters = re.findall(r"\(([A-J])\)", text)
    return letters[-1] if letters else None


def _extract_number(text: str) -> str | None:
    span = _last_boxed(text) or _marked_span(text)
    source = span if span and _NUMBER.search(span) else text
    numbers = _NUMBER.findall(source)
    if not numbers:
        return None
    # inside a marked span the first number is the answer ("42 apples, i.e. 6 each"); else the last
    value = _parse_number(numbers[0] if source is span else numbers[-1])
    return _format_number(value) if value is not None else None


def _extract_python(text: str) -> str | None:
    s = text.strip()
    tagged = re.search(r"\[ANSWER\](.*?)\[/ANSWER\]", s, re.DOTALL)
    if tagged:
        s = tagged.group(1)
    fenced = re.search(r"```(?:python|py)?\s*\n?(.*?)```", s, re.DOTALL)
    if fenced:
        s = fenced.group(1)
    s = s.strip()
    if s.startswith("assert ") and "==" in s:
        s = s.split("==", 1)[1]
    s = s.strip().rstrip(";").strip()
    if not s:
        return None
    return _parsed_python(s)


# A refusal ("I'm sorry, but I can't help with that.") is no answer: identical refusals would out-vote
# real answers. Only a refusal to help or answer: "I'm sorry, I misread: 12" and "Cannot be determined" are answers.
_REFUSAL = re.compile(
    r"^\W*(?:(?:i\s*['’]?\s*m|i\s+am)\s+(?:sorry|afraid)|sorry|unfortunately|i\s+apologi[sz]e)?[\s,.!]*(?:but\s*,?\s*)?"
    r"i\s*(?:can\s*['’]\s*t|can\s*not|won\s*['’]?\s*t|will\s+not|['’]?\s*m\s+(?:unable|not\s+able)|am\s+(?:unable|not\s+able))"
    r"\s+(?:to\s+)?(?:help|assist|answer|provide|comply|fulfil+|support|share|do\s+that|engage)\b",
    re.IGNORECASE,
)


def _extract_short_text(text: str) -> str | None:
    span = _last_boxed(text) or _marked_span(text)
    if span is None:
        if len(text.split()) > _SHORT_ANSWER_WORDS:
            return None
        span = text
    if _REFUSAL.match(span):
        return None
    span = _strip_wrappers(re.sub(r"\\text\{([^{}]*)\}", r"\1", span))
    number = _parse_number(span) if _NUMBER.fullmatch(span.replace("$", "").strip()) else None
    if number is not None:
        return _format_number(number)
    normalized = normalize_text(span)
    return normalized or None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def normalize_text(s: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces; a number's minus sign stays
    ("-5 degrees" is not "5 degrees")."""
    s = s.lower()
    s = re.sub(r"(?!(?<![\w-])-(?=\d))[^\w\s]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_math(s: str) -> str:
    """A canonical string for a LaTeX answer: no delimiters, spacing, units text or degree signs.

    Deliberately conservative: it only removes what never changes the value, so that string
    equality after it is a safe fast path before math_verify.
    """
    s = _strip_wrappers(s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)", "", s)
    s = s.replace("{,}", ",").replace("\\ ", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    # units: "5 \text{ cm}" -> "5" (a \text{ starting with a space after content is a unit)
    unit = re.search(r".\s*\\(?:text|mbox|mathrm)\{\s", s)
    if unit:
        s = s[: unit.start() + 1]
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = _plain_numbers_to_latex(s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = "".join(s.split()).rstrip(".")
    # "x=5" -> "5" (a single variable assigned a value), but keep real equations like "y=2x+1"
    assignment = re.fullmatch(r"[a-zA-Z]=([^=]+)", s)
    if assignment and not re.search(r"[a-zA-Z]", assignment.group(1).replace("\\frac", "").replace("\\sqrt", "")):
        s = assignment.group(1)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+\.0+", s):
        s = s.split(".")[0]
    return s.lstrip("+")


# "1.2e-3" is 0.0012 when it cannot be Euler's e (which sympy reads into "2e-1": 2e - 1): a decimal
# mantissa, a mantissa of 1, or an unsigned exponent ("2e5")
_UNAMBIGUOUS_E_NOTATION = re.compile(r"[-+]?(?:\d+\.\d+|1)[eE][-+]?\d{1,3}|[-+]?\d+[eE]\d{1,3}")


def _plain_numbers_to_latex(s: str) -> str:
    """Plain-text scientific notation and mixed numbers in the LaTeX math_verify reads (whitespace still
    in): "1.2 × 10^-3", "1.2x10^3" -> "1.2\\times10^{-3}"; "1.2e-3" -> "0.0012"; "3 1/2" -> "3\\frac{1}{2}"."""
    s = s.replace("×", "\\times ")
    s = re.sub(r"(\d)\s*[xX*·]\s*10\s*\^", r"\1\\times10^", s)
    s = re.sub(r"\^\s*([-+]\d+)", r"^{\1}", s)  # "10^-3": a signed exponent unbraced is no LaTeX
    if _UNAMBIGUOUS_E_NOTATION.fullmatch(s.strip()):
        s = format(Decimal(s.strip()).normalize(), "f")
    mixed = _MIXED_PARTS.fullmatch(s.strip())
    if mixed and 0 < int(mixed.group(3)) < int(mixed.group(4)):
        s = "{}{}\\frac{{{}}}{{{}}}".format(*mixed.groups())
    return s


_TIMES_TEN_PARTS = re.compile(rf"(.+?)\s*{_TIMES}\s*10\s*\^\s*\{{?\s*([-+]?\d+)\s*\}}?")
_MIXED_PARTS = re.compile(r"([-+]?)(\d+)\s+(\d+)/(\d+)")
# Fraction builds 10**exponent: "1e99999999" would hold a vote for minutes, so longer exponents are no number
_HUGE_EXPONENT = re.compile(r"[eE][-+]?\d{4}")


def _parse_number(s: str) -> Fraction | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    times_ten = _TIMES_TEN_PARTS.fullmatch(s)
    if times_ten:
        s = f"{times_ten.group(1)}e{times_ten.group(2)}"
    mixed = _MIXED_PARTS.fullmatch(s)
    if mixed:
        sign, whole, numerator, denominator = mixed.groups()
        if not 0 < int(numerator) < int(denominator):  # "3 7/2" is no mixed number we can read
            return None
        value = int(whole) + Fraction(int(numerator), int(denominator))
        return -value if sign == "-" else value
    s = s.replace(" ", "")
    if _HUGE_EXPONENT.search(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".10g")


@lru_cache(maxsize=65536)
def _parsed_python(s: str) -> str | None:
    """``ast.unparse`` of the expression (quotes, spacing and redundant parentheses normalised), or
    None when ``s`` is not a Python expression of at most 5000 characters. Parsing executes nothing."""
    if len(s) > 5000:
        return None
    try:
        return ast.unparse(ast.parse(s, mode="eval"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _canonical_python(s: str) -> str:
    """``_parsed_python``, falling back to whitespace-collapsed text (for equivalence of raw strings)."""
    parsed = _parsed_python(s)
    return parsed if parsed is not None else " ".join(s.split())


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------


def answers_equivalent(a: str, b: str, task: str) -> bool:
    """Whether two extracted answers are the same answer for this task (symmetric, cached)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    fmt = answer_format(task)
    first, second = (a, b) if a <= b else (b, a)  # one cache entry per unordered pair
    return _equivalent_cached(first, second, fmt)


@lru_cache(maxsize=65536)
def _equivalent_cached(a: str, b: str, fmt: str) -> bool:
    if fmt == "math":
        na, nb = normalize_math(a), normalize_math(b)
        if na == nb:
            return True
        return _math_verify_equal(na, nb)
    if fmt in ("number", "short_text"):
        x, y = _parse_number(a), _parse_number(b)
        if x is not None and y is not None:
            return abs(x - y) <= Fraction(1, 10**6) * max(1, abs(x), abs(y))
        return fmt == "short_text" and normalize_text(a) == normalize_text(b)
    if fmt == "python":
        return _canonical_python(a) == _canonical_python(b)
    if fmt == "multiple_choice":
        return a.strip().upper() == b.strip().upper()
    return False


def _math_verify_safe(s: str) -> bool:
    """Refuse inputs that can make sympy run for minutes (we run it without a timeout)."""
    if not s or len(s) > _MATH_VERIFY_MAX_CHARS:
        return False
    if re.search(r"\^\s*\{?\s*[-+]?\d{3,}", s):  # huge exponents
        return False
    if re.search(r"\d{3,}\s*!", s) or s.count("^") > 3:  # large factorials, power towers
        return False
    return True


def _math_verify_equal(a: str, b: str) -> bool:
    if not (_math_verify_safe(a) and _math_verify_safe(b)):
        return False
    pa, pb = _math_parse(a), _math_parse(b)
    if not pa or not pb:
        return False
    from math_verify import verify

    try:
        return bool(verify(list(pa), list(pb), timeout_seconds=None))
    except Exception:  # math_verify/sympy raise many types on odd input; not equal is the safe answer
        return False


@lru_cache(maxsize=16384)
def _math_parse(answer: str) -> tuple:
    """math_verify's parse of one answer, wrapped in \\boxed{} so a bare expression is found."""
    from math_verify import parse

    try:
        return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=None))
    except Exception:
        return ()
