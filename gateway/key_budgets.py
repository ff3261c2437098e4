"""Per-key budgets: each key's caps, what it has left, and the hold each request puts on them.

A request holds its worst case (gateway/cost_bounds.py) against its key's budgets before any backend
is called, atomically across replicas (the store), and settles to what it actually cost when it ends.
Refusals say why and what to send instead, in the OpenAI error schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.auth import Principal
from gateway.cost_bounds import affordable_max_tokens, held_without_max_tokens, worst_case_usd
from gateway.errors import NO_CLIENT_RETRY, ApiError, retry_after
from gateway.policy_watch import PolicySet
from gateway.schemas import ChatRequest
from gateway.strategies import output_bound
from router.decide import BudgetExhausted
from telemetry.budgets import Reservation, exceeded, latest_reset, seconds_until_reset
from telemetry.store import BudgetExceeded, Store

if TYPE_CHECKING:
    from gateway.service import Plan

log = logging.getLogger("ponder.gateway")


class KeyBudgets:
    """The budgets of every key, as this process enforces them. `store` and `policies` are the gateway's
    (set when it starts)."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.policies: PolicySet | None = None
        self.held_usd: dict[str, float] = {}  # key id -> this process's holds not yet settled

    def limits(self, principal: Principal) -> dict[str, float]:
        """USD caps per period for this key: its own, else the default policy's caps for keys. Always
        the default policy's: a client picking another policy (x-ponder-policy) does not pick its budget."""
        limits = dict(principal.budgets)
        if self.policies is not None:
            budgets = self.policies.default.policy.budgets
            for period, cap in (("day", budgets.per_key_daily_usd), ("month", budgets.per_key_monthly_usd)):
                if cap is not None and period not in limits:
                    limits[period] = cap
        return limits

    def applies_to(self, principal: Principal) -> bool:
        """Whether the key's requests are held against a budget (`reserve` holds them)."""
        return bool(self.limits(principal)) and self.store is not None

    async def left(self, principal: Principal) -> dict[str, float] | None:
        """What the key may still spend in each period it has a cap for (the decision takes the lowest,
        so it can degrade in time). One store read, only for keys that have a budget."""
        limits = self.limits(principal)
        if not limits or self.store is None:
            return None
        try:
            spent = await self.store.spent(principal.key_id, tuple(limits))
        except Exception:  # the store being away must not refuse service: reserve() still guards
            log.warning("could not read spend for %s; deciding without the remaining budget", principal.key_id)
            return None
        return {period: cap - spent.get(period, 0.0) for period, cap in limits.items()}

    def refusal(self, exc: BudgetExhausted, left_by_period: dict[str, float], principal: Principal) -> ApiError:
        """The error for a request the decision found no arm for within the key's budget."""
        # The periods with less left than the cheapest arm costs (than nothing, when that is unknown);
        # the one to wait for is the one that resets last.
        need = exc.cheapest_usd if exc.cheapest_usd is not None else 1e-9
        limits = self.limits(principal)
        # Money left, but the cheapest arm costs more than the period's whole cap: waiting cannot help (as
        # in reserve). A key with nothing left is out of money, as OpenAI's 429 insufficient_quota is.
        whole = [period for period, left in left_by_period.items()
                 if left > 0 and period in limits and need > limits[period]]  # (a reload may drop a cap meanwhile)
        if whole:
            return ApiError(400, f"{exc}. Even the cheapest arm may cost ${need:.6f}, more than this key's whole "
                                 f"{whole[0]} budget (${limits[whole[0]]:.6f}); send a lower max_tokens.",
                            code="over_budget_cap")
        short = [period for period, left in left_by_period.items() if left < need]
        period = latest_reset(short, time.time()) if short else min(left_by_period, key=left_by_period.__getitem__)
        held = self.held_usd.get(principal.key_id, 0.0)
        if held > 0 and short and not _spent_out(left_by_period, need, held):
            return _budget_held(period, held)
        return ApiError(429, str(exc), code="budget_exhausted", headers=_retry_at_reset(period))

    async def reserve(self, plan: Plan, req: ChatRequest) -> Reservation | None:
        """Hold the request's worst case against the key's budgets (atomic across replicas)."""
        def what_fits(usd: float, where: str, only_if_fits: bool) -> str:
            return self._what_fits(plan, req, usd, where, only_if_fits=only_if_fits)

        return await self.hold(plan.principal, plan.reserve_usd(), what_fits)

    async def hold(self, principal: Principal, amount_usd: float,
                   what_fits: Callable[[float, str, bool], str]) -> Reservation | None:
        """Hold `amount_usd`, a request's worst case, against the key's budgets (atomic across replicas).
        `what_fits(usd, where, only_if_fits)`: what the client could send instead that costs at most
        `usd` (see _what_fits), for the refusal's message."""
        limits = self.limits(principal)
        if not limits or self.store is None:
            return None
        key_id = principal.key_id
        try:
            reservation = await self.store.reserve(key_id, amount_usd, limits)
        except BudgetExceeded as exc:
            for period, limit, spent in exc.failures:
                if exc.amount > limit > spent:  # waiting cannot help: the worst case is over the whole cap
                    raise ApiError(400, f"This request may cost up to ${exc.amount:.6f}, more than this key's whole "
                                        f"{period} budget (${limit:.6f}); "
                                        f"{what_fits(limit, 'in that budget', False)}.",
                                   code="over_budget_cap") from None
            left = min(limit - spent for _period, limit, spent in exc.failures)
            held = self.held_usd.get(key_id, 0.0)
            waited_for = _spent_out({period: limit - spent for period, limit, spent in exc.failures}, exc.amount, held)
            if not waited_for:
                raise _budget_held(exc.period, held, what_fits(left, "now", True)) from None
            binding = exceeded([failure for failure in exc.failures if failure[0] in waited_for], exc.amount,
                               time.time())  # of the periods worth waiting for, the one that frees it last
            advice = what_fits(left, "in what is left", True)
            raise ApiError(429, f"Budget exhausted for this key: {binding}" + (f"; {advice}." if advice else "."),
                           code="budget_exhausted", headers=_retry_at_reset(binding.period)) from None
        if reservation.mode != "none":
            self.held_usd[key_id] = self.held_usd.get(key_id, 0.0) + reservation.amount_usd
        return reservation

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Charge a request's actual cost in place of its hold (settling twice changes nothing)."""
        if reservation.settled or reservation.mode == "none":
            return
        left = self.held_usd.get(reservation.key_id, 0.0) - reservation.amount_usd
        if left > 1e-12:
            self.held_usd[reservation.key_id] = left
        else:
            self.held_usd.pop(reservation.key_id, None)
        if self.store is not None:
            await self.store.settle(reservation, actual_usd)

    def _what_fits(self, plan: Plan, req: ChatRequest, usd: float, where: str, *, only_if_fits: bool = False) -> str:
        """What a client whose request's worst case does not fit `usd` can send instead: a lower
        max_tokens, and the most that fits (`where` it fits). What the request held without one is said
        (the backend's maximum output, or the default length the gateway sends as the limit), since a
        client that sent none cannot guess it. "" with `only_if_fits` when no max_tokens would fit."""
        backends = plan.backends  # the request's, as its worst case was priced with them
        arms = plan.arms()
        most = affordable_max_tokens(backends, arms, req, plan.held_prompt_tokens, usd, capped=plan.capped)
        if only_if_fits and not most:
            return ""
        costliest = max(arms, key=lambda arm: worst_case_usd(backends, arm, req, plan.held_prompt_tokens,
                                                             capped=plan.capped))
        backend = backends.get(costliest.backend)
        bound = output_bound(backend, req.max_output_tokens, capped=plan.capped) if backend is not None else None
        advice = held_without_max_tokens(bound, costliest.backend)
        if most is None:
            return advice
        if most == 0:
            return advice + " and a shorter prompt: its prompts alone may cost more than that"
        return advice + f" (at most {most:,} fits {where})"


def _spent_out(left_by_period: dict[str, float], need_usd: float, held_usd: float) -> list[str]:
    """The periods with less left than `need_usd` even once this process's holds in flight (`held_usd`)
    are returned: the ones worth waiting for. Empty: only the holds stand in the way (`_budget_held`)."""
    return [period for period, left in left_by_period.items() if left + held_usd < need_usd]


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
    return {**retry_after(seconds_until_reset(period, time.time()) if period else 3600.0), **NO_CLIENT_RETRY}
