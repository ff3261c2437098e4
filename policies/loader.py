"""Read policy YAML into a checked `Policy`, with errors an operator can act on.

Every error names the file, the line and the key path, and says what was expected (policies/yaml_source.py
finds the lines, for our own cross-field checks too).
Also: the `ponder policy check` command and the JSON Schema shipped for editors.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError
from pydantic.json_schema import GenerateJsonSchema

from policies.backends import BackendSpec, Prices
from policies.yaml_source import YamlSyntaxError, compose, validation_problems
from policies.yaml_source import dotted as _dotted, line_of as _line_of
from policies.schema import (
    Policy,
    PolicyError,
    expected_output_tokens,
    policy_problems,
)

__all__ = ["PolicyError", "load_policy", "parse_policy", "resolve_policy_path", "check_cli", "write_json_schema", "resolve_prices",
           "resolve_max_context", "resolve_max_output", "unpriced_refusal"]

SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")
SHIPPED = Path(__file__).parent  # the policies that come with the package
SUMMARY_PROMPT_TOKENS = 500  # the prompt size the summary prices arms at


def load_policy(path: str | Path, extra_backends: Iterable[BackendSpec] = (),
                served_inline: Mapping[str, tuple[BackendSpec, str]] | None = None) -> Policy:
    """Read and check a policy file. `extra_backends` (the gateway config's) win over inline ones by name.
    `served_inline`: backend name -> (spec, which policy) of the inline backends the other policies served
    with this one declare, which one declared here must equal."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        hint = f"; a bare name picks a shipped policy: {', '.join(shipped_policies())}" \
            if isinstance(exc, FileNotFoundError) else ""
        raise PolicyError([(str(path), None, "", f"cannot read the file: {exc}{hint}")]) from exc
    return parse_policy(text, str(path), extra_backends, served_inline)


def shipped_policies() -> list[str]:
    return sorted(path.name for path in SHIPPED.glob("*.yaml"))


def resolve_policy_path(base: Path, value: str) -> str:
    """Where a policy named `value` is, as a gateway config names it: `$VARS` expanded, relative to `base`
    (the config's folder), and a bare file name that is not there one of the shipped policies
    (`policy: cost-saver.yaml`)."""
    expanded = os.path.expandvars(value)
    candidate = Path(expanded)
    if candidate.is_absolute():
        return expanded
    if (base / candidate).exists():
        return str(base / candidate)
    if (SHIPPED / candidate.name).exists() and not candidate.parent.parts:
        return str(SHIPPED / candidate.name)
    return str(base / candidate)


def parse_policy(text: str, source_name: str, extra_backends: Iterable[BackendSpec] = (),
                 served_inline: Mapping[str, tuple[BackendSpec, str]] | None = None) -> Policy:
    try:
        root, data, duplicates = compose(text)
    except YamlSyntaxError as exc:
        raise PolicyError([(source_name, exc.line, "", f"YAML syntax error: {exc.detail}")]) from None
    if root is None or data is None:
        raise PolicyError([(source_name, 1, "", "empty policy; expected a mapping with at least name, arms, routes")])
    if not isinstance(data, dict):
        raise PolicyError([(source_name, root.start_mark.line + 1, "", "expected a mapping with at least name, arms, "
                                                                     f"routes; got a {type(data).__name__}")])

    problems = [(source_name, line, _dotted(loc), message) for loc, line, message in duplicates]
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(problems + validation_problems(exc, root, Policy, source_name)) from None

    seen: set[str] = set()
    for index, spec in enumerate(policy.backends):  # checked before the merge below hides it
        if spec.name in seen:
            loc = ("backends", index, "name")
            problems.append((source_name, _line_of(root, loc), _dotted(loc), f"backend `{spec.name}` is declared twice"))
        seen.add(spec.name)
    merged = {spec.name: spec for spec in policy.backends}
    configured = {spec.name: spec for spec in extra_backends}
    for index, spec in enumerate(policy.backends):
        other = (served_inline or {}).get(spec.name)
        # The gateway serves one backend per name: whichever policy's came last would answer the other's arms.
        if other is not None and spec.name not in configured and other[0] != spec:
            loc = ("backends", index)
            problems.append((source_name, _line_of(root, loc), _dotted(loc),
                             f"backend `{spec.name}` differs from the one policy {other[1]} declares, and the gateway "
                             "serves one backend per name; declare it once, under the gateway config's `backends`"))
        if spec.name not in configured and (refusal := reasoning_effort_refusal(spec)):
            loc = ("backends", index, "efforts" if spec.efforts else "reasoning")
            problems.append((source_name, _line_of(root, loc), _dotted(loc), refusal))
        if spec.name not in configured and (refusal := unpriced_refusal(spec)):
            loc = ("backends", index, "model")
            problems.append((source_name, _line_of(root, loc), _dotted(loc), refusal))
    merged.update(configured)
    policy = policy.model_copy(update={"backends": list(merged.values())})
    for loc, message in policy_problems(policy):
        problems.append((source_name, _line_of(root, loc), _dotted(loc), message))
    if problems:
        raise PolicyError(problems)
    return policy


# --- prices ---------------------------------------------------------------------------------------


@functools.cache
def litellm_cost_map() -> dict:
    """litellm's bundled cost map, read as JSON: importing litellm itself takes seconds."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolve_prices(spec: BackendSpec) -> tuple[Prices, str]:
    """The backend's prices and where they came from: the declaration, litellm's cost map, or nowhere (zero)."""
    if spec.prices is not None:
        return spec.prices, "declared"
    table = litellm_cost_map()
    for key in (spec.model, spec.model.split("/", 1)[-1]):
        entry = table.get(key)
        if entry and "input_cost_per_token" in entry:
            cached, written = entry.get("cache_read_input_token_cost"), entry.get("cache_creation_input_token_cost")
            prices = Prices(
                input_per_mtok=float(entry["input_cost_per_token"]) * 1e6,
                output_per_mtok=float(entry.get("output_cost_per_token") or 0.0) * 1e6,
                cached_input_per_mtok=float(cached) * 1e6 if cached is not None else None,
                cache_write_input_per_mtok=float(written) * 1e6 if written is not None else None,
            )
            return prices, "litellm cost map"
    return Prices(input_per_mtok=0.0, output_per_mtok=0.0), "unknown: zero"


def resolve_max_context(spec: BackendSpec) -> tuple[int | None, str]:
    """The backend's context window in tokens and where it came from: the declaration, litellm's model
    map (`max_input_tokens`), or nowhere (None: no limit). The map describes the provider's own
    endpoint: a backend with an api_base (vLLM, llama.cpp, a proxy) is served as its operator set it up."""
    if spec.max_context is not None:
        return spec.max_context, "declared"
    window = _model_map_tokens(spec, "max_input_tokens")
    return (window, "litellm model map") if window is not None else (None, "unknown: no limit")


def resolve_max_output(spec: BackendSpec) -> tuple[int | None, str]:
    """The most tokens one call to the backend can write, and where that came from: the declaration,
    litellm's model map (`max_output_tokens`, for a provider's own endpoint only, as resolve_max_context),
    or nowhere (None: unknown)."""
    if spec.max_output_tokens is not None:
        return spec.max_output_tokens, "declared"
    most = _model_map_tokens(spec, "max_output_tokens")
    return (most, "litellm model map") if most is not None else (None, "unknown")


def reasoning_effort_refusal(spec: BackendSpec) -> str | None:
    """Why the backend cannot be served as declared, where it would send `reasoning_effort` (efforts or
    `reasoning: true` declared) to an OpenAI model that litellm's map knows and does not mark as a reasoning
    model (gpt-4.1, gpt-4o ...), which OpenAI answers with a 400; else None. Only OpenAI's own endpoint: a
    server behind an api_base is whatever its operator runs. (The gateway config's backends too: gateway/config.py.)"""
    if spec.api_base is not None or spec.effort_param != "reasoning_effort" or not (spec.efforts or spec.reasoning):
        return None
    provider, _, name = spec.model.rpartition("/")
    entry = litellm_cost_map().get(name) or {}
    if provider in ("", "openai") and entry.get("litellm_provider") == "openai" and \
            entry.get("mode") == "chat" and not entry.get("supports_reasoning"):
        return (f"`{spec.model}` is not a reasoning model (litellm's model map), and OpenAI answers its "
                "`reasoning_effort` with a 400: leave out `efforts` and `reasoning: true`")
    return None


# litellm providers whose default endpoint is the operator's own machine (Ollama at localhost:11434, a
# llamafile, vLLM in process, LM Studio): served without an api_base, and nobody bills their calls
LOCAL_PROVIDERS = frozenset({"ollama", "ollama_chat", "llamafile", "lm_studio", "vllm", "hosted_vllm"})


def unpriced_refusal(spec: BackendSpec) -> str | None:
    """Why the backend cannot be served as declared, where it calls a provider's own endpoint (no
    api_base, not a local provider: a provider bills it) with no `prices` and a model litellm's cost map
    does not price: every call would be counted as $0, so budgets, cost caps and the cost the learner
    weighs would never hold. A server behind an api_base is the operator's own: zero unless priced.
    Else None. (The gateway config's backends too: gateway/config.py.)"""
    if spec.api_base is not None or spec.prices is not None or spec.model.split("/", 1)[0] in LOCAL_PROVIDERS \
            or resolve_prices(spec)[1] != "unknown: zero":
        return None
    said = f"litellm's cost map has no price for `{spec.model}`, and its calls would be counted as $0: "
    if near := _priced_under_another_name(spec.model):
        # a policy that loaded before this check: say the very line to add, and whose price it is
        name, prices = near
        line = f"prices: {{input_per_mtok: {_per_mtok(prices.input_per_mtok)}, " \
               f"output_per_mtok: {_per_mtok(prices.output_per_mtok)}}}"
        return (said + f"the map prices `{name}` so; if that is what this model costs you, add `{line}` to this "
                "backend, else your provider's prices (USD per million tokens; 0 for a free model)")
    return (said + "give `prices: {input_per_mtok: ..., output_per_mtok: ...}` (USD per million tokens; 0 for a "
            "free model), or check the model name")


def _per_mtok(value: float) -> str:
    return f"{round(value, 6):g}"


def _priced_under_another_name(model: str) -> tuple[str, Prices] | None:
    """The cost map's entry for the same model behind a route or reseller's prefix (`bedrock/converse/...`,
    `openrouter/openai/...`). Only said in the refusal, never billed: a reseller's price may not be the
    maker's. (A close name is not offered: `grok-3` is close to `grok-4.3`, at another price.)"""
    table = litellm_cost_map()
    parts = model.split("/")
    for index in range(2, len(parts)):  # resolve_prices tried the whole and the first prefix dropped
        if "input_cost_per_token" in (table.get(name := "/".join(parts[index:])) or {}):
            return name, resolve_prices(BackendSpec(name="x", model=name))[0]
    return None


def _model_map_tokens(spec: BackendSpec, field: str) -> int | None:
    """A token count from litellm's model map for the backend's model (with or without its provider
    prefix), for a provider's own endpoint only (no api_base): None where the map has none."""
    if spec.api_base is not None:
        return None
    table = litellm_cost_map()
    for key in (spec.model, spec.model.split("/", 1)[-1]):
        tokens = (table.get(key) or {}).get(field)
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            return tokens
    return None


# --- JSON Schema ----------------------------------------------------------------------------------


class _PolicyJsonSchema(GenerateJsonSchema):
    """Pydantic writes a mapping with constrained names (arms, aliases, candidates) as `patternProperties`
    alone, which JSON Schema reads as "other names allowed, with any value": an arm named `fast arm` (which
    the check refuses) was accepted by editors, its body unchecked. No other names, as the models say."""

    def dict_schema(self, schema):
        json_schema = super().dict_schema(schema)
        if "patternProperties" in json_schema:
            json_schema.setdefault("additionalProperties", False)
        return json_schema


def json_schema_text() -> str:
    schema = Policy.model_json_schema(schema_generator=_PolicyJsonSchema)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Ponder policy",
        **{key: value for key, value in schema.items() if key != "title"},
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_json_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Regenerate the shipped schema (editors validate and complete policy YAML with it)."""
    path = Path(path)
    path.write_text(json_schema_text(), encoding="utf-8")
    return path


# --- `ponder policy check` ------------------------------------------------------------------------


def check_cli(argv: Sequence[str] | None = None,
              config_backends: Callable[[str], list[BackendSpec]] | None = None,
              config_policies: Callable[[str], tuple[list[tuple[str, Policy]], list[str]]] | None = None) -> int:
    """`ponder policy check FILE [FILE...]`: print each policy's summary, or its errors. 0 when all pass.
    `ponder policy check --config GW.yaml` (no FILE): the policies that config serves, checked together.

    `config_backends` reads --config's backends (raising PolicyError): `ponder` passes the gateway's
    own reader, which adds the managed local model's `local` as serving does; this module alone (which
    may not import the gateway) reads the file's `backends` list. `config_policies` loads the policies
    a config serves as the gateway does, returning (file, policy) pairs and what the gateway would warn
    about; without it (this module alone) the config form is not offered."""
    parser = argparse.ArgumentParser(
        prog="ponder policy check", description="Validate policy files, or (--config alone) the policies a "
                                                "gateway config serves, together, as `ponder serve` loads them.")
    parser.add_argument("files", nargs="*", metavar="FILE")
    parser.add_argument("--config", help="gateway config whose backends the policies may name; with no FILE, "
                                          "check its `policy` and `extra_policies` together (with no FILE, "
                                          "default: $PONDER_CONFIG, as for `ponder serve`)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    if not args.files:
        # the served form defaults as `ponder serve` does: in the image ($PONDER_CONFIG set) a bare
        # `ponder policy check` checks what the gateway serves. FILEs are checked alone unless --config.
        config = args.config or os.environ.get("PONDER_CONFIG")
        if not config:
            parser.error("give the policy FILEs to check, or --config GW.yaml for the policies it serves "
                         "(default: $PONDER_CONFIG, unset)")
        if config_policies is None:
            parser.error("--config without FILE needs the gateway: run `ponder policy check --config`")
        return _check_served(config, config_policies, args.quiet)
    try:
        extra = (config_backends or _config_backends)(args.config) if args.config else []
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    failed = 0
    for name in args.files:
        try:  # a file named as the gateway config names it: a path, or a shipped policy's file name
            policy = load_policy(resolve_policy_path(Path(), name), extra)
        except PolicyError as exc:
            failed += 1
            _print_failure(name, exc)
            continue
        print(f"{name}: OK" if args.quiet else summarize(policy, name))
    return 1 if failed else 0


def _check_served(config: str, config_policies: Callable[[str], tuple[list[tuple[str, Policy]], list[str]]],
                  quiet: bool) -> int:
    """Each file checked alone passes, and `ponder serve` may still refuse them together (two names alike,
    an inline backend declared differently): checked as it loads them, what it refuses fails here."""
    try:
        served, warnings = config_policies(config)
    except PolicyError as exc:
        _print_failure(config, exc)
        return 1
    for source, policy in served:
        print(f"{source}: OK" if quiet else summarize(policy, source))
    for warning in warnings:
        print(f"{config}: warning: {warning}", file=sys.stderr)
    return 0


def _print_failure(name: str, exc: PolicyError) -> None:
    count = len(exc.problems)
    print(f"{name}: FAILED ({count} problem{'s' if count != 1 else ''})", file=sys.stderr)
    print(exc, file=sys.stderr)


def _config_backends(path: str) -> list[BackendSpec]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return [BackendSpec.model_validate(item) for item in raw.get("backends") or []]
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as exc:
        raise PolicyError([(path, None, "backends", f"cannot read the gateway config's backends: {exc}")]) from exc


def summarize(policy: Policy, source: str = "") -> str:
    """A readable page about one checked policy: what it can call, what it will try, and its limits."""
    lines = [f"{source}: OK" if source else "", f"policy `{policy.name}`: {policy.description.strip()}".rstrip(": ")]
    used = {arm.backend for arm in policy.arms.values()} | {a.verifier for a in policy.arms.values() if a.verifier}
    lines.append("backends (USD per million input/output tokens):")
    for spec in policy.backends:
        if spec.name not in used:
            continue
        prices, origin = resolve_prices(spec)
        efforts = f"efforts {','.join(spec.efforts)} via {spec.effort_param}" if spec.efforts else "no effort knob"
        where = f" @ {spec.api_base}" if spec.api_base else ""
        most, most_origin = resolve_max_output(spec)
        lines.append(
            f"  {spec.name:<18} {spec.model}{where}  ${prices.input_per_mtok:g}/${prices.output_per_mtok:g} ({origin})"
            f"  {efforts}  max output {f'{most} tokens ({most_origin})' if most else 'unknown'}"
        )
    unused = len(policy.backends) - len([s for s in policy.backends if s.name in used])
    if unused:
        lines.append(f"  (+{unused} declared but unused)")
    from router.estimates import compile_policy  # the compiler imports this module

    # the decision's own cost model (every sample's prompt, a judge's calls, a cascade's stages), so
    # that the numbers shown are the ones cost caps are checked against
    compiled = compile_policy(policy)
    lines.append(f"arms (estimated at a {SUMMARY_PROMPT_TOKENS}-token prompt, before any learning):")
    for name, arm in policy.arms.items():
        spec = policy.backend(arm.backend)
        key = compiled.arms[name].key
        tokens = expected_output_tokens(arm, spec) if spec else 0
        cost = compiled.estimated_cost_usd(key, SUMMARY_PROMPT_TOKENS, None)
        lines.append(f"  {name:<18} {key:<44} ~{tokens} out tokens/sample  ~${cost:.5f}")
    arm_priors = {name: arm.prior for name, arm in compiled.arms.items()}
    price_prior = policy.learner.price_prior
    how = f"rising with price, {price_prior.low:g} to {price_prior.high:g}" if price_prior else "flat 0.5"
    lines.append(f"routes (first match wins; candidate: prior P(correct), arms without one {how}):")
    for route in policy.routes:
        when = route.when
        tasks = ",".join(when.tasks) if when.tasks else "any task"
        if when.difficulty is not None:
            level = f"difficulty {when.difficulty[0]:g}-{when.difficulty[1]:g}"
        else:
            level = ",".join(when.tiers) if when.tiers else "any difficulty"
        arms = ", ".join(
            f"{arm} {prior if prior is not None else arm_priors[arm]:.2f}" for arm, prior in route.candidates.items()
        )
        lines.append(f"  {route.name:<18} {tasks} / {level} -> {arms}")
    lines.append("aliases: " + ", ".join(sorted(set(policy.aliases) | {"auto"})))
    objective = policy.objective
    lines.append(
        f"objective: P(correct) - {objective.cost_weight:g} x cost_usd - {objective.latency_weight:g} x latency_s"
        f"; p95 latency <= {_limit(objective.max_p95_latency_ms, 'ms')}; cost <= {_limit(objective.max_cost_usd, 'USD')}"
    )
    explore = policy.exploration
    lines.append(
        f"exploration: {explore.share:.0%} of requests, at most {_limit(explore.max_extra_cost_usd, 'USD')} "
        "more than the greedy arm"
    )
    budgets = policy.budgets
    lines.append(
        f"budgets: per request {_limit(budgets.per_request_usd, 'USD')}; per key per day "
        f"{_limit(budgets.per_key_daily_usd, 'USD')}, per month {_limit(budgets.per_key_monthly_usd, 'USD')}; "
        + (f"below {budgets.degrade.below_usd:g} USD left: " + (
            f"only arms <= {budgets.degrade.max_cost_usd:g} USD" if budgets.degrade.max_cost_usd is not None
            else "cheapest arm only") + "; " if budgets.degrade.below_usd > 0 else "")
        + "nothing affordable left: 429"
    )
    honoured = [
        f"{name}={','.join(value)}" if isinstance(value, list) else name
        for name, value in policy.overrides.model_dump().items()
        if value
    ]
    lines.append("client overrides honoured: " + (", ".join(honoured) or "none"))
    learner = policy.learner
    if learner.half_life_hours:
        memory = f"half-life {learner.half_life_hours:g} h"
    else:
        memory = "no decay"
    lines.append(f"learner: priors worth {learner.prior_strength:g} outcomes; {memory}")
    return "\n".join(line for line in lines if line)


def _limit(value: float | None, unit: str) -> str:
    return "unlimited" if value is None else f"{value:g} {unit}"


if __name__ == "__main__":
    raise SystemExit(check_cli())
