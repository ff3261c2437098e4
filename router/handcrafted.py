"""The handcrafted numbers of a prompt's feature vector (HANDCRAFTED, in its order): lengths and turn
counts, character classes (digits, LaTeX, code), the multiple-choice layout, and counts of task
vocabulary (TASK_TERMS). router/features.py appends them to the hashed n-gram counts; router/_ngrams.c
computes all but the task-term counts (the same numbers: tests/test_classifier.py).
"""

from __future__ import annotations

import math
import re
import struct

from router.messages import Prompt


HANDCRAFTED: tuple[str, ...] = (
    "log_user_chars",
    "log_system_chars",
    "log_user_turns",
    "log_assistant_turns",
    "has_system",
    "digit_ratio",
    "non_ascii_ratio",
    "log_backslashes",  # LaTeX
    "log_dollars",  # LaTeX math mode
    "log_code_fences",
    "log_code_keywords",
    "log_braces_semicolons",
    "log_indented_lines",
    "log_math_operators",
    "log_question_marks",
    "ends_with_question",
    "log_newlines",
    "log_words",
    "mean_word_bytes",
    # Multiple-choice layout (option lines "A. ", "(B) ", "C) "): the question stem and the options
    # apart, because a long stem with numbers (a calculation) reads harder than its options do.
    "log_stem_chars",
    "log_option_lines",
    "log_option_mean_bytes",
    "log_stem_digits",
    "log_option_digits",
    # Distinct words of each TASK_TERMS list in the user turn (below).
    "log_code_terms",
    "log_math_terms",
    "log_writing_terms",
    "log_reasoning_terms",
)


# The numbers, in HANDCRAFTED's order (router/_ngrams.c computes all but the task terms).
_CODE_WORDS = (b"def ", b"return", b"import ", b"class ", b"function", b"print(", b"#include", b"const ")
_DIGITS = b"0123456789"
_OPERATORS = b"=+^*<>"
_BRACES = b"{};"
_OPTION_LINE = re.compile(rb"\n\(?[a-j][.)] ")  # "A. ", "(A) ", "A) " at a line start (the bytes are lowercased)


def _digit_count(data: bytes) -> int:
    return len(data) - len(data.translate(None, _DIGITS))


def _options_layout(user_bytes: bytes, digits: int) -> list[float]:
    """Stem length, number of option lines, mean option length, digits in the stem and in the options.
    Without option lines the whole turn is the stem."""
    first = _OPTION_LINE.search(user_bytes)
    if first is None:
        return [math.log1p(len(user_bytes)) / 8.0, 0.0, 0.0, math.log1p(digits), 0.0]
    start = first.start()
    n_options = 1 + len(_OPTION_LINE.findall(user_bytes, first.end()))
    stem_digits = _digit_count(user_bytes[:start])
    return [
        math.log1p(start) / 8.0,
        math.log1p(n_options),
        math.log1p((len(user_bytes) - start) / n_options) / 5.0,
        math.log1p(stem_digits),
        math.log1p(digits - stem_digits),
    ]


# Task vocabulary the datasets barely show. The code sets are Python functions, the math sets mostly
# LaTeX problems, the writing set a few hundred instructions, so "Implement quicksort in Rust" or
# "Draft an email declining a meeting" had nothing to go by (docs/classifier.md, "Natural prompts").
# Each word here counts for its task wherever it stands; how much a count says is learned from the
# training prompts that have such words. Words that are common in another task ("function",
# "solve", "write", "post", "mean") are left out.
TASK_TERMS: dict[str, frozenset[bytes]] = {
    "code": frozenset(b"""
        python python3 javascript typescript js ts java kotlin rust golang c++ c# cpp csharp ruby php swift
        scala haskell perl lua matlab bash shell zsh powershell sql mysql postgres postgresql sqlite mongodb
        redis html css scss json yaml xml regex regexp git github gitlab docker dockerfile kubernetes k8s
        kubectl helm terraform ansible nginx linux unix ubuntu npm pip conda pandas numpy pytorch tensorflow
        sklearn react angular vue svelte django flask fastapi express node nodejs jquery api apis graphql
        http https curl endpoint webhook sdk cli compiler compile compiles debug debugging debugger bug bugs
        segfault exception exceptions traceback stacktrace nullpointerexception typeerror valueerror
        syntaxerror nonetype null runtime refactor refactoring codebase repo repository commit rebase
        deploy deployment backend frontend database query queries async await thread threads mutex pointer
        pointers struct enum inheritance polymorphism recursion recursive algorithm algorithms snippet
        script scripts code coding programming programmer array arrays string strings loop loops iterator
        dictionary dict hashmap boolean tuple lambda closure callback promise component components method
        methods yield div flexbox
    """.split()),
    "math": frozenset(b"""
        math maths mathematics algebra calculus geometry trigonometry arithmetic equation equations
        inequality derivative derivatives differentiate integral integrals integrate antiderivative
        polynomial quadratic cubic roots sqrt logarithm log ln exponent exponential factorial prime primes
        divisor divisors divisible gcd lcm remainder modulo fraction fractions decimal percent percentage
        ratio proportion probability expected variance deviation median average matrix matrices
        determinant eigenvalue eigenvalues vector vectors theorem lemma proof area perimeter volume radius
        diameter circumference triangle triangles rectangle circle sphere cylinder cone polygon hexagon
        octagon angle angles hypotenuse pythagorean slope intercept parabola asymptote infinity infinite
        series converge convergence integer integers irrational rational subsets combinations permutations
        combinatorics binomial simplify calculate factor factorize factorise dice
    """.split()),
    "writing": frozenset(b"""
        email emails letter letters essay essays poem poems poetry haiku sonnet limerick verse rhyme rhymes
        lyrics song story stories tale novel chapter narrative slogan slogans tagline taglines caption
        captions headline headlines speech toast eulogy blog article articles tweet tweets linkedin
        instagram newsletter memo summarize summarise summary paraphrase rewrite rephrase reword proofread
        translate translation draft compose formal informal concise persuasive tone apology resume cv bio
        biography outline invitation greeting paragraph creative fiction prose
    """.split()),
    "reasoning": frozenset(b"""
        puzzle puzzles riddle riddles logic logical liar liars lies lying truthful truth deduce deduction
        deductive infer inference conclude conclusion syllogism premise premises valid invalid argument
        fallacy taller shorter older younger heavier lighter leftmost rightmost arrange arrangement seated
        seating knights knaves
    """.split()),
}
# Words on the lowercased bytes: letters, digits, `+` and `#` (c++, c#, python3); anything else
# separates. translate + split are C loops: a 4,000-byte turn costs microseconds, not a regex pass.
_TERM_SEPARATORS = bytes(b if b >= 128 or chr(b).isalnum() or b in b"+#" else 32 for b in range(256))
TERMS_FORMAT = struct.Struct(f"<{len(TASK_TERMS)}f")  # appended to the C extension's numbers
_ANY_TERM = frozenset().union(*TASK_TERMS.values())
_TERM_LISTS = tuple(TASK_TERMS.values())


def task_term_counts(user_bytes: bytes) -> list[float]:
    found = _ANY_TERM.intersection(user_bytes.translate(_TERM_SEPARATORS).split())  # the few hits, distinct
    return [math.log1p(len(found & terms)) for terms in _TERM_LISTS]


def handcrafted_numbers(p: Prompt, user_bytes: bytes, n_words: float, word_bytes: float) -> list[float]:
    # Byte counts with bytes methods (C loops, no numpy call): delete a set and compare lengths.
    n = max(len(user_bytes), 1)
    size = len(user_bytes)
    count = user_bytes.count
    log1p = math.log1p
    digits = _digit_count(user_bytes)
    return [
        log1p(p.user_chars) / 8.0,
        log1p(p.system_chars) / 8.0,
        log1p(p.user_turns),
        log1p(p.assistant_turns),
        1.0 if p.system else 0.0,
        digits / n,
        max(size - len(p.user), 0) / n,  # bytes beyond one per character: non-ASCII text
        log1p(count(b"\\")),  # LaTeX
        log1p(count(b"$")),
        log1p(count(b"```")),
        log1p(sum(count(w) for w in _CODE_WORDS)),
        log1p(size - len(user_bytes.translate(None, _BRACES))),
        log1p(count(b"\n    ") + count(b"\n\t")),
        log1p(size - len(user_bytes.translate(None, _OPERATORS))),
        log1p(count(b"?")),
        1.0 if p.user.rstrip().endswith("?") else 0.0,
        log1p(count(b"\n")),
        log1p(n_words) / 4.0,
        min(word_bytes / n_words, 20.0) / 10.0 if n_words else 0.0,
        *_options_layout(user_bytes, digits),
        *task_term_counts(user_bytes),
    ]
