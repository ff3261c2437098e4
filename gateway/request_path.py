"""The request path of `POST /v1/chat/completions` and `POST /v1/responses`:

    auth -> read + validate -> plan (router: classify, decide) -> reserve budget
         -> execute (strategies, through backends) -> respond -> record (telemetry) -> settle budget

Both APIs take this one path: a `Wire` (gateway/wire.py) reads the API's body into the internal chat
request at the edge, and writes the chat answer (whole, synthesized or relayed as it streams) back in
the API's format. Here too: reading a request's body and headers, and stopping the work of a client
that left (`until_disconnect`), which every handler uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.backends import UpstreamError
from gateway.calls import Caller, cooling_error, upstream_to_api_error
from gateway.cost_bounds import backends_of
from gateway.connections import CLIENT_CONNECTION, ClientConnection
from gateway.effort import apply_effort
from gateway.errors import NO_CLIENT_RETRY, REQUEST_ID_SCOPE_KEY, ApiError, retry_after
from gateway.schemas import ChatRequest, parse_json_body
from gateway.service import Gateway, Plan
from gateway.strategies import StrategyResult, with_output_limit
from gateway.streaming import EventStream, PassThrough, synthesized
from gateway.wire import Wire, cost_header, extension, finish_response, plan_headers, server_timing
from router import prompts
from router.types import Arm

log = logging.getLogger("ponder.app")
KEEPALIVE_S = 2.0
# How long a synthesized stream's headers wait for its strategy. Past this the answer is a 200 kept
# alive by SSE comments (idle proxies cut silent connections, often at 30-60 s), and a failure after
# it can only be an SSE error event.
SYNTH_HOLD_S = 20.0
CLIENT_CLOSED = "Client closed the request."
CLIENT_CLOSED_STATUS = 499


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                  background: BackgroundTask | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json", background=background)


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


PONDER_HEADER = b"x-ponder-"


def ponder_headers(request: Request) -> dict[str, str]:
    """The request's `x-ponder-*` headers (all that planning reads), in one pass over the raw list:
    asking Starlette's Headers for each (most are absent) scans every header per name, 5 names a
    request. The first of a repeated header wins, as Headers.get has it."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(request.headers.raw)
            if name.startswith(PONDER_HEADER)}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body is larger than the {limit} bytes this gateway accepts.",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # a body that stalls must not hold its connection forever
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"Request body is larger than the {limit} bytes this gateway accepts.",
                                   code="body_too_large")
                chunks.append(chunk)
    except ClientDisconnect:
        # the client hung up mid-body (a cancelled upload, a dropped link): its doing, no traceback
        raise ApiError(CLIENT_CLOSED_STATUS, CLIENT_CLOSED, code="client_closed") from None
    except TimeoutError:
        # the rest of the body may still come: the connection is closed after the answer, not reused
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s.", code="body_timeout",
                       headers={"Connection": "close"}) from None
    return b"".join(chunks)


async def serve(request: Request, read: Callable[[dict[str, Any], int], Wire]) -> Response:
    received = time.perf_counter()
    gw = gateway_of(request)
    req = None
    try:
        principal = gw.keys.authenticate(request)
        gw.key_limits.admit(principal.key_id, request.scope)  # before the body: a refusal costs nothing
        body = parse_json_body(await read_body(request, gw.config.max_body_bytes, gw.config.body_timeout_s))
        wire = read(body, gw.config.max_n)
        req = wire.req
        plan = await gw.plan(req, ponder_headers(request), principal, id_prefix=wire.id_prefix)
        reservation = await gw.budgets.reserve(plan, req)
    except ApiError as exc:
        gw.metrics.refused(req.model if req is not None and req.model in gw.models() else "-", exc.status)
        if req is None:
            raise
        raise wire.error(exc) from None
    gw.unsettled.add()  # from here every path ends in settle(): shutdown waits for it
    request.scope[REQUEST_ID_SCOPE_KEY] = plan.request_id  # a bug's 500 (errors.AnswerEveryRequest) names it too
    if gw.config.log_prompts:  # opt-in only: prompts are the users' data
        log.info("%s %s prompt: %s", plan.request_id, req.model, prompts.last_user_text(req.messages)[:2000])
    caller = gw.caller(plan.backends)
    if req.stream:
        return await stream_answer(request, gw, plan, wire, caller, reservation, received)
    executing = time.perf_counter()
    try:
        result = await until_disconnect(request, gw.execute(plan, req, caller), caller)
    except ApiError as exc:
        failed = wire.error(exc).response({**plan_headers(plan), **cost_header(caller)})
        failed.background = BackgroundTask(settle, gw, plan, caller, reservation, **failure_outcome(exc))
        return failed
    except Exception as exc:  # a bug, not an upstream's doing: still recorded and settled, then a 500
        await settle(gw, plan, caller, reservation, **failure_outcome(exc))
        raise
    try:
        response = finish_response(plan, caller, result)
        headers = plan_headers(plan)
        headers["x-ponder-arm"] = result.arm.key
        headers.update(cost_header(caller))
        headers["x-ponder-samples"] = str(response["ponder"]["samples"])
        response = wire.answer(response)
    except Exception as exc:  # the answer could not be written (a bug): its calls still billed, its hold settled
        await settle(gw, plan, caller, reservation, **failure_outcome(exc))
        raise
    if gw.config.server_timing:
        headers["server-timing"] = server_timing(plan, caller, received, executing)
    # Recorded and settled right after the last byte is written: no await comes between the two, so
    # the event is in the store before this process reads any other request (feedback included).
    return json_response(response, headers=headers,
                         background=BackgroundTask(settle, gw, plan, caller, reservation, status=200, result=result))


async def settle(gw: Gateway, plan: Plan, caller: Caller, reservation: Any, *, status: int,
                 result: StrategyResult | None = None, error: str | None = None, served: Arm | None = None) -> None:
    try:
        event = gw.record(plan, caller.calls, status=status, result=result, error=error, served=served,
                          arm_span=caller.arm)
        if reservation is not None:
            with contextlib.suppress(Exception):  # settling is bookkeeping: never fail the answer for it
                await gw.budgets.settle(reservation, event.cost_usd)
    finally:
        gw.unsettled.done()


async def until_disconnect(request: Request, work: Any, caller: Caller) -> StrategyResult:
    """Await `work` in this task, but stop it (and every upstream call it would still make) if the
    client leaves. One watcher task and a done-callback: cheaper than racing two tasks."""
    task = asyncio.current_task()
    assert task is not None
    left = finished = False

    def on_disconnect(watcher: asyncio.Future) -> None:
        nonlocal left
        # `finished`: the disconnect came in the same loop turn as the answer, and this callback was
        # already scheduled: cancelling now would hit the answer's send and its settling instead
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            left = caller.cancelled = True
            task.cancel()

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        task.uncancel()
        if not left:
            # The server cancels what still runs when its graceful shutdown is up: the client gets an
            # answer it can retry elsewhere, and the request is recorded and its budget hold settled.
            raise ApiError(503, "The server is shutting down; send the request again.", code="shutting_down",
                           headers=retry_after(1.0)) from None
        raise ApiError(CLIENT_CLOSED_STATUS, CLIENT_CLOSED, code="client_closed") from None
    finally:
        finished = True
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream_answer(request: Request, gw: Gateway, plan: Plan, wire: Wire, caller: Caller,
                        reservation: Any, received: float) -> Response:
    """One answer relayed as the upstream writes it, or a multi-sample one sent once it is decided."""
    if plan.decision.arm.strategy == "single" and wire.req.n == 1:
        return await _relayed_stream(request, gw, plan, wire, caller, reservation, received)
    return await _synthesized_stream(request, gw, plan, wire, caller, reservation, received)


async def _relayed_stream(request: Request, gw: Gateway, plan: Plan, wire: Wire, caller: Caller,
                          reservation: Any, received: float) -> Response:
    headers = plan_headers(plan)
    executing = time.perf_counter()
    try:
        # The client may leave while the first byte is awaited: then no retry and no fallback.
        opened = await until_disconnect(request, open_first_stream(gw, plan, wire.req, caller), caller)
    except ApiError as exc:
        opened = exc
    except Exception as exc:  # a bug, not an upstream's doing: still recorded and settled, then a 500
        await asyncio.shield(settle(gw, plan, caller, reservation, **failure_outcome(exc)))
        raise
    if isinstance(opened, ApiError):
        await asyncio.shield(settle(gw, plan, caller, reservation, **failure_outcome(opened)))
        return wire.error(opened).response({**headers, **cost_header(caller)})
    if isinstance(opened, list):  # a fallback that samples: answered whole, as the JSON path would serve it
        return await _synthesized_stream(request, gw, plan, wire, caller, reservation, received, arms=opened)
    served, passthrough = opened  # a fallback's arm, when the chosen one failed before its first byte
    headers["x-ponder-arm"] = served.key
    if gw.config.server_timing:
        headers["server-timing"] = server_timing(plan, caller, received, executing, finished_calls=False)

    def stream_extension() -> dict[str, Any]:
        return {**extension(plan, caller, None, served), "usage_estimated": passthrough.usage_estimated}

    async def finish() -> None:  # once the body is closed (EventStream): its call is in the ledger
        await passthrough.abandon(caller)  # a no-op once the relay has started: it bills its own call
        outcome = failure_outcome(stream.failure) if stream.failure else stream_outcome(passthrough, caller)
        await settle(gw, plan, caller, reservation, served=served, **outcome)

    stream = EventStream(wire.relay(passthrough, caller, plan.request_id, stream_extension), finish, headers,
                         gw.config.stream_stall_timeout_s, lambda exc: wire.stream_error(plan.request_id, exc))
    return stream


async def _synthesized_stream(request: Request, gw: Gateway, plan: Plan, wire: Wire, caller: Caller,
                              reservation: Any, received: float, arms: list[Arm] | None = None) -> Response:
    """`arms`: the plan's arms left to try (all of them by default)."""
    headers = plan_headers(plan)
    executing = time.perf_counter()
    work = asyncio.ensure_future(gw.execute(plan, wire.req, caller, arms))
    try:
        # The headers wait for the strategy, so that a request no backend could serve gets its HTTP
        # error; only one still sampling after SYNTH_HOLD_S is answered 200 and kept alive with comments.
        await until_disconnect(request, asyncio.wait({work}, timeout=SYNTH_HOLD_S), caller)
    except ApiError as exc:  # the client left: stop sampling for it
        work.cancel()

        async def cancelled(refusal: ApiError) -> None:
            await asyncio.wait({work})  # its cancelled calls enter the ledger before the request is settled
            await settle(gw, plan, caller, reservation, **failure_outcome(refusal))

        await asyncio.shield(cancelled(exc))
        return exc.response(headers)
    if work.done():
        try:
            result = work.result()
        except Exception as exc:
            await settle(gw, plan, caller, reservation, **failure_outcome(exc))
            if isinstance(exc, ApiError):
                return wire.error(exc).response({**headers, **cost_header(caller)})
            raise  # a bug, not an upstream's doing: recorded and settled, then a 500
        headers["x-ponder-arm"] = result.arm.key
    if gw.config.server_timing:
        headers["server-timing"] = server_timing(plan, caller, received, executing if work.done() else None)

    def render(result: StrategyResult) -> list[bytes]:
        return wire.synthesized(finish_response(plan, caller, result))

    written: list[bool] = []  # set once the answer's last frame went out to a client still connected
    connection: ClientConnection | None = request.scope.get("extensions", {}).get(CLIENT_CONNECTION)

    def last_frame_sent() -> None:
        # uvicorn drops what is sent to a client gone, silently, and a vote's frames are sent at once:
        # its disconnect, read after them, raced them (under `ponder serve` only: another server says not)
        if connection is None or not connection.lost():
            written.append(True)

    async def finish() -> None:
        if not work.done():  # the client went away: stop sampling for it, and bill what was cut off
            work.cancel()
            await asyncio.wait({work})
        if work.cancelled():  # here or by synthesized() when the body was closed early
            caller.cancelled = True
            await settle(gw, plan, caller, reservation, status=CLIENT_CLOSED_STATUS, error=CLIENT_CLOSED)
        elif (failure := work.exception() or stream.failure) is not None:
            await settle(gw, plan, caller, reservation, **failure_outcome(failure))
        elif not written:
            # The answer was decided (every sample called and billed), but the client hung up while its
            # frames were written: a client that left, as a relayed stream cut off is (`left`, not 200)
            await settle(gw, plan, caller, reservation, status=CLIENT_CLOSED_STATUS, error=CLIENT_CLOSED,
                         served=work.result().arm)
        else:
            await settle(gw, plan, caller, reservation, status=200, result=work.result())

    def render_error(exc: ApiError) -> bytes:
        return wire.stream_error(plan.request_id, exc)

    events = synthesized(work, keepalive_s=KEEPALIVE_S, render=render, render_error=render_error,
                         written=last_frame_sent)
    stream = EventStream(events, finish, headers, gw.config.stream_stall_timeout_s, render_error)
    return stream


def failure_outcome(exc: BaseException) -> dict[str, Any]:
    """What a failed request is recorded as: the client's error, or a 500 for anything else."""
    if isinstance(exc, ApiError):
        return {"status": exc.status, "error": exc.message}
    return {"status": 500, "error": f"{type(exc).__name__}: {exc}"}


def stream_outcome(passthrough: PassThrough, caller: Caller) -> dict[str, Any]:
    """What a relayed stream is recorded as: 200, 502 when the upstream broke, 499 when the client left."""
    if caller.calls and not passthrough.client_left:
        last = caller.calls[-1]
        return {"status": 200} if last.ok else {"status": 502, "error": last.error}
    return {"status": CLIENT_CLOSED_STATUS, "error": CLIENT_CLOSED}


async def open_first_stream(gw: Gateway, plan: Plan, req: ChatRequest,
                            caller: Caller) -> tuple[Arm, PassThrough] | ApiError | list[Arm]:
    """Open the first arm whose backend sends a first chunk; failures before any byte are invisible.
    A fallback arm that samples (a vote, a cascade) cannot be relayed: the arms from it on are returned,
    to be answered whole (skipped, a stream failed where the same request without `stream` was served)."""
    last: UpstreamError | None = None
    arms = plan.arms()
    for index, arm in enumerate(arms):
        if arm.strategy != "single":
            return arms[index:]
        if caller.passes_over(arms, index, tried=last is not None):
            continue  # cooling down: as Gateway.execute skips it
        backend = caller.backend(arm.backend)
        caller.start_arm()
        body = apply_effort({k: v for k, v in req.body.items() if k != "n"}, backend.spec, arm.effort)
        body = with_output_limit(body, backend.spec, plan.output_caps.get(arm.backend))
        for attempt in range(1 + backend.spec.max_retries):
            if not backend.health.available(time.monotonic()):
                # cooling down (a Retry-After, failures): not called, as Caller.complete would not call it
                last = last if attempt else cooling_error(backend)
                break
            if caller.out_of_time():
                return ApiError(504, "The request deadline passed before a backend answered.", code="deadline",
                                headers=NO_CLIENT_RETRY)
            try:
                return arm, await PassThrough.open(backend, body, caller, plan.prompt_tokens)
            except UpstreamError as exc:
                last = exc
                if exc.about_request or caller.out_of_time():  # every arm would refuse it alike, or time is up
                    return upstream_to_api_error(exc)
                if not exc.retryable:  # not on this backend (a 401 for its key); another may serve
                    break
                if caller.retries(backend, exc, attempt):
                    await caller.back_off(attempt, exc)  # as a JSON call waits: a retry at once meets the same overload
    assert last is not None
    return upstream_to_api_error(last, caller.retry_after_s(backends_of(arms))
                                 if last.status in (429, 503) else None)
