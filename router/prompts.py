"""Prompt text the strategies add, and the parsers that read the replies back.

- CoT: a step-by-step instruction per task type (a template the policy may override) that asks for a
  last line "Final answer: ...", and ``final_answer`` which hands the client only that answer
  (``reply_until_stop``: where the client's stop sequences end it).
- Judge: the rubric an LLM judge scores best-of-N samples with, and ``parse_judge_score``.

Templates are plain ``str.format`` strings; unknown placeholders are not used, so a policy can
write any text. The answer-format wording per task matches what ``router.answers`` extracts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from router.answers import answer_format, answer_line, first_marker, last_marker

FINAL_ANSWER_MARKER = "Final answer:"

_FORMAT_HINTS: dict[str, str] = {
    "math": "Put the final answer within \\boxed{} as well.",
    "multiple_choice": "Give the letter of the correct option as the final answer.",
    "number": "Give only the number as the final answer.",
    "python": "Give only the Python expression as the final answer.",
    "short_text": "Keep the final answer short: a word, a phrase or a number.",
    "open": "After the final answer marker, write the complete reply for the user.",
}

DEFAULT_COT_TEMPLATE = (
    "Think through the problem step by step before answering. {format_hint} "
    "End your reply with a last line of the form '" + FINAL_ANSWER_MARKER + " <answer>'."
)


def cot_instruction(task: str, template: str | None = None) -> str:
    """The step-by-step instruction for a task; ``template`` may use ``{format_hint}`` and ``{task}``."""
    hint = _FORMAT_HINTS[answer_format(task)]
    return (template or DEFAULT_COT_TEMPLATE).replace("{format_hint}", hint).replace("{task}", task).strip()


def with_cot_instruction(messages: Sequence[dict[str, Any]], task: str, template: str | None = None) -> list[dict[str, Any]]:
    """A copy of an OpenAI ``messages`` list with the CoT instruction appended to the last user turn.

    Appended to the user turn rather than sent as a system message because some chat templates
    drop or merge system messages; a content-parts list gets an extra text part.
    """
    instruction = cot_instruction(task, template)
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [*content, {"type": "text", "text": instruction}]
        else:
            message["content"] = f"{content or ''}\n\n{instruction}".lstrip()
        return out
    out.append({"role": "user", "content": instruction})
    return out


def final_answer(text: str | None, task: str) -> str:
    """The clean reply to hand the client from a CoT output.

    The answer after the last "Final answer" marker that is followed by one (the markers of
    ``router.answers``, so "Final answer check: ..." is none), stripped of markdown bold and a math
    ``\\boxed{}`` wrapper. For an open task (writing, chat, code) that is everything after the
    marker; for a task with a comparable answer, its first paragraph without a closing "I hope it is
    correct.". Without a marker, the whole text, so the client never loses an answer.
    """
    if not text:
        return ""
    marker = last_marker(text, final_only=True)
    if marker is None:
        return text.strip()
    reply = text[marker.start(1) :]
    if answer_format(task) != "open":
        # later paragraphs are checks and sign-offs, not the answer
        paragraph = re.split(r"\n\s*\n", reply, maxsplit=1)[0]
        if _is_json(paragraph):
            # a JSON reply the app asked for in its prompt: whole (answer_line unwrapped a "the answer
            # is 42" in one of its strings, and the client got `42"}`)
            return paragraph.strip()
        reply = answer_line(paragraph)
    reply = reply.strip().strip("*").strip()
    if not reply:
        return text.strip()
    if answer_format(task) == "math":
        boxed = re.fullmatch(r"\$*\s*\\boxed\{(.*)\}\s*\$*\.?", reply, re.DOTALL)
        if boxed:
            reply = boxed.group(1).strip()
    return reply


_CODE_FENCE = re.compile(r"\s*```[\w-]*[ \t]*\n(.*?)\n?```\s*", re.DOTALL)


def _is_json(text: str) -> bool:
    """Whether ``text`` is a JSON object or array, bare or in a code fence."""
    fenced = _CODE_FENCE.fullmatch(text)
    try:
        return isinstance(json.loads(fenced.group(1) if fenced else text), (dict, list))
    except ValueError:
        return False


def reply_until_stop(text: str, stop: str | Sequence[str] | None, *, finished: bool = True) -> str:
    """A CoT output ended where the client's ``stop`` sequences end its reply.

    The chain is written without them: they are about the reply, and sent with it "\\n\\n" (an eval
    harness's) ended the chain at its first paragraph, before any answer. The reply starts at the
    answer after the first "Final answer" marker (the whole text without one), and the first stop
    sequence from there on ends the output, as it would have ended an upstream's: a few-shot prompt's
    next "Question:" the model went on to write is dropped, its "Final answer" with it. A chain cut
    off at its length limit (not ``finished``) before any marker never reached its reply: it stays
    as it is (cut, no answer), not a first paragraph passed off as a finished reply."""
    sequences = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
    marker = first_marker(text, final_only=True)
    if marker is None and not finished:
        return text
    start = marker.start(1) if marker else 0
    cuts = [i for i in (text.find(s, start) for s in sequences) if i >= 0]
    return text[:min(cuts)] if cuts else text


DEFAULT_JUDGE_RUBRIC = """You are grading one candidate answer to a user's request.
Judge it on:
1. Correctness: is the final answer right? For math, code or reasoning, check the work step by step.
2. Completeness: does it answer everything that was asked?
3. Instruction following: format, length and constraints the user set.
4. Clarity: is it clear and free of irrelevant content?
Correctness matters most: a wrong final answer scores at most 3.

Reply with the score first, on a first line exactly of the form:
Score: <integer from 1 to 10>
then, optionally, one short sentence giving the reason."""

JUDGE_SCALE = (1.0, 10.0)


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text of the last user turn (content parts joined), the question a judge is shown."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return str(content or "")
    return ""


def last_user_media(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts of the last user turn that are no text (images, audio), which a judge must see too:
    "What is in this picture?" says nothing without the picture."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if not isinstance(content, list):
            return []
        return [p for p in content if isinstance(p, dict) and p.get("type") not in ("text", None)]
    return []


def judge_messages(question: str, answer: str, rubric: str | None = None,
                   media: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Chat messages asking an LLM judge to score one candidate answer with the rubric; `media`: the
    request's images and audio (last_user_media), after the text, as the question had them."""
    text = (f"User request:\n<request>\n{question}\n</request>\n\n"
            f"Candidate answer:\n<answer>\n{answer}\n</answer>\n\nGrade the candidate answer.")
    content: str | list[dict[str, Any]] = [{"type": "text", "text": text}, *media] if media else text
    return [
        {"role": "system", "content": (rubric or DEFAULT_JUDGE_RUBRIC).strip()},
        {"role": "user", "content": content},
    ]


_SCORE = re.compile(
    r"(?:score|rating|grade)\s*(?:is)?\s*[:=]?\s*\**\s*\[?(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE
)


def parse_judge_score(text: str | None, scale: tuple[float, float] = JUDGE_SCALE) -> float | None:
    """The judge's score normalised to [0, 1] (1 -> 0.0, 10 -> 1.0), or None if there is none.

    The rubric asks for the score first (the gateway reads only a few tokens of the reply), so a reply
    whose first line starts with "Score: N" is read there and a reason after it cannot override it.
    Otherwise the last "Score: N" (or "N/10") counts, so a judge quoting the rubric first does not.
    Out-of-range scores are clamped; a "N/M" score is read on its own scale M.
    """
    if not text:
        return None
    first_line = text.strip().split("\n", 1)[0]
    leading = _SCORE.match(first_line.lstrip("*_# "))
    matches = [leading] if leading else list(_SCORE.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    value = float(match.group(1))
    low, high = scale
    if match.group(2):
        high = float(match.group(2))
        low = 0.0 if low >= high else low
    if high <= low:
        return None
    return min(1.0, max(0.0, (value - low) / (high - low)))
