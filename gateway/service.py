"""The gateway's state and its three steps per request: plan (router), execute (strategies), record.

Built once at startup (`Gateway.start`) and shared by every request; `gateway/app.py` holds the
HTTP handlers that call into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth import KeyRing, Principal
from gateway.backends import Backend, CallRecord, UpstreamError, import_litellm
from gateway.calls import Caller, upstream_to_api_error
from gateway.config import LOCAL_BACKEND_NAME, ConfigError, GatewayConfig
from gateway.effort import effective_effort
from gateway.errors import ApiError, retry_after
from gateway.local_model import LocalModelError, LocalModelServer, check_local_model
from gateway.metrics import Metrics
from gateway.policy_watch import PolicySet
from gateway.prices import call_cost
from gateway.schemas import ChatRequest
from gateway.strategies import (
    JUDGE_OUTPUT_TOKENS, OutputBound, StrategyContext, StrategyResult, cot_instruction_tokens, first_stage,
    output_bound, run_arm, uses_cot,
)
from policies.backends import BackendSpec
from policies.schema import PolicyError
from router import prompts
from router.classifier import Classifier, ClassifierError
from router.decide import BudgetExhausted, ContextTooLong, InvalidHint, RequestHints, context_message, decide
from router.estimates import CompiledPolicy, estimate_prompt_tokens, exceeds_context, prompt_tokens_bound
from router.types import Arm, Classification, Decision
from telemetry.budgets import Reservation, exceeded, latest_reset, seconds_until_reset
from telemetry.embedded_store import check_data_dir
from telemetry.events import Event
from telemetry.store import BudgetExceeded, Store, open_store

log = logging.getLogger("ponder.gateway")
DIRECT_SAMPLES = 5  # samples when a client asks a named backend for a multi-sample strategy
CLOSE_WAIT_S = 5.0  # at shutdown, how long the store waits for requests still settling
# An output limit the gateway sends leaves the prompt room in the context window. The prompt estimate
# (characters / 4) can undercount a tokenizer by a quarter, and a sample may carry the reasoning
# instruction; the limit never drops below MIN_OUTPUT_LIMIT (a prompt that near the window fails anyway).
PROMPT_UNDERCOUNT = 1.25
PROMPT_ADDITIONS = 256
MIN_OUTPUT_LIMIT = 256


@dataclass
class Plan:
    """What the gateway will do for one request, decided before any backend is called."""

    request_id: str
    decision: Decision
    policy: CompiledPolicy | None
    principal: Principal
    alias: str
    worst_cost_usd: float = 0.0  # what the request may cost at most (see Gateway.worst_case_usd)
    prompt_tokens: int = 0  # estimated, as the decision saw it
    held_prompt_tokens: int | None = None  # counted as the budget holds it (prompt_counter)
    max_output_tokens: int | None = None  # the client's
    choices: int = 1  # the client's `n`
    capped: bool = False  # the key has a budget: worst_cost_usd is the request's true bound (output_bound)
    # backend -> the output limit sent where the client set none, so that the hold is a bound
    output_caps: dict[str, int] = field(default_factory=dict)
    classify_s: float = 0.0  # how long the classifier took (Server-Timing)
    decide_s: float = 0.0  # and the rest of planning: policy, hints, budget read, the decision
    started: float = field(default_factory=time.perf_counter)
    ts: float = field(default_factory=time.time)

    def arms(self) -> list[Arm]:
        return [self.decision.arm, *self.decision.fallbacks]

    def reserve_usd(self) -> float:
        """What the budget holds until the request settles: its worst case, never below the decision
        engine's estimate (estimates learn from cheap past answers; a bound must not)."""
        expected = next((c.expected_cost_usd for c in self.decision.candidates if c.arm == self.decision.arm), 0.0)
        return max(expected, self.worst_cost_usd)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = KeyRing(config.api_keys)
        self.backends: dict[str, Backend] = {}
        self.local_model: LocalModelServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.classifier: Classifier | None = None
        self.policies: PolicySet | None = None
        self.store: Store | None = None
        self._tasks: list[asyncio.Task] = []
        self._rng = random.Random()
        self._configured: set[str] = set()  # backends of the gateway config (policies' inline ones may not replace them)
        self.unsettled = InFlight()  # requests planned and not yet settled (recorded, hold released)
        self._held_usd: dict[str, float] = {}  # key id -> this process's budget holds not yet settled
        self.started_at = time.time()
        self.metrics = Metrics(store_health=lambda: self.store.health() if self.store else None,
                               policy_rejections=self._policy_rejections)

    # -- lifecycle ------------------------------------------------------------------------------
    @staticmethod
    def check(config: GatewayConfig) -> None:
        """Raise ConfigError with a readable message for what start() would fail on (a policy that
        does not load, a classifier artifact that does not, a local model file that is missing or a
        fixed local model port that is taken, a data dir it cannot create or another gateway holds),
        before a server is started for it."""
        try:
            Classifier.load(config.classifier)
            configured_policies(config)
        except (ClassifierError, PolicyError) as exc:
            raise ConfigError(str(exc)) from None
        if config.local_model.enabled and not any(s.name == LOCAL_BACKEND_NAME for s in config.backends):
            try:
                check_local_model(config.local_model)
            except LocalModelError as exc:
                raise ConfigError(str(exc)) from None
        if not config.telemetry.redis_url:  # with Redis it only keeps budget changes at shutdown, made when needed
            try:
                check_data_dir(Path(config.telemetry.data_dir))
            except RuntimeError as exc:
                raise ConfigError(f"telemetry.data_dir: {exc}") from None

    async def start(self) -> None:
        specs = list(self.config.backends)
        if self.config.local_model.enabled and not any(s.name == LOCAL_BACKEND_NAME for s in specs):
            self.local_model = LocalModelServer(self.config.local_model)
            specs.append(self.local_model.backend_spec())
        # One pooled session for every fast-path backend: no per-request client construction.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300),
            json_serialize=None, auto_decompress=True,
        )
        self.backends = {spec.name: Backend(spec, self.session) for spec in specs}
        if self.local_model is not None:
            self.backends[LOCAL_BACKEND_NAME].finishes_abandoned_calls = True
        for spec in specs:  # said once at startup, not discovered as a 401 on the first request
            if spec.api_key_env and not os.environ.get(spec.api_key_env):
                log.warning("backend %s: $%s is not set; its calls will be refused upstream until it is",
                            spec.name, spec.api_key_env)
        self.classifier = Classifier.load(self.config.classifier)
        self.policies = PolicySet(self.config.policy, self.config.extra_policies, specs)
        self._configured = {spec.name for spec in specs}
        self._serve_inline_backends()
        self._warn_if_policies_cannot_be_picked()
        await self._import_litellm_if_used()
        self.store = await open_store(
            self.config.telemetry.redis_url, Path(self.config.telemetry.data_dir),
            refresh_s=self.config.telemetry.refresh_s, decay_half_life_s=self.learner_half_life_s(),
            feedback_window_s=self.config.telemetry.feedback_window_s,
            stream_maxlen=self.config.telemetry.stream_maxlen,
        )
        if self.local_model is not None:
            await self.local_model.start()
            # Calls that failed while it was down cooled its backend down; ready again means serving
            # again, not a 503 for as long as the cool-down had left to run.
            local = self.backends[LOCAL_BACKEND_NAME]
            self._tasks.append(asyncio.create_task(self.local_model.watch(on_back=local.health.succeeded)))
        self._tasks.append(asyncio.create_task(self._watch_policies()))

    def learner_half_life_s(self) -> float | None:
        """How fast outcomes fade in the store: the default policy's `learner.half_life_hours` (one store
        serves every policy, so one setting applies)."""
        assert self.policies is not None
        hours = self.policies.default.policy.learner.half_life_hours
        return hours * 3600.0 if hours else None

    async def _watch_policies(self, interval_s: float = 1.0) -> None:
        assert self.policies is not None
        while True:
            await asyncio.sleep(interval_s)
            if self.policies.reload_changed():
                self._serve_inline_backends()
                self._warn_if_policies_cannot_be_picked()
                await self._import_litellm_if_used()
                if self.store is not None:
                    self.store.half_life_s = self.learner_half_life_s()

    def _warn_if_policies_cannot_be_picked(self) -> None:
        """extra_policies are picked with x-ponder-policy, which only a default policy with
        overrides.policy_header (off by default) honours: else the header is ignored and every request
        gets the default, with nothing said. Said once at startup and at each reload that leaves it so."""
        assert self.policies is not None
        default = self.policies.default.policy
        others = [name for name in self.policies.names() if name != default.name]
        if others and not default.overrides.policy_header:
            log.warning("policies %s cannot be picked: the default policy %r does not honour x-ponder-policy "
                        "(overrides.policy_header: false), so every request gets %r", ", ".join(others),
                        default.name, default.name)

    def _policy_rejections(self) -> dict[str, bool]:
        """policy -> whether its file's last edit was rejected (the previous version serves)."""
        if self.policies is None:
            return {}
        return {name: name in self.policies.rejected for name in self.policies.names()}

    def _serve_inline_backends(self) -> None:
        """Backends a policy declares inline serve too (the gateway config's win by name), also when a
        reloaded policy adds or changes one: else its arms would be chosen and never served. One that
        no policy declares any more stops serving (it stayed in /v1/models and callable by name, at
        its cost, after the operator removed it). A new mapping each time: a request in flight keeps
        the one its calls started with (Caller), so its backend does not vanish under it."""
        assert self.policies is not None
        served = {name: backend for name, backend in self.backends.items() if name in self._configured}
        for compiled in self.policies.all():
            for spec in compiled.policy.backends:
                if spec.name not in self._configured:
                    current = self.backends.get(spec.name)
                    served[spec.name] = current if current is not None and current.spec == spec else \
                        Backend(spec, self.session)
        self.backends = served

    async def _import_litellm_if_used(self) -> None:
        """litellm takes seconds to import, all of them with the event loop blocked: imported by the first
        call that needs it, it froze every request in flight, and that call's first-byte timeout ran out
        (a 504, and its backend cooled down). Imported now in a thread, before any call needs it."""
        if any(not backend.fast_path for backend in self.backends.values()):
            await asyncio.to_thread(import_litellm)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Requests the server has just cancelled still record their events and settle their holds:
        # the store closes after them (bounded: a request whose response never got out may not).
        await self.unsettled.wait_idle(CLOSE_WAIT_S)
        if self.store is not None:
            await self.store.close()
        if self.session is not None:
            await self.session.close()
        if self.local_model is not None:
            self.local_model.stop()

    def readiness(self) -> dict[str, Any]:
        store = self.store.health() if self.store else {"connected": False}
        checks = {
            "backends": bool(self.backends),
            "classifier": self.classifier is not None,
            "policy": self.policies is not None,
            "store": store,
        }
        if self.local_model is not None:  # a dead model server is restarted: not ready until it is back
            checks["local_model"] = self.local_model.alive()
        checks["ready"] = checks["backends"] and checks["classifier"] and checks["policy"] and \
            checks.get("local_model", True)
        return checks

    # -- plan -----------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if self.policies is None:
            return [*self.backends]
        default = self.policies.default
        backends = list(self.backends) if default.allows_override("direct_backend") else []
        return [*sorted(default.aliases), *backends]

    def classify(self, req: ChatRequest) -> Classification:
        assert self.classifier is not None
        return self.classifier.classify(req.messages)

    async def plan(self, req: ChatRequest, headers: Any, principal: Principal, *,
                   id_prefix: str = "chatcmpl-") -> Plan:
        """`id_prefix`: of the request id, which is also the answer's id (`chatcmpl-`, a response's `resp_`)."""
        request_id = f"{id_prefix}{uuid.uuid4().hex}"
        started = time.perf_counter()
        classification = self.classify(req)
        classified = time.perf_counter()
        policy = self._policy_for(headers)
        try:
            hints = RequestHints.from_request(req, headers, policy)
        except InvalidHint as exc:
            raise ApiError(400, str(exc), code="invalid_header") from None
        if req.model in self.backends:
            if not policy.allows_override("direct_backend"):
                raise ApiError(404, f"The model {req.model!r} is a backend, and policy `{policy.name}` routes only "
                                    "its aliases (overrides.direct_backend: false); GET /v1/models lists them.",
                               param="model", code="model_not_found")
            backend = self.backends[req.model]
            if exceeds_context(hints.prompt_tokens or 0, backend.max_context):
                raise ApiError(400, context_message(hints.prompt_tokens or 0, backend.max_context), param="messages",
                               code="context_length_exceeded")
            decision = self._direct(req, headers, classification, policy)
            capped = self.has_budget(principal)
            held = _held_prompt_tokens(req, hints, capped)
            worst = self.plan_worst_case_usd(decision, req, held, capped=capped)
            # the request's own cost cap prices the prompt as routed requests are priced (the estimate):
            # the bytes bound is for the key's budget, and would refuse a budgeted key what it lets others do
            self._check_direct_cost(worst if not capped else
                                    self.plan_worst_case_usd(decision, req, hints.prompt_tokens, capped=True),
                                    hints, policy)
            decision, caps = self._with_output_caps(decision, req, capped, hints.prompt_tokens or 0)
            return Plan(request_id, decision, policy, principal, req.model, worst_cost_usd=worst,
                        prompt_tokens=hints.prompt_tokens or 0, held_prompt_tokens=held,
                        max_output_tokens=req.max_output_tokens,
                        choices=req.n, capped=capped, output_caps=caps, classify_s=classified - started,
                        decide_s=time.perf_counter() - classified)
        if req.model not in policy.aliases:
            raise ApiError(404, f"The model {req.model!r} does not exist; GET /v1/models lists the models "
                                "and routed aliases.", param="model", code="model_not_found")
        assert self.store is not None
        left_by_period = await self._budget_left(principal)
        budget_left = min(left_by_period.values()) if left_by_period else None
        try:
            decision = decide(classification, policy, self.store.snapshot(policy.policy.name), alias=req.model,
                              request=hints, budget_left_usd=budget_left, rng=self._rng)
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except BudgetExhausted as exc:
            if exc.scope == "request":  # the request's own cost cap: asking again will not help
                raise ApiError(400, str(exc), code="over_cost_limit") from None
            assert left_by_period  # a key's budget refused it: the key has one
            # The periods with less left than the cheapest arm costs (than nothing, when that is
            # unknown); the one to wait for is the one that resets last.
            need = exc.cheapest_usd if exc.cheapest_usd is not None else 1e-9
            short = [period for period, left in left_by_period.items() if left < need]
            period = latest_reset(short, time.time()) if short else min(left_by_period, key=left_by_period.__getitem__)
            held = self._held_usd.get(principal.key_id, 0.0)
            if held > 0 and short and not _spent_out(left_by_period, need, held):
                raise _budget_held(period, held) from None
            raise ApiError(429, str(exc), code="budget_exhausted", headers=_retry_at_reset(period)) from None
        capped = self.has_budget(principal)
        held = _held_prompt_tokens(req, hints, capped)
        if budget_left is not None:
            decision = self._arms_within(decision, req, held, budget_left)
        decision, caps = self._with_output_caps(decision, req, capped, hints.prompt_tokens or 0)
        return Plan(request_id, decision, policy, principal, req.model,
                    worst_cost_usd=self.plan_worst_case_usd(decision, req, held, capped=capped),
                    prompt_tokens=hints.prompt_tokens or 0, held_prompt_tokens=held,
                    max_output_tokens=req.max_output_tokens, choices=req.n, capped=capped, output_caps=caps,
                    classify_s=classified - started, decide_s=time.perf_counter() - classified)

    def worst_case_usd(self, arm: Arm, req: ChatRequest, prompt_tokens: int | None = None, *,
                       capped: bool = False, output_tokens: int | None = None) -> float:
        """What answering with this arm can cost at most (every sample writing as much as its call may:
        `output_bound`): what a budget must hold while the request runs, so that concurrent requests
        cannot overspend. `capped`: the key has a budget, so this must be a true bound (without
        max_tokens: the backend's maximum output, else the default length, then sent as the limit);
        without it, calls without max_tokens count a default length, only for a named backend's
        per-request cost caps. Every prompt counts what the gateway adds to it: the reasoning
        instruction of a sample that gets one, and a best-of-N judge's rubric, question and candidate
        answer. Prompts are counted by `prompt_counter`: for a key with a budget by their bound, not
        their estimate, which can be 8x under (digits, Chinese, emoji); `prompt_tokens`: the messages'
        count so made, if made. `output_tokens`: what each call would write with that max_tokens (for
        `affordable_max_tokens`)."""
        backend = self.backends.get(arm.backend)
        if backend is None:
            return 0.0
        count = prompt_counter(capped)
        if prompt_tokens is None:
            prompt_tokens = count(req.messages, req.body)
        prompt = prompt_tokens
        if capped and backend.max_context is not None:  # a longer prompt is refused, and costs nothing
            prompt = min(prompt, backend.max_context)
        out = output_tokens if output_tokens is not None else \
            output_bound(backend, req.max_output_tokens, capped=capped).tokens
        # every sample a strategy may draw: self-consistency's extra round for a client's `n` replaces
        # failed samples (no output), and adaptive waves stop at max(n, the client's n)
        samples = max(arm.n, req.n)
        params = dict(arm.params)
        if uses_cot(arm if arm.strategy != "cascade" else first_stage(arm), backend.spec, params):
            prompt += cot_instruction_tokens(params.get("cot_template"), count)
        cost = call_cost(backend.prices, prompt, out) * samples
        if arm.strategy == "best_of_n":
            judge = self.backends.get(arm.verifier or arm.backend, backend)
            judged = count(prompts.judge_messages(prompts.last_user_text(req.messages), "")) + out
            cost += call_cost(judge.prices, judged, JUDGE_OUTPUT_TOKENS) * samples
        return cost + sum(self.worst_case_usd(stage, req, prompt_tokens, capped=capped, output_tokens=output_tokens)
                          for stage in arm.stages)

    def plan_worst_case_usd(self, decision: Decision, req: ChatRequest, prompt_tokens: int | None, *,
                            capped: bool = False) -> float:
        """The most any of the decision's arms can cost: a fallback may answer instead of the choice."""
        return max(self.worst_case_usd(arm, req, prompt_tokens, capped=capped)
                   for arm in (decision.arm, *decision.fallbacks))

    def affordable_max_tokens(self, arms: list[Arm], req: ChatRequest, prompt_tokens: int | None,
                              usd: float, *, capped: bool = False) -> int | None:
        """The largest max_tokens with which these arms' worst case is at most `usd` (a request's worst
        case is linear in it); 0 when not even one token fits (the prompts alone cost more); None when
        the output is free, so no max_tokens would change it."""
        most: int | None = None
        for arm in arms:
            base = self.worst_case_usd(arm, req, prompt_tokens, capped=capped, output_tokens=0)
            per_token = self.worst_case_usd(arm, req, prompt_tokens, capped=capped, output_tokens=1) - base
            if base > usd:
                return 0
            if per_token > 0:
                fits = int((usd - base) / per_token + 1e-6)
                most = fits if most is None else min(most, fits)
        # float rounding at the edge; the stores admit what passes the limit by less than 1e-9 USD
        while most and any(self.worst_case_usd(arm, req, prompt_tokens, capped=capped, output_tokens=most) > usd + 1e-9
                           for arm in arms):
            most -= 1
        return most

    def _arms_within(self, decision: Decision, req: ChatRequest, prompt_tokens: int | None,
                     budget_left_usd: float) -> Decision:
        """The decision without the arms whose worst case is more than the key has left. The budget hold
        covers every arm that may answer, so one costly fallback (eligible by its expected cost) would
        refuse a request whose chosen arm fits, and lock the key out for the rest of the period. The
        chosen arm goes too when a fallback fits in its place: it was chosen by its expected cost, and
        its worst case (a backend's whole maximum output, without max_tokens) can be far above that.
        When no arm fits, the chosen one stays, and the reservation says what to send instead."""
        arms = (decision.arm, *decision.fallbacks)
        fits = [self.worst_case_usd(arm, req, prompt_tokens, capped=True) <= budget_left_usd for arm in arms]
        if all(fits):
            return decision
        kept = [arm for arm, ok in zip(arms, fits) if ok] or [decision.arm]
        reasons = list(decision.reasons)
        left = f"the key's remaining {budget_left_usd:.6f} USD"
        if kept[0] is not decision.arm:
            reasons.append(f"{decision.arm.key} may cost more than {left}: {kept[0].key} answers instead")
        dropped = [arm.key for arm in decision.fallbacks if not any(arm is k for k in kept)]
        if dropped:
            reasons.append(f"fallbacks dropped: {', '.join(dropped)} may cost more than {left}")
        # an explored arm that gives way explores nothing: a fallback (the greedy arm, mostly) answers
        return dataclasses.replace(decision, arm=kept[0], fallbacks=tuple(kept[1:]), reasons=tuple(reasons),
                                   explore=decision.explore and kept[0] is decision.arm)

    def _with_output_caps(self, decision: Decision, req: ChatRequest, capped: bool,
                          prompt_tokens: int) -> tuple[Decision, dict[str, int]]:
        """The output limits the gateway sends this request's calls (output_bound: a key with a budget, no
        max_tokens, a backend whose maximum output is unknown), and the decision saying so. A limit leaves
        the prompt its room in the backend's context window: vLLM refuses a request whose prompt plus
        max_tokens is over it, which the request without the limit was not."""
        if not capped or req.max_output_tokens is not None:
            return decision, {}
        caps: dict[str, int] = {}
        for name in dict.fromkeys(_backends_of((decision.arm, *decision.fallbacks))):
            backend = self.backends.get(name)
            bound = output_bound(backend, None, capped=True) if backend is not None else None
            if bound is not None and bound.sent:
                room = None if backend.max_context is None else \
                    backend.max_context - int(prompt_tokens * PROMPT_UNDERCOUNT) - PROMPT_ADDITIONS
                caps[name] = bound.tokens if room is None else max(MIN_OUTPUT_LIMIT, min(bound.tokens, room))
        if not caps:
            return decision, caps
        sent = ", ".join(f"{tokens} to {name}" for name, tokens in caps.items())
        return dataclasses.replace(decision, reasons=(
            *decision.reasons, f"max_tokens sent ({sent}): the key has a budget, the request no max_tokens, "
                               "and the backend's maximum output is unknown, so the default length held is "
                               "sent as the limit")), caps

    def _direct(self, req: ChatRequest, headers: Any, classification: Classification,
                policy: CompiledPolicy) -> Decision:
        """A backend named as `model`: no routing, but the policy may let the client pick a strategy."""
        strategy, n, reasons = "single", 1, [f"client named backend {req.model!r}"]
        asked = headers.get("x-ponder-strategy")
        if asked and asked != "single" and req.exact_output:
            reasons.append(f"ignored x-ponder-strategy={asked}: the request has {req.exact_output}")
        elif asked:
            if asked in policy.policy.overrides.strategy_header:
                strategy = asked
                n = 1 if asked in ("single", "cot") else DIRECT_SAMPLES
                reasons.append(f"x-ponder-strategy={asked} (n={n})")
            else:
                reasons.append(f"ignored x-ponder-strategy={asked}: not allowed by policy `{policy.policy.name}`")
        effort = effective_effort(self.backends[req.model].spec, req.reasoning_effort)  # what is sent, not asked
        arm = Arm(backend=req.model, strategy=strategy, effort=effort, n=n)
        return Decision(arm=arm, task=classification.task, difficulty=classification.difficulty,
                        task_probs=classification.task_probs, policy="direct", rule="direct", reasons=tuple(reasons))

    @staticmethod
    def _check_direct_cost(worst_usd: float, hints: RequestHints, policy: CompiledPolicy) -> None:
        """A named backend skips the decision, not the request's cost caps (budgets.per_request_usd,
        x-ponder-max-cost-usd where the policy honours it): with no arms to choose from, the caps
        bound the call's worst case (max_tokens, else a default output length per call)."""
        caps = [(policy.policy.budgets.per_request_usd, "budgets.per_request_usd")]
        if policy.allows_override("max_cost"):
            caps.append((hints.max_cost_usd, "x-ponder-max-cost-usd"))
        for cap, why in caps:
            if cap is not None and worst_usd > cap:
                raise ApiError(400, f"This request may cost up to ${worst_usd:.6f}, over its cost cap (${cap:.6f}, "
                                    f"{why}); send a lower max_tokens or a shorter prompt.", code="over_cost_limit")

    def _policy_for(self, headers: Any) -> CompiledPolicy:
        assert self.policies is not None
        name = headers.get("x-ponder-policy")
        default = self.policies.default
        if name and name != default.policy.name and default.policy.overrides.policy_header:
            chosen = self.policies.get(name)
            if chosen is None:
                raise ApiError(400, f"Unknown policy {name!r}; known: {self.policies.names()}.",
                               param="x-ponder-policy", code="unknown_policy")
            return chosen
        return default

    # -- execute --------------------------------------------------------------------------------
    def caller(self) -> Caller:
        return Caller(self.backends, time.monotonic() + self.config.request_timeout_s)

    async def execute(self, plan: Plan, req: ChatRequest, caller: Caller) -> StrategyResult:
        """Run the decided arm; on a backend failure fall back through the decision's other arms."""
        last: UpstreamError | None = None
        arms = plan.arms()
        # the learner's stats of the request's bucket, for strategies that gate on them (one lookup)
        stats = self.store.snapshot(plan.decision.policy).get(plan.decision.bucket, {}) if self.store else {}
        for index, arm in enumerate(arms):
            is_last = index == len(arms) - 1
            if not caller.available(arm.backend) and not is_last:
                continue  # cooling down: skip at once rather than wait on it
            params = dict(arm.params)
            ctx = StrategyContext(task=plan.decision.task, params=params, caller=caller, bucket_stats=stats,
                                  output_caps=plan.output_caps)
            try:
                return await run_arm(arm, req.body, ctx)
            except UpstreamError as exc:
                last = exc
                if exc.about_request or caller.out_of_time():
                    break
        assert last is not None
        raise upstream_to_api_error(last, caller.retry_after_s() if last.status in (429, 503) else None)

    # -- record ---------------------------------------------------------------------------------
    def record(self, plan: Plan, calls: list[CallRecord], *, status: int, result: StrategyResult | None = None,
               error: str | None = None, served: Arm | None = None) -> Event:
        """`served`: the arm that answered where no result says so (a relayed stream's fallback)."""
        decision = plan.decision
        arm = result.arm if result else served or decision.arm
        event = Event(
            request_id=plan.request_id,
            ts=plan.ts,
            key_id=plan.principal.key_id,
            policy=decision.policy,
            alias=plan.alias,
            task=decision.task,
            task_probs=decision.task_probs,
            difficulty=decision.difficulty,
            arm=arm.key,
            strategy=arm.strategy,
            effort=arm.effort,
            n=arm.n,
            explore=decision.explore,
            reasons=list(decision.reasons),
            candidates=[_candidate_dict(c) for c in decision.candidates],
            calls=[c.as_dict() for c in calls],
            prompt_tokens=sum(c.prompt_tokens for c in calls),
            completion_tokens=sum(c.completion_tokens for c in calls),
            reasoning_tokens=sum(c.reasoning_tokens for c in calls),
            cost_usd=sum(c.cost_usd for c in calls),
            # what the cost model expected of this answer: the learner's cost ratio compares the two
            estimated_cost_usd=(plan.policy.estimated_cost_usd(arm.key, plan.prompt_tokens, plan.max_output_tokens,
                                                               plan.choices)
                                if calls else 0.0) if plan.policy is not None and decision.policy != "direct" else None,
            estimated_prompt_tokens=plan.prompt_tokens,
            latency_ms=(time.perf_counter() - plan.started) * 1000,
            status=status,
            error=error,
            success=result.confidence if result and result.confidence_source in ("vote", "verifier") else None,
            success_source=result.confidence_source if result and result.confidence_source in ("vote", "verifier")
            else None,
            details=result.details if result else {},
        )
        if self.store is not None:
            self.store.record(event)
        self.metrics.observe(event)
        return event

    def budget_limits(self, principal: Principal) -> dict[str, float]:
        """USD caps per period for this key: its own, else the default policy's caps for keys. Always
        the default policy's: a client picking another policy (x-ponder-policy) does not pick its budget."""
        limits = dict(principal.budgets)
        if self.policies is not None:
            budgets = self.policies.default.policy.budgets
            for period, cap in (("day", budgets.per_key_daily_usd), ("month", budgets.per_key_monthly_usd)):
                if cap is not None and period not in limits:
                    limits[period] = cap
        return limits

    async def _budget_left(self, principal: Principal) -> dict[str, float] | None:
        """What the key may still spend in each period it has a cap for (the decision takes the lowest,
        so it can degrade in time). One store read, only for keys that have a budget."""
        limits = self.budget_limits(principal)
        if not limits or self.store is None:
            return None
        try:
            spent = await self.store.spent(principal.key_id, tuple(limits))
        except Exception:  # the store being away must not refuse service: reserve() still guards
            log.warning("could not read spend for %s; deciding without the remaining budget", principal.key_id)
            return None
        return {period: cap - spent.get(period, 0.0) for period, cap in limits.items()}

    def has_budget(self, principal: Principal) -> bool:
        """Whether the key's requests are held against a budget (reserve_budget holds them)."""
        return bool(self.budget_limits(principal)) and self.store is not None

    async def reserve_budget(self, plan: Plan, req: ChatRequest) -> Reservation | None:
        """Hold the request's worst case against the key's budgets (atomic across replicas)."""
        limits = self.budget_limits(plan.principal)
        if not limits or self.store is None:
            return None
        key_id = plan.principal.key_id
        try:
            reservation = await self.store.reserve(key_id, plan.reserve_usd(), limits)
        except BudgetExceeded as exc:
            for period, limit, spent in exc.failures:
                if exc.amount > limit > spent:  # waiting cannot help: the worst case is over the whole cap
                    raise ApiError(400, f"This request may cost up to ${exc.amount:.6f}, more than this key's whole "
                                        f"{period} budget (${limit:.6f}); "
                                        f"{self._what_fits(plan, req, limit, 'in that budget')}.",
                                   code="over_budget_cap") from None
            left = min(limit - spent for _period, limit, spent in exc.failures)
            held = self._held_usd.get(key_id, 0.0)
            waited_for = _spent_out({period: limit - spent for period, limit, spent in exc.failures}, exc.amount, held)
            if not waited_for:
                raise _budget_held(exc.period, held, self._what_fits(plan, req, left, "now", only_if_fits=True)) \
                    from None
            binding = exceeded([failure for failure in exc.failures if failure[0] in waited_for], exc.amount,
                               time.time())  # of the periods worth waiting for, the one that frees it last
            advice = self._what_fits(plan, req, left, "in what is left", only_if_fits=True)
            raise ApiError(429, f"Budget exhausted for this key: {binding}" + (f"; {advice}." if advice else "."),
                           code="budget_exhausted", headers=_retry_at_reset(binding.period)) from None
        if reservation.mode != "none":
            self._held_usd[key_id] = self._held_usd.get(key_id, 0.0) + reservation.amount_usd
        return reservation

    def _what_fits(self, plan: Plan, req: ChatRequest, usd: float, where: str, *, only_if_fits: bool = False) -> str:
        """What a client whose request's worst case does not fit `usd` can send instead: a lower
        max_tokens, and the most that fits (`where` it fits). What the request held without one is said
        (the backend's maximum output, or the default length the gateway sends as the limit), since a
        client that sent none cannot guess it. "" with `only_if_fits` when no max_tokens would fit."""
        arms = plan.arms()
        most = self.affordable_max_tokens(arms, req, plan.held_prompt_tokens, usd, capped=plan.capped)
        if only_if_fits and not most:
            return ""
        costliest = max(arms, key=lambda arm: self.worst_case_usd(arm, req, plan.held_prompt_tokens,
                                                                  capped=plan.capped))
        backend = self.backends.get(costliest.backend)
        bound = output_bound(backend, req.max_output_tokens, capped=plan.capped) if backend is not None else None
        advice = _held_without_max_tokens(bound, costliest.backend)
        if most is None:
            return advice
        if most == 0:
            return advice + " and a shorter prompt: its prompts alone may cost more than that"
        return advice + f" (at most {most:,} fits {where})"

    async def settle_budget(self, reservation: Reservation, actual_usd: float) -> None:
        """Charge a request's actual cost in place of its hold (settling twice changes nothing)."""
        if reservation.settled or reservation.mode == "none":
            return
        left = self._held_usd.get(reservation.key_id, 0.0) - reservation.amount_usd
        if left > 1e-12:
            self._held_usd[reservation.key_id] = left
        else:
            self._held_usd.pop(reservation.key_id, None)
        if self.store is not None:
            await self.store.settle(reservation, actual_usd)


class InFlight:
    """A count of things under way, and a wait for none to be left."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self) -> None:
        self.count += 1
        self._idle.clear()

    def done(self) -> None:
        self.count = max(0, self.count - 1)
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


def configured_backends(config: GatewayConfig) -> list[BackendSpec]:
    """The backends a gateway with this config offers its policies: the config's, and the managed local
    model's `local` unless the config declares its own (as start() declares them, without starting it)."""
    specs = list(config.backends)
    if config.local_model.enabled and not any(s.name == LOCAL_BACKEND_NAME for s in specs):
        specs.append(LocalModelServer(config.local_model).backend_spec())
    return specs


def configured_policies(config: GatewayConfig) -> PolicySet:
    """The policies a gateway with this config serves, loaded as it loads them (its backends and the
    local model's declared), without starting anything. Raises PolicyError."""
    return PolicySet(config.policy, config.extra_policies, configured_backends(config))


def _spent_out(left_by_period: dict[str, float], need_usd: float, held_usd: float) -> list[str]:
    """The periods with less left than `need_usd` even once this process's holds in flight (`held_usd`)
    are returned: the ones worth waiting for. None: only the holds stand in the way (`_budget_held`)."""
    return [period for period, left in left_by_period.items() if left + held_usd < need_usd]


def _held_without_max_tokens(bound: OutputBound | None, backend: str) -> str:
    """The advice to send a (lower) max_tokens, saying what a request without one held per call."""
    if bound is None or bound.source == "max_tokens":
        return "send a lower max_tokens"
    if bound.source == "backend":
        return f"without max_tokens each call holds {backend}'s maximum output ({bound.tokens:,} tokens); " \
               "send max_tokens"
    sent = " and is sent that as its max_tokens" if bound.sent else ""
    return f"without max_tokens each call holds {bound.tokens:,} tokens{sent} ({backend}'s maximum output is " \
           "unknown); send max_tokens"  # the client sent none: there is no lower one to send


def _backends_of(arms: tuple[Arm, ...]):
    """The backends these arms send the client's body to: each arm's, and its cascade stages'."""
    for arm in arms:
        yield arm.backend
        yield from _backends_of(arm.stages)


def _budget_held(period: str | None, held_usd: float, advice: str = "") -> ApiError:
    """429 for a key whose budget only this process's requests in flight stand in the way of: their holds
    (each request's worst case) mostly come back when they settle, so worth retrying in a moment, not at
    the period's end. When they do not (answers as long as their max_tokens), the retry is told
    `budget_exhausted`: one extra round trip, where the other mistake would send a client away until
    midnight with money left."""
    return ApiError(429, f"This key's {period} budget is held by its requests in flight (${held_usd:.6f} "
                         f"held); retry shortly{f', or: {advice}' if advice else ''}.", code="budget_held",
                    headers=retry_after(1.0))


def _retry_at_reset(period: str | None) -> dict[str, str]:
    """Retry-After for a spent budget: when its period starts anew (none for a lifetime budget). And
    `x-should-retry: false`, which the OpenAI SDKs honour: their own retries (a second or two apart,
    since they ignore a Retry-After of hours) would only be refused again."""
    return {**retry_after(seconds_until_reset(period, time.time()) if period else 3600.0), "x-should-retry": "false"}


def _held_prompt_tokens(req: ChatRequest, hints: RequestHints, capped: bool) -> int | None:
    """The request's prompt counted as its worst case counts it (prompt_counter): the bytes bound for a
    key with a budget, else the estimate the hints already made."""
    return prompt_tokens_bound(req.messages, req.body) if capped else hints.prompt_tokens


def prompt_counter(capped: bool) -> Callable[..., int]:
    """How a request's prompts are counted for its worst case: for a key with a budget, whose hold must
    be a bound, by their bytes (`prompt_tokens_bound`); else by the estimate the decision prices with."""
    return prompt_tokens_bound if capped else estimate_prompt_tokens


def _candidate_dict(candidate: Any) -> dict[str, Any]:
    return {
        "arm": candidate.arm.key,
        "expected_accuracy": round(candidate.expected_accuracy, 4),
        "expected_cost_usd": candidate.expected_cost_usd,
        "expected_latency_ms": round(candidate.expected_latency_ms, 1),
        "utility": round(candidate.utility, 6),
        "excluded": candidate.excluded,
    }
