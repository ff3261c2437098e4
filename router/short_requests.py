"""Synthetic short requests, worded as people type them: training only, never evaluated on.

The datasets ask their questions in benchmark form: MATH in LaTeX paragraphs, GSM8K as word problems,
code as Python functions, reasoning as BBH templates and StrategyQA yes/no questions. Their short,
open "what is ...?" questions are nearly all NQ-open trivia, so a model trained on them alone reads
"What is 17 * 23?" or "what is the derivative of sin x" as knowledge. These requests are built from
templates with random slots (numbers, functions, languages, names) and cover the short forms of every
task type, the boundaries included: "what is a derivative" stays knowledge, "what is the derivative
of x^3" is math; "write a poem about primes" is writing, "write a function that finds primes" code.

They carry a task label and no difficulty (nothing was measured), and are generated from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Template = Callable[[random.Random], str]

_OPS = (("+", "plus"), ("-", "minus"), ("*", "times"), ("x", "multiplied by"), ("/", "divided by"))
_FUNCTIONS = ("x^2", "x^3", "3x^2 + 2x", "sin(x)", "cos x", "e^x", "ln(x)", "sqrt(x)", "1/x", "x*e^x",
              "tan(x)", "x^2 sin x", "(2x+1)^3", "log x", "5x^4 - x", "e^(2x)", "x ln x", "sin(x)^2")
_ASKS = ("what is", "what's", "whats", "calculate", "compute", "how much is", "can you work out",
         "quick question: what is", "pls calculate", "find")


def _n(rng: random.Random, lo: int = 2, hi: int = 999) -> int:
    return rng.randint(lo, hi)


def _ask(rng: random.Random) -> str:
    ask = rng.choice(_ASKS)
    return ask.capitalize() if rng.random() < 0.5 else ask


def _end(rng: random.Random) -> str:
    return rng.choice(("?", "?", "", " ?", "??", ". thanks", ", please"))


def _arithmetic(rng: random.Random) -> str:
    symbol, word = rng.choice(_OPS)
    a, b = _n(rng), _n(rng, 2, 99)
    op = word if rng.random() < 0.35 else symbol
    spaced = f"{a} {op} {b}" if rng.random() < 0.7 or op == word else f"{a}{op}{b}"
    return rng.choice((f"{_ask(rng)} {spaced}{_end(rng)}", f"{spaced} = ?", f"{spaced}{_end(rng)}"))


def _percent(rng: random.Random) -> str:
    p, n = rng.choice((5, 10, 12, 15, 18, 20, 25, 30, 33, 40, 75)), _n(rng, 20, 2000)
    return rng.choice((
        f"{_ask(rng)} {p}% of {n}{_end(rng)}",
        f"{p} percent of {n}{_end(rng)}",
        f"A jacket costs ${n} and is {p}% off. What do I pay{_end(rng)}",
        f"how much is a {p}% tip on a ${n} bill",
        f"{n} is what percent of {n * rng.randint(2, 9)}{_end(rng)}",
        f"If my salary goes from {n * 10} to {n * 11}, by what percentage did it rise{_end(rng)}",
    ))


def _powers(rng: random.Random) -> str:
    a, k = _n(rng, 2, 40), rng.randint(2, 12)
    return rng.choice((
        f"{_ask(rng)} {a} squared{_end(rng)}", f"{_ask(rng)} {a}^{k}{_end(rng)}",
        f"{_ask(rng)} the square root of {a * a}{_end(rng)}", f"2 to the power of {k + 8}{_end(rng)}",
        f"cube root of {a ** 3}{_end(rng)}", f"{_ask(rng)} {k}!{_end(rng)}",
        f"{_ask(rng)} log base 2 of {2 ** k}{_end(rng)}",
    ))


def _number_theory(rng: random.Random) -> str:
    a, b = _n(rng, 12, 500), _n(rng, 12, 500)
    return rng.choice((
        f"is {_n(rng, 11, 9999)} prime{_end(rng)}", f"{_ask(rng)} the gcd of {a} and {b}{_end(rng)}",
        f"lcm of {a} and {b}{_end(rng)}", f"prime factors of {a * b}{_end(rng)}",
        f"Is {a * b} divisible by {rng.choice((3, 7, 9, 11, 13))}{_end(rng)}",
        f"what is the remainder when {a * b + 5} is divided by {rng.randint(3, 17)}{_end(rng)}",
        f"convert {a} to binary", f"what is {bin(a)[2:]} in decimal{_end(rng)}",
    ))


def _algebra(rng: random.Random) -> str:
    a, b, c = _n(rng, 2, 12), _n(rng, 1, 30), _n(rng, 31, 99)
    r, s = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice((
        f"solve {a}x + {b} = {c}", f"Solve for x: {a}x - {b} = {c}", f"{a}x + {b} = {c}, x = ?",
        f"solve x^2 - {r + s}x + {r * s} = 0", f"roots of x^2 + {r + s}x + {r * s}{_end(rng)}",
        f"simplify (x + {r})^2", f"expand (x + {r})(x - {s})", f"factor x^2 - {r * r}",
        f"solve the system x + y = {r + s}, x - y = {r - s}",
        f"if f(x) = {a}x + {b}, what is f({r}){_end(rng)}",
        f"what is the slope of the line through ({r}, {s}) and ({r + a}, {s + b}){_end(rng)}",
    ))


def _calculus(rng: random.Random) -> str:
    f, k = rng.choice(_FUNCTIONS), rng.randint(1, 5)
    return rng.choice((
        f"{_ask(rng)} the derivative of {f}{_end(rng)}", f"derivative of {f}", f"d/dx {f}",
        f"differentiate {f}", f"integrate {f}", f"{_ask(rng)} the integral of {f} dx{_end(rng)}",
        f"integral of {f} from 0 to {k}", f"limit of sin({k}x)/x as x -> 0",
        f"what is the second derivative of {f}{_end(rng)}",
        f"find the maximum of -x^2 + {2 * k}x + {k}", f"taylor series of {f} around 0",
    ))


def _fractions_and_units(rng: random.Random) -> str:
    a, b, c, d = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
    n = _n(rng, 3, 400)
    return rng.choice((
        f"{_ask(rng)} {a}/{b} + {c}/{d}{_end(rng)}", f"{a}/{b} times {c}/{d}", f"{a}/{b} as a decimal",
        f"convert 0.{n} to a fraction", f"what is {a}/{b} as a percentage{_end(rng)}",
        f"convert {n} fahrenheit to celsius", f"how many seconds are in {a} days{_end(rng)}",
        f"{n} km in miles", f"how many minutes is {n} seconds{_end(rng)}",
        f"round {n}.{rng.randint(10, 99)}{rng.randint(1, 9)} to 2 decimal places",
    ))


def _stats_and_probability(rng: random.Random) -> str:
    xs = ", ".join(str(rng.randint(1, 40)) for _ in range(rng.randint(4, 8)))
    n, k = rng.randint(5, 20), rng.randint(2, 4)
    return rng.choice((
        f"mean of {xs}", f"{_ask(rng)} the median of {xs}{_end(rng)}", f"standard deviation of {xs}",
        f"probability of rolling two {rng.choice(('sixes', 'ones', 'fours'))} with two dice",
        f"how many ways can I choose {k} people from {n}{_end(rng)}", f"{n} choose {k}",
        f"what are the odds of flipping {k + 1} heads in a row{_end(rng)}",
        f"If I draw 2 cards from a deck, what's the chance both are aces{_end(rng)}",
    ))


def _word_problem(rng: random.Random) -> str:
    d, v, w, h = _n(rng, 20, 600), rng.choice((40, 50, 60, 80, 90, 100)), _n(rng, 12, 60), rng.randint(10, 45)
    return rng.choice((
        f"If I drive {d} km at {v} km/h, how long does it take{_end(rng)}",
        f"I earn ${w} an hour and work {h} hours a week. How much is that a year{_end(rng)}",
        f"a recipe for 4 needs {rng.randint(2, 5)} eggs, how many for {rng.randint(6, 15)} people",
        f"I have {d} apples and give away a third. how many are left{_end(rng)}",
        f"my loan is ${d * 100} at {rng.randint(3, 9)}% a year, how much interest after {rng.randint(2, 6)} years{_end(rng)}",
        f"a room is {rng.randint(3, 9)}m by {rng.randint(3, 9)}m, what's the area{_end(rng)}",
        f"if gas is ${rng.randint(3, 6)}.{rng.randint(10, 99)} a gallon and my car does {rng.randint(20, 40)} mpg, what does a {d} mile trip cost{_end(rng)}",
    ))


_STATEMENTS = ("the square of an odd number is odd", "the product of two odd numbers is odd",
               "n^2 + n is even for every integer n", "n^3 - n is divisible by 3 for every integer n",
               "the sum of three consecutive integers is divisible by 3", "there is no largest even number",
               "every integer greater than 1 has a prime factor", "1 + 3 + 5 + ... + (2n-1) = n^2",
               "the angles of a triangle add up to 180 degrees", "the rationals are countable",
               "a function with a positive derivative is increasing", "1/n tends to 0 as n goes to infinity",
               "the diagonals of a parallelogram bisect each other", "2^n > n for every positive integer n",
               "log_2 3 is irrational", "between any two rationals there is another rational")


def _proof(rng: random.Random) -> str:
    # A proof asked for is math: the datasets have one such request (Self-Instruct), so short
    # ones ("Prove that there are infinitely many primes.") read as chat or knowledge.
    claim = rng.choice(_STATEMENTS + (f"sqrt({rng.choice((3, 5, 6, 7, 10, 11))}) is irrational",
                                      f"{rng.randint(3, 9)}^n - 1 is divisible by the base minus 1 for every n >= 1"))
    verb = rng.choice(("Prove that", "prove", "Show that", "Can you prove that", "how do I prove that",
                       "Give a proof that", "Prove by induction that", "proof that", "Prove rigorously that"))
    return f"{verb} {claim}{rng.choice(('.', '', '.', '?', ' please'))}"


_LANGUAGES = ("python", "Python", "javascript", "JS", "java", "C++", "rust", "go", "typescript", "bash", "C#", "ruby")
_CODE_TASKS = ("reverse a string", "read a csv file", "sort a list of dicts by a key", "check if a number is prime",
               "remove duplicates from a list", "merge two sorted arrays", "make an http request",
               "parse json", "find the largest element in an array", "count word frequencies in a file",
               "flatten a nested list", "convert a string to a date", "generate a random password",
               "find primes up to n", "read a file line by line", "reverse a linked list")
_ERRORS = ("TypeError: 'NoneType' object is not subscriptable", "IndexError: list index out of range",
           "undefined is not a function", "segmentation fault (core dumped)", "ModuleNotFoundError: No module named 'requests'",
           "error: cannot borrow `x` as mutable more than once", "NullPointerException", "CORS error in the browser console")
_SNIPPETS = ("for i in range(len(xs)): print(xs[i])", "x = [i*i for i in range(10) if i % 2]",
             "const f = (a) => a.map(x => x * 2);", "SELECT name FROM users WHERE age > 30;",
             "def f(n):\n    return n if n < 2 else f(n-1) + f(n-2)", "while True:\n    pass",
             "int main() { printf(\"%d\", 5/2); }", "git reset --hard HEAD~1")


def _code(rng: random.Random) -> str:
    lang, task = rng.choice(_LANGUAGES), rng.choice(_CODE_TASKS)
    return rng.choice((
        f"{lang} {task}", f"how do I {task} in {lang}{_end(rng)}", f"write a {lang} function to {task}",
        f"can you write code to {task}", f"{task} {lang}", f"fastest way to {task} in {lang}{_end(rng)}",
        f"why do I get {rng.choice(_ERRORS)}", f"fix this error: {rng.choice(_ERRORS)}",
        f"what does this do?\n{rng.choice(_SNIPPETS)}", f"explain this code: {rng.choice(_SNIPPETS)}",
        f"is there a bug here?\n{rng.choice(_SNIPPETS)}",
        f"regex to match {rng.choice(('an email address', 'a phone number', 'a date like 2024-01-31', 'a hex color'))}",
        f"sql query to get the {rng.choice(('top 5 customers by revenue', 'duplicate emails', 'second highest salary'))}",
        f"how do I {rng.choice(('undo my last commit', 'delete a branch', 'squash commits', 'resolve a merge conflict'))} in git",
        f"bash command to {rng.choice(('find large files', 'count lines in all .py files', 'kill a process on port 8080'))}",
        f"convert this to {lang}: {rng.choice(_SNIPPETS)}",
    ))


_NAMES = ("Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Hana", "Ivan", "Jo")
_THINGS = (("cats", "mammals", "animals"), ("roses", "flowers", "plants"), ("squares", "rectangles", "shapes"),
           ("wugs", "daxes", "blickets"), ("poets", "dreamers", "artists"))


def _reasoning(rng: random.Random) -> str:
    a, b, c = rng.sample(_NAMES, 3)
    x, y, z = rng.choice(_THINGS)
    return rng.choice((
        f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest{_end(rng)}",
        f"If all {x} are {y} and all {y} are {z}, are all {x} {z}{_end(rng)}",
        f"All {x} are {y}. Some {y} are {z}. Does it follow that some {x} are {z}{_end(rng)}",
        f"{a} always lies and {b} always tells the truth. {a} says {b} stole the cake. Who stole it{_end(rng)}",
        f"{a} sits left of {b}, {c} sits right of {b}. who is in the middle{_end(rng)}",
        f"{a}, {b} and {c} each own a different pet: a cat, a dog, a fish. {a} is allergic to fur and {b} hates water. who owns the dog",
        f"riddle: what has keys but can't open locks{_end(rng)}",
        f"I'm {a}'s brother's only sibling's child. How am I related to {a}{_end(rng)}",
        f"if it rains the match is cancelled. the match was not cancelled. did it rain{_end(rng)}",
        f"{a} arrived before {b} but after {c}. who came first{_end(rng)}",
        f"which one doesn't belong: {rng.choice(('apple, banana, carrot, grape', 'red, blue, square, green', 'dog, cat, eagle, cow'))}",
        f"a man pushes his car to a hotel and tells the owner he's bankrupt. why{_end(rng)}",
        f"is this argument valid: {a} is a doctor, some doctors are rich, so {a} is rich{_end(rng)}",
    ))


_CONCEPTS = ("a derivative", "an integral", "a prime number", "calculus", "a vector", "an algorithm",
             "recursion", "photosynthesis", "inflation", "a black hole", "DNA", "the stock market",
             "machine learning", "a compiler", "democracy", "an API", "entropy", "the pythagorean theorem")
_TOPICS = ("the french revolution", "the roman empire", "world war 1", "the moon landing", "the printing press",
           "penicillin", "the internet", "electricity", "the telephone", "the cold war")


def _knowledge(rng: random.Random) -> str:
    concept, topic = rng.choice(_CONCEPTS), rng.choice(_TOPICS)
    return rng.choice((
        f"what is {concept}{_end(rng)}", f"explain {concept} simply", f"who invented {topic}{_end(rng)}",
        f"when did {topic} start{_end(rng)}", f"what caused {topic}{_end(rng)}", f"tell me about {topic}",
        f"why do leaves change colour in autumn{_end(rng)}", f"how do vaccines work{_end(rng)}",
        f"what's the capital of {rng.choice(('Australia', 'Canada', 'Peru', 'Kenya', 'Norway', 'Vietnam'))}{_end(rng)}",
        f"how tall is {rng.choice(('mount everest', 'the eiffel tower', 'a giraffe'))}{_end(rng)}",
        f"who wrote {rng.choice(('Hamlet', 'War and Peace', '1984', 'Don Quixote'))}{_end(rng)}",
        f"difference between {rng.choice(('a virus and a bacterium', 'weather and climate', 'stocks and bonds', 'a crocodile and an alligator'))}",
        f"is coffee bad for you{_end(rng)}", f"how many {rng.choice(('bones are in the human body', 'planets are there', 'countries are in Africa'))}{_end(rng)}",
    ))


def _writing(rng: random.Random) -> str:
    topic = rng.choice(("autumn", "prime numbers", "my cat", "the ocean", "a rainy monday", "coffee", "python", "friendship"))
    return rng.choice((
        f"write a poem about {topic}", f"write a haiku about {topic}", f"short story about {topic}",
        f"write a limerick about {topic}", f"give me a catchy slogan for a {rng.choice(('bakery', 'gym', 'coding bootcamp'))}",
        f"write an email to my boss asking for {rng.choice(('a day off', 'a raise', 'feedback'))}",
        f"rewrite this to sound more professional: {rng.choice(('hey, cant make it tmrw', 'u guys messed up my order', 'need the report asap'))}",
        f"summarize this: {rng.choice(('The meeting covered budgets, hiring and the Q3 roadmap; hiring is frozen until October.', 'Our study followed 200 patients for a year and found no difference between the two treatments.'))}",
        f"make this shorter: {rng.choice(('I am writing to let you know that I will not be able to attend.', 'We would like to take this opportunity to thank all of you.'))}",
        f"write a {rng.choice(('cover letter', 'toast', 'product description', 'tweet', 'linkedin post'))} for {rng.choice(('a junior developer job', 'my sister wedding', 'noise-cancelling headphones', 'our launch'))}",
        f"translate to {rng.choice(('french', 'spanish', 'german'))}: {rng.choice(('See you tomorrow at noon.', 'Thank you for your help.'))}",
        f"proofread: {rng.choice(('Their going to the park tomorow.', 'Its been a long time sence we met.'))}",
    ))


def _chat(rng: random.Random) -> str:
    return rng.choice((
        "hiya", "hello!", "hey there", "good morning", "how are you?", "how's it going", "thanks a lot!", "thank you so much",
        "lol", "that's funny", "i'm bored", "i had a rough day", "yo, what are you up to", "tell me something fun",
        "do you like jazz?", "what do you think about cats?", "you're awesome", "ok, sounds good", "bye!",
        "wanna talk for a while?", "i can't sleep", "what should I do this weekend?", "guess what, I got the job!",
        "do you have a favourite movie?", "that's not what I meant, but ok", "haha nice",
    ))


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "math": (_arithmetic, _percent, _powers, _number_theory, _algebra, _calculus, _fractions_and_units,
             _stats_and_probability, _word_problem, _proof),
    "code": (_code,),
    "reasoning": (_reasoning,),
    "knowledge": (_knowledge,),
    "writing": (_writing,),
    "chat": (_chat,),
}


# Distinct requests per type: the math templates vary most (numbers, functions) and math is the type
# whose short form the datasets lack most; chat and writing have few distinct texts to give.
PER_TASK = {"math": 400, "code": 200, "reasoning": 150, "knowledge": 100, "writing": 85, "chat": 29}


def short_requests(seed: int) -> list[tuple[str, str]]:
    """(text, task) pairs, PER_TASK distinct requests per task type (fewer where the templates run out)."""
    out = []
    for task, templates in TEMPLATES.items():
        per_task = PER_TASK[task]
        rng = random.Random(f"{seed}:short:{task}")
        seen: set[str] = set()
        for _ in range(per_task * 20):
            if len(seen) == per_task:
                break
            text = rng.choice(templates)(rng)
            if rng.random() < 0.15:
                text = text.lower()
            if text not in seen:
                seen.add(text)
                out.append((text, task))
    return out
