"""The request's hints for the decision: client overrides (x-ponder-* headers, `reasoning_effort`) and
request facts (estimated prompt length, output cap, `n`), parsed once by the gateway and handed to
router.decide.decide(), which decides whether the policy honours each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.schema import TASK_LABEL_PATTERN
from router.estimates import estimate_prompt_tokens
from router.types import STRATEGIES

@dataclass(frozen=True, slots=True)
class RequestHints:
    """Client overrides and request facts, already parsed by the gateway. None means not given."""

    max_cost_usd: float | None = None  # x-ponder-max-cost-usd
    max_latency_ms: float | None = None  # x-ponder-max-latency-ms
    strategy: str | None = None  # x-ponder-strategy
    task: str | None = None  # x-ponder-task: the client's task label
    reasoning_effort: str | None = None  # body `reasoning_effort`
    prompt_tokens: int | None = None  # estimated
    max_output_tokens: int | None = None  # body `max_tokens` / `max_completion_tokens`
    choices: int = 1  # body `n`: the answers the client asks for
    exact_output: str | None = None  # why the answer must be the model's own ("tools"), if it must

    @classmethod
    def from_request(cls, request: Any, headers: Mapping[str, str], policy: Any = None) -> RequestHints:
        """Hints from a parsed chat request (anything with `messages`, `reasoning_effort`,
        `max_output_tokens`, and the `body`, whose tool definitions are prompt too) and its headers.
        Whether each is honoured is the policy's call, made in decide() where the reason is recorded.
        Raises InvalidHint (-> 400) on a malformed header."""
        strategy = headers.get("x-ponder-strategy") or None
        if strategy is not None and strategy not in STRATEGIES:
            raise InvalidHint("x-ponder-strategy",
                              f"x-ponder-strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        task = headers.get("x-ponder-task") or None
        if task is not None and not _TASK_LABEL.match(task):
            raise InvalidHint("x-ponder-task", f"x-ponder-task must be a lowercase label of letters, digits, '_', "
                              f"'.' or '-' (at most 64); got {task[:80]!r}")
        return cls(
            task=task,
            max_cost_usd=_header_number(headers, "x-ponder-max-cost-usd"),
            max_latency_ms=_header_number(headers, "x-ponder-max-latency-ms"),
            strategy=strategy,
            reasoning_effort=getattr(request, "reasoning_effort", None),
            prompt_tokens=estimate_prompt_tokens(getattr(request, "messages", None) or [],
                                                 getattr(request, "body", None)),
            max_output_tokens=getattr(request, "max_output_tokens", None),
            choices=int(getattr(request, "n", None) or 1),
            exact_output=getattr(request, "exact_output", None),
        )


_TASK_LABEL = re.compile(TASK_LABEL_PATTERN)


class InvalidHint(ValueError):
    """A malformed client override (the gateway answers 400 with this message, and the header's name
    as the error's `param`, as OpenAI names the offending field)."""

    def __init__(self, header: str, message: str) -> None:
        super().__init__(message)
        self.header = header


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidHint(name, f"{name} must be a number; got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidHint(name, f"{name} must be a non-negative number; got {raw!r}")
    return value
