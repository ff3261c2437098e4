"""The cost model, compiled once per policy: what each arm is expected to cost and how long it takes,
and whether a backend can hold a prompt.

Everything about a policy that does not depend on the request is computed here once (`CompiledPolicy`,
cached on the Policy object); router/decide.py reads these tables on every request, with the
request's prompt length, output cap and the learned stats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from policies.backends import BackendSpec
from policies.loader import resolve_max_context, resolve_prices
from policies.schema import (
    ArmSpec, Objective, Policy, PolicyError, PricePrior, expected_output_tokens, policy_problems,
)
from policies.thinking import thinking_cap_floor, unthinking_effort
from router.types import DIFFICULTY_TIERS, TASK_TYPES, Arm

DEFAULT_PROMPT_TOKENS = 300  # when the gateway could not count the prompt
P95_OVER_MEAN = 1.5  # before any latency is observed, p95 is taken as this multiple of the mean
PARALLEL_STRAGGLER = 1.1  # n concurrent samples finish with the slowest one
VERIFIER_TOKENS_PER_SAMPLE = 20  # a best-of-N verifier writes a short score per sample
DEFAULT_WAVE = 2  # as gateway/strategies.py, for estimates when the arm sets none
DEFAULT_REQUEST_CONCURRENCY = 8  # likewise: parallel calls per request
DEFAULT_ESCALATION_RATE = 0.3
DEFAULT_PRIOR = 0.5  # an arm's cold P(correct) when neither it, its route nor learner.price_prior gives one
# A prompt is kept from a backend only when its estimate (about 4 characters a token) is this much over
# the backend's context window: the estimate of real prose, code or JSON comes within 1.25x of the
# real count (measured with cl100k and SmolLM2's tokenizers), so a prompt that might fit is sent, and
# the backend answers with its exact count.
CONTEXT_MARGIN = 1.5
# ...and it can be this many times below the real count (Chinese text: 5.5x; digits, base64: 4x).
CONTEXT_UNDERCOUNT = 6


# A request's fields the provider reads (and bills) as prompt besides its messages: an agent's tool
# definitions are often thousands of tokens under a one-line question, and a structured output's schema
# is sent to the model too.
PROMPT_FIELDS = ("tools", "functions", "response_format")
# The most tokens a chat template adds around one message (ChatML and Llama 3 add 5, OpenAI 3 or 4).
TEMPLATE_TOKENS_PER_MESSAGE = 8


def estimate_prompt_tokens(messages: list, body: Mapping[str, Any] | None = None) -> int:
    """About 4 characters per token plus a few per message: close enough to price a request. An
    assistant turn's tool calls count; so do the request `body`'s tool definitions and response_format
    (as their JSON), when it is given."""
    return _prompt_size(messages, body, len) // 4 + 4 * len(messages)


def prompt_tokens_bound(messages: list, body: Mapping[str, Any] | None = None) -> int:
    """The most tokens the same text can be as a prompt, where `estimate_prompt_tokens` is only close:
    a token of a byte-level BPE (OpenAI's, Llama's, Qwen's) or of a SentencePiece vocabulary with byte
    fallback is at least one byte, so the text's UTF-8 bytes bound its tokens (4 characters a token is
    4x under for digits or base64, 5x for Chinese, 8x for emoji: CONTEXT_UNDERCOUNT), plus what a chat
    template wraps each message in. What a budget holds (gateway.cost_bounds.worst_case_usd). An image or audio
    part counts nothing: its tokens depend on the provider and the image, which the gateway never fetches."""
    return _prompt_size(messages, body, _utf8_bytes) + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)


def _prompt_size(messages: list, body: Mapping[str, Any] | None, measure: Callable[[str], int]) -> int:
    """The prompt's text measured by `measure` (characters, bytes), plus the JSON of its tool calls and
    of the body's PROMPT_FIELDS: what the two counts above share."""
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            size += measure(content)
        elif isinstance(content, list):
            size += sum(measure(text) for part in content
                        if isinstance(part, dict) and isinstance(text := part.get("text"), str))
        if message.get("tool_calls") or message.get("function_call"):
            size += _json_chars(message.get("tool_calls")) + _json_chars(message.get("function_call"))
    if body is not None:
        size += sum(_json_chars(body.get(field)) for field in PROMPT_FIELDS)
    return size


def estimate_input_tokens(inputs: str | list) -> int:
    """An embeddings request's `input` (a string, strings, token ids or lists of them) counted as a
    prompt's text is (4 characters a token); token ids are exact, one each."""
    return sum(-(-len(item) // 4) if isinstance(item, str) else len(item) for item in _inputs(inputs))


def input_tokens_bound(inputs: str | list, max_per_input: int | None = None) -> int:
    """The most tokens an embeddings `input` can be (what a budget holds): a string's UTF-8 bytes, as
    `prompt_tokens_bound` counts a prompt; token ids exactly. An input over `max_per_input` (the model's
    window) is refused upstream, and costs nothing, so none counts more."""
    sizes = (_utf8_bytes(item) if isinstance(item, str) else len(item) for item in _inputs(inputs))
    return sum(sizes if max_per_input is None else (min(size, max_per_input) for size in sizes))


def _inputs(inputs: str | list) -> list:
    """The separate inputs of an embeddings `input`: one string or one list of token ids is one input."""
    if isinstance(inputs, str) or (inputs and all(isinstance(item, int) for item in inputs)):
        return [inputs]
    return list(inputs)


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _json_chars(value: Any) -> int:
    if not value:
        return 0
    try:
        return len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):  # not JSON (the body was forwarded as JSON, so rare)
        return 0


def exceeds_context(prompt_tokens: int, max_context: int | None) -> bool:
    """Whether an estimated prompt is clearly too long for a context window (None: no known limit)."""
    return max_context is not None and prompt_tokens > max_context * CONTEXT_MARGIN


def may_exceed_context(prompt_tokens: int, max_context: int | None) -> bool:
    """Whether an estimated prompt might be too long for a context window (None: no known limit)."""
    return max_context is not None and prompt_tokens * CONTEXT_UNDERCOUNT > max_context


# --- per-policy tables ----------------------------------------------------------------------------


class CompiledArm:
    """An arm with everything that does not depend on the request precomputed."""

    __slots__ = ("name", "arm", "key", "backend", "effort", "strategy", "prior", "cost_per_prompt_token",
                 "cost_fixed", "cost_reference", "latency_ms", "latency_p95_ms", "tokens", "spec", "_policy",
                 "_capped", "max_context", "samples", "prompt_once", "reasons_aloud", "thinks_above",
                 "stage_backends")

    def __init__(self, name: str, spec: ArmSpec, policy: Policy, backends: dict[str, BackendSpec]):
        self.name = name
        self.spec, self._policy = spec, (policy, backends)
        self.arm = _build_arm(spec, policy)
        self.key = self.arm.key
        self.backend, self.effort, self.strategy = spec.backend, spec.effort, spec.strategy
        # a cascade's later stages' backends: it escalates to the first of them that answers
        self.stage_backends = tuple(stage.backend for stage in self.arm.stages)
        # an arm without a prior of its own: CompiledPolicy replaces this with price_priors()'s
        self.prior = spec.prior if spec.prior is not None else DEFAULT_PRIOR
        self.tokens = expected_output_tokens(spec, backends[spec.backend])
        # Its samples are asked to reason step by step before a "Final answer:" line, as the gateway asks
        # them (gateway/strategies.py uses_cot): a sample cut before that line answers nothing.
        self.reasons_aloud = spec.strategy == "cot" or (
            spec.strategy in ("self_consistency", "adaptive_consistency") and not backends[spec.backend].reasoning)
        # Its backend thinks at its effort (policies/thinking.py), within the client's max_tokens, above this
        # cap (None: it answers at once): a call cut while it thinks answers nothing.
        self.thinks_above = thinking_cap_floor(backends[spec.backend], spec.effort)
        # the first call's backend: a cascade stage that cannot hold the prompt fails alone (400), and
        # the answer so far stands
        self.max_context = resolve_max_context(backends[spec.backend])[0]
        # Cost is linear in prompt tokens for every strategy: cost(p) = per_token * p + fixed.
        fixed, latency, p95 = _estimate(spec, policy, backends, 0, None)
        at_1k, _, _ = _estimate(spec, policy, backends, 1000, None)
        self.cost_fixed, self.cost_per_prompt_token = fixed, (at_1k - fixed) / 1000
        self.cost_reference = fixed + self.cost_per_prompt_token * DEFAULT_PROMPT_TOKENS
        self.latency_ms, self.latency_p95_ms = latency, p95
        self._capped: dict[int, tuple[float, float, float, float]] = {}
        # A client's `n` choices beyond the arm's samples are drawn as more samples (gateway/strategies.py):
        # one call with `n` for a single or cot arm on a backend that takes it (the prompt paid once),
        # else one call each.
        self.samples = _expected_samples(spec)
        self.prompt_once = spec.strategy in ("single", "cot") and backends[spec.backend].supports_n

    def choice_scales(self, choices: int) -> tuple[float, float]:
        """(prompt cost, output cost) multipliers of a request asking for `choices` answers (body `n`)."""
        more = max(self.samples, choices) / self.samples
        return (1.0 if self.prompt_once else more), more

    def under_cap(self, max_output_tokens: int) -> tuple[float, float, float, float]:
        """(cost per prompt token, fixed cost, latency, p95) when the client caps output tokens."""
        found = self._capped.get(max_output_tokens)
        if found is None:
            policy, backends = self._policy
            fixed, latency, p95 = _estimate(self.spec, policy, backends, 0, max_output_tokens)
            at_1k, _, _ = _estimate(self.spec, policy, backends, 1000, max_output_tokens)
            found = ((at_1k - fixed) / 1000, fixed, latency, p95)
            if len(self._capped) > 256:
                self._capped.clear()
            self._capped[max_output_tokens] = found
        return found


def price_priors(arms: dict[str, CompiledArm], price_prior: PricePrior | None) -> dict[str, float]:
    """The cold-start P(correct) of the arms without a `prior` of their own (those keep theirs, and
    with no `price_prior` DEFAULT_PRIOR stands): linear in the log of the arm's estimated cost per
    call (cost_reference) from `low` at the policy's cheapest priced arm to `high` at its priciest
    (free arms: `low`; one price for all: the middle)."""
    if price_prior is None:
        return {}
    logs = {name: math.log(arm.cost_reference) for name, arm in arms.items() if arm.cost_reference > 0}
    lowest, highest = min(logs.values(), default=0.0), max(logs.values(), default=0.0)
    span = price_prior.high - price_prior.low
    priors = {}
    for name, arm in arms.items():
        if arm.spec.prior is not None:
            continue
        if name not in logs:
            priors[name] = price_prior.low
        elif highest > lowest:
            priors[name] = price_prior.low + span * (logs[name] - lowest) / (highest - lowest)
        else:
            priors[name] = price_prior.low + span / 2
    return priors


def candidate_row(arm: CompiledArm, prior: float, prior_strength: float) -> tuple:
    """What the hot loop reads about one candidate, flat, so it unpacks in one step."""
    alpha = prior_strength * prior
    return (arm, arm.key, arm.arm, alpha, prior_strength - alpha, arm.tokens, arm.cost_per_prompt_token,
            arm.cost_fixed, arm.cost_reference, arm.latency_ms, arm.latency_p95_ms)


class CompiledRoute:
    __slots__ = ("name", "tasks", "tiers", "low", "high", "candidates", "rows", "learned", "calibrated")

    def __init__(self, name, tasks, tiers, window, candidates, prior_strength):
        self.name = name
        self.tasks = frozenset(tasks) if tasks is not None else None
        self.tiers = frozenset(tiers) if tiers is not None else None
        self.low, self.high = window if window is not None else (None, None)
        self.candidates: tuple[tuple[CompiledArm, float], ...] = candidates
        self.rows = tuple(candidate_row(arm, prior, prior_strength) for arm, prior in candidates)
        # bucket -> per row: (the ArmStats it was computed from, accuracy, cost factor, cost addend,
        # latency, p95). ArmStats are immutable, so the same object means the same numbers; a new
        # snapshot simply misses and recomputes.
        self.learned: dict[str, list] = {}
        self.calibrated: tuple | None = None  # (the pooled stats it was computed from, cost calibration)

    def matches(self, task: str, difficulty: float, tier: str) -> bool:
        if self.tasks is not None and task not in self.tasks:
            return False
        if self.low is not None:
            return self.low <= difficulty < self.high or (self.high >= 1.0 and difficulty >= 1.0)
        return self.tiers is None or tier in self.tiers


class CompiledAlias:
    __slots__ = ("name", "objective", "routes", "arms", "explore", "_table")

    def __init__(self, name: str, objective: Objective, routes: list[CompiledRoute], arms: list[CompiledArm],
                 explore: bool):
        self.name, self.objective, self.routes, self.arms, self.explore = name, objective, routes, arms, explore
        # Routes keyed by (task, tier) unless one uses a difficulty range (then scan: still a handful).
        self._table: dict[tuple[str, str], CompiledRoute] | None = None
        if all(route.low is None for route in routes):
            self._table = {}
            for task in TASK_TYPES:
                for tier, _ in DIFFICULTY_TIERS:
                    route = next((r for r in routes if r.matches(task, 0.0, tier)), None)
                    if route is not None:
                        self._table[(task, tier)] = route

    def route(self, task: str, difficulty: float, tier: str) -> CompiledRoute:
        if self._table is not None:
            found = self._table.get((task, tier))
            if found is not None:
                return found
        for route in self.routes:
            if route.matches(task, difficulty, tier):
                return route
        return self.routes[-1]  # a task the classifier invented: the last (catch-all) route


class CompiledPolicy:
    def __init__(self, policy: Policy):
        problems = policy_problems(policy)
        if problems:
            raise PolicyError([(policy.name, None, ".".join(map(str, loc)), message) for loc, message in problems])
        self.policy = policy
        backends = {spec.name: spec for spec in policy.backends}
        self.arms = {name: CompiledArm(name, spec, policy, backends) for name, spec in policy.arms.items()}
        for name, prior in price_priors(self.arms, policy.learner.price_prior).items():
            self.arms[name].prior = prior
        self.by_key = {arm.key: arm for arm in self.arms.values()}
        self.plain_stand_ins = self._plain_stand_ins(policy, backends)
        self.by_key.update((arm.key, arm) for arm in self.plain_stand_ins)
        # (backend, effort) -> the one plain call there: the policy's single arm, else its stand-in
        self.plain_calls = {(arm.backend, arm.effort): arm for arm in (*self.arms.values(), *self.plain_stand_ins)
                            if arm.strategy == "single"}
        # backend -> a plain call there at an effort that does not think, for a backend some arm thinks on:
        # the policy's single arm at that effort, else one standing in (decide(): a cap too small to think)
        self.unthinking_calls = self._unthinking_calls(policy, backends)
        self.by_key.update((arm.key, arm) for arm in self.unthinking_calls.values())
        # a prompt estimated at or below this fits every arm: decide() checks windows only above it
        self.context_floor = min((arm.max_context * CONTEXT_MARGIN for arm in self.arms.values()
                                  if arm.max_context is not None), default=math.inf)
        self.aliases: dict[str, CompiledAlias] = {}
        for alias_name in set(policy.aliases) | {"auto"}:
            spec = policy.alias(alias_name)
            patch = {key: value for key, value in spec.objective.model_dump().items() if value is not None}
            objective = policy.objective.model_copy(update=patch)
            allowed = set(spec.arms) if spec.arms is not None else None
            arms = [arm for name, arm in self.arms.items() if allowed is None or name in allowed]
            chosen = policy.routes if spec.routes is None else sorted(
                (r for r in policy.routes if r.name in spec.routes), key=lambda r: spec.routes.index(r.name)
            )
            routes = []
            for route in chosen:
                candidates = tuple(
                    (self.arms[name], prior if prior is not None else self.arms[name].prior)
                    for name, prior in route.candidates.items()
                    if allowed is None or name in allowed
                )
                if not candidates:  # the alias excludes every arm of this route: consider the alias's own
                    candidates = tuple((arm, arm.prior) for arm in arms)
                when = route.when
                routes.append(CompiledRoute(route.name, when.tasks, when.tiers, when.difficulty, candidates,
                                            policy.learner.prior_strength))
            self.aliases[alias_name] = CompiledAlias(alias_name, objective, routes, arms, spec.explore)

    def _plain_stand_ins(self, policy: Policy, backends: dict[str, BackendSpec]) -> list[CompiledArm]:
        """A plain call (`single`) for each backend and effort the arms use that the policy has none
        for, standing in for the arms there (their prior, their expected tokens): a request that must
        be answered by one call (tools, JSON mode, logprobs: decide()) has one even in a policy whose
        arms all vote, reason or cascade, rather than having its tool call voted on or its JSON
        object asked for a 'Final answer:' line."""
        plain = {(arm.backend, arm.effort) for arm in self.arms.values() if arm.strategy == "single"}
        stand_ins = []
        for name, arm in self.arms.items():
            if (arm.backend, arm.effort) not in plain:
                plain.add((arm.backend, arm.effort))
                spec = ArmSpec(backend=arm.backend, effort=arm.effort, tokens=arm.spec.tokens)
                stand_in = CompiledArm(f"{name} (one call)", spec, policy, backends)
                stand_in.prior = arm.prior
                stand_ins.append(stand_in)
        return stand_ins

    def _unthinking_calls(self, policy: Policy, backends: dict[str, BackendSpec]) -> dict[str, CompiledArm]:
        calls: dict[str, CompiledArm] = {}
        for arm in self.arms.values():
            if arm.thinks_above is None or arm.backend in calls:
                continue
            effort = unthinking_effort(backends[arm.backend])
            if effort is None:
                continue
            plain = self.plain_calls.get((arm.backend, effort))
            if plain is None:
                plain = CompiledArm(f"{arm.backend} (effort {effort}, one call)",
                                    ArmSpec(backend=arm.backend, effort=effort), policy, backends)
            calls[arm.backend] = plain
        return calls

    @property
    def name(self) -> str:
        return self.policy.name

    def allows_override(self, name: str) -> bool:
        """Whether the policy honours a client override: policy, strategy, reasoning_effort, max_cost,
        max_latency, direct_backend or task (unknown names: no)."""
        overrides = self.policy.overrides
        return bool({
            "policy": overrides.policy_header,
            "strategy": overrides.strategy_header,
            "reasoning_effort": overrides.reasoning_effort,
            "max_cost": overrides.max_cost_header,
            "max_latency": overrides.max_latency_header,
            "direct_backend": overrides.direct_backend,
            "task": overrides.task_header,
        }.get(name, False))

    def estimated_cost_usd(self, arm_key: str, prompt_tokens: int, max_output_tokens: int | None,
                           choices: int = 1) -> float:
        """The cost model's estimate for one request answered by this arm, before any learning (what
        decide() scales by the learned ratio), 0 for an arm this policy does not declare. Recorded
        with each outcome, so the ratio compares a cost with the estimate for that same request
        (its prompt, its max_tokens, the choices it asked for)."""
        carm = self.by_key.get(arm_key)
        if carm is None:
            return 0.0
        per_token, fixed = carm.cost_per_prompt_token, carm.cost_fixed
        if max_output_tokens is not None and max_output_tokens < carm.tokens:
            per_token, fixed, _, _ = carm.under_cap(max_output_tokens)
        prompt_scale, output_scale = carm.choice_scales(choices) if choices > 1 else (1.0, 1.0)
        return per_token * prompt_tokens * prompt_scale + fixed * output_scale

    def key_budgets(self) -> dict[str, float]:
        """The policy's default per-key caps by period ("day", "month"), for the budget store."""
        budgets = self.policy.budgets
        caps = {"day": budgets.per_key_daily_usd, "month": budgets.per_key_monthly_usd}
        return {period: cap for period, cap in caps.items() if cap is not None}


def compile_policy(policy: Policy, extra_backends: Iterable[BackendSpec] = ()) -> CompiledPolicy:
    """The policy's decision tables, built once and cached on the (immutable) Policy object.

    `extra_backends` (the gateway config's) replace the policy's own of the same name, as in
    load_policy; a policy from load_policy already has them, so passing them again changes nothing.
    """
    extra = list(extra_backends)
    if extra:
        merged = {spec.name: spec for spec in policy.backends}
        merged.update({spec.name: spec for spec in extra})
        if list(merged.values()) != policy.backends:
            policy = policy.model_copy(update={"backends": list(merged.values())})
    # Read the private slot directly: `policy._compiled` goes through pydantic's __getattr__ (~3 us).
    compiled = policy.__pydantic_private__.get("_compiled")
    if compiled is None or compiled.policy is not policy:  # model_copy() copies the private cache too
        compiled = CompiledPolicy(policy)
        policy._compiled = compiled
    return compiled


# Strategy knobs an arm may set; passed on in Arm.params only when the policy sets them, so the
# strategies' own defaults (gateway/strategies.py) apply otherwise.
STRATEGY_KNOBS = ("confidence", "wave", "min_samples", "min_gain", "sample_value", "max_concurrency", "escalate_below",
                  "temperature")


def _build_arm(spec: ArmSpec, policy: Policy) -> Arm:
    params: dict[str, float | str] = {name: float(getattr(spec, name)) for name in STRATEGY_KNOBS
                                      if getattr(spec, name) is not None}
    if spec.cot_template is not None:
        params["cot_template"] = spec.cot_template
    stages = tuple(_build_arm(policy.arms[name], policy) for name in spec.stages)
    verifier = spec.verifier or (spec.backend if spec.strategy == "best_of_n" else None)
    return Arm(backend=spec.backend, strategy=spec.strategy, effort=spec.effort, n=spec.n, stages=stages,
               verifier=verifier, params=tuple(sorted(params.items())))


def _expected_samples(spec: ArmSpec) -> float:
    """Samples one request answered by this arm draws, as the cost model counts them (_estimate)."""
    if spec.strategy == "adaptive_consistency":
        wave = spec.wave if spec.wave is not None else min(DEFAULT_WAVE, spec.n)
        return spec.expected_n if spec.expected_n is not None else (wave + spec.n) / 2
    return spec.n  # single and cot have n == 1; self_consistency, best_of_n and a cascade's first stage take n


def _call_ms(backend: BackendSpec, tokens: float) -> float:
    return backend.first_token_ms + tokens / backend.output_tokens_per_s * 1000.0


def _estimate(spec: ArmSpec, policy: Policy, backends: dict[str, BackendSpec], prompt_tokens: int,
              max_output_tokens: int | None) -> tuple[float, float, float]:
    """Expected (cost USD, mean latency ms, p95 latency ms) of one request answered by this arm."""
    backend = backends[spec.backend]
    prices, _ = resolve_prices(backend)
    price_in, price_out = prices.input_per_mtok / 1e6, prices.output_per_mtok / 1e6
    tokens = expected_output_tokens(spec, backend)
    if max_output_tokens is not None:
        tokens = min(tokens, max_output_tokens)
    parallel = min(backend.max_concurrency, spec.max_concurrency or DEFAULT_REQUEST_CONCURRENCY)
    samples = _expected_samples(spec)
    if spec.strategy == "adaptive_consistency":
        wave = spec.wave if spec.wave is not None else min(DEFAULT_WAVE, spec.n)
        sequential = math.ceil(samples / wave) * math.ceil(wave / parallel)
    else:
        sequential = math.ceil(samples / parallel)
    # The gateway draws each sample as its own seeded call (gateway/strategies.py; not every provider
    # takes `n`), so every sample pays for the prompt, whatever the backend's `supports_n`.
    cost = samples * (prompt_tokens * price_in + tokens * price_out)
    latency = sequential * _call_ms(backend, tokens) * (PARALLEL_STRAGGLER if samples > 1 else 1.0)
    p95 = latency * P95_OVER_MEAN
    if spec.strategy == "best_of_n":
        judge = backends[spec.verifier or spec.backend]
        judge_prices, _ = resolve_prices(judge)
        judge_out = VERIFIER_TOKENS_PER_SAMPLE * spec.n
        cost += ((prompt_tokens + spec.n * tokens) * judge_prices.input_per_mtok
                 + judge_out * judge_prices.output_per_mtok) / 1e6
        latency += _call_ms(judge, judge_out)
        p95 += _call_ms(judge, judge_out) * P95_OVER_MEAN
    if spec.latency_ms is not None:
        latency, p95 = spec.latency_ms, spec.latency_ms * P95_OVER_MEAN
    if spec.strategy == "cascade":
        rate = spec.escalation_rate if spec.escalation_rate is not None else DEFAULT_ESCALATION_RATE
        reach = 1.0
        for stage in spec.stages:
            reach *= rate
            stage_cost, stage_latency, stage_p95 = _estimate(policy.arms[stage], policy, backends, prompt_tokens,
                                                             max_output_tokens)
            cost += reach * stage_cost
            latency += reach * stage_latency
            if reach >= 0.05:  # escalations common enough to show in the p95
                p95 += stage_p95
    return cost, latency, p95
