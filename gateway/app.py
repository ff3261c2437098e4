"""The ASGI app: routes, and the request path of `POST /v1/chat/completions` and `POST /v1/responses`
(and `POST /v1/embeddings`, a pass-through with no plan: gateway/embeddings.py).

    auth -> read + validate -> plan (router: classify, decide) -> reserve budget
         -> execute (strategies, through backends) -> respond -> record (telemetry) -> settle budget

Both APIs take this one path: a `Wire` reads the API's body into the internal chat request at the
edge, and writes the chat answer (whole, synthesized or relayed as it streams) back in the API's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import embeddings
from gateway.backends import UpstreamError
from gateway.calls import Caller, cooling_error, upstream_to_api_error
from gateway.config import GatewayConfig
from gateway.cost_bounds import backends_of
from gateway.dashboard import dashboard_routes
from gateway.effort import apply_effort
from gateway.errors import EXCEPTION_HANDLERS, NO_CLIENT_RETRY, ApiError, request_id_headers, retry_after
from gateway.local_model import LocalModelError
from gateway.responses import ResponsesWire, count_input_tokens, parse_responses_request
from gateway.schemas import ChatRequest, parse_chat_request, parse_json_body
from gateway.service import Gateway, Plan
from gateway.strategies import StrategyResult, with_output_limit
from gateway.streaming import (DONE, EventStream, PassThrough, completion_to_chunks, sse, synthesized,
                                usage_block)
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
# What a browser app may read of an answer when CORS is on (the rest of the headers are hidden from it:
# a hidden x-should-retry reads as absent, and the openai SDK in a browser retried every 502 and 504).
EXPOSED_HEADERS = ["x-ponder-request-id", "x-request-id", "x-ponder-arm", "x-ponder-task", "x-ponder-difficulty",
                   "x-ponder-policy", "x-ponder-cost-usd", "x-ponder-samples", "retry-after", "x-should-retry",
                   "server-timing"]


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


# -- health and discovery ---------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = gateway_of(request).readiness()
    return json_response(checks, 200 if checks["ready"] else 503)


def model_card(gw: Gateway, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(gw.started_at), "owned_by": "ponder"}


async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    gw.keys.authenticate(request)
    return json_response({"object": "list", "data": [model_card(gw, name) for name in gw.models()]})


async def retrieve_model(request: Request) -> Response:
    gw = gateway_of(request)
    gw.keys.authenticate(request)
    name = request.path_params["model"]
    if name not in gw.models():
        raise ApiError(404, f"The model {name!r} does not exist; GET /v1/models lists the models and routed aliases.",
                       param="model", code="model_not_found")
    return json_response(model_card(gw, name))


# -- the request path: chat completions and responses -----------------------------------------------


def plan_headers(plan: Plan) -> dict[str, str]:
    decision = plan.decision
    return {
        **request_id_headers(plan.request_id),
        "x-ponder-arm": decision.arm.key,
        "x-ponder-task": decision.task,
        "x-ponder-difficulty": f"{decision.difficulty:.3f}",
        "x-ponder-policy": decision.policy,
    }


def cost_header(caller: Caller) -> dict[str, str]:
    """`x-ponder-cost-usd`: what this request's calls were billed. An error answer carries it too: a
    call cut off by a timeout or the deadline is billed its prompt, and the client is owed the figure."""
    return {"x-ponder-cost-usd": f"{sum(c.cost_usd for c in caller.calls):.8f}"}


def server_timing(plan: Plan, caller: Caller, received: float, executing: float | None = None, *,
                  finished_calls: bool = True) -> str:
    """The `Server-Timing` header (opt-in, `server_timing: true`): where this request's time went, in ms.
    `execute` is the strategy's wall time (for a relayed stream: until the first chunk); `upstream`
    sums the finished calls' latencies (parallel samples overlap)."""
    now = time.perf_counter()
    parts = [f"classify;dur={plan.classify_s * 1000:.3f}", f"decide;dur={plan.decide_s * 1000:.3f}"]
    if executing is not None:
        if finished_calls:
            upstream_ms = sum(call.latency_ms for call in caller.calls)
            parts.append(f'upstream;dur={upstream_ms:.3f};desc="{len(caller.calls)} call(s)"')
        parts.append(f"execute;dur={(now - executing) * 1000:.3f}")
    parts.append(f"total;dur={(now - received) * 1000:.3f}")
    return ", ".join(parts)


def extension(plan: Plan, caller: Caller, result: StrategyResult | None, served: Arm | None = None) -> dict[str, Any]:
    """`served`: the arm that answered where no result says so (a relayed stream)."""
    arm = result.arm if result else served or plan.decision.arm
    details = result.details if result else {}
    extra: dict[str, Any] = {"max_tokens_sent": plan.output_caps} if plan.output_caps else {}  # only where added
    if any(call.usage_estimated for call in caller.calls):  # an upstream answered without usage
        extra["usage_estimated"] = True
    return {
        "request_id": plan.request_id,
        "arm": arm.key,
        "strategy": arm.strategy,
        "effort": arm.effort,
        "task": plan.decision.task,
        "difficulty": round(plan.decision.difficulty, 4),
        "explore": plan.explored(arm),
        "calls": len(caller.calls),
        "samples": details.get("samples", 1),
        "votes": details.get("votes"),
        "confidence": result.confidence if result else None,
        "cost_usd": sum(c.cost_usd for c in caller.calls),
        **extra,
    }


def finish_response(plan: Plan, caller: Caller, result: StrategyResult) -> dict[str, Any]:
    response = result.response
    response["id"] = plan.request_id  # so clients can send feedback on `completion.id`
    response["usage"] = usage_block(caller.calls)
    response["ponder"] = extension(plan, caller, result)
    return response


class Wire(Protocol):
    """One API at the edge of the shared request path: the internal chat request read from its body
    (`req`), and the chat answer written back in its format."""

    req: ChatRequest
    id_prefix: str  # of the request id, which is also the answer's `id` (feedback takes it)

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A finished chat.completion (our id, usage and `ponder` set) as this API's JSON answer."""
        ...

    def synthesized(self, completion: dict[str, Any]) -> list[bytes]:
        """A finished chat.completion as this API's SSE frames, whole stream."""
        ...

    def error(self, error: ApiError) -> ApiError:
        """An error of the shared path as this API names the request's fields (`param`)."""
        ...

    def stream_error(self, request_id: str, error: ApiError) -> bytes:
        """A failure after the stream's headers, as this API's SSE error."""
        ...

    def relay(self, passthrough: PassThrough, caller: Caller, request_id: str,
              extension: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
        """An upstream stream translated chunk by chunk as it arrives (billed by `passthrough.chunks`)."""
        ...


class ChatWire:
    """The chat-completions API: the body is the request, and the answer goes back as it came."""

    id_prefix = "chatcmpl-"

    def __init__(self, req: ChatRequest) -> None:
        self.req = req

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        return completion

    def synthesized(self, completion: dict[str, Any]) -> list[bytes]:
        return [*map(sse, completion_to_chunks(completion, include_usage=self.req.include_usage)), DONE]

    def error(self, error: ApiError) -> ApiError:
        return error

    def stream_error(self, request_id: str, error: ApiError) -> bytes:
        return sse(error.body())

    def relay(self, passthrough: PassThrough, caller: Caller, request_id: str,
              extension: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
        return passthrough.events(caller, request_id=request_id, include_usage=self.req.include_usage,
                                  extension=extension)


async def chat_completions(request: Request) -> Response:
    return await serve(request, lambda body, max_n: ChatWire(parse_chat_request(body, max_n=max_n)))


async def responses(request: Request) -> Response:
    """The Responses API, stateless: translated at the edge, served by the chat request path."""
    return await serve(request, lambda body, max_n: ResponsesWire(*parse_responses_request(body, max_n=max_n)))


async def responses_input_tokens(request: Request) -> Response:
    """`client.responses.input_tokens.count(...)`: the prompt's tokens, estimated (gateway/responses.py)."""
    gw = gateway_of(request)
    gw.keys.authenticate(request)
    body = parse_json_body(await read_body(request, gw.config.max_body_bytes, gw.config.body_timeout_s))
    return json_response(count_input_tokens(body))


async def responses_compact(request: Request) -> Response:
    """`client.responses.compact(...)`: OpenAI's compaction writes an encrypted item only its servers read."""
    gateway_of(request).keys.authenticate(request)
    raise ApiError(400, "Compaction (POST /v1/responses/compact) is not supported: Ponder's Responses API is stateless, "
                        "and a compacted item is encrypted for OpenAI's servers to read; trim `input` instead.",
                   code="unsupported_endpoint")


async def responses_not_stored(request: Request) -> Response:
    """Retrieving, deleting, cancelling a stored response: Ponder stores none (docs/api.md)."""
    gateway_of(request).keys.authenticate(request)
    response_id = request.path_params["response_id"].split("/")[0]  # .../cancel, .../input_items name the same id
    raise ApiError(404, f"No response {response_id!r}: Ponder's Responses API is stateless "
                        "and stores no responses (`store` is ignored); send the whole conversation as `input`.",
                   param="response_id", code="not_found")


async def create_embeddings(request: Request) -> Response:
    """`client.embeddings.create(...)`: passed through to the backend named as `model` (gateway/embeddings.py)."""
    started, ts = time.perf_counter(), time.time()
    gw = gateway_of(request)
    req = None
    try:
        principal = gw.keys.authenticate(request)
        body = parse_json_body(await read_body(request, gw.config.max_body_bytes, gw.config.body_timeout_s))
        req = embeddings.parse_embeddings_request(body)
        hints = ponder_headers(request)
        backend = gw.embedding_backend(req.model, hints)
        gw.check_embedding_cost(embeddings.estimated_usd(backend, req), hints)
        reservation = await gw.budgets.hold(principal, embeddings.worst_case_usd(backend, req), embeddings.what_fits)
    except ApiError as exc:
        gw.metrics.refused(req.model if req is not None and req.model in gw.models() else "-", exc.status)
        raise
    gw.unsettled.add()  # from here every path ends in settle(): shutdown waits for it
    request_id = embeddings.new_request_id()
    headers = {**request_id_headers(request_id), "x-ponder-arm": backend.name, "x-ponder-policy": "direct"}
    caller = gw.caller({backend.name: backend})  # its one backend, even if a reload has dropped it since

    async def settle(status: int, error: str | None = None) -> None:
        try:
            event = embeddings.embedding_event(request_id, ts, started, principal, backend, req, caller.calls,
                                               status=status, error=error)
            gw.publish(event)
            if reservation is not None:
                with contextlib.suppress(Exception):  # settling is bookkeeping: never fail the answer for it
                    await gw.budgets.settle(reservation, event.cost_usd)
        finally:
            gw.unsettled.done()

    try:
        data = await until_disconnect(request, caller.embed(backend.name, req.body), caller)
    except (ApiError, UpstreamError) as exc:
        if isinstance(exc, UpstreamError):  # no fallback: an embedding is its own model's, no other's
            cooling_s = backend.for_embeddings.health.cooldown_until - time.monotonic()
            exc = upstream_to_api_error(exc, cooling_s if cooling_s > 0 else None)
        failed = exc.response({**headers, **cost_header(caller)})
        failed.background = BackgroundTask(settle, **failure_outcome(exc))
        return failed
    except Exception as exc:  # a bug, not an upstream's doing: still recorded and settled, then a 500
        await settle(**failure_outcome(exc))
        raise
    return json_response(data, headers={**headers, **cost_header(caller)}, background=BackgroundTask(settle, 200))


async def serve(request: Request, read: Callable[[dict[str, Any], int], Wire]) -> Response:
    received = time.perf_counter()
    gw = gateway_of(request)
    req = None
    try:
        principal = gw.keys.authenticate(request)
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
        await settle(gw, plan, caller, reservation, served=served, **stream_outcome(passthrough, caller))

    return EventStream(wire.relay(passthrough, caller, plan.request_id, stream_extension), finish, headers)


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

    async def finish() -> None:
        if not work.done():  # the client went away: stop sampling for it, and bill what was cut off
            work.cancel()
            await asyncio.wait({work})
        if work.cancelled():  # here or by synthesized() when the body was closed early
            caller.cancelled = True
            await settle(gw, plan, caller, reservation, status=CLIENT_CLOSED_STATUS, error=CLIENT_CLOSED)
        elif (failure := work.exception()) is not None:
            await settle(gw, plan, caller, reservation, **failure_outcome(failure))
        else:
            await settle(gw, plan, caller, reservation, status=200, result=work.result())

    events = synthesized(work, keepalive_s=KEEPALIVE_S, render=render,
                         render_error=lambda exc: wire.stream_error(plan.request_id, exc))
    return EventStream(events, finish, headers)


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
        if not caller.available(arm.backend) and index < len(arms) - 1:
            continue
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


# -- feedback ---------------------------------------------------------------------------------------


async def feedback(request: Request) -> Response:
    gw = gateway_of(request)
    principal = gw.keys.authenticate(request)
    body = parse_json_body(await read_body(request, 64 * 1024, gw.config.body_timeout_s))
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ApiError(400, "'request_id' must be the id of a completion.", param="request_id", code="invalid_value")
    # a field sent as null is one not sent (typed clients serialise every optional field)
    score = body.get("score") if body.get("score") is not None else body.get("correct")
    if isinstance(score, bool):
        score = 1.0 if score else 0.0
    if not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise ApiError(400, "Send 'score' in [0, 1] or 'correct': true/false.", param="score", code="invalid_value")
    assert gw.store is not None
    # An admin key may grade any request (an operator labelling traffic); others only their own.
    owner = None if principal.admin else principal.key_id
    outcome = await gw.store.feedback(request_id, float(score), owner)
    code = getattr(outcome, "status", str(outcome))
    status = _FEEDBACK_STATUS.get(code, 200)
    if status >= 400:
        headers = retry_after(FEEDBACK_RETRY_AFTER_S) if status == 503 else None
        raise ApiError(status, f"Feedback not recorded: {code}.", param="request_id", code=code, headers=headers)
    return json_response({"request_id": request_id, "status": code})


_FEEDBACK_STATUS = {"accepted": 200, "duplicate": 200, "unknown_request": 404, "expired": 410, "forbidden": 403,
                    "unavailable": 503}
FEEDBACK_RETRY_AFTER_S = 5.0  # the store reconnects in the background within seconds


# -- the app ----------------------------------------------------------------------------------------


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/embeddings", create_embeddings, methods=["POST"]),
        Route("/v1/responses/input_tokens", responses_input_tokens, methods=["POST"]),
        Route("/v1/responses/compact", responses_compact, methods=["POST"]),
        Route("/v1/responses/{response_id:path}", responses_not_stored, methods=["GET", "POST", "DELETE"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        *dashboard_routes(),
    ]


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await gateway.start()
        except BaseException:
            await gateway.close()  # a failed start must not leave the model process or sessions behind
            raise
        try:
            with long_lived_heap():
                yield
        finally:
            await gateway.close()

    middleware = [Middleware(ReadableStartupFailure)]
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["*"],
                                     expose_headers=EXPOSED_HEADERS))
    app = Starlette(routes=routes(), middleware=middleware, exception_handlers=EXCEPTION_HANDLERS,
                    lifespan=lifespan)
    app.state.gateway = gateway
    return app


# Collect the youngest generation after this many new container objects (Python's default: 700).
YOUNG_GC_THRESHOLD = 10_000


@contextlib.contextmanager
def long_lived_heap() -> Iterator[None]:
    """While the gateway serves: what startup built (the classifier, the policies, litellm's modules and
    cost map where a backend needs it; 60,000 to 390,000 objects) is frozen out of the cyclic garbage
    collector, which walked all of it in every full collection (30 ms of CPU, 200 ms with litellm
    loaded, each a stall of every request in flight). A request leaves no cycles behind, but 16 in
    flight cross Python's 700 new objects every few requests: each young collection, 0.2 ms, walked
    live requests to free nothing. Undone at shutdown (an app in a test process)."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


class ReadableStartupFailure:
    """Starlette reports a failed startup with the whole traceback (uvicorn logs it): a local model that
    would not start (a file that is no model, a model llama.cpp cannot load, a load slower than
    `startup_timeout_s`) is the operator's to fix, and gets its reason alone, as a bad config does."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def reported(message: dict[str, Any]) -> None:
            # sent from within Starlette's `except` around the lifespan: the failure is the one handled
            if message["type"] == "lifespan.startup.failed" and isinstance(failure := sys.exc_info()[1],
                                                                          LocalModelError):
                message = {**message, "message": f"ponder: the local model did not start: {failure}"}
            await send(message)

        await self.app(scope, receive, reported)
