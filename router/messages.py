"""What the classifier reads from a conversation: OpenAI `messages` (or plain text) into a `Prompt`.

The features (router/features.py) are computed from the Prompt alone. (router/prompts.py is another
thing: the text the strategies add to a request.) Never raises: whatever the client put in `messages`
(nothing, only a system prompt, 1 MB of text, binary junk, emoji, the wrong types), the request path
gets a valid Prompt, already cut to what the features read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Deterministic truncation: long pastes usually end with the actual question, so keep head and tail.
# 2,500 characters hold every MATH, GSM8K, HumanEval and nearly every BBH prompt whole; beyond that
# more text changes the vector little and costs latency linearly.
USER_HEAD_CHARS = 2000
USER_TAIL_CHARS = 500
SYSTEM_CHARS = 1000
MAX_PARTS = 64  # content parts looked at per message
MAX_PART_CHARS = USER_HEAD_CHARS + USER_TAIL_CHARS + 1  # enough to truncate; avoids joining 1 MB

SYSTEM_ROLES = frozenset({"system", "developer"})
ASSISTANT_ROLES = frozenset({"assistant", "tool", "function"})
TEXT_PART_TYPES = frozenset({"text", "input_text"})


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the classifier reads from a conversation: already truncated, always valid."""

    user: str = ""  # last user turn (head + tail when long)
    system: str = ""  # system/developer prompts, first SYSTEM_CHARS characters
    user_turns: int = 0
    assistant_turns: int = 0
    user_chars: int = 0  # length before truncation: long inputs are a signal in themselves
    system_chars: int = 0


EMPTY_PROMPT = Prompt()


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part[:MAX_PART_CHARS]
    if isinstance(part, dict) and part.get("type", "text") in TEXT_PART_TYPES:
        text = part.get("text")
        if isinstance(text, str):
            return text[:MAX_PART_CHARS]
    return ""  # images, audio, files, junk: not text, ignored


def _content_text(content: Any) -> tuple[str, int]:
    """(text truncated to what we may keep, full length) of a message's `content`."""
    if isinstance(content, str):
        return content, len(content)
    if isinstance(content, (bytes, bytearray)):
        text = bytes(content[: 4 * MAX_PART_CHARS]).decode("utf-8", "replace")
        return text, len(content)
    if isinstance(content, (list, tuple)):
        texts, total = [], 0
        for part in content[:MAX_PARTS]:
            text = _part_text(part)
            if text:
                texts.append(text)
                full = part.get("text") if isinstance(part, dict) else part
                total += len(full) if isinstance(full, str) else len(text)
        return "\n".join(texts), total
    return "", 0


def truncate_user(text: str) -> str:
    if len(text) <= USER_HEAD_CHARS + USER_TAIL_CHARS:
        return text
    return text[:USER_HEAD_CHARS] + "\n" + text[-USER_TAIL_CHARS:]


def prompt_from_messages(messages: Any) -> Prompt:
    """Read an OpenAI `messages` list (or a bare string) into a Prompt. Never raises."""
    try:
        return _prompt_from_messages(messages)
    except Exception:  # noqa: BLE001 - malformed input must not reach the request path
        return EMPTY_PROMPT


def _prompt_from_messages(messages: Any) -> Prompt:
    if isinstance(messages, str):
        return prompt_from_text(messages)
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        return EMPTY_PROMPT
    last_user, user_chars, user_turns, assistant_turns = None, 0, 0, 0
    systems, system_chars = [], 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "user":
            user_turns += 1
            last_user = message  # what must be answered now, however many tool round trips came after it
        elif role in ASSISTANT_ROLES:
            assistant_turns += 1
        elif role in SYSTEM_ROLES and system_chars < SYSTEM_CHARS:
            text, full = _content_text(message.get("content"))
            systems.append(text[:SYSTEM_CHARS])
            system_chars += full
    user, user_chars = _content_text(last_user.get("content")) if last_user is not None else ("", 0)
    system = "\n".join(systems)[:SYSTEM_CHARS]
    return Prompt(
        user=truncate_user(user or ""),
        system=system,
        user_turns=user_turns,
        assistant_turns=assistant_turns,
        user_chars=user_chars,
        system_chars=system_chars,
    )


def prompt_from_text(text: Any, system: str = "") -> Prompt:
    """A single-turn prompt from plain text (the `ponder classify "TEXT"` case). Never raises."""
    try:
        body, full = _content_text(text)
        sys_text, sys_full = _content_text(system)
        return Prompt(
            user=truncate_user(body),
            system=sys_text[:SYSTEM_CHARS],
            user_turns=1,
            assistant_turns=0,
            user_chars=full,
            system_chars=sys_full,
        )
    except Exception:  # noqa: BLE001
        return EMPTY_PROMPT


def messages_problem(messages: Any) -> str | None:
    """What is wrong with `messages` read from a user's file (classify --input, train --extra), or None.
    The request path takes anything (prompt_from_messages); a file is held to the documented form, as a
    string, null or `{"content": 42}` used to be classified (or trained on) as an empty conversation."""
    if not isinstance(messages, list) or not messages:
        return f'"messages" must be a non-empty list of {{"role": ..., "content": ...}} objects, not {_shown(messages)}'
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f'"messages" item {n} must be an object with a "role" string, not {_shown(message)}'
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return f'"messages" item {n}: "content" must be a string or a list of parts, not {_shown(content)}'
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
