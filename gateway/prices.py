"""What one call costs. Backend prices are resolved in policies/ (declared, else litellm's cost map)."""

from __future__ import annotations

from policies.backends import BackendSpec, Prices
from policies.loader import resolve_prices as _resolve


def resolve_prices(spec: BackendSpec) -> Prices:
    return _resolve(spec)[0]


def call_cost(prices: Prices, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
              cache_write_tokens: int = 0) -> float:
    """USD for one call. Reasoning tokens are part of completion_tokens in the OpenAI usage block;
    cached_tokens are the part of prompt_tokens the provider read from its prompt cache (cheaper), and
    cache_write_tokens the part it wrote to it (dearer at Anthropic: 1.25x the input price)."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    written = min(max(cache_write_tokens, 0), prompt_tokens - cached)
    cached_price = prices.input_per_mtok if prices.cached_input_per_mtok is None else prices.cached_input_per_mtok
    write_price = (prices.input_per_mtok if prices.cache_write_input_per_mtok is None
                   else prices.cache_write_input_per_mtok)
    return ((prompt_tokens - cached - written) * prices.input_per_mtok + cached * cached_price
            + written * write_price + completion_tokens * prices.output_per_mtok) / 1e6
