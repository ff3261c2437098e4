"""What one upstream call is billed: its Usage (the upstream's own counts, or the gateway's estimate
where it sent none) and its CallRecord, which telemetry stores and a response's `usage` sums."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How a cut call's error starts (Backend.cut): telemetry and dashboards tell cut calls, billed what the
# upstream had read and written, from failed ones that cost nothing.
CUT_OFF = "cut off"
# How the error of a 200 without choices starts (Caller._call): billed as it came, yet no answer, so a
# failed call to the backend's health, the ledger and /metrics alike.
NO_CHOICES = "no choices"


@dataclass(slots=True)
class CallRecord:
    """One upstream call as billed: what telemetry stores and what `usage` sums."""

    backend: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ok: bool = True
    error: str | None = None
    # the upstream's other counts (`prompt_tokens_details.cached_tokens`, audio, predicted tokens),
    # by block and name: the client's `usage` sums them over the request's calls
    usage_details: dict[str, dict[str, int]] = field(default_factory=dict)
    usage_estimated: bool = False  # the upstream's answer had no usage: counted by the gateway's estimate

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": self.cost_usd,
            "latency_ms": round(self.latency_ms, 3),
            "ok": self.ok,
            "error": self.error,
        }


USAGE_DETAIL_BLOCKS = ("prompt_tokens_details", "completion_tokens_details")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    details: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the provider served from its prompt cache (billed at the cached price)."""
        return self.details.get("prompt_tokens_details", {}).get("cached_tokens", 0)

    @property
    def cache_write_tokens(self) -> int:
        """Prompt tokens the provider wrote to its prompt cache (billed at the cache-write price):
        litellm's `cache_creation_tokens` (Anthropic's `cache_creation_input_tokens`), else the
        `cache_write_tokens` of OpenAI-compatible routers."""
        prompt = self.details.get("prompt_tokens_details", {})
        return prompt.get("cache_creation_tokens", prompt.get("cache_write_tokens", 0))

    @classmethod
    def from_block(cls, usage: dict | None) -> Usage:
        if not usage:
            return cls()
        details = {}
        for block in USAGE_DETAIL_BLOCKS:
            counts = usage.get(block)
            if isinstance(counts, dict):
                details[block] = {name: value for name, value in counts.items()
                                  if isinstance(value, int) and not isinstance(value, bool)}
        return cls(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int(details.get("completion_tokens_details", {}).get("reasoning_tokens") or 0),
            details,
        )

    @classmethod
    def estimated(cls, prompt_tokens: int, content_chunks: int = 0, content_chars: int = 0, *,
                  output_limit: int | None = None) -> Usage:
        """A call's usage where the upstream reported none (a stream from llama.cpp's server, a call cut
        off before its end): the prompt at its estimate, and what it wrote so far: a content chunk at
        least one token (what llama.cpp sends), a long one its characters / 4 (as the prompt's
        estimate counts), but no more than the call's `output_limit` (its max_tokens), which the
        upstream did not pass."""
        written = max(content_chunks, -(-content_chars // 4))
        return cls(prompt_tokens, written if output_limit is None else min(written, output_limit))


def output_limit(body: dict[str, Any]) -> int | None:
    """The most tokens a call with this body may write (its max_tokens or max_completion_tokens)."""
    limits = [v for k in ("max_tokens", "max_completion_tokens")
              if isinstance(v := body.get(k), int) and not isinstance(v, bool)]
    return min(limits) if limits else None
