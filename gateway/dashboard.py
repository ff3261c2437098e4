"""The operator's view: `/dashboard` (one static page), its JSON under `/v1/ponder/`, and `/metrics`.

Auth: when API keys are configured every route here needs an admin key (401 without a key or with a
wrong one, 403 with a non-admin key). The page itself holds no data, so `/dashboard` still sends its
HTML with that 401/403 status: the page then shows a key field, keeps the key in sessionStorage and
sends it as `Authorization: Bearer` on its JSON fetches, so the key never travels in a URL. The page's
script and stylesheet are public static files. See docs/dashboard.md for every endpoint's JSON.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import ANONYMOUS, principal_of
from gateway.errors import ApiError
from telemetry import summaries

STATIC_DIR = Path(__file__).resolve().with_name("static")
STATIC_TYPES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# The page loads nothing but its own files; its data comes from same-origin fetches.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
DEFAULT_REQUESTS = 50
MAX_REQUESTS = 1000
REQUEST_LOOKUP_WINDOW = 5000  # /requests/{id} looks this far back in the event log
EXPLORATION_WINDOW = 500  # the summary's explore share: over this many of the policy's latest requests
MAX_REPORT_BYTES = 20 * 1024 * 1024
SPEND_READ_BATCH = 16  # /spend reads this many keys' ledgers at once: half the Redis pool (MAX_CONNECTIONS)


def json_response(data: Any, status: int = 200) -> Response:
    # no-store: the numbers change every second and must not linger in a shared cache.
    return Response(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status, {"cache-control": "no-store"},
                    media_type="application/json")


def store_readable(gw: Any) -> bool:
    """Whether the store answers reads: while Redis is away the event log holds only this replica's
    buffered events, and an empty list (or an id not found) must not read as 'no requests'."""
    health = gw.store.health()
    return bool(health.get("connected", True) or health.get("answers_reads"))


def admin_gateway(request: Request) -> Any:
    gw = request.app.state.gateway
    gw.keys.authenticate(request, admin=True)
    if gw.store is None:
        raise ApiError(503, "The telemetry store is not started yet.", code="store_unavailable")
    return gw


# -- helpers over the gateway's state -------------------------------------------------------------


def policy_names(gw: Any, summary: dict[str, Any]) -> list[str]:
    names = list(gw.policies.names()) if gw.policies is not None else []
    return names + sorted(n for n in summary.get("policies", {}) if n not in names)


def chosen_policy(request: Request, gw: Any, summary: dict[str, Any]) -> str:
    asked = request.query_params.get("policy")
    known = policy_names(gw, summary)
    if asked:
        if asked not in known:
            raise ApiError(404, f"Unknown policy {asked!r}; known: {known}.", param="policy", code="unknown_policy")
        return asked
    if gw.policies is not None:
        return gw.policies.default_name
    return known[0] if known else "direct"


def current_choices(gw: Any, policy: str, buckets: list[str]) -> dict[str, str | None]:
    """bucket -> the arm the learner would pick now (greedy, no budget pressure)."""
    compiled = gw.policies.get(policy) if gw.policies is not None else None
    if compiled is None:
        return {}
    try:
        from router.learner import current_choice
    except ImportError:  # the learner is optional for the page: no choice marked then
        return {}
    snapshot = gw.store.snapshot(policy)
    choices: dict[str, str | None] = {}
    for bucket in buckets:
        try:
            choices[bucket] = current_choice(bucket, compiled, snapshot, alias="auto").key
        except Exception:  # noqa: BLE001 - e.g. a bucket no route covers any more after a policy edit
            choices[bucket] = None
    return choices


async def policy_events(gw: Any, policy: str, count: int) -> list[dict[str, Any]]:
    """The policy's latest `count` recorded requests. Other events share the log (embeddings, requests
    naming a backend, other policies': an app that embeds ten chunks a question writes ten of them a
    chat), so the log is read further back, up to REQUEST_LOOKUP_WINDOW, when the latest `count`
    events hold fewer of this policy's. `direct` has no learner: nothing to look for."""
    if policy == "direct":
        return []
    events = await gw.store.recent_events(count)
    mine = [e for e in events if e.get("policy") == policy]
    if len(mine) < count and len(events) == count:
        # as far back as this policy's share of the latest events says it takes: one more read
        depth = min(REQUEST_LOOKUP_WINDOW, math.ceil(1.2 * count * count / max(len(mine), 1)))
        mine = [e for e in await gw.store.recent_events(depth) if e.get("policy") == policy]
    return mine[:count]


def cost_estimate(gw: Any, policy: str):
    """(arm key, prompt tokens) -> the policy's expected cost of one request, for arms never observed."""
    compiled = gw.policies.get(policy) if gw.policies is not None else None
    by_key = getattr(compiled, "by_key", {}) if compiled is not None else {}

    def estimate(arm: str, prompt_tokens: float) -> float | None:
        found = by_key.get(arm)
        if found is None:
            return None
        return found.cost_per_prompt_token * (prompt_tokens or 300.0) + found.cost_fixed

    return estimate


def key_budgets(gw: Any) -> dict[str, dict[str, float]]:
    """key id -> period -> USD cap, exactly as `KeyBudgets.reserve` enforces them: the key's own
    caps, else the default policy's caps for keys."""
    principals = [principal_of(k) for k in gw.config.api_keys] or [ANONYMOUS]
    return {p.key_id: gw.budgets.limits(p) for p in principals}


# -- JSON endpoints ---------------------------------------------------------------------------------


async def summary_endpoint(request: Request) -> Response:
    gw = admin_gateway(request)
    summary = await gw.store.summary()
    policy = chosen_policy(request, gw, summary)
    table = summary.get("policies", {}).get(policy, {})
    return json_response({
        "generated_at": summary.get("generated_at"),
        "policy": policy,
        "policies": policy_names(gw, summary),
        "totals": summaries.totals(table),
        "tasks": summaries.task_views(table, current_choices(gw, policy, sorted(table))),
        "latency": summaries.latency_by_arm(table),
        "shares": summaries.shares(table),
        "exploration": summaries.exploration(await policy_events(gw, policy, EXPLORATION_WINDOW)),
        "health": summary.get("health") or gw.store.health(),
    })


async def spend_endpoint(request: Request) -> Response:
    gw = admin_gateway(request)
    summary = await gw.store.summary()
    budgets = key_budgets(gw)
    spent: dict[str, dict[str, float]] = {}

    async def read(key_id: str, caps: dict[str, float]) -> None:
        # The budget ledger counts only periods with a cap (what enforcement needs): an uncapped
        # period has no ledger to show, rather than a $0 that reads as nothing spent.
        try:
            spent[key_id] = await gw.store.spent(key_id, tuple(caps)) if caps else {}
        except Exception:  # noqa: BLE001 - store unreachable: the rollups still show
            spent[key_id] = {}

    # Every configured key (only the first 200 were read: the others showed $0 against their caps),
    # SPEND_READ_BATCH reads at a time, so thousands of keys do not open as many Redis connections.
    items = list(budgets.items())
    for start in range(0, len(items), SPEND_READ_BATCH):
        await asyncio.gather(*(read(key_id, caps) for key_id, caps in items[start:start + SPEND_READ_BATCH]))
    return json_response({"generated_at": summary.get("generated_at"),
                          **summaries.spend_view(summary.get("spend") or {}, budgets, spent)})


async def savings_endpoint(request: Request) -> Response:
    gw = admin_gateway(request)
    summary = await gw.store.summary()
    policy = chosen_policy(request, gw, summary)
    table = summary.get("policies", {}).get(policy, {})
    observed = sorted(summaries.per_arm(table))
    compiled = gw.policies.get(policy) if gw.policies is not None else None
    declared = sorted(getattr(compiled, "by_key", {}) or {}) if compiled is not None else []
    references = observed + [k for k in declared if k not in observed]
    reference = request.query_params.get("reference") or summaries.default_reference(table)
    if reference is None:
        return json_response({"policy": policy, "reference": None, "references": references, "buckets": []})
    if reference not in references:
        raise ApiError(400, f"Unknown reference arm {reference!r}; known: {references}.", param="reference",
                       code="unknown_arm")
    result = summaries.savings(table, reference, cost_estimate(gw, policy))
    return json_response({"policy": policy, "references": references, **result})


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_REQUESTS))
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, "'limit' must be an integer.", param="limit", code="invalid_value") from None
    if not 1 <= limit <= MAX_REQUESTS:
        raise ApiError(400, f"'limit' must be between 1 and {MAX_REQUESTS}.", param="limit", code="invalid_value")
    return limit


async def requests_endpoint(request: Request) -> Response:
    gw = admin_gateway(request)
    events = await gw.store.recent_events(_limit(request))
    rows = [summaries.request_row(e) for e in events]
    return json_response({"requests": rows, "count": len(rows), "store_readable": store_readable(gw)})


async def request_endpoint(request: Request) -> Response:
    gw = admin_gateway(request)
    request_id = request.path_params["request_id"]
    for event in await gw.store.recent_events(REQUEST_LOOKUP_WINDOW):
        if event.get("request_id") == request_id:
            return json_response(summaries.request_detail(event))
    if not store_readable(gw):
        raise ApiError(503, f"The telemetry store is unreachable: request {request_id!r} is not among the requests "
                       "this gateway still holds in memory; try again when the store is back.",
                       param="request_id", code="store_unavailable")
    raise ApiError(404, f"No request {request_id!r} among the last {REQUEST_LOOKUP_WINDOW} recorded.",
                   param="request_id", code="unknown_request")


async def report_endpoint(request: Request) -> Response:
    request.app.state.gateway.keys.authenticate(request, admin=True)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPORT_BYTES:
            raise ApiError(413, f"A report larger than {MAX_REPORT_BYTES} bytes is not accepted.",
                           code="body_too_large")
    try:
        report = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "Send a `ponder eval` report.json as the request body.", code="invalid_json") from None
    points = summaries.report_points(report)
    points["points"] = [p for p in points["points"] if math.isfinite(p["cost"]) and math.isfinite(p["accuracy"])]
    return json_response(points)


# -- page, static files, metrics --------------------------------------------------------------------


async def dashboard_page(request: Request) -> Response:
    gw = request.app.state.gateway
    status = 200
    try:
        gw.keys.authenticate(request, admin=True)
    except ApiError as exc:  # the same page: it asks for the key and the data stays behind it
        status = exc.status
    return Response((STATIC_DIR / "dashboard.html").read_bytes(), status, PAGE_HEADERS, media_type="text/html")


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_TYPES:  # a fixed list: no path from the URL ever reaches the filesystem
        raise ApiError(404, "Not found.", code="not_found")
    headers = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "content-type": STATIC_TYPES[name]}
    return Response((STATIC_DIR / name).read_bytes(), 200, headers)


async def metrics_endpoint(request: Request) -> Response:
    gw = request.app.state.gateway
    gw.keys.authenticate(request, admin=True)
    metrics = getattr(gw, "metrics", None)
    if metrics is None:
        raise ApiError(503, "Metrics are not enabled in this gateway.", code="metrics_unavailable")
    body, content_type = metrics.render()
    return Response(body, 200, {"content-type": content_type, "cache-control": "no-store"})


def dashboard_routes() -> list[Route]:
    return [
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/dashboard", dashboard_page, methods=["GET"]),
        Route("/dashboard/static/{name}", static_file, methods=["GET"]),
        Route("/v1/ponder/summary", summary_endpoint, methods=["GET"]),
        Route("/v1/ponder/spend", spend_endpoint, methods=["GET"]),
        Route("/v1/ponder/savings", savings_endpoint, methods=["GET"]),
        Route("/v1/ponder/requests", requests_endpoint, methods=["GET"]),
        Route("/v1/ponder/requests/{request_id}", request_endpoint, methods=["GET"]),
        Route("/v1/ponder/report", report_endpoint, methods=["POST"]),
    ]
