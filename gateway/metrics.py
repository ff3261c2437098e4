"""Prometheus metrics for the gateway: one `Metrics` per process, fed one `Event` per request.

`Gateway.record()` calls `observe(event)` after handing the event to the store; `GET /metrics`
(gateway/dashboard.py) serves `render()`. Observing is a handful of counter increments on label sets
that are bounded by configuration, never by clients: arm keys and aliases come from the policy and the
backend list (an unknown `model` is refused before anything is recorded), tasks from the classifier's
fixed label set, efforts from a validated enum, and HTTP statuses are grouped into classes (errors keep
the exact code: the gateway only returns a dozen). Request ids are never labels; key ids only in
`ponder_rate_limited_requests`, where they are the configured keys' (bounded by the config).

Multi-process: when the server runs several worker processes, set `PROMETHEUS_MULTIPROC_DIR` to an
empty, writable folder before the workers start (and wipe it on every deploy). prometheus-client then
keeps each worker's values in memory-mapped files there, and `render()` merges every worker's files
with `MultiProcessCollector`, so a scrape that lands on any worker sees the whole server. Gauges say
how they merge (`multiprocess_mode`): buffered/dropped events are summed over live workers, `connected`
is the minimum over live workers (one disconnected worker shows as 0).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.usage import CUT_OFF, NO_CHOICES
from telemetry.events import Event

# `*_created` series would double every scrape for a timestamp nobody graphs; the gateway owns its process.
disable_created_metrics()

# Seconds. Ponder answers range from a cached-feeling 50 ms to minutes of sampled reasoning.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
SAMPLE_BUCKETS = (1, 2, 3, 4, 5, 8, 16, 32, 64)
STORE_HEALTH_EVERY_S = 1.0  # observe() refreshes the store gauges at most this often


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def call_outcome(call: dict[str, Any]) -> str:
    """`ok`, `cut` (cut off before its end, and billed for what the upstream had read and written:
    Backend.cut), `empty` (a 200 without choices, billed as it came) or `error` (failed, at no cost)."""
    if call.get("ok"):
        return "ok"
    error = str(call.get("error") or "")
    return "cut" if error.startswith(CUT_OFF) else "empty" if error.startswith(NO_CHOICES) else "error"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class Metrics:
    """The gateway's counters. `store_health` returns `Store.health()` (or None before the store is up)."""

    def __init__(self, store_health: Callable[[], dict[str, Any] | None] | None = None,
                 policy_rejections: Callable[[], dict[str, bool]] | None = None) -> None:
        # A registry per instance: tests and `create_app` may build several gateways in one process.
        self.registry = CollectorRegistry(auto_describe=True)
        self._store_health = store_health
        self._policy_rejections = policy_rejections
        self._health_at = 0.0
        self._policies_shown: set[str] = set()  # the `policy` labels of ponder_policy_reload_rejected set so far
        self._children: dict[tuple, Any] = {}  # bounded like the label sets themselves
        r = self.registry
        self.requests = Counter("ponder_requests", "Requests answered (or failed), by routed model and status class.",
                                ["alias", "task", "status_class"], registry=r)
        self.errors = Counter("ponder_errors", "Requests that ended in an error, by arm and exact HTTP status.",
                              ["arm", "status"], registry=r)
        self.tokens = Counter("ponder_tokens", "Tokens billed by backends, by arm and kind.",
                              ["arm", "kind"], registry=r)
        self.cost = Counter("ponder_cost_usd", "Backend spend in USD, by arm and task type.",
                            ["arm", "task"], registry=r)
        self.latency = Histogram("ponder_request_latency_seconds", "Gateway latency of a request, by arm.",
                                 ["arm"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("ponder_decisions", "Routing decisions, by arm, strategy, effort and task type.",
                                 ["arm", "strategy", "effort", "task"], registry=r)
        self.learner = Counter("ponder_learner_decisions", "Routed decisions the learner explored vs exploited "
                               "(exploration share = explore / all).", ["task", "mode"], registry=r)
        self.samples = Histogram("ponder_samples", "Samples drawn per request (self-consistency, best-of-N ...).",
                                 ["strategy"], buckets=SAMPLE_BUCKETS, registry=r)
        self.calls = Counter("ponder_backend_calls", "Calls to backends, by backend and outcome.",
                             ["backend", "outcome"], registry=r)
        self.success_score = Counter("ponder_success_score", "Summed automatic success scores (vote agreement, "
                                     "verifier) in [0, 1]; divide by ponder_success_scored_total.",
                                     ["arm", "task", "source"], registry=r)
        self.success_scored = Counter("ponder_success_scored", "Requests that got an automatic success score.",
                                      ["arm", "task", "source"], registry=r)
        self.store_connected = Gauge("ponder_store_connected", "1 when the telemetry store is reachable.",
                                     ["backend"], multiprocess_mode="livemin", registry=r)
        self.store_buffered = Gauge("ponder_store_buffered_events", "Events waiting in memory to be written.",
                                    multiprocess_mode="livesum", registry=r)
        self.store_dropped = Gauge("ponder_store_dropped_events", "Events dropped since start: the buffer was "
                                   "full (the store unreachable too long), or the store kept refusing a batch (e.g. "
                                   "Redis OOM at maxmemory).",
                                   multiprocess_mode="livesum", registry=r)
        self.store_written = Gauge("ponder_store_written_events", "Events written to the store since start.",
                                   multiprocess_mode="livesum", registry=r)
        self.store_budget_fallback = Gauge("ponder_store_budget_fallback", "1 while budget reservations are "
                                           "checked in this process's ledger, not in Redis (Redis away, or refusing "
                                           "writes: OOM at maxmemory); each replica then enforces the caps alone.",
                                           multiprocess_mode="livemax", registry=r)
        self.shed_requests = Counter("ponder_shed_requests", "Requests refused with 503 `overloaded` before any "
                                     "work, by path and reason: `in_flight` (this process at max_requests_in_flight) or "
                                     "`event_loop_lag` (its event loop later than max_event_loop_lag_ms).",
                                     ["path", "reason"],
                                     registry=r)
        self.rate_limited = Counter("ponder_rate_limited_requests", "Requests refused with 429 "
                                    "`rate_limit_exceeded` at a key's own limit (api_keys), by key and limit.",
                                    ["key_id", "limit"], registry=r)
        self.in_flight = Gauge("ponder_requests_in_flight", "Model requests (chat, responses, embeddings) being "
                               "served now; past max_requests_in_flight in one process more are shed.",
                               multiprocess_mode="livesum", registry=r)
        self.event_loop_lag = Gauge("ponder_event_loop_lag_seconds", "How late the event loop ran a timer due "
                                    "every 50 ms, at its last tick: the wait of work queued in this process. Past "
                                    "max_event_loop_lag_ms new model requests are shed.",
                                    multiprocess_mode="livemax", registry=r)
        self.policy_rejected = Gauge("ponder_policy_reload_rejected", "1 while a policy file's last edit failed "
                                     "its check: the previous version keeps serving (the log says why).",
                                     ["policy"], multiprocess_mode="livemax", registry=r)

    # -- hot path -------------------------------------------------------------------------------
    def observe(self, event: Event) -> None:
        """Count one request. Never raises: metrics must not fail an answer."""
        try:
            self._observe(event)
        except Exception:  # noqa: BLE001 - a bad value in one event must not reach the client
            pass

    def refused(self, alias: str, status: int) -> None:
        """Count a chat request refused before any decision ran (auth, bad input, budget, cost cap):
        no event is recorded for it, but operators must see it. `alias` is a known model name or "-"
        (never the client's string: labels stay a fixed set)."""
        try:
            self._child(self.requests, alias, "-", status_class(status)).inc()
            self._child(self.errors, "-", str(status)).inc()
        except Exception:  # noqa: BLE001 - metrics must not fail an answer
            pass

    def shed(self, path: str, reason: str = "in_flight") -> None:
        """Count a request shed (gateway/shedding.py: `path` and `reason` are each one of its fixed set).
        It is an answered 5xx too, as ponder_requests and ponder_errors count refusals."""
        try:
            self._child(self.shed_requests, path, reason).inc()
        except Exception:  # noqa: BLE001 - metrics must not fail an answer
            pass
        self.refused("-", 503)

    def key_limited(self, key_id: str, limit: str) -> None:
        """Count a request refused at its key's own limit (gateway/key_limits.py: `key_id` is a configured
        key's, `limit` the limit's config name). The handler counts it as a refused 429 too."""
        try:
            self._child(self.rate_limited, key_id, limit).inc()
        except Exception:  # noqa: BLE001 - metrics must not fail an answer
            pass

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: labels() validates and hashes on every call (~2 us each)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _observe(self, event: Event) -> None:
        c = self._child
        arm, task = event.arm or "-", event.task or "-"
        c(self.requests, event.alias or "-", task, status_class(event.status)).inc()
        if event.status >= 400 or event.error:
            c(self.errors, arm, str(event.status)).inc()
        for kind, value in (("prompt", event.prompt_tokens), ("completion", event.completion_tokens),
                            ("reasoning", event.reasoning_tokens)):
            if value:
                c(self.tokens, arm, kind).inc(value)
        if event.cost_usd > 0:
            c(self.cost, arm, task).inc(event.cost_usd)
        c(self.latency, arm).observe(max(0.0, event.latency_ms) / 1000.0)
        if event.arm_outcome:  # an embedding is no decision
            c(self.decisions, arm, event.strategy or "-", event.effort or "-", task).inc()
        if event.policy != "direct":  # a client that names a backend bypasses the learner
            c(self.learner, task, "explore" if event.explore else "exploit").inc()
        samples = event.details.get("samples") if isinstance(event.details, dict) else None
        if isinstance(samples, (int, float)) and samples > 0:
            c(self.samples, event.strategy or "-").observe(samples)
        for call in event.calls:
            c(self.calls, str(call.get("backend", "-")), call_outcome(call)).inc()
        if event.success is not None and event.success_source:
            c(self.success_score, arm, task, event.success_source).inc(event.success)
            c(self.success_scored, arm, task, event.success_source).inc()
        now = time.monotonic()
        if now - self._health_at >= STORE_HEALTH_EVERY_S:
            self._health_at = now
            self.refresh_store_health()

    def refresh_store_health(self, health: dict[str, Any] | None = None) -> None:
        if health is None and self._store_health is not None:
            try:
                health = self._store_health()
            except Exception:  # noqa: BLE001
                health = None
        if not health:
            return
        self.store_connected.labels(str(health.get("backend", "unknown"))).set(1 if health.get("connected") else 0)
        self.store_buffered.set(float(health.get("buffered") or 0))
        self.store_dropped.set(float(health.get("dropped") or 0))
        self.store_written.set(float(health.get("written") or 0))
        fallback = health.get("backend") == "redis" and health.get("budget_mode") == "local"
        self.store_budget_fallback.set(1 if fallback else 0)

    def refresh_policy_rejections(self) -> None:
        if self._policy_rejections is None:
            return
        try:
            served = self._policy_rejections()
            for policy, rejected in served.items():
                self.policy_rejected.labels(policy).set(1 if rejected else 0)
            # A policy renamed by an edit is served under its new name only: its old name's last value (1 when
            # that edit fixed a rejected file) must not keep an alert firing.
            for gone in self._policies_shown - served.keys():
                if multiprocess_dir():  # prometheus-client cannot remove a label there
                    self.policy_rejected.labels(gone).set(0)
                else:
                    self.policy_rejected.remove(gone)
            self._policies_shown = set(served)
        except Exception:  # noqa: BLE001 - a scrape must not fail for it
            pass

    # -- exposition -----------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this process, or of every worker in multi-process mode."""
        self.refresh_store_health()
        self.refresh_policy_rejections()
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
