"""The ASGI app: the route table, the handlers of the small endpoints (health, models, the Responses
API's stateless refusals, embeddings, feedback), and the app's assembly (middleware, lifespan).

The request path of `POST /v1/chat/completions` and `POST /v1/responses` is gateway/request_path.py's
(`POST /v1/embeddings`, a pass-through with no plan, is gateway/embeddings.py's).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import embeddings
from gateway.backends import UpstreamError
from gateway.calls import upstream_to_api_error
from gateway.config import GatewayConfig
from gateway.dashboard import dashboard_routes
from gateway.errors import (
    EXCEPTION_HANDLERS, REQUEST_ID_SCOPE_KEY, AnswerEveryRequest, ApiError, request_id_headers, retry_after,
)
from gateway.key_limits import KeySlots
from gateway.local_model import LocalModelError
from gateway.loop_lag import EventLoopLag
from gateway.request_path import (
    failure_outcome, gateway_of, json_response, ponder_headers, read_body, serve, until_disconnect,
)
from gateway.responses import ResponsesWire, count_input_tokens, parse_responses_request
from gateway.schemas import parse_chat_request, parse_json_body
from gateway.service import Gateway
from gateway.shedding import LoadShedding
from gateway.wire import ChatWire, cost_header

# What a browser app may read of an answer when CORS is on (the rest of the headers are hidden from it:
# a hidden x-should-retry reads as absent, and the openai SDK in a browser retried every 502 and 504).
EXPOSED_HEADERS = ["x-ponder-request-id", "x-request-id", "x-ponder-arm", "x-ponder-task", "x-ponder-difficulty",
                   "x-ponder-policy", "x-ponder-cost-usd", "x-ponder-samples", "retry-after", "retry-after-ms",
                   "x-should-retry", "server-timing", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                   "x-ratelimit-reset-requests"]


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


# -- the API endpoints ------------------------------------------------------------------------------


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
        gw.key_limits.admit(principal.key_id, request.scope)
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
    request_id = request.scope[REQUEST_ID_SCOPE_KEY] = embeddings.new_request_id()  # a bug's 500 names it too
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
    loop_lag = EventLoopLag(config.max_event_loop_lag_ms, gateway.metrics.event_loop_lag)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await gateway.start()
        except BaseException:
            await gateway.close()  # a failed start must not leave the model process or sessions behind
            raise
        loop_lag.start()
        try:
            with long_lived_heap():
                yield
        finally:
            loop_lag.stop()
            await gateway.close()

    middleware = [Middleware(ReadableStartupFailure)]
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["*"],
                                     expose_headers=EXPOSED_HEADERS))
    # inside CORS: a browser app reads a 500 of a bug too (a preflight, CORS's own answer, has no request id)
    middleware.append(Middleware(AnswerEveryRequest))
    # inside CORS: a browser app can read its 503; with no limit (0) it still counts ponder_requests_in_flight
    middleware.append(Middleware(LoadShedding, limit=config.max_requests_in_flight, metrics=gateway.metrics,
                                 lag=loop_lag))
    if gateway.key_limits.enabled:  # inside shedding: a shed request takes no key slot
        middleware.append(Middleware(KeySlots))
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
