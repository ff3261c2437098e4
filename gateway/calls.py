"""Calling backends under one request's rules: bounded attempts, cool-downs, fallbacks, deadline.

Every upstream call of a request goes through `Caller`, so the request's deadline and its
disconnect are honoured in one place and every attempt, failed or not, is accounted for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.backends import Admission, Backend, UpstreamError
from gateway.errors import NO_CLIENT_RETRY, ApiError, retry_after
from gateway.usage import NO_CHOICES, CallRecord, Usage
from router.estimates import estimate_input_tokens, estimate_prompt_tokens
from router.types import Arm

MIN_CALL_S = 0.01  # less time than this left: a call is not started (see Caller.out_of_time)
# A call the request's deadline cut off is the backend's fault (a timeout, see Caller.deadline_reached)
# only if it had the backend for at least this share of the request's time.
SLOW_CALL_SHARE = 0.5
CLIENT_LEFT = "the client left (or the server stopped) before the answer"
CANCELLED_QUEUED = "cancelled while queued for a free slot: never sent"
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 1.0
OUT_OF_FILES_LOG_EVERY_S = 10.0  # the gateway running out of descriptors is logged at most this often
_request_ids = itertools.count()
log = logging.getLogger("ponder.calls")
_out_of_files_logged = float("-inf")
# One attempt of a call: Backend.complete or Backend.embed
Send = Callable[[Backend, dict[str, Any], Admission], Awaitable[tuple[dict[str, Any], CallRecord]]]


@dataclass(frozen=True, slots=True)
class ArmSpan:
    """Where one arm's calls lie in a request's ledger (`calls[calls_from:calls_until]`) and when it ran
    (perf_counter; `ended` None: until the request ends)."""

    calls_from: int = 0
    started: float = 0.0
    calls_until: int | None = None
    ended: float | None = None

    @property
    def alone(self) -> bool:
        """No other arm's calls are in the ledger beside this one's (as far as its span says)."""
        return self.calls_from == 0 and self.calls_until is None


@dataclass
class Caller:
    """Per-request call context: the backends, the deadline, and the ledger of every call made."""

    backends: dict[str, Backend]
    deadline: float  # time.monotonic() value
    calls: list[CallRecord] = field(default_factory=list)
    # The calls and time of the arm trying to answer (set as each arm starts, start_arm): what other
    # arms spent before it (or after it, when its short answer was kept) its learned cost and latency
    # leave out.
    arm: ArmSpan = field(default_factory=lambda: ArmSpan())
    cancelled: bool = False
    opened: float = field(default_factory=time.monotonic)  # when the request's time started to run
    ident: int = field(default_factory=_request_ids.__next__)  # tells backends' health one request from another

    def start_arm(self) -> None:
        """The calls from now on are the next arm's (see `arm`)."""
        self.arm = ArmSpan(len(self.calls), time.perf_counter())

    def arm_done(self) -> ArmSpan:
        """The answering arm's span, closed now: later arms' calls and time are not its."""
        return replace(self.arm, calls_until=len(self.calls), ended=time.perf_counter())

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        """Whether the request's deadline is (as good as) past: no call started now could answer. The
        margin is not only prudence: uvloop's timers fire up to a millisecond early, so a call cut at
        the deadline can end with a sliver of it left, in which another call would start."""
        return self.remaining() < MIN_CALL_S

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise ApiError(503, f"Backend {name!r} is not configured.", code="backend_missing") from None

    async def complete(self, backend_name: str, body: dict[str, Any]) -> dict[str, Any]:
        """One logical chat call to one backend: retried with backoff while that backend may recover."""
        return await self._call(self.backend(backend_name), body, Backend.complete)

    async def embed(self, backend_name: str, body: dict[str, Any]) -> dict[str, Any]:
        """One logical embeddings call, under the same rules as a chat call (on its endpoint's own
        health: Backend.for_embeddings)."""
        return await self._call(self.backend(backend_name).for_embeddings, body, Backend.embed)

    async def _call(self, backend: Backend, body: dict[str, Any], send: Send) -> dict[str, Any]:
        attempts = 1 + backend.spec.max_retries
        last: UpstreamError | None = None
        for attempt in range(attempts):
            if self.cancelled:
                raise asyncio.CancelledError
            if not backend.health.available(time.monotonic()):
                raise last or cooling_error(backend)
            budget = self.remaining()
            if budget < MIN_CALL_S:
                # An UpstreamError, as the call timing out would be: a strategy holding answers already
                # (a best-of-n judge, a cascade's later stage, another wave) answers with them.
                raise UpstreamError(backend.name, 504, "The request deadline passed before a backend answered.",
                                    retryable=False, code="deadline")
            started = time.perf_counter()
            admission = Admission()
            probe = backend.health.probe(time.monotonic(), budget)
            try:
                try:
                    # asyncio.timeout, not wait_for: no extra task per call on the hot path
                    async with asyncio.timeout(budget):
                        data, record = await send(backend, body, admission)
                finally:
                    if probe:  # the call has ended, however: what it says is marked below, at once
                        backend.health.probe_ended()
            except asyncio.CancelledError:
                self.cancelled_call(backend, body, started, admission)
                raise
            except TimeoutError:
                last = self.deadline_reached(backend, body, started, admission)
                raise last from None
            except UpstreamError as exc:
                last = exc
                self._failed(backend, body, started, exc)
                if not self.retries(backend, exc, attempt):
                    raise
                await self.back_off(attempt, exc)
                continue
            if "choices" in data and not data["choices"]:
                # A chat answer without choices (some servers answer so under load) is a failed call
                # (billed as it came): counted as a success, it kept a backend that answers nothing but
                # these out of cool-down, and every request called it first.
                backend.health.failed(time.monotonic(), request=self.ident)
                record.ok, record.error = False, f"{NO_CHOICES}: the upstream answered 200 with an empty `choices`"
            else:
                backend.health.succeeded()
            self.calls.append(record)
            return data
        raise last or cooling_error(backend)

    def retries(self, backend: Backend, exc: UpstreamError, attempt: int) -> bool:
        """Whether a failed attempt (`attempt`, from 0) is tried again on its backend. One that has just
        gone into cool-down (Retry-After, a timeout, repeated failures) is not waited for: the next arm
        answers sooner than a backoff would."""
        return exc.retryable and attempt < backend.spec.max_retries and backend.health.available(time.monotonic())

    async def back_off(self, attempt: int, exc: UpstreamError) -> None:
        """The wait before retrying a failed attempt (a JSON call's or a stream's first byte): growing
        from BACKOFF_BASE_S, jittered, or the upstream's Retry-After; never past the deadline."""
        await asyncio.sleep(min(_backoff(attempt, exc.retry_after), max(0.0, self.remaining())))

    def _failed(self, backend: Backend, body: dict[str, Any], started: float, exc: UpstreamError) -> None:
        now = time.monotonic()
        if exc.local:  # the gateway's own failure: a healthy backend cooled down would refuse everyone
            _log_out_of_files(now)
        elif exc.status >= 500 or exc.status == 429:  # a 4xx about the request itself says nothing of the backend
            backend.health.failed(now, exc.retry_after, slow=exc.status == 504, request=self.ident, error=exc)
        if exc.retry_after is None and not backend.health.available(now):
            # If this error reaches the client as a 503 or 429, it carries when this backend is expected back
            # (a 502 or 504 carries none: upstream_to_api_error).
            exc.retry_after = backend.health.cooldown_until - now
        self._ended(backend, body, started, exc)

    def _ended(self, backend: Backend, body: dict[str, Any], started: float, exc: UpstreamError) -> None:
        """A call that did not answer, in the ledger: one cut off while the upstream was at it (a
        timeout, the deadline) billed as every cut call is (Backend.cut), a refused one at nothing."""
        if exc.cut:
            self.calls.append(backend.cut(Usage.estimated(prompt_estimate(body)), started, exc.message))
        else:
            self.calls.append(backend.record(Usage(), started, ok=False, error=exc.message[:300]))

    def deadline_reached(self, backend: Backend, body: dict[str, Any], started: float,
                         admission: Admission) -> UpstreamError:
        """The request's deadline passed during a call. One that had reached the upstream is cut off,
        and billed so; one still waiting for one of its backend's slots was never sent. The backend's
        fault (a mark against its health, as a timeout) only if the call had reached it and had it for
        a good share of the request's time (SLOW_CALL_SHARE). A call that started late (the tail of a
        queue, a later wave, stage or judge) and was cut a moment later says nothing of the backend:
        marking it cooled a busy but healthy backend down for everyone."""
        if admission.admitted:
            error = UpstreamError(backend.name, 504, f"{backend.name}: request deadline reached", retryable=False,
                                  cut=True)
            if time.monotonic() - admission.admitted_at >= SLOW_CALL_SHARE * (self.deadline - self.opened):
                self._failed(backend, body, started, error)
            else:
                self._ended(backend, body, started, error)
            return error
        error = UpstreamError(backend.name, 504, f"{backend.name}: request deadline reached while queued for a "
                              f"free slot (max_concurrency {backend.spec.max_concurrency})", retryable=False)
        self._ended(backend, body, started, error)
        return error

    def cancelled_call(self, backend: Backend, body: dict[str, Any], started: float, admission: Admission) -> None:
        """A call cut off by the client leaving (or the server stopping) before it answered: billed as
        every cut call is (Backend.cut). One still queued for a slot (`max_concurrency`) never reached
        the upstream: nothing to bill. No mark against the backend's health: it did nothing wrong."""
        if not admission.admitted:
            self.calls.append(backend.record(Usage(), started, ok=False, error=CANCELLED_QUEUED))
            return
        self.calls.append(backend.cut(Usage.estimated(prompt_estimate(body)), started, CLIENT_LEFT))

    def available(self, backend_name: str) -> bool:
        """Whether an arm on this backend is worth trying now: not cooling down, nor being tested by
        another call after its cool-down (BackendHealth.in_doubt)."""
        backend = self.backends.get(backend_name)
        return backend is not None and not backend.health.in_doubt(time.monotonic())

    def passes_over(self, arms: Sequence[Arm], index: int, tried: bool) -> bool:
        """Whether a request skips its arm `arms[index]` rather than call it: its backend is in doubt
        (`available`), and either a later arm's backend is not, or it still cools down and is called
        only as the last arm when no arm was `tried` (to refuse at once, 503 with Retry-After). A
        backend whose cool-down is over, being tested by another call, is called when no arm after
        it answers sooner: the other arms still cooling down, it is this request's best chance."""
        name = arms[index].backend
        if self.available(name):
            return False
        if any(self.available(arm.backend) for arm in arms[index + 1:]):
            return True
        backend = self.backends.get(name)
        cooling = backend is None or not backend.health.available(time.monotonic())
        return cooling and (index < len(arms) - 1 or tried)

    def retry_after_s(self, names: Iterable[str]) -> float:
        """When the soonest of the request's cooling backends (`names`) is expected back, for a
        Retry-After header: another model's backends, cooling on their own schedule, say nothing
        about when this request can be served."""
        now = time.monotonic()
        waits = [backend.health.cooldown_until - now for name in set(names)
                 if (backend := self.backends.get(name)) is not None and backend.health.cooldown_until > now]
        return max(1.0, min(waits)) if waits else 1.0


def _log_out_of_files(now: float) -> None:
    global _out_of_files_logged
    if now - _out_of_files_logged >= OUT_OF_FILES_LOG_EVERY_S:
        _out_of_files_logged = now
        log.warning("the gateway has run out of open files: calls fail with 503 until connections close; raise "
                    "`ulimit -n` (LimitNOFILE=, the container's nofile) or lower max_requests_in_flight")


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, BACKOFF_MAX_S)
    return min(BACKOFF_BASE_S * 2**attempt, BACKOFF_MAX_S) * (0.5 + random.random() / 2)


def prompt_estimate(body: dict[str, Any]) -> int:
    """The prompt of a call's body (a chat call's messages, an embeddings call's input) as every
    estimate counts it (router.estimates)."""
    if "messages" not in body and "input" in body:
        return estimate_input_tokens(body["input"])
    return estimate_prompt_tokens(body.get("messages") or [], body)


def cooling_error(backend: Backend) -> UpstreamError:
    return UpstreamError(backend.name, 503, f"{backend.name}: cooling down after repeated failures",
                         retryable=True)


def upstream_to_api_error(exc: UpstreamError, retry_after_s: float | None = None) -> ApiError:
    """The client's error for a request no backend could serve. Retry-After: when a cooling backend
    is expected back (given, or carried by the error), whole seconds, at least 1. A 502 or 504 comes
    after the gateway's own retries and fallbacks (a 504's cut call billed its prompt): the SDK's
    retries would only repeat them, each one a full wait and another billed call, so it says
    `x-should-retry: false` and no Retry-After, even when its backend now cools down (an upstream
    503 with a Retry-After, passed on as a 502): a wait beside "do not retry" is a contradiction."""
    code = exc.code or ("upstream_timeout" if exc.status == 504 else "upstream_error")
    if exc.status in (502, 504):
        return ApiError(exc.status, exc.message, param=exc.param, code=code, headers=dict(NO_CLIENT_RETRY))
    # (a call the gateway could not make for want of file descriptors: worth sending again in a moment)
    headers = retry_after(retry_after_s or exc.retry_after or (1.0 if exc.local else None))
    return ApiError(exc.status, exc.message, param=exc.param, code=code, headers=headers)
