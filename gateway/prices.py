"""Backend prices: the operator's numbers when given, else litellm's bundled cost map (offline).

The cost map is read as the JSON file litellm ships, without importing litellm (which takes
seconds), so startup stays fast even for configs that never touch litellm.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from policies.backends import BackendSpec, Prices

ZERO = Prices(input_per_mtok=0.0, output_per_mtok=0.0)


@functools.cache
def _cost_map() -> dict:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def litellm_prices(model: str) -> Prices | None:
    """Look a litellm model string up as litellm does: full name first, then without the provider."""
    table = _cost_map()
    for key in (model, model.split("/", 1)[-1]):
        entry = table.get(key)
        if entry and "input_cost_per_token" in entry:
            return Prices(
                input_per_mtok=float(entry["input_cost_per_token"]) * 1e6,
                output_per_mtok=float(entry.get("output_cost_per_token", 0.0)) * 1e6,
            )
    return None


def resolve_prices(spec: BackendSpec) -> Prices:
    return spec.prices or litellm_prices(spec.model) or ZERO


def call_cost(prices: Prices, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one call. Reasoning tokens are part of completion_tokens in the OpenAI usage block."""
    return (prompt_tokens * prices.input_per_mtok + completion_tokens * prices.output_per_mtok) / 1e6
