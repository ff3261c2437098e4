"""The eval price table: USD per million tokens for every model a suite replays, and where each came from.

One file holds the table (evals/price_table.yaml); this module reads it. An entry with a `litellm` key
takes its price from the installed litellm's bundled cost map, read as JSON (evals/ must not import
gateway/, and importing litellm itself takes seconds); the numbers written in the table are the
fallback if that key ever disappears. An entry without one cites a public price page in `source`.
A user's own table (`ponder eval --prices FILE`, same format) is merged over the shipped one.
list_price_costs prices an outcome table's columns with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from policies.loader import litellm_cost_map  # the one reader of litellm's bundled cost map

PRICE_TABLE_PATH = Path(__file__).with_name("price_table.yaml")
CHARS_PER_TOKEN = 4.0  # the usual English rule of thumb, for tables that record characters, not tokens


def estimated_tokens(text: str | None) -> float:
    return len(text) / CHARS_PER_TOKEN if text else 0.0


@dataclass(frozen=True)
class ModelPrice:
    model: str
    input_per_mtok: float
    output_per_mtok: float
    origin: str  # "litellm:<key>", "litellm key missing, table value:<key>", or the cited source
    note: str = ""

    def cost_usd(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def _from_litellm(key: str) -> tuple[float, float] | None:
    entry = litellm_cost_map().get(key)
    if not entry or entry.get("input_cost_per_token") is None:
        return None
    return float(entry["input_cost_per_token"]) * 1e6, float(entry.get("output_cost_per_token") or 0.0) * 1e6


def _entry(model: str, raw: dict) -> ModelPrice:
    key = raw.get("litellm")
    note = str(raw.get("note", ""))
    if key:
        found = _from_litellm(key)
        if found is not None:
            return ModelPrice(model, found[0], found[1], f"litellm:{key}", note)
        if "input_per_mtok" not in raw:
            raise KeyError(f"price of `{model}`: litellm key `{key}` not in the installed cost map and no fallback")
        return ModelPrice(model, _usd(raw, "input_per_mtok"), _usd(raw, "output_per_mtok"),
                          f"litellm key missing, table value:{key}", note)
    if "source" not in raw:
        raise ValueError(f"price of `{model}`: give a `litellm` key or cite a `source`")
    return ModelPrice(model, _usd(raw, "input_per_mtok"), _usd(raw, "output_per_mtok"), str(raw["source"]), note)


def _usd(raw: dict, key: str) -> float:
    """A price in USD per million tokens: a number >= 0. A negative one failed the replay's policy with
    a many-line validation error, NaN made the model unpriced, and YAML's `true` read as 1."""
    value = raw[key]
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{key} must be a number >= 0, not {value!r}")
    return number


def read_price_file(path: str | Path) -> dict[str, ModelPrice]:
    """A price file's entries; ValueError naming the file for one that is not YAML or not in the table's shape
    (a file without its `models:` mapping used to be read as no prices at all)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not YAML ({getattr(exc, 'problem', None) or exc})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path}: expected a `models:` mapping of model name to prices, as in {PRICE_TABLE_PATH.name}")
    prices = {}
    for model, raw in models.items():
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: `{model}` must map to input_per_mtok, output_per_mtok and source (or litellm)")
        try:
            prices[str(model)] = _entry(str(model), raw)
        except KeyError as exc:
            raise ValueError(f"{path}: `{model}` has no {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: `{model}`: {exc}") from None
    return prices


@functools.cache
def shipped_prices() -> dict[str, ModelPrice]:
    return read_price_file(PRICE_TABLE_PATH)


def price_table(extra: str | Path | None = None) -> dict[str, ModelPrice]:
    table = dict(shipped_prices())
    if extra is not None:
        table.update(read_price_file(extra))
    return table


HOST_PREFIXES = ("", "together_ai/", "deepinfra/", "fireworks_ai/accounts/fireworks/models/")


def find_price(model: str, table: dict[str, ModelPrice] | None = None) -> ModelPrice | None:
    """The table's entry (by name, or by the name after its last `/`; in any letter case), else
    litellm's entry for the name itself (a user's column may be a litellm model string such as
    `gpt-4-1106-preview`, or a Hugging Face id such as `mistralai/Mixtral-8x7B-Instruct-v0.1` that a
    serverless host lists), else None."""
    table = table if table is not None else shipped_prices()
    names = (model, model.rsplit("/", 1)[-1])
    for name in names:
        if name in table:
            return table[name]
    folded = {key.casefold(): price for key, price in table.items()}
    for name in names:
        if name.casefold() in folded:  # RouteLLM's files name `mixtral-8x7b-instruct-v0.1` in lower case
            return folded[name.casefold()]
    for key in (model, model.split("/", 1)[-1]):
        for prefix in HOST_PREFIXES:
            found = _from_litellm(prefix + key)
            if found is not None:
                return ModelPrice(model, found[0], found[1], f"litellm:{prefix + key}")
    return None


def list_price_costs(models: Sequence[str], prompt_tokens: np.ndarray, output_tokens: np.ndarray,
                     prices: dict[str, ModelPrice]) -> tuple[np.ndarray, dict[str, str], dict[str, ModelPrice]]:
    """Each model's costs, where its price came from, and the price itself (None found: NaN costs)."""
    cost = np.full(output_tokens.shape, np.nan)
    origins: dict[str, str] = {}
    found: dict[str, ModelPrice] = {}
    for j, model in enumerate(models):
        price = find_price(model, prices)
        if price is None:
            origins[model] = "unknown: add it with --prices FILE"
            continue
        origins[model], found[model] = price.origin, price
        cost[:, j] = (prompt_tokens * price.input_per_mtok + output_tokens[:, j] * price.output_per_mtok) / 1e6
    return cost, origins, found
