"""The gateway's state and its three steps per request: plan (router), execute (strategies), record.

Built once at startup (`Gateway.start`) and shared by every request; `gateway/request_path.py` and
`gateway/app.py` hold the HTTP handlers that call into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth import KeyRing, Principal
from gateway.backends import Backend, UpstreamError
from gateway.calls import ArmSpan, Caller, upstream_to_api_error
from gateway.config import LOCAL_BACKEND_NAME, ConfigError, GatewayConfig
from gateway.cost_bounds import (
    arms_within, backends_of, held_prompt_tokens, plan_worst_case_usd, with_output_caps,
)
from gateway.effort import effective_effort
from gateway.errors import ApiError
from gateway.key_budgets import KeyBudgets
from gateway.key_limits import KeyLimits
from gateway.litellm_calls import import_litellm
from gateway.local_model import LocalModelError, LocalModelServer, check_local_model
from gateway.metrics import Metrics
from gateway.policy_watch import PolicySet
from gateway.schemas import ChatRequest
from gateway.strategies import StrategyContext, StrategyResult, run_arm
from gateway.usage import CallRecord
from policies.backends import BackendSpec
from policies.schema import PolicyError
from router.candidates import ContextTooLong, context_message
from router.classifier import Classifier, ClassifierError
from router.decide import BudgetExhausted, decide
from router.estimates import CompiledPolicy, exceeds_context
from router.request_hints import InvalidHint, RequestHints
from router.types import Arm, Classification, Decision
from telemetry.embedded_store import check_data_dir
from telemetry.events import Event
from telemetry.store import Store, open_store

log = logging.getLogger("ponder.gateway")
DIRECT_SAMPLES = 5  # samples when a client asks a named backend for a multi-sample strategy
CLOSE_WAIT_S = 5.0  # at shutdown, how long the store waits for requests still settling


@dataclass
class Plan:
    """What the gateway will do for one request, decided before any backend is called."""

    request_id: str
    decision: Decision
    policy: CompiledPolicy | None
    principal: Principal
    alias: str
    backends: dict[str, Backend]  # those on offer when it was planned: its calls use them (Gateway.caller)
    # what the request may cost at most (cost_bounds.plan_worst_case_usd), where a budget holds it (`capped`):
    # a routed request of a key without one is not priced so (a named backend's is: its cost caps read it)
    worst_cost_usd: float = 0.0
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

    def explored(self, answered: Arm) -> bool:
        """Whether the request explored: the arm the exploration drew answered it. A fallback answering
        for it (the greedy arm, mostly) explored nothing, as an explored arm that gives way to the budget
        (cost_bounds.arms_within)."""
        return self.decision.explore and answered == self.decision.arm

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
        self._policy_reload = asyncio.Lock()  # a reload reads in a thread, then swaps in: one at a time
        self._rng = random.Random()
        self._configured: set[str] = set()  # backends of the gateway config (policies' inline ones may not replace them)
        self.unsettled = InFlight()  # requests planned and not yet settled (recorded, hold released)
        self.budgets = KeyBudgets()
        self.started_at = time.time()
        self.metrics = Metrics(store_health=lambda: self.store.health() if self.store else None,
                               policy_rejections=self._policy_rejections)
        self.key_limits = KeyLimits(config.api_keys, self.metrics)

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
        if not config.telemetry.redis_url:  # with Redis it only journals budget changes, made when needed
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
        self._log_policy_warnings()
        await self._import_litellm_if_used()
        self.store = await open_store(
            self.config.telemetry.redis_url, Path(self.config.telemetry.data_dir),
            refresh_s=self.config.telemetry.refresh_s, decay_half_life_s=self.learner_half_life_s(),
            feedback_window_s=self.config.telemetry.feedback_window_s,
            stream_maxlen=self.config.telemetry.stream_maxlen,
        )
        self.budgets.store, self.budgets.policies = self.store, self.policies
        if self.local_model is not None:
            await self.local_model.start()
            # Calls that failed while it was down cooled its backend down; ready again means serving
            # again, not a 503 for as long as the cool-down had left to run.
            local = self.backends[LOCAL_BACKEND_NAME]
            self._tasks.append(asyncio.create_task(self.local_model.watch(on_back=lambda: _back(local))))
        self._tasks.append(asyncio.create_task(self._watch_policies()))
        # `kill -HUP` (systemd's ExecReload) re-reads the policies now; without a handler it killed the
        # gateway on the spot, its requests in flight unanswered and their budget holds unsettled.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals: not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_on_signal)

    def learner_half_life_s(self) -> float | None:
        """How fast outcomes fade in the store: the default policy's `learner.half_life_hours` (one store
        serves every policy, so one setting applies)."""
        assert self.policies is not None
        hours = self.policies.default.policy.learner.half_life_hours
        return hours * 3600.0 if hours else None

    async def _watch_policies(self, interval_s: float = 1.0) -> None:
        """Every second: the policy files that changed are reloaded, and an edit of the gateway config
        file (read at start only) is said once, at WARNING (gateway/config_watch.py)."""
        config_file = self.config.file_watch
        while True:
            await asyncio.sleep(interval_s)
            await self._reload_policies_logged()
            if config_file is not None:
                config_file.check()

    async def _reload_policies_logged(self, *, force: bool = False) -> None:
        """A reload that fails unexpectedly is logged, and the next poll tries again: raised out of the
        watcher task it ended the task unseen, and no edit was reloaded after (nor a SIGHUP's said)."""
        try:
            await self._reload_policies(force=force)
        except Exception:
            log.exception("policy reload failed; the policies serving keep serving, the next poll tries again")

    async def _reload_policies(self, *, force: bool = False) -> None:
        """Reload the policy files that changed (`force`: every file), and serve what they now declare."""
        assert self.policies is not None
        # Read and compiled in a thread (a big policy took ~50 ms, every request stalled meanwhile), then
        # swapped in here on the loop at once; one reload at a time (the poll, a SIGHUP).
        async with self._policy_reload:
            pending = await asyncio.to_thread(self.policies.read_changed, force=force)
            if self.policies.swap_in(pending):
                self._serve_inline_backends()
                self._log_policy_warnings()
                await self._import_litellm_if_used()
                if self.store is not None:
                    self.store.half_life_s = self.learner_half_life_s()

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: re-reading the policy files (the gateway config is read at start only)")
        task = asyncio.create_task(self._reload_policies_logged(force=True))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)  # ended: nothing left to cancel at close (no list growing per signal)

    def _log_policy_warnings(self) -> None:
        """Said once at startup and at each reload that leaves it so (PolicySet.warnings)."""
        assert self.policies is not None
        for warning in self.policies.warnings():
            log.warning("%s", warning)

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
        if any(backend.needs_litellm for backend in self.backends.values()):
            await asyncio.to_thread(import_litellm)

    async def close(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
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
        request_id = f"{id_prefix}{secrets.token_hex(16)}"  # 32 hex digits as uuid4().hex, no UUID built
        started = time.perf_counter()
        # One map for the whole request: a policy reload during its awaits (the budget read and hold)
        # replaces self.backends, and may drop a backend the request was planned on.
        backends = self.backends
        classification = self.classify(req)
        classified = time.perf_counter()
        policy = self._policy_for(headers)
        try:
            hints = RequestHints.from_request(req, headers, policy)
        except InvalidHint as exc:
            raise ApiError(400, str(exc), param=exc.header, code="invalid_header") from None
        if req.model in backends:
            if not policy.allows_override("direct_backend"):
                raise ApiError(404, f"The model {req.model!r} is a backend, and policy `{policy.name}` routes only "
                                    "its aliases (overrides.direct_backend: false); GET /v1/models lists them.",
                               param="model", code="model_not_found")
            backend = backends[req.model]
            if exceeds_context(hints.prompt_tokens or 0, backend.max_context):
                raise ApiError(400, context_message(hints.prompt_tokens or 0, backend.max_context), param="messages",
                               code="context_length_exceeded")
            decision = self._direct(req, headers, classification, policy, backends[req.model])
            capped = self.budgets.applies_to(principal)
            held = held_prompt_tokens(req, hints, capped)
            worst = plan_worst_case_usd(backends, decision, req, held, capped=capped)
            # the request's own cost cap prices the prompt as routed requests are priced (the estimate):
            # the bytes bound is for the key's budget, and would refuse a budgeted key what it lets others do
            self._check_direct_cost(worst if not capped else
                                    plan_worst_case_usd(backends, decision, req, hints.prompt_tokens,
                                                        capped=True),
                                    hints, policy)
            decision, caps = with_output_caps(backends, decision, req, capped, hints.prompt_tokens or 0)
            return Plan(request_id, decision, policy, principal, req.model, backends, worst_cost_usd=worst,
                        prompt_tokens=hints.prompt_tokens or 0, held_prompt_tokens=held,
                        max_output_tokens=req.max_output_tokens,
                        choices=req.n, capped=capped, output_caps=caps, classify_s=classified - started,
                        decide_s=time.perf_counter() - classified)
        if req.model not in policy.aliases:
            raise ApiError(404, f"The model {req.model!r} does not exist; GET /v1/models lists the models "
                                "and routed aliases.", param="model", code="model_not_found")
        assert self.store is not None
        left_by_period = await self.budgets.left(principal)
        budget_left = min(left_by_period.values()) if left_by_period else None
        try:
            decision = decide(classification, policy, self.store.snapshot(policy.policy.name), alias=req.model,
                              request=hints, budget_left_usd=budget_left, rng=self._rng,
                              cooling=cooling_backends(backends))
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except BudgetExhausted as exc:
            if exc.scope == "request":  # the request's own cost cap: asking again will not help
                raise ApiError(400, str(exc), code="over_cost_limit") from None
            assert left_by_period  # a key's budget refused it: the key has one
            raise self.budgets.refusal(exc, left_by_period, principal) from None
        capped = self.budgets.applies_to(principal)
        held = held_prompt_tokens(req, hints, capped)
        if budget_left is not None:
            decision = arms_within(backends, decision, req, held, budget_left)
        decision, caps = with_output_caps(backends, decision, req, capped, hints.prompt_tokens or 0)
        # only a key with a budget holds the worst case (KeyBudgets.reserve): not priced for the others
        worst = plan_worst_case_usd(backends, decision, req, held, capped=True) if capped else 0.0
        return Plan(request_id, decision, policy, principal, req.model, backends, worst_cost_usd=worst,
                    prompt_tokens=hints.prompt_tokens or 0, held_prompt_tokens=held,
                    max_output_tokens=req.max_output_tokens, choices=req.n, capped=capped, output_caps=caps,
                    classify_s=classified - started, decide_s=time.perf_counter() - classified)

    def _direct(self, req: ChatRequest, headers: Any, classification: Classification,
                policy: CompiledPolicy, backend: Backend) -> Decision:
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
        effort = effective_effort(backend.spec, req.reasoning_effort)  # what is sent, not asked
        arm = Arm(backend=req.model, strategy=strategy, effort=effort, n=n)
        return Decision(arm=arm, task=classification.task, difficulty=classification.difficulty,
                        task_probs=classification.task_probs, policy="direct", rule="direct", reasons=tuple(reasons))

    @staticmethod
    def _check_direct_cost(worst_usd: float, hints: RequestHints, policy: CompiledPolicy,
                           advice: str = "send a lower max_tokens or a shorter prompt") -> None:
        """A named backend skips the decision, not the request's cost caps (budgets.per_request_usd,
        x-ponder-max-cost-usd where the policy honours it): with no arms to choose from, the caps
        bound the call's worst case (max_tokens, else a default output length per call)."""
        caps = [(policy.policy.budgets.per_request_usd, "budgets.per_request_usd")]
        if policy.allows_override("max_cost"):
            caps.append((hints.max_cost_usd, "x-ponder-max-cost-usd"))
        for cap, why in caps:
            if cap is not None and worst_usd > cap:
                raise ApiError(400, f"This request may cost up to ${worst_usd:.6f}, over its cost cap (${cap:.6f}, "
                                    f"{why}); {advice}.", code="over_cost_limit")

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
    def caller(self, backends: dict[str, Backend]) -> Caller:
        """`backends`: the request's (Plan.backends), not those on offer now: a reload since may have
        dropped the one it was planned on."""
        return Caller(backends, time.monotonic() + self.config.request_timeout_s)

    async def execute(self, plan: Plan, req: ChatRequest, caller: Caller,
                      arms: list[Arm] | None = None) -> StrategyResult:
        """Run the decided arm; on a backend failure fall back through the decision's other arms
        (`arms`: the ones left to try, when a relayed stream's arms failed before them)."""
        last: UpstreamError | None = None
        arms = plan.arms() if arms is None else arms
        # An answer with fewer choices than the client's `n` (its backend failed the samples drawn again
        # too): an app reads choices[n - 1], so the next arm is asked for all n, and this answer is kept
        # in case none can. Not for a key with a budget: its hold bounds one arm's answers, not two.
        short: tuple[StrategyResult, ArmSpan] | None = None
        # the learner's stats of the request's bucket, for strategies that gate on them (one lookup)
        stats = self.store.snapshot(plan.decision.policy).get(plan.decision.bucket, {}) if self.store else {}
        for index, arm in enumerate(arms):
            if caller.passes_over(arms, index, tried=last is not None):
                # cooling down: skipped at once rather than waited on; the last one is called (and
                # refuses at once, 503 with Retry-After) only when no other was, so that an arm that
                # did fail before it is the error the client gets
                continue
            params = dict(arm.params)
            ctx = StrategyContext(task=plan.decision.task, params=params, caller=caller, bucket_stats=stats,
                                  output_caps=plan.output_caps)
            caller.start_arm()
            try:
                result = await run_arm(arm, req.body, ctx)
            except UpstreamError as exc:
                last = exc
                if exc.about_request or caller.out_of_time():
                    break
                continue
            choices = len(result.response["choices"])
            if choices >= req.n or plan.capped:
                return result
            if short is None or choices > len(short[0].response["choices"]):
                short = result, caller.arm_done()
        if short is not None:  # its arm is charged its own calls and time, not the later arms' failures
            result, caller.arm = short
            return result
        assert last is not None
        raise upstream_to_api_error(last, caller.retry_after_s(backends_of(arms))
                                    if last.status in (429, 503) else None)

    # -- record ---------------------------------------------------------------------------------
    def record(self, plan: Plan, calls: list[CallRecord], *, status: int, result: StrategyResult | None = None,
               error: str | None = None, served: Arm | None = None, arm_span: ArmSpan | None = None) -> Event:
        """`served`: the arm that answered where no result says so (a relayed stream's fallback).
        `arm_span`: where the answering arm's own calls lie in `calls`, and when it ran (Caller.arm)."""
        decision = plan.decision
        ended = time.perf_counter()
        # other arms called besides the one that answered (failed before it, or tried after its answer
        # fell short of n): its own cost and time are what the learner reads
        answered = result is not None or served is not None
        own = arm_span if arm_span is not None and not arm_span.alone and answered else None
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
            explore=plan.explored(arm),
            reasons=list(decision.reasons),
            candidates=[_candidate_dict(c) for c in decision.candidates],
            calls=[c.as_dict() for c in calls],
            prompt_tokens=sum(c.prompt_tokens for c in calls),
            completion_tokens=sum(c.completion_tokens for c in calls),
            reasoning_tokens=sum(c.reasoning_tokens for c in calls),
            cost_usd=sum(c.cost_usd for c in calls),
            arm_cost_usd=sum(c.cost_usd for c in calls[own.calls_from:own.calls_until]) if own else None,
            # what the cost model expected of this answer: the learner's cost ratio compares the two
            estimated_cost_usd=(plan.policy.estimated_cost_usd(arm.key, plan.prompt_tokens, plan.max_output_tokens,
                                                               plan.choices)
                                if calls else 0.0) if plan.policy is not None and decision.policy != "direct" else None,
            estimated_prompt_tokens=plan.prompt_tokens,
            max_output_tokens=plan.max_output_tokens,
            choices=plan.choices,
            latency_ms=(ended - plan.started) * 1000,
            arm_latency_ms=((ended if own.ended is None else own.ended) - own.started) * 1000 if own else None,
            status=status,
            error=error,
            success=result.confidence if result and result.confidence_source in ("vote", "verifier") else None,
            success_source=result.confidence_source if result and result.confidence_source in ("vote", "verifier")
            else None,
            details=result.details if result else {},
        )
        self.publish(event)
        return event

    def publish(self, event: Event) -> None:
        """An event into the store (learned stats, spend rollups, the dashboard) and the metrics."""
        if self.store is not None:
            self.store.record(event)
        self.metrics.observe(event)

    # -- embeddings: a pass-through to the backend the client names ---------------------------
    def embedding_backend(self, model: str, headers: Any) -> Backend:
        """The backend an embeddings request names as `model`. An embedding has no effort and no
        strategy, so nothing is routed: an alias is refused, and so is every backend where the policy
        routes only its aliases (overrides.direct_backend: false), as for chat."""
        policy = self._policy_for(headers)
        if model in self.backends:
            if not policy.allows_override("direct_backend"):
                raise ApiError(404, f"The model {model!r} is a backend, and policy `{policy.name}` routes only "
                                    "its aliases (overrides.direct_backend: false); embeddings need a backend by name.",
                               param="model", code="model_not_found")
            return self.backends[model]
        if model in policy.aliases:
            raise ApiError(400, f"The model {model!r} is a routed alias, and embeddings are not routed: name an "
                                "embedding model's backend as `model` (GET /v1/models lists the backends).",
                           param="model", code="invalid_model")
        raise ApiError(404, f"The model {model!r} does not exist; embeddings need a configured backend's name "
                            "(GET /v1/models lists them).", param="model", code="model_not_found")

    def check_embedding_cost(self, estimated_usd: float, headers: Any) -> None:
        """An embeddings request names its backend, and is held to the request's cost caps as a chat
        request naming one is (budgets.per_request_usd, x-ponder-max-cost-usd where honoured), its input
        priced at the estimate, as a chat prompt is: it went through whatever its size and cost."""
        policy = self._policy_for(headers)
        try:
            hints = RequestHints.from_request(None, headers, policy)
        except InvalidHint as exc:
            raise ApiError(400, str(exc), param=exc.header, code="invalid_header") from None
        self._check_direct_cost(estimated_usd, hints, policy, advice="send fewer or shorter inputs")



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


def cooling_backends(backends: dict[str, Backend]) -> frozenset[str]:
    """The backends cooling down after failures now, or being tested by a call since (in_doubt): the
    decision plans their arms last."""
    now = time.monotonic()
    return frozenset(name for name, backend in backends.items() if backend.health.in_doubt(now))


def _back(backend: Backend) -> None:
    """A restarted local model serves again: chat and embeddings alike, not after their cool-downs."""
    backend.health.restarted()
    backend.for_embeddings.health.restarted()


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


def _candidate_dict(candidate: Any) -> dict[str, Any]:
    return {
        "arm": candidate.arm.key,
        "expected_accuracy": round(candidate.expected_accuracy, 4),
        "expected_cost_usd": candidate.expected_cost_usd,
        "expected_latency_ms": round(candidate.expected_latency_ms, 1),
        "utility": round(candidate.utility, 6),
        "excluded": candidate.excluded,
    }
