"""What one call costs. Backend prices are resolved in policies/ (declared, else litellm's cost map)."""

from __future__ import annotations

from policies.backends import BackendSpec, Prices
from policies.loader import resolve_prices as _resolve


def resolve_prices(spec: BackendSpec) -> Prices:
    return _resolve(spec)[0]


def call_cost(prices: Prices, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one call. Reasoning tokens are part of completion_tokens in the OpenAI usage block."""
    return (prompt_tokens * prices.input_per_mtok + completion_tokens * prices.output_per_mtok) / 1e6
