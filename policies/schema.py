"""The policy format: what an operator writes in a policy YAML file, as pydantic models.

Unknown keys are errors everywhere (extra="forbid"): a typo must not silently fall back to a default.
Checks that need more than one field (routes naming arms, arms naming backends, efforts a backend
supports, cascade cycles, routes covering every task and tier) live in `policy_problems`, because the
backends an arm may name include those of the gateway config, known only at load time.
See docs/policies.md for the format with examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from policies.backends import BackendSpec
from router.types import DIFFICULTY_TIERS, EFFORTS, STRATEGIES, TASK_TYPES, difficulty_tier

# One source of truth for the words: router/types.py (a leaf module with no imports of its own).
StrategyName = Literal[STRATEGIES]  # type: ignore[valid-type]
EffortName = Literal[EFFORTS]  # type: ignore[valid-type]
TaskName = Literal[TASK_TYPES]  # type: ignore[valid-type]
TierName = Literal[tuple(name for name, _ in DIFFICULTY_TIERS)]  # type: ignore[misc]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
# A client's task label (x-ponder-task): it becomes part of the learner's bucket key (`label:tier`),
# so no `:`, `*` or uppercase, and short.
TASK_LABEL_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
TaskLabel = Annotated[str, Field(pattern=TASK_LABEL_PATTERN)]
Usd = Annotated[float, Field(ge=0)]

SAMPLING_STRATEGIES = ("self_consistency", "adaptive_consistency", "best_of_n")

# Expected output tokens per sample (reasoning included) when an arm does not say. Reasoning models
# by effort (no knob sent = the provider default, medium); non-reasoning models answer directly for
# `single` (and a cascade's first stage) and think aloud for everything else. Rough on purpose:
# learned costs replace them.
REASONING_TOKENS: dict[str, int] = {"none": 300, "minimal": 500, "low": 1200, "medium": 2500, "high": 6000}
DIRECT_TOKENS = 300
CHAIN_OF_THOUGHT_TOKENS = 600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf in YAML is a typo, not a limit


class ArmSpec(_Strict):
    """One way to answer: backend x effort x strategy x n, plus the strategy's knobs."""

    backend: str = Field(description="Name of a backend declared in the policy or the gateway config.")
    strategy: StrategyName = "single"
    effort: EffortName | None = Field(default=None, description="Effort level sent to the backend; null sends none.")
    n: int = Field(default=1, ge=1, le=64, description="Samples (the maximum, for adaptive_consistency).")
    stages: list[Name] = Field(default_factory=list, description="cascade: arms tried in order when not confident.")
    verifier: str | None = Field(default=None, description="best_of_n: backend that scores samples (default: own).")
    confidence: float | None = Field(
        default=None, gt=0.5, le=1.0,
        description="adaptive_consistency: stop once P(the leading answer is the majority) reaches this.",
    )
    wave: int | None = Field(default=None, ge=1, le=64, description="adaptive_consistency: samples per round.")
    min_samples: int | None = Field(default=None, ge=1, le=64, description="adaptive_consistency: first round size.")
    min_gain: float | None = Field(
        default=None, ge=0, le=1,
        description="adaptive_consistency: answer with one sample where a vote is expected to gain less accuracy "
                    "than this over one sample (default 0.01).",
    )
    sample_value: float | None = Field(
        default=None, ge=-1, le=1,
        description="adaptive_consistency: the expected accuracy gain of a vote over one sample, fixed; "
                    "by default it is learned per bucket from the stats of this backend's voting and single arms.",
    )
    max_concurrency: int | None = Field(default=None, ge=1, le=64, description="Parallel calls for this request.")
    expected_n: float | None = Field(
        default=None, ge=1, description="adaptive_consistency: expected samples, for cost estimates before learning."
    )
    escalate_below: float | None = Field(
        default=None, ge=0, le=1, description="cascade: escalate when the answer's confidence is below this."
    )
    escalation_rate: float | None = Field(
        default=None, ge=0, le=1, description="cascade: expected share of requests escalated, for estimates."
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature for n > 1.")
    cot_template: str | None = Field(
        default=None, description="Step-by-step instruction for non-reasoning models; {task} and {format_hint} filled."
    )
    tokens: int | None = Field(default=None, ge=1, description="Expected output tokens per sample, reasoning included.")
    latency_ms: float | None = Field(default=None, gt=0, description="Expected latency, overriding the estimate.")
    prior: float | None = Field(
        default=None, ge=0, le=1,
        description="Cold-start P(correct) where a route gives none; unset: from learner.price_prior (0.5 without it).",
    )
    description: str = ""


def _names_to_priors(value: Any) -> Any:
    """A route may list arm names (each taking the arm's own prior) instead of a name -> prior mapping."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return {name: None for name in value}
    return value


class RouteMatch(_Strict):
    """Which requests a route applies to. Every key left out matches everything."""

    tasks: list[TaskName] | None = Field(default=None, description="Task types; default: all.")
    tiers: list[TierName] | None = Field(default=None, description="Difficulty tiers easy/medium/hard; default: all.")
    difficulty: tuple[float, float] | None = Field(
        default=None, description="Difficulty range [low, high), an alternative to tiers."
    )


class RouteSpec(_Strict):
    name: Name
    when: RouteMatch = Field(default_factory=RouteMatch, description="Leave out for a catch-all route.")
    candidates: Annotated[
        dict[Name, Annotated[float, Field(ge=0, le=1)] | None],
        BeforeValidator(
            _names_to_priors,
            # editors should accept the list form too
            json_schema_input_type=dict[Name, Annotated[float, Field(ge=0, le=1)] | None] | list[Name],
        ),
    ] = Field(description="Arm name -> cold-start P(correct) (null: the arm's prior), or a list of arm names.")
    description: str = ""


class Objective(_Strict):
    """Utility = P(correct) - cost_weight * cost_usd - latency_weight * latency_s, within the limits."""

    cost_weight: float = Field(
        default=10.0, ge=0, description="lambda: utility lost per USD (1/lambda = what a correct answer is worth)."
    )
    latency_weight: float = Field(default=0.005, ge=0, description="mu: utility lost per second of latency.")
    max_p95_latency_ms: float | None = Field(default=None, gt=0, description="Arms expected slower are excluded.")
    max_cost_usd: Usd | None = Field(default=None, description="Arms expected to cost more per request are excluded.")


class ObjectivePatch(_Strict):
    """An alias's changes to the policy objective; keys left out keep the policy's value."""

    cost_weight: float | None = Field(default=None, ge=0)
    latency_weight: float | None = Field(default=None, ge=0)
    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    max_cost_usd: Usd | None = None


class AliasSpec(_Strict):
    """A routed model name clients may send as `model` (`auto`, `auto-cheap`, `auto-best`, ...)."""

    description: str = ""
    objective: ObjectivePatch = Field(default_factory=ObjectivePatch)
    routes: list[Name] | None = Field(default=None, description="Only these routes, in this order (must cover all).")
    arms: list[Name] | None = Field(default=None, description="Only these arms are candidates.")
    explore: bool = Field(default=True, description="Whether requests on this alias may be explored.")


class Exploration(_Strict):
    share: float = Field(default=0.05, ge=0, le=1, description="Share of requests on which the learner explores.")
    max_extra_cost_usd: Usd | None = Field(
        default=0.01, description="An explored arm may cost at most this much more than the greedy choice."
    )


class Degrade(_Strict):
    below_usd: Usd = Field(default=0.0, description="Degrade when the key's remaining budget is below this.")
    max_cost_usd: Usd | None = Field(
        default=None, description="While degraded, arms expected to cost more are excluded (null: cheapest only)."
    )


class Budgets(_Strict):
    per_request_usd: Usd | None = Field(default=None, description="Hard cap on one request's expected cost.")
    per_key_daily_usd: Usd | None = Field(default=None, description="Default daily budget of an API key.")
    per_key_monthly_usd: Usd | None = Field(default=None, description="Default monthly budget of an API key.")
    degrade: Degrade = Field(default_factory=Degrade)


class Overrides(_Strict):
    """Which client overrides the policy honours; the others are ignored (and the reason says so)."""

    reasoning_effort: bool = Field(default=True, description="`reasoning_effort` in the body picks arms of that effort.")
    max_cost_header: bool = Field(default=True, description="x-ponder-max-cost-usd (can only tighten the policy).")
    max_latency_header: bool = Field(default=True, description="x-ponder-max-latency-ms (can only tighten).")
    policy_header: bool = Field(default=False, description="x-ponder-policy may switch to another named policy.")
    strategy_header: list[StrategyName] = Field(
        default_factory=list, description="Strategies a client may ask for with x-ponder-strategy."
    )
    direct_backend: bool = Field(default=True, description="A backend name as `model` bypasses routing.")
    task_header: list[TaskLabel] = Field(
        default_factory=list,
        description="Task labels a client may send in x-ponder-task instead of the classifier's task type: "
        "a task type picks its routes, any other label the catch-all route; either way the learner keys its "
        "buckets on the label (e.g. one per app or subject, `legal-qa:hard`).",
    )


class PricePrior(_Strict):
    """Cold priors that rise with price: an arm's P(correct) before any outcome goes from `low` for the
    policy's cheapest arm to `high` for its priciest, linear in the log of its estimated cost per call.
    Pricier arms (bigger models, more samples, more reasoning) are usually the better ones; without
    any prior knowledge a flat prior makes the learner settle on the first cheap arm that is good
    enough and rarely try the expensive ones. An arm's or a route's own prior wins over it."""

    low: float = Field(default=0.4, ge=0, le=1, description="Prior of the cheapest arm (and of free arms).")
    high: float = Field(default=0.7, ge=0, le=1, description="Prior of the priciest arm.")

    @model_validator(mode="after")
    def _ordered(self) -> "PricePrior":
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must not be above high ({self.high:g})")
        return self


class LearnerSettings(_Strict):
    prior_strength: float = Field(default=10.0, gt=0, description="Pseudo-outcomes behind each route prior.")
    price_prior: PricePrior | None = Field(
        default_factory=PricePrior,
        description="Cold priors rising with each arm's price (null: every arm without a prior starts at 0.5).",
    )
    half_life_hours: float | None = Field(
        default=72.0, gt=0,
        description="Outcomes lose half their weight per half-life (null: never). The telemetry store is one for "
                    "every policy: the default policy's setting is the one applied.")


class Policy(_Strict):
    name: Name
    description: str = ""
    backends: list[BackendSpec] = Field(
        default_factory=list, description="Backends declared inline; the gateway config's backends win by name."
    )
    arms: dict[Name, ArmSpec] = Field(description="Named arms.")
    routes: list[RouteSpec] = Field(description="First matching route wins; the last is usually a catch-all.")
    aliases: dict[Name, AliasSpec] = Field(
        default_factory=lambda: {"auto": AliasSpec()}, description="Routed model names; `auto` always exists."
    )
    objective: Objective = Field(default_factory=Objective)
    exploration: Exploration = Field(default_factory=Exploration)
    budgets: Budgets = Field(default_factory=Budgets)
    overrides: Overrides = Field(default_factory=Overrides)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)

    # Filled by router.decide on first use: the per-policy tables that keep decide() fast.
    _compiled: Any = PrivateAttr(default=None)

    def backend(self, name: str) -> BackendSpec | None:
        for spec in self.backends:
            if spec.name == name:
                return spec
        return None

    def alias(self, name: str) -> AliasSpec:
        if name in self.aliases:
            return self.aliases[name]
        if name == "auto":
            return AliasSpec()
        raise KeyError(name)


class PolicyError(ValueError):
    """A policy that cannot be used. `problems` are (file, line, key path, message), one per mistake."""

    def __init__(self, problems: list[tuple[str, int | None, str, str]]):
        self.problems = problems
        super().__init__("\n".join(_format_problem(*problem) for problem in problems))


def _format_problem(source: str, line: int | None, path: str, message: str) -> str:
    where = f"{source}:{line}" if line else source
    return f"{where}: {path}: {message}" if path else f"{where}: {message}"


def expected_output_tokens(arm: ArmSpec, backend: BackendSpec) -> int:
    """Output tokens one sample of this arm is expected to produce, reasoning included."""
    if arm.tokens is not None:
        return arm.tokens
    if backend.reasoning:
        return REASONING_TOKENS[arm.effort or "medium"]
    # A cascade's first stage answers directly; the escalation stages carry their own estimates.
    return DIRECT_TOKENS if arm.strategy in ("single", "cascade") else CHAIN_OF_THOUGHT_TOKENS


Loc = tuple[str | int, ...]


def policy_problems(policy: Policy) -> list[tuple[Loc, str]]:
    """Cross-field mistakes, as (key path, message). `policy.backends` must already hold every backend."""
    problems: list[tuple[Loc, str]] = []
    backends = {spec.name: spec for spec in policy.backends}
    seen_backends: set[str] = set()
    for index, spec in enumerate(policy.backends):
        if spec.name in seen_backends:
            problems.append((("backends", index, "name"), f"backend `{spec.name}` is declared twice"))
        seen_backends.add(spec.name)

    keys: dict[str, str] = {}
    for name, arm in policy.arms.items():
        problems += [(("arms", name) + loc, msg) for loc, msg in _arm_problems(name, arm, policy, backends)]
        key = f"{arm.backend}/{arm.effort or '-'}/{arm.strategy}/{arm.n}"
        if key in keys:
            problems.append(
                (("arms", name), f"same backend/effort/strategy/n as arm `{keys[key]}` ({key}); the learner "
                 "keys its stats on that, so two such arms would share them: change n or drop one")
            )
        keys.setdefault(key, name)
    problems += _cascade_cycles(policy)

    if not policy.routes:
        problems.append((("routes",), "no routes; expected at least one (a catch-all route has no `when`)"))
    route_names: set[str] = set()
    for index, route in enumerate(policy.routes):
        if route.name in route_names:
            problems.append((("routes", index, "name"), f"route `{route.name}` is declared twice"))
        route_names.add(route.name)
        if not route.candidates:
            problems.append((("routes", index, "candidates"), "no candidate arms; expected at least one arm name"))
        for arm_name in route.candidates:
            if arm_name not in policy.arms:
                problems.append(
                    (("routes", index, "candidates", arm_name), f"unknown arm `{arm_name}`; expected one of: "
                     + _choices(policy.arms))
                )
        window = route.when.difficulty
        if window is not None and not 0 <= window[0] < window[1] <= 1:
            problems.append(
                (("routes", index, "when", "difficulty"), f"range {list(window)} is not [low, high) within [0, 1]")
            )
        if window is not None and route.when.tiers is not None:
            problems.append((("routes", index, "when"), "give `tiers` or `difficulty`, not both"))
    if policy.routes:
        gap = coverage_gap(policy.routes)
        if gap:
            problems.append((("routes",), f"no route matches {gap}; add a catch-all route (no `when`) at the end"))
        for index in unreachable_routes(policy):
            when = policy.routes[index].when
            empty = [key for key in ("tasks", "tiers") if getattr(when, key) == []]
            why = (f"its `{empty[0]}` list is empty, which matches nothing (leave the key out to match all)" if empty
                   else "the routes before it match every request it would (first match wins): move it up or drop it")
            problems.append((("routes", index), f"route `{policy.routes[index].name}` can never match: {why}"))

    for alias_name in set(policy.aliases) | {"auto"}:
        if alias_name in backends:  # the gateway takes a backend's name as the backend: the alias is never used
            index = next(i for i, spec in enumerate(policy.backends) if spec.name == alias_name)
            declared = "aliases" in policy.model_fields_set and alias_name in policy.aliases  # `auto` by default
            loc = ("aliases", alias_name) if declared else ("backends", index, "name")
            problems.append((loc, f"alias `{alias_name}` has the name of a backend: a client's `model: {alias_name}` "
                                  "calls that backend directly (a 404 with overrides.direct_backend false), never "
                                  "the alias; rename one"))
    for alias_name, alias in policy.aliases.items():
        for index, route_name in enumerate(alias.routes or ()):
            if route_name not in route_names:
                problems.append((("aliases", alias_name, "routes", index), f"unknown route `{route_name}`"))
        for index, arm_name in enumerate(alias.arms or ()):
            if arm_name not in policy.arms:
                problems.append((("aliases", alias_name, "arms", index), f"unknown arm `{arm_name}`"))
        if alias.routes is not None and alias.routes and all(r in route_names for r in alias.routes):
            chosen = [r for r in policy.routes if r.name in alias.routes]
            chosen.sort(key=lambda r: alias.routes.index(r.name))
            gap = coverage_gap(chosen)
            if gap:
                problems.append((("aliases", alias_name, "routes"), f"these routes do not match {gap}"))
        if alias.routes == [] or alias.arms == []:
            problems.append((("aliases", alias_name), "an empty `routes` or `arms` list leaves nothing to choose"))

    budgets = policy.budgets
    if (
        budgets.per_key_daily_usd is not None
        and budgets.per_key_monthly_usd is not None
        and budgets.per_key_daily_usd > budgets.per_key_monthly_usd
    ):
        problems.append((("budgets", "per_key_daily_usd"), "daily budget exceeds the monthly one"))
    if budgets.degrade.max_cost_usd is not None and budgets.degrade.below_usd <= 0:
        problems.append((("budgets", "degrade", "max_cost_usd"), "has no effect without `below_usd`: a key is "
                         "degraded only while it has less than `below_usd` left (default 0: never)"))
    return problems


def _arm_problems(name: str, arm: ArmSpec, policy: Policy, backends: dict[str, BackendSpec]) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    backend = backends.get(arm.backend)
    if backend is None:
        problems.append(
            (("backend",), f"unknown backend `{arm.backend}`; expected one declared under `backends` here or in "
             f"the gateway config: {_choices(backends)}")
        )
    elif arm.effort is not None and arm.effort not in backend.efforts:
        if backend.efforts:
            expected = "expected one of: " + ", ".join(backend.efforts)
        else:
            expected = "it declares no effort levels: leave `effort` out, or list `efforts` on the backend"
        problems.append((("effort",), f"backend `{backend.name}` does not support effort `{arm.effort}`; {expected}"))
    if arm.verifier is not None and arm.verifier not in backends:
        problems.append((("verifier",), f"unknown backend `{arm.verifier}`; expected one of: {_choices(backends)}"))

    strategy = arm.strategy
    if strategy in SAMPLING_STRATEGIES and arm.n < 2:
        problems.append((("n",), f"{strategy} needs n >= 2 samples; for one sample use `single` or `cot`"))
    if strategy in ("single", "cot") and arm.n != 1:
        problems.append((("n",), f"{strategy} takes one sample; for n > 1 use self_consistency or best_of_n"))
    only_for = {
        "stages": ("cascade", bool(arm.stages)),
        "escalate_below": ("cascade", arm.escalate_below is not None),
        "escalation_rate": ("cascade", arm.escalation_rate is not None),
        "verifier": ("best_of_n", arm.verifier is not None),
        "confidence": ("adaptive_consistency", arm.confidence is not None),
        "wave": ("adaptive_consistency", arm.wave is not None),
        "expected_n": ("adaptive_consistency", arm.expected_n is not None),
        "min_samples": ("adaptive_consistency", arm.min_samples is not None),
        "min_gain": ("adaptive_consistency", arm.min_gain is not None),
        "sample_value": ("adaptive_consistency", arm.sample_value is not None),
    }
    for key, (owner, given) in only_for.items():
        if given and strategy != owner:
            problems.append(((key,), f"`{key}` applies to strategy {owner} only, not {strategy}"))
    if strategy == "cascade":
        if not arm.stages:
            problems.append((("stages",), "a cascade needs `stages`: the arms to escalate to, in order"))
        for index, stage in enumerate(arm.stages):
            if stage not in policy.arms:
                problems.append((("stages", index), f"unknown arm `{stage}`; expected one of: {_choices(policy.arms)}"))
    if strategy == "adaptive_consistency":
        if arm.wave is not None and arm.wave > arm.n:
            problems.append((("wave",), f"wave {arm.wave} exceeds the maximum n = {arm.n}"))
        if arm.expected_n is not None and arm.expected_n > arm.n:
            problems.append((("expected_n",), f"expected_n {arm.expected_n} exceeds the maximum n = {arm.n}"))
    return problems


def _cascade_cycles(policy: Policy) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    reported: set[frozenset[str]] = set()

    def walk(name: str, path: list[str]) -> None:
        arm = policy.arms.get(name)
        if arm is None:
            return
        for stage in arm.stages:
            if stage in path:
                cycle = path[path.index(stage):] + [stage]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    problems.append((("arms", path[-1], "stages"), "cascade stages form a cycle: " + " -> ".join(cycle)))
            else:
                walk(stage, path + [stage])

    for name in policy.arms:
        walk(name, [name])
    return problems


def route_matches(route: RouteSpec, task: str, difficulty: float) -> bool:
    when = route.when
    if when.tasks is not None and task not in when.tasks:
        return False
    if when.difficulty is not None:
        low, high = when.difficulty
        return low <= difficulty < high or (high >= 1.0 and difficulty >= 1.0)
    if when.tiers is not None:
        return difficulty_tier(difficulty) in when.tiers
    return True


def unreachable_routes(policy: Policy) -> list[int]:
    """Indexes of the routes no request can reach: in the policy's order (what `auto` and every alias
    without `routes` use) and in each alias's own `routes` order, an earlier route matches every task
    (and client task label) and difficulty it matches, or it matches none at all. A catch-all (no
    `when`) is never reported: after routes that already cover everything it is a harmless safety net."""
    routes = policy.routes
    views = [list(range(len(routes)))] if "auto" not in policy.aliases or any(
        alias.routes is None for alias in policy.aliases.values()) else []
    for alias in policy.aliases.values():
        if alias.routes:
            views.append([i for name in alias.routes for i, route in enumerate(routes) if route.name == name])
    # A label that is not a task type matches only routes without `tasks`, else the view's last route.
    label = "\0label" if any(label not in TASK_TYPES for label in policy.overrides.task_header) else None
    # Matching is constant between these difficulties, so the boundaries and the midpoints decide it exactly.
    edges = {0.0, 1.0, *(upper for _, upper in DIFFICULTY_TIERS[:-1])}
    edges |= {value for route in routes if route.when.difficulty for value in route.when.difficulty if 0 <= value <= 1}
    edges = sorted(edges)
    points = edges + [(low + high) / 2 for low, high in zip(edges, edges[1:])]
    reached: set[int] = set()
    for view in views:
        for task in (*TASK_TYPES, label) if label else TASK_TYPES:
            for difficulty in points:
                hit = next((i for i in view if route_matches(routes[i], task, difficulty)), None)
                if hit is None and task == label and view:
                    hit = view[-1]
                if hit is not None:
                    reached.add(hit)
    catch_all = RouteMatch()
    return [index for index in range(len(routes)) if index not in reached and routes[index].when != catch_all]


def coverage_gap(routes: list[RouteSpec]) -> str | None:
    """The first task:difficulty no route matches, checked on a fine grid, or None when all are covered."""
    for task in TASK_TYPES:
        for step in range(101):
            difficulty = step / 100
            if not any(route_matches(route, task, difficulty) for route in routes):
                return f"{task}:{difficulty_tier(difficulty)} (difficulty {difficulty:.2f})"
    return None


def _choices(names: Any) -> str:
    names = sorted(names)
    return ", ".join(f"`{name}`" for name in names) if names else "(none declared)"
