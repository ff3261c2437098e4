"""The dashboard, its JSON and /metrics, against a real gateway with real traffic, in a real browser.

One keyed gateway (`ponder serve`) in front of the mock upstream gets a known mix of requests (routed,
self-consistency, direct, one failure) and client feedback; every number the JSON, /metrics and the
page show is then checked against what the client itself saw in the responses. The page is driven by
Playwright on Debian's /usr/bin/chromium (never `playwright install`); the screenshot lands in
test-artifacts/dashboard.png.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.types import bucket_key
from telemetry.redis_server import start_redis
from tests.servers import (ROOT, Process, control, free_port, mock_backend, running, start_gateway, start_mock,
                           two_mock_policy, write_policy)

USER_KEY = "sk-dash-user-1"
ADMIN_KEY = "sk-dash-admin-2"
DAY_BUDGET = 1.0
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
JSON_PATHS = ["/v1/ponder/summary", "/v1/ponder/spend", "/v1/ponder/savings", "/v1/ponder/requests",
              "/v1/ponder/requests/chatcmpl-none", "/metrics"]
SC_ARM = "mock-a/-/self_consistency/5"
PROMPTS = ["What is 17 * 23? Show the steps.", "Write a haiku about routers.", "hi, how are you today?",
           "Who wrote The Brothers Karamazov?", "Prove that the square root of 2 is irrational.",
           "def f(x): return x*2  # what does f(3) return?"]


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Seeded:
    """What the client saw: one record per request the gateway answered (or failed)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def add(self, response: httpx.Response, scored: float | None = None) -> dict:
        body = response.json()
        ext = body.get("ponder") or {}
        usage = body.get("usage") or {}
        record = {"id": response.headers["x-ponder-request-id"], "status": response.status_code,
                  "policy": response.headers.get("x-ponder-policy"), "arm": ext.get("arm"), "task": ext.get("task"),
                  "bucket": bucket_key(response.headers["x-ponder-task"],
                                       float(response.headers["x-ponder-difficulty"])),
                  "strategy": ext.get("strategy"), "cost": ext.get("cost_usd", 0.0), "calls": ext.get("calls", 0),
                  "samples": ext.get("samples"), "prompt_tokens": usage.get("prompt_tokens", 0),
                  "completion_tokens": usage.get("completion_tokens", 0), "score": scored}
        self.records.append(record)
        return record

    def routed(self) -> list[dict]:
        return [r for r in self.records if r["policy"] == "dash"]

    def cost(self, records: list[dict] | None = None) -> float:
        return sum(r["cost"] for r in (self.records if records is None else records))


@pytest.fixture(scope="module", params=["embedded", "redis"])
def stack(request, tmp_path_factory):
    """(gateway, mock, seeded, store backend): the same traffic on the embedded store and on Redis."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"dash-{backend}")
    with contextlib.ExitStack() as cleanup:  # stops whatever started, however the fixture ends
        redis_proc = start_redis(data_dir=tmp / "redis") if backend == "redis" else None
        telemetry = {"data_dir": str(tmp / "data"), "refresh_s": 0.2}
        if redis_proc is not None:
            cleanup.callback(redis_proc.stop)
            telemetry["redis_url"] = redis_proc.url
        mock = cleanup.enter_context(running(start_mock(tmp)))
        policy = two_mock_policy(tmp, "dash")
        gateway = cleanup.enter_context(running(start_gateway(tmp, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock, prices={
                "input_per_mtok": 3.0, "output_per_mtok": 15.0})],
            "policy": policy,
            "telemetry": telemetry,
            "api_keys": [{"id": "team-a", "sha256": hashlib.sha256(USER_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": DAY_BUDGET},
                         {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}],
        }, name="dash")))
        seeded = seed(gateway.url, mock.url)
        yield gateway, mock, seeded, backend


def chat(url: str, model: str, prompt: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={**bearer(USER_KEY), **(headers or {})}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": prompt}]})


def seed(url: str, mock_url: str) -> Seeded:
    seeded = Seeded()
    # Six routed requests, each scored by feedback (two wrong), so every success rate is known exactly.
    for i, prompt in enumerate(PROMPTS):
        response = chat(url, "auto", prompt)
        assert response.status_code == 200, response.text
        seeded.add(response, scored=0.0 if i < 2 else 1.0)
    # Two self-consistency requests: five samples, a 3-2 vote.
    httpx.post(mock_url + "/control", json={"answers": ["The answer is 7", "The answer is 7", "The answer is 9",
                                                        "The answer is 7", "The answer is 9"]}).raise_for_status()
    for prompt in ("What is 3 + 4?", "What is 10 - 3?"):
        response = chat(url, "auto", prompt, {"x-ponder-strategy": "self_consistency"})
        assert response.status_code == 200, response.text
        seeded.add(response, scored=1.0)
    httpx.post(mock_url + "/reset").raise_for_status()
    # Two direct requests (they bypass the learner: policy "direct") and one that fails upstream.
    for prompt in ("one two three", "four five"):
        seeded.add(chat(url, "mock-b", prompt))
    httpx.post(mock_url + "/control", json={"script": ["500", "500"]}).raise_for_status()
    failed = chat(url, "mock-a", "this one fails")
    assert failed.status_code == 502
    seeded.records.append({"id": failed.headers["x-ponder-request-id"], "status": 502, "policy": "direct",
                           "arm": "mock-a/-/single/1", "task": failed.headers["x-ponder-task"], "strategy": "single",
                           "bucket": "", 
                           "cost": 0.0, "calls": 2, "samples": 1, "prompt_tokens": 0, "completion_tokens": 0,
                           "score": None})
    httpx.post(mock_url + "/reset").raise_for_status()
    for record in seeded.routed():
        response = httpx.post(url + "/v1/feedback", headers=bearer(USER_KEY), timeout=10,
                              json={"request_id": record["id"], "score": record["score"]})
        assert response.status_code == 200 and response.json()["status"] == "accepted", response.text
    # The store writes in the background and refreshes its cache every 0.2 s: wait until it shows it all.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        summary = get(url, "/v1/ponder/summary").json()
        scored = summary["totals"]["scored_weight"]
        if summary["totals"]["requests"] == len(seeded.routed()) and scored == pytest.approx(len(seeded.routed())):
            break
        time.sleep(0.2)
    return seeded


def get(url: str, path: str, key: str | None = ADMIN_KEY) -> httpx.Response:
    return httpx.get(url + path, headers=bearer(key), timeout=10)


# -- auth ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*JSON_PATHS, "/dashboard"])
def test_admin_key_is_required(stack, path):
    url = stack[0].url
    assert get(url, path, key=None).status_code == 401
    assert get(url, path, key="sk-wrong").status_code == 401
    forbidden = get(url, path, key=USER_KEY)
    assert forbidden.status_code == 403
    if path != "/dashboard":
        assert forbidden.json()["error"]["code"] == "admin_required"
    assert get(url, path).status_code == (404 if path.endswith("chatcmpl-none") else 200)
    report = httpx.post(url + "/v1/ponder/report", json={}, headers=bearer(USER_KEY))
    assert report.status_code == 403


def test_an_admin_key_may_grade_any_keys_request(stack):
    """An operator labels traffic with the admin key: feedback on another key's request is taken (here
    the same score again, so `duplicate`), as telemetry.md says; a user key may grade only its own."""
    url = stack[0].url
    record = stack[2].routed()[0]
    response = httpx.post(url + "/v1/feedback", headers=bearer(ADMIN_KEY), timeout=10,
                          json={"request_id": record["id"], "score": record["score"]})
    assert response.status_code == 200 and response.json()["status"] == "duplicate", response.text


def test_dashboard_page_without_key_is_a_login_page_and_holds_no_data(stack):
    gateway, _, seeded, _ = stack
    page = get(gateway.url, "/dashboard", key=None)
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert 'data-testid="key-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert all(r["id"] not in page.text for r in seeded.records)
    assert httpx.get(gateway.url + "/dashboard/static/dashboard.js").status_code == 200
    assert httpx.get(gateway.url + "/dashboard/static/..%2Fdashboard.py").status_code == 404


# -- /metrics -------------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, list]:
    families = text_string_to_metric_families(get(url, "/metrics").text)
    return {f.name: f.samples for f in families}


def total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_what_was_sent(stack):
    gateway, _, seeded, backend = stack
    m = scrape(gateway.url)
    n = len(seeded.records)
    ok = [r for r in seeded.records if r["status"] == 200]
    assert total(m["ponder_requests"], "ponder_requests_total") == n
    assert total(m["ponder_requests"], "ponder_requests_total", status_class="2xx") == len(ok)
    assert total(m["ponder_requests"], "ponder_requests_total", status_class="5xx") == 1
    assert total(m["ponder_errors"], "ponder_errors_total", arm="mock-a/-/single/1", status="502") == 1
    assert total(m["ponder_tokens"], "ponder_tokens_total", kind="prompt") == sum(r["prompt_tokens"] for r in ok)
    completion_tokens = sum(r["completion_tokens"] for r in ok)
    assert total(m["ponder_tokens"], "ponder_tokens_total", kind="completion") == completion_tokens
    assert total(m["ponder_cost_usd"], "ponder_cost_usd_total") == pytest.approx(seeded.cost(), rel=1e-9)
    assert total(m["ponder_request_latency_seconds"], "ponder_request_latency_seconds_count") == n
    assert total(m["ponder_decisions"], "ponder_decisions_total", strategy="self_consistency") == 2
    per_arm = defaultdict(int)
    for r in seeded.records:
        per_arm[r["arm"]] += 1
    for arm, count in per_arm.items():
        assert total(m["ponder_decisions"], "ponder_decisions_total", arm=arm) == count, arm
    routed = len(seeded.routed())
    assert total(m["ponder_learner_decisions"], "ponder_learner_decisions_total", mode="exploit") == routed
    assert total(m["ponder_learner_decisions"], "ponder_learner_decisions_total", mode="explore") == 0
    assert total(m["ponder_backend_calls"], "ponder_backend_calls_total", outcome="ok") == sum(r["calls"] for r in ok)
    assert total(m["ponder_backend_calls"], "ponder_backend_calls_total", outcome="error") == 2
    assert total(m["ponder_samples"], "ponder_samples_count", strategy="self_consistency") == 2
    assert total(m["ponder_samples"], "ponder_samples_sum", strategy="self_consistency") == 10
    assert total(m["ponder_store_connected"], "ponder_store_connected", backend=backend) == 1
    assert total(m["ponder_store_dropped_events"], "ponder_store_dropped_events") == 0
    assert "ponder_store_buffered_events" in m


def test_metrics_merge_worker_processes(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, a scrape of any worker sums every worker's counters."""
    script = (
        "import sys; from gateway.metrics import Metrics; from telemetry.events import Event\n"
        "m = Metrics()\n"
        "for i in range(int(sys.argv[1])):\n"
        "    m.observe(Event(request_id=str(i), arm='a/-/single/1', task='math', alias='auto', policy='p',"
        " cost_usd=0.5, latency_ms=20))\n"
        "if len(sys.argv) > 2: sys.stdout.write(m.render()[0].decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in (3, 4):
        subprocess.run([sys.executable, "-c", script, str(count)], cwd=ROOT, env=env, check=True)
    out = subprocess.run([sys.executable, "-c", script, "1", "render"], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    samples = [s for f in text_string_to_metric_families(out) for s in f.samples]
    assert total(samples, "ponder_requests_total") == 8
    assert total(samples, "ponder_cost_usd_total") == pytest.approx(4.0)


def test_grafana_dashboard_uses_only_metrics_the_gateway_exports():
    import re

    from gateway.metrics import Metrics
    from telemetry.events import Event

    metrics = Metrics(store_health=lambda: {"backend": "redis", "connected": True, "buffered": 0, "dropped": 0})
    metrics.observe(Event(request_id="x", arm="a/-/self_consistency/5", strategy="self_consistency", task="math",
                          alias="auto", policy="p", cost_usd=0.1, prompt_tokens=1, completion_tokens=1, status=502,
                          error="boom", success=1.0, success_source="vote", details={"samples": 5},
                          calls=[{"backend": "a", "ok": True}]))
    metrics.shed("/v1/chat/completions")  # a request shed at max_requests_in_flight (gateway/shedding.py)
    exported = {s.name for f in text_string_to_metric_families(metrics.render()[0].decode()) for s in f.samples}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ponder-dashboard.json").read_text())
    used = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"ponder_\w+", t["expr"])}
    assert used and used <= exported, used - exported


# -- JSON endpoints -------------------------------------------------------------------------------------


def expected_success(records: list[dict]) -> dict[tuple[str, str], float]:
    scores = defaultdict(list)
    for r in records:
        scores[(r["task"], r["arm"])].append(r["score"])
    return {k: sum(v) / len(v) for k, v in scores.items()}


def test_summary_matches_the_seeded_traffic(stack):
    gateway, _, seeded, backend = stack
    summary = get(gateway.url, "/v1/ponder/summary").json()
    routed = seeded.routed()
    assert summary["policy"] == "dash" and "direct" in summary["policies"]
    assert summary["totals"]["requests"] == len(routed)
    assert summary["totals"]["cost_usd"] == pytest.approx(seeded.cost(routed), rel=1e-6)
    assert summary["totals"]["success_rate"] == pytest.approx(sum(r["score"] for r in routed) / len(routed))
    success = expected_success(routed)
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {task for task, _ in success}
    for (task, arm), rate in success.items():
        point = next(a for a in tasks[task]["arms"] if a["arm"] == arm)
        assert point["success_rate"] == pytest.approx(rate, abs=1e-4)
        assert point["requests"] == sum(1 for r in routed if (r["task"], r["arm"]) == (task, arm))
    for view in tasks.values():
        on_frontier = [a for a in view["arms"] if a["pareto"]]
        assert [a["arm"] for a in sorted(on_frontier, key=lambda a: a["mean_cost_usd"])] == view["frontier"]
        for tier in view["tiers"]:  # the learner's greedy choice for every bucket with traffic
            assert tier["current_choice"] in {"mock-a/-/single/1", "mock-b/-/single/1"}
    strategies = {s["name"]: s for s in summary["shares"]["strategy"]}
    assert strategies["self_consistency"]["requests"] == 2
    assert strategies["self_consistency"]["share"] == pytest.approx(2 / len(routed), abs=1e-4)
    assert {row["arm"] for row in summary["latency"]} == {r["arm"] for r in routed}
    assert all(0 < row["p50_latency_ms"] <= row["p95_latency_ms"] for row in summary["latency"])
    assert summary["exploration"] == {"window": len(routed), "explored": 0, "exploited": len(routed), "share": 0.0}
    assert summary["health"]["connected"] and summary["health"]["dropped"] == 0
    assert summary["health"]["backend"] == backend
    direct = get(gateway.url, "/v1/ponder/summary?policy=direct").json()
    assert direct["totals"]["requests"] == len(seeded.records) - len(routed)
    assert direct["exploration"]["window"] == 0  # like every other number there, this policy's own
    assert get(gateway.url, "/v1/ponder/summary?policy=nope").status_code == 404


def test_spend_by_hour_and_by_key_against_budget(stack):
    gateway, _, seeded, _ = stack
    spend = get(gateway.url, "/v1/ponder/spend").json()
    assert len(spend["by_hour"]) == 24 and len(spend["by_day"]) == 30
    assert sum(h["cost_usd"] for h in spend["by_hour"]) == pytest.approx(seeded.cost(), rel=1e-6)
    assert sum(h["requests"] for h in spend["by_hour"]) == len(seeded.records)
    keys = {k["key_id"]: k for k in spend["keys"]}
    team = keys["team-a"]
    assert team["requests_30d"] == len(seeded.records)
    assert team["cost_usd_30d"] == pytest.approx(seeded.cost(), rel=1e-6)
    assert team["budget"] == {"day": DAY_BUDGET}
    assert team["spent"]["day"] == pytest.approx(seeded.cost(), rel=1e-6)  # reservations settle to actual cost
    assert team["used"]["day"] == pytest.approx(seeded.cost() / DAY_BUDGET, abs=1e-4)
    assert set(team["spent"]) == {"day"}  # no monthly cap: no monthly ledger, rather than a $0
    assert keys["ops"]["budget"] == {} and keys["ops"]["spent"] == {} and keys["ops"]["requests_30d"] == 0


def test_a_merged_rows_latency_percentiles_are_of_its_answers():
    """An arm answered ten requests in one bucket (p95 1 s) and none of ten in another (every call
    failed: no latency at all). Weighted by count, the arm's p95 on the page read 500 ms."""
    from telemetry.summaries import merge_rows

    answered = {"requests": 10.0, "count": 10.0, "answered": 10.0, "error_rate": 0.0,
                "p50_latency_ms": 600.0, "p95_latency_ms": 1000.0, "mean_latency_ms": 650.0}
    failed = {"requests": 10.0, "count": 10.0, "answered": 0.0, "error_rate": 1.0,
              "p50_latency_ms": 0.0, "p95_latency_ms": 0.0, "mean_latency_ms": 0.0}
    merged = merge_rows([answered, failed])
    assert (merged["p50_latency_ms"], merged["p95_latency_ms"], merged["mean_latency_ms"]) == (600.0, 1000.0, 650.0)


def test_savings_price_the_reference_at_its_cost_per_request_it_answered():
    """The reference arm spent $0.04 on the two of its four requests that did not fail (the failed two
    billed nothing): an answer from it costs $0.02, not the $0.01 its mean over all four reads, in its
    own bucket and in one it never served."""
    from telemetry.summaries import savings

    ref = {"requests": 4.0, "failed_requests": 2.0, "count": 4.0, "error_rate": 0.5, "cost_usd": 0.04,
           "mean_cost_usd": 0.01, "spent_usd": 0.04}
    cheap = {"requests": 10.0, "failed_requests": 0.0, "count": 10.0, "error_rate": 0.0, "cost_usd": 0.01,
             "mean_cost_usd": 0.001, "spent_usd": 0.01}
    result = savings({"math:hard": {"ref": ref, "cheap": cheap}, "math:easy": {"cheap": cheap}}, "ref")
    by_bucket = {b["bucket"]: b for b in result["buckets"]}
    assert by_bucket["math:hard"]["reference_cost_basis"] == "observed"
    assert by_bucket["math:hard"]["reference_cost_usd"] == pytest.approx(0.02 * 12)  # its 12 requests not failed
    assert by_bucket["math:easy"]["reference_cost_basis"] == "observed_elsewhere"
    assert by_bucket["math:easy"]["reference_cost_usd"] == pytest.approx(0.02 * 10)


def test_savings_against_a_reference_arm(stack):
    gateway, _, seeded, _ = stack
    routed = seeded.routed()
    savings = get(gateway.url, f"/v1/ponder/savings?reference={SC_ARM}").json()
    assert savings["reference"] == SC_ARM and SC_ARM in savings["references"]
    assert savings["actual_cost_usd"] == pytest.approx(seeded.cost(routed), rel=1e-6)
    sc = [r for r in routed if r["arm"] == SC_ARM]
    expected = 0.0  # per bucket: the reference's mean cost there if it ran there, else its overall mean
    for bucket in {r["bucket"] for r in routed}:
        here = [r for r in sc if r["bucket"] == bucket]
        mean = seeded.cost(here) / len(here) if here else seeded.cost(sc) / len(sc)
        expected += mean * sum(1 for r in routed if r["bucket"] == bucket)
    assert savings["reference_cost_usd"] == pytest.approx(expected, rel=1e-6)
    assert savings["reference_cost_usd"] > savings["actual_cost_usd"]
    assert savings["saved_usd"] == pytest.approx(savings["reference_cost_usd"] - savings["actual_cost_usd"], abs=1e-9)
    assert {b["reference_cost_basis"] for b in savings["buckets"]} <= {"observed", "observed_elsewhere"}
    assert sum(b["requests"] for b in savings["buckets"]) == len(routed)
    mean_cost = {arm: seeded.cost([r for r in routed if r["arm"] == arm]) / sum(1 for r in routed if r["arm"] == arm)
                 for arm in {r["arm"] for r in routed}}
    default = get(gateway.url, "/v1/ponder/savings").json()  # default: the priciest arm seen
    assert default["reference"] == max(mean_cost, key=mean_cost.get)
    assert get(gateway.url, "/v1/ponder/savings?reference=nope/-/single/1").status_code == 400


def test_requests_list_and_one_requests_reasons(stack):
    gateway, _, seeded, _ = stack
    rows = get(gateway.url, "/v1/ponder/requests?limit=100").json()["requests"]
    assert {r["request_id"] for r in rows} == {r["id"] for r in seeded.records}
    assert get(gateway.url, "/v1/ponder/requests?limit=0").status_code == 400
    vote = next(r for r in seeded.records if r["arm"] == SC_ARM)
    detail = get(gateway.url, f"/v1/ponder/requests/{vote['id']}").json()
    assert detail["request"]["arm"] == SC_ARM and detail["classifier"]["task"] == vote["task"]
    assert sum(detail["classifier"]["task_probs"].values()) == pytest.approx(1.0, abs=1e-3)
    assert detail["decision"]["explore"] is False and detail["decision"]["reasons"]
    assert any(c["chosen"] for c in detail["decision"]["candidates"])
    assert detail["execution"]["samples"] == 5 and len(detail["execution"]["calls"]) == vote["calls"]
    assert detail["request"]["cost_usd"] == pytest.approx(vote["cost"])


def test_report_points(stack):
    report = {"suite": "demo", "methods": {"first sample": {"accuracy": 0.6, "mean_samples": 1},
                                           "majority@8": {"accuracy": 0.8, "mean_samples": 8},
                                           "majority@16": {"accuracy": 0.79, "mean_samples": 16}}}
    got = httpx.post(stack[0].url + "/v1/ponder/report", json=report, headers=bearer(ADMIN_KEY)).json()
    assert got["cost_unit"] == "mean_samples" and len(got["points"]) == 3
    assert got["frontier"] == ["methods / first sample", "methods / majority@8"]
    bad = httpx.post(stack[0].url + "/v1/ponder/report", content=b"{nope", headers=bearer(ADMIN_KEY))
    assert bad.status_code == 400


# -- the page, in Chromium -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (scripts/install.sh --test)"
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class WatchedBrowser:
    """The browser, each page of which has its script's uncaught exceptions and console errors collected: a
    page test can pass while the script throws on a path it does not look at (a refresh, a retry)."""

    # Chromium logs every non-2xx or refused fetch so; the tests that cause them (401, 503, a gateway
    # restarting) check what the page says of them
    NETWORK = "Failed to load resource: "

    def __init__(self, browser) -> None:
        self._browser = browser
        self.errors: list[str] = []

    def new_page(self, **options):
        page = self._browser.new_page(**options)
        self._watch(page)
        return page

    def new_context(self, **options):
        context = self._browser.new_context(**options)
        context.on("page", self._watch)
        return context

    def _watch(self, page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", lambda message: self.errors.append(f"console.error: {message.text}")
                if message.type == "error" and not message.text.startswith(self.NETWORK) else None)

    def __getattr__(self, name: str):
        return getattr(self._browser, name)


@pytest.fixture
def browser(chromium):
    watched = WatchedBrowser(chromium)
    yield watched
    assert not watched.errors, f"the dashboard's script failed in the browser: {watched.errors}"


def test_dashboard_in_a_browser(stack, browser, tmp_path):
    from playwright.sync_api import expect  # (the page's CSP forbids eval: wait with locators, not JS strings)

    gateway, _, seeded, backend = stack
    routed = seeded.routed()
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: errors.append(f"key in URL: {req.url}") if ADMIN_KEY in req.url else None)

    response = page.goto(gateway.url + "/dashboard")
    assert response.status == 401
    page.wait_for_selector("[data-testid=login]:not([hidden])")
    page.fill("[data-testid=key-input]", USER_KEY)  # not an admin: refused, still on the login form
    page.click("[data-testid=login-submit]")
    expect(page.get_by_test_id("login-error")).to_contain_text("admin")
    page.fill("[data-testid=key-input]", ADMIN_KEY)
    page.click("[data-testid=login-submit]")
    page.wait_for_selector("[data-testid=request-row]")

    # KPIs and charts carry the seeded numbers.
    assert page.text_content("[data-testid=total-requests]") == str(len(routed))
    shown_cost = float(page.get_attribute("[data-testid=total-cost]", "data-value"))
    assert shown_cost == pytest.approx(seeded.cost(routed), rel=1e-6)
    tasks = {r["task"] for r in routed}
    assert page.locator("[data-testid=task-chart]").count() == len(tasks)
    for task in tasks:
        arms = {r["arm"] for r in routed if r["task"] == task}
        chart = page.locator(f"[data-testid=task-chart][data-task={task}]")
        assert chart.locator("[data-testid=arm-point]").count() == len(arms)
        assert {chart.locator("[data-testid=arm-point]").nth(i).get_attribute("data-arm")
                for i in range(len(arms))} == arms
    assert page.locator("[data-testid=current-choice]").count() >= 1
    bars = page.locator("[data-testid=spend-bar]")
    assert bars.count() == 24
    hourly = [float(bars.nth(i).get_attribute("data-value")) for i in range(24)]
    assert sum(hourly) == pytest.approx(seeded.cost(), rel=1e-6)
    assert page.locator("[data-testid=key-spend-row][data-key=team-a]").count() == 1
    assert page.locator("[data-testid=latency-row]").count() == len({r["arm"] for r in routed})
    sc_share = page.get_attribute("[data-testid=strategy-shares] [data-name=self_consistency]", "data-share")
    assert float(sc_share) == pytest.approx(2 / len(routed), abs=1e-3)
    assert page.locator("[data-testid=request-row]").count() == len(seeded.records)
    savings = get(gateway.url, "/v1/ponder/savings").json()  # the panel's default reference
    saved = page.text_content("[data-testid=saved]")
    assert saved.endswith(f"({100 * savings['saved_share']:.0f}%)"), (saved, savings)
    delta, said = savings["success_rate_delta"], page.text_content("[data-testid=success-delta]")
    assert (f"({'+' if delta >= 0 else ''}{100 * delta:.1f} points)" if delta is not None
            else "not enough scored requests") in said, (said, savings)
    # every chart is an image with a name that reads its numbers (its parts are hidden from screen readers)
    charts = page.evaluate("[...document.querySelectorAll('svg')].map(s => [s.getAttribute('role'), s.getAttribute('aria-label')])")
    assert len(charts) >= 5 and all(role == "img" and name for role, name in charts), charts

    # Clicking a row shows that request's reasons.
    vote = next(r for r in seeded.records if r["arm"] == SC_ARM)
    page.click(f"[data-testid=request-row][data-request-id='{vote['id']}']")
    page.wait_for_selector("[data-testid=detail-reasons] li")
    assert page.text_content("[data-testid=detail-arm]") == SC_ARM
    assert page.text_content("[data-testid=detail-samples]") == "5"
    assert page.text_content("[data-testid=detail-task]") == vote["task"]
    assert page.text_content("[data-testid=detail-mode]") == "exploit"
    assert page.locator("[data-testid=candidate-row]").count() >= 2

    # An eval report opens in the same scatter.
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"suite": "demo", "baselines": [
        {"name": "always-cheap", "accuracy": 0.61, "cost_usd": 0.001},
        {"name": "always-strong", "accuracy": 0.83, "cost_usd": 0.02},
        {"name": "ponder", "accuracy": 0.82, "cost_usd": 0.006}]}))
    page.set_input_files("[data-testid=report-input]", str(report))
    page.wait_for_selector("[data-testid=report-point]")
    assert page.locator("[data-testid=report-point]").count() == 3

    # Live refresh: a new request shows up without a reload.
    page.evaluate("window.__sameDocument = true")
    extra = chat(gateway.url, "auto", "one more question, please")
    assert extra.status_code == 200
    seeded.add(extra, scored=None)
    expect(page.get_by_test_id("total-requests")).to_have_text(str(len(routed) + 1), timeout=15_000)
    assert page.evaluate("window.__sameDocument") is True

    page.click(f"[data-testid=request-row][data-request-id='{vote['id']}']")
    page.wait_for_selector("[data-testid=detail-reasons] li")
    ARTIFACTS.mkdir(exist_ok=True)
    name = "dashboard.png" if backend == "embedded" else f"dashboard-{backend}.png"
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    assert not errors, errors
    page.close()


def _dashboard_with_requests(stack, browser):
    """The page, as the admin sees it, once its recent requests are drawn (embedded store only: what
    the page does is the same on either store)."""
    gateway, _, seeded, backend = stack
    if backend != "embedded":
        pytest.skip("the page's behaviour, the same on either store")
    page = browser.new_page()
    page.goto(gateway.url + "/dashboard#key=" + ADMIN_KEY)
    page.wait_for_selector("[data-testid=request-row]")
    return page, seeded


def test_a_policy_picked_while_a_refresh_is_on_its_way_is_kept(stack, browser):
    """The page refreshes every 4 s; a policy picked while one refresh's answers are still coming
    must not be put back to the old one when they arrive (it was, and the pick was lost for good)."""
    from playwright.sync_api import expect

    page, seeded = _dashboard_with_requests(stack, browser)
    held = []  # the next refresh's summary request, held until the pick is made; later ones pass
    page.route("**/v1/ponder/summary*", lambda route: route.continue_() if held else held.append(route))
    deadline = time.monotonic() + 15
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert held, "no refresh within 15 s"
    page.select_option("[data-testid=policy-select]", "direct")
    held[0].continue_()
    direct = len(seeded.records) - len(seeded.routed())
    expect(page.get_by_test_id("total-requests")).to_have_text(str(direct), timeout=10_000)
    page.wait_for_timeout(500)  # whatever was still on its way has landed
    expect(page.get_by_test_id("policy-select")).to_have_value("direct")
    expect(page.get_by_test_id("total-requests")).to_have_text(str(direct))
    page.close()


def test_the_detail_shows_the_last_request_picked_not_the_last_answered(stack, browser):
    """Click one request, then another before the first one's reasons arrived: the first answer, landing
    last, replaced the second's reasons, so the panel explained a request other than the highlighted one."""
    from playwright.sync_api import expect

    page, seeded = _dashboard_with_requests(stack, browser)
    first, second = seeded.records[0]["id"], seeded.records[1]["id"]
    held = []
    page.route(f"**/v1/ponder/requests/{first}", lambda route: held.append(route))
    page.click(f"[data-testid=request-row][data-request-id='{first}']")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the first request's reasons were never asked for"
    page.click(f"[data-testid=request-row][data-request-id='{second}']")
    expect(page.locator("[data-testid=request-detail] .hint").first).to_have_text(second)
    held[0].continue_()
    page.wait_for_timeout(500)  # the first answer has landed
    expect(page.locator("[data-testid=request-detail] .hint").first).to_have_text(second)
    page.close()


def test_a_request_opens_from_the_keyboard(stack, browser):
    """Tab reaches the recent requests and Enter opens one's reasons, as a click does; the 4 s refresh
    that redraws the rows leaves the keyboard on the same request."""
    page, seeded = _dashboard_with_requests(stack, browser)
    focused = lambda: page.evaluate("document.activeElement.dataset.requestId || null")  # noqa: E731
    for _ in range(40):  # the controls, the tabs and the reference select come first
        page.keyboard.press("Tab")
        if focused():
            break
    first = focused()
    assert first in {r["id"] for r in seeded.records}, "Tab never reached a request row"
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-testid=detail-reasons]")
    assert page.text_content("[data-testid=request-detail] .hint") == first
    page.wait_for_timeout(4500)  # a refresh has redrawn the table
    assert focused() == first
    page.close()


def test_spend_view_shows_the_budgets_the_gateway_enforces(tmp_path, browser):
    """A key's own cap wins over the policy's default for keys (policies.md), in the dashboard as in
    enforcement: the view must not show a tighter budget than the one that refuses requests. A cap of
    $0 (a key that may spend nothing) is a cap, used up, not "no cap"."""
    policy = tmp_path / "capped.yaml"
    policy.write_text(open(two_mock_policy(tmp_path, "capped")).read()
                      + "budgets: {per_key_daily_usd: 10, per_key_monthly_usd: 100}\n")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": str(policy),
            "api_keys": [{"id": "own", "sha256": hashlib.sha256(USER_KEY.encode()).hexdigest(),
                          "budget_usd_per_day": 20},
                         {"id": "frozen", "sha256": hashlib.sha256(b"sk-frozen").hexdigest(), "budget_usd_per_day": 0},
                         {"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}],
    }, name="capped")) as gateway:
        rows = {row["key_id"]: row for row in get(gateway.url, "/v1/ponder/spend").json()["keys"]}
        keys = {key_id: row["budget"] for key_id, row in rows.items()}
        assert keys["own"] == {"day": 20, "month": 100} and keys["ops"] == {"day": 10, "month": 100}
        assert keys["frozen"] == {"day": 0, "month": 100} and rows["frozen"]["used"]["day"] == 1.0
        refused = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer("sk-frozen"), timeout=10,
                             json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exhausted"
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard#key=" + ADMIN_KEY)
        frozen = page.locator("[data-testid=key-spend-row][data-key=frozen] td")
        assert frozen.nth(3).text_content() == "$0 / $0"
        assert frozen.nth(3).locator(".meter.over").count() == 1
        page.close()
        # and enforcement agrees: a worst case of ~$15 fits the key's own $20 day, not the policy's $10
        # (mock-a: $2 per M output tokens)
        fits = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(USER_KEY), timeout=10,
                          json={"model": "mock-a", "max_tokens": 7_500_000,
                                "messages": [{"role": "user", "content": "x"}]})
        assert fits.status_code == 200, fits.text


def test_an_empty_dashboard_says_so_and_draws_no_made_up_scales(tmp_path, browser):
    """Before any request each panel says there is nothing yet (the recent requests and the shares
    were blank, the spend chart a $0 to $1 scale of no data); with one request to a free backend,
    not scored, its scatter shows a $0 tick and the n/a strip, no 0-100 % or $0 to $1 scale, and
    its name reads the arm's numbers."""
    from playwright.sync_api import expect

    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 0, "output_per_mtok": 0}),
                         mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "empty"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="empty")) as gateway:
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        expect(page.get_by_test_id("requests-empty")).to_have_text("No requests yet.")
        expect(page.get_by_test_id("shares")).to_have_text("No requests yet.")
        expect(page.get_by_test_id("spend-empty")).to_have_text("Nothing spent in the last 24 hours.")
        page.click("[data-testid=spend-day]")
        expect(page.get_by_test_id("spend-empty")).to_have_text("Nothing spent in the last 30 days.")
        assert page.locator("svg").count() == 0
        response = chat(gateway.url, "auto", "hello there")
        assert response.status_code == 200 and float(response.headers["x-ponder-cost-usd"]) == 0
        page.wait_for_selector("[data-testid=arm-point]", timeout=15_000)
        scatter = page.locator("[data-testid=task-scatter]")
        ticks = scatter.locator("text").all_text_contents()
        assert "n/a" in ticks and "$0" in ticks and not any(t.endswith("%") or t.startswith("$1") for t in ticks), ticks
        assert "mock-a: $0, not scored" in scatter.get_attribute("aria-label")
        assert page.get_by_test_id("requests-empty").count() == 0
        page.close()


def test_the_default_policys_half_life_ages_the_learned_stats(tmp_path, browser):
    """learner.half_life_hours reaches the store: with a 1.8 s half-life, what the learner sees of
    four requests has faded by half a few seconds later, while the raw request count has not, nor
    has the money: the spend and the savings the page shows are what the requests cost."""
    policy = tmp_path / "fading.yaml"
    policy.write_text(open(two_mock_policy(tmp_path, "fading")).read().replace(
        "half_life_hours: null", "half_life_hours: 0.0005"))
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)], "policy": str(policy),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="fading")) as gateway:
        paid = 0.0
        for _ in range(4):
            response = chat(gateway.url, "auto", "hello there")
            assert response.status_code == 200
            paid += float(response.headers["x-ponder-cost-usd"])
        time.sleep(2.5)
        summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
        arms = [a for t in summary["tasks"] for a in t["arms"]]
        assert sum(a["requests"] for a in arms) == 4
        learned = sum(a["count"] for a in arms)
        assert 0 < learned < 2.2, learned
        assert summary["totals"]["spent_usd"] == pytest.approx(paid, rel=1e-6)
        assert sum(t["spent_usd"] for t in summary["tasks"]) == pytest.approx(paid, rel=1e-6)
        # each arm's too, per task and per tier (they were rounded to 4 places: $0.0 for these)
        assert sum(a["spent_usd"] for a in arms) == pytest.approx(paid, rel=1e-6)
        tier_arms = [a for t in summary["tasks"] for tier in t["tiers"] for a in tier["arms"]]
        assert sum(a["spent_usd"] for a in tier_arms) == pytest.approx(paid, rel=1e-6)
        assert summary["totals"]["cost_usd"] < paid / 2  # the learner's faded view
        savings = httpx.get(gateway.url + "/v1/ponder/savings").json()
        assert savings["actual_cost_usd"] == pytest.approx(paid, rel=1e-6)
        assert savings["reference_cost_usd"] == pytest.approx(paid, rel=1e-6)  # one arm: it is the reference
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=arm-point]")
        assert float(page.get_attribute("[data-testid=total-cost]", "data-value")) == pytest.approx(paid, rel=1e-6)
        assert page.text_content("[data-testid=actual-cost]") == page.text_content("[data-testid=total-cost]")
        page.close()


def test_savings_price_the_reference_for_the_requests_that_did_not_fail(tmp_path, browser):
    """Two answered requests, then three the upstream refuses (400: the prompt is over its context), $0
    each: the reference arm would have been refused them too. They were priced at its answer's cost,
    so the panel's "Always strong" grew by 150% and the refusals read as money saved."""
    from playwright.sync_api import expect

    strong = "mock-b/-/single/1"
    policy = write_policy(tmp_path, {
        "name": "refusals", "arms": {"cheap": {"backend": "mock-a", "prior": 0.9, "tokens": 1},
                                     "strong": {"backend": "mock-b", "prior": 0.5, "tokens": 1}},
        "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
        "objective": {"cost_weight": 0, "latency_weight": 0}, "exploration": {"share": 0.0}}, "refusals.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, max_retries=0),
                         mock_backend("mock-b", mock, prices={"input_per_mtok": 100.0, "output_per_mtok": 10_000.0})],
            "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.1}},
            name="refusals")) as gateway:
        prompt = "What is 6 times 7?"
        for _ in range(2):
            assert chat(gateway.url, "auto", prompt).status_code == 200
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=arm-point]")
        page.select_option("#reference", strong)
        expect(page.locator("#savings .savings-big .label").first).to_have_text("Always mock-b")
        expect(page.get_by_test_id("savings-requests")).to_have_text("2")
        answered_only = page.text_content("[data-testid=reference-cost]")
        before = httpx.get(gateway.url + "/v1/ponder/savings", params={"reference": strong}).json()
        assert before["buckets"][0]["reference_cost_basis"] == "policy_estimate" and before["saved_usd"] > 0

        httpx.post(mock.url + "/control", json={"script": ["too_long"] * 3}).raise_for_status()
        for _ in range(3):
            assert chat(gateway.url, "auto", prompt).status_code == 400
        expect(page.get_by_test_id("savings-requests")).to_have_text(re.compile(r"^5\b"), timeout=15_000)
        assert page.text_content("[data-testid=reference-cost]") == answered_only
        assert page.text_content("[data-testid=savings-requests]") == "5 (3 failed)"
        after = httpx.get(gateway.url + "/v1/ponder/savings", params={"reference": strong}).json()
        assert after["reference_cost_usd"] == pytest.approx(before["reference_cost_usd"], rel=1e-6)
        assert after["saved_usd"] == pytest.approx(before["saved_usd"], rel=1e-6)
        page.close()


def test_the_default_reference_is_the_priciest_arm_per_request_that_did_not_fail(tmp_path):
    """The Savings panel's default reference is the most expensive arm seen. Ranked by a mean cost over
    every request, its $0 failures counted in, a flaky expensive arm (one answer at $0.000048, four
    upstream 500s) ranked below a cheap one that always answers ($0.000012): the panel compared the
    routing with always using the cheap arm, and showed a loss."""
    pricey = "mock-b/-/single/1"
    policy = write_policy(tmp_path, {
        "name": "flaky", "arms": {"cheap": {"backend": "mock-a"}, "pricey": {"backend": "mock-b"}},
        "routes": [{"name": "all", "candidates": ["cheap", "pricey"]}],
        "aliases": {"cheap": {"arms": ["cheap"], "explore": False}, "pricey": {"arms": ["pricey"], "explore": False}},
        "exploration": {"share": 0.0}}, "flaky.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, max_retries=0),
                         mock_backend("mock-b", mock, max_retries=0, prices={"input_per_mtok": 4.0, "output_per_mtok": 8.0})],
            "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.1}},
            name="flaky")) as gateway:
        prompt = "hello there"  # 2 prompt tokens, and the mock's 5-word answer
        for _ in range(3):
            assert chat(gateway.url, "cheap", prompt).status_code == 200
        assert chat(gateway.url, "pricey", prompt).status_code == 200
        httpx.post(mock.url + "/control", json={"script": ["500"] * 4}).raise_for_status()
        for _ in range(4):
            assert chat(gateway.url, "pricey", prompt).status_code in (502, 503)  # failed, or skipped cooling
        deadline = time.monotonic() + 10
        savings = get(gateway.url, "/v1/ponder/savings").json()
        while sum(bucket["requests"] for bucket in savings.get("buckets", ())) < 8:  # recorded, all 8
            assert time.monotonic() < deadline, savings
            time.sleep(0.1)
            savings = get(gateway.url, "/v1/ponder/savings").json()
        assert savings["reference"] == pricey, savings
        # always pricey: its answer's cost for each of the 4 requests that did not fail
        assert savings["reference_cost_usd"] == pytest.approx(4 * (2 * 4.0 + 5 * 8.0) / 1e6, rel=1e-6)
        assert savings["saved_usd"] > 0


def test_the_current_choice_is_priced_for_the_requests_max_tokens(tmp_path, browser):
    """Every client caps its answer at 20 tokens, so `strong` (2,000 tokens expected, 10x the price
    of its answer at 20) is worth its price and answers them all. The current choice was priced for
    an uncapped request: the page showed `cheap` as the choice with 0% of the requests, and `ponder
    stats` marked no arm."""
    from playwright.sync_api import expect

    policy = write_policy(tmp_path, {
        "name": "capped", "arms": {"cheap": {"backend": "mock-a", "prior": 0.6, "tokens": 1},
                                   "strong": {"backend": "mock-b", "prior": 0.9, "tokens": 2000}},
        "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
        "objective": {"cost_weight": 10, "latency_weight": 0}, "exploration": {"share": 0.0}}, "capped.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock),
                         mock_backend("mock-b", mock, prices={"input_per_mtok": 1.0, "output_per_mtok": 100.0})],
            "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.1}},
            name="capped")) as gateway:
        for _ in range(3):
            response = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
                "model": "auto", "max_tokens": 20, "messages": [{"role": "user", "content": "What is 6 times 7?"}]})
            assert response.status_code == 200 and response.headers["x-ponder-arm"] == "mock-b/-/single/1"
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=arm-point]")
        expect(page.get_by_test_id("tier-choice")).to_contain_text("mock-b — 100% of 3 requests")
        ring = page.locator("[data-testid=arm-point]", has=page.get_by_test_id("current-choice"))
        expect(ring).to_have_attribute("data-arm", "mock-b/-/single/1")
        page.close()


def test_the_current_choice_is_priced_for_the_requests_n(tmp_path):
    """Every client asks n=4 answers: a single call costs four answers then, as much as a vote of four
    (which draws them anyway and is likelier right), so the vote answers them all. The current choice
    is priced for that typical n, not for one answer, where the single call is four times cheaper."""
    policy = write_policy(tmp_path, {
        "name": "four", "arms": {"one": {"backend": "mock-b", "prior": 0.6, "tokens": 100},
                                 "vote": {"backend": "mock-b", "strategy": "self_consistency", "n": 4, "prior": 0.9,
                                          "tokens": 100}},
        "routes": [{"name": "all", "candidates": ["one", "vote"]}],
        "objective": {"cost_weight": 20, "latency_weight": 0}, "exploration": {"share": 0.0}}, "four.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-b", mock, prices={"input_per_mtok": 1.0, "output_per_mtok": 100.0})],
            "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.1}},
            name="four")) as gateway:
        control(mock, answers=[" ".join(["word"] * 100)])  # as long as the arms' estimate
        for _ in range(3):
            response = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
                "model": "auto", "n": 4, "messages": [{"role": "user", "content": "What is 6 times 7?"}]})
            assert response.status_code == 200 and response.headers["x-ponder-arm"] == "mock-b/-/self_consistency/4"
        time.sleep(0.5)  # the stats' refresh
        [task] = get(gateway.url, "/v1/ponder/summary", key=None).json()["tasks"]
        assert [tier["current_choice"] for tier in task["tiers"]] == ["mock-b/-/self_consistency/4"]


def overflowing(page) -> list[str]:
    """Elements that stick out past the viewport's right edge, outside any box that scrolls or clips them."""
    return page.evaluate("""() => {
        const width = document.documentElement.clientWidth;
        const out = [];
        for (const el of document.querySelectorAll('body *')) {
            const box = el.getBoundingClientRect();
            if (box.width === 0 || box.right <= width + 1) continue;
            let clipped = false;  // inside a box that scrolls or clips its own overflow
            for (let up = el.parentElement; up && up !== document.body; up = up.parentElement) {
                const style = getComputedStyle(up);
                if (style.overflowX !== 'visible' && up.getBoundingClientRect().right <= width + 1) { clipped = true; break; }
            }
            if (!clipped) out.push(el.tagName + '.' + el.className + '#' + el.id + ' ' + Math.round(box.right));
        }
        return out;
    }""")


def test_dashboard_fits_a_phone_screen(stack, browser):
    """At 375 px wide the page never scrolls sideways: wide tables scroll inside their panel."""
    gateway, *_ = stack
    page = browser.new_page(viewport={"width": 375, "height": 812})
    page.goto(gateway.url + "/dashboard")
    page.fill("[data-testid=key-input]", ADMIN_KEY)
    page.click("[data-testid=login-submit]")
    page.wait_for_selector("[data-testid=request-row]")
    page.click("[data-testid=request-row] >> nth=0")
    page.wait_for_selector("[data-testid=detail-reasons] li")
    out = overflowing(page)
    assert out == [], out[:12]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    page.close()


def test_times_are_utc_whatever_the_browsers_time_zone(tmp_path, browser):
    """The recent requests' times were the browser's local time, unlabelled, beside spend bars in UTC: an
    operator at UTC+13:45 read a request 13 h 45 min away from its hour's bar. Every time is UTC now."""
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "zoned"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="zoned")) as gateway:
        assert chat(gateway.url, "auto", "hello there").status_code == 200
        [row] = get(gateway.url, "/v1/ponder/requests", key=None).json()["requests"]
        context = browser.new_context(timezone_id="Pacific/Chatham")  # UTC+12:45 or +13:45, never UTC
        page = context.new_page()
        page.goto(gateway.url + "/dashboard")
        cells = page.locator("[data-testid=request-row] td")
        cells.first.wait_for()
        assert page.locator("[data-testid=requests-table] th").first.text_content() == "time (UTC)"
        assert cells.first.text_content() == time.strftime("%H:%M:%S", time.gmtime(row["ts"]))
        assert page.text_content("[data-testid=last-updated]").endswith(" UTC")
        context.close()


def test_a_policy_or_arm_a_reload_removes_is_not_asked_for_again(tmp_path, browser):
    """The page asks for the policy and the savings reference on show every 4 s. A policy edit that
    removed that reference arm, or renamed the policy (with no traffic yet, so it was known by name
    only), made every refresh fail for good ("refresh failed: Unknown ..."): the page froze. It now
    falls back to the default policy / reference and carries on."""
    from playwright.sync_api import expect

    policy = {"name": "before", "arms": {"cheap": {"backend": "mock-a"}, "strong": {"backend": "mock-b"}},
              "routes": [{"name": "all", "candidates": ["cheap", "strong"]}]}
    path = write_policy(tmp_path, policy, "live.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)], "policy": path,
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="reload")) as gateway:
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        expect(page.get_by_test_id("policy-select")).to_have_value("before")
        page.select_option("[data-testid=reference-select]", "mock-b/-/single/1")
        expect(page.get_by_test_id("last-updated")).to_contain_text("updated")
        del policy["arms"]["strong"]
        policy["routes"][0]["candidates"] = ["cheap"]
        write_policy(tmp_path, policy, "live.yaml")
        expect(page.get_by_test_id("reference-select")).to_have_value("mock-a/-/single/1", timeout=15_000)
        expect(page.get_by_test_id("last-updated")).to_contain_text("updated")
        write_policy(tmp_path, {**policy, "name": "after"}, "live.yaml")
        expect(page.get_by_test_id("policy-select")).to_have_value("after", timeout=15_000)
        expect(page.get_by_test_id("last-updated")).to_contain_text("updated")
        page.close()


def test_redis_going_away_while_the_page_is_open_is_said_and_recovered_from(tmp_path, browser):
    """While Redis is away the gateway keeps answering from what it last read, and the event log holds
    only this replica's buffered events: the page said "No requests yet." and "updated <now>" over
    frozen numbers, and a request's reasons were a 404 "no request". It says the store is unreachable
    (the JSON says so too, and a lookup is a 503), and goes back to normal by itself when Redis is back."""
    from playwright.sync_api import expect

    redis_proc = start_redis(data_dir=tmp_path / "redis")
    port = int(redis_proc.url.rsplit(":", 1)[1].split("/")[0])
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: redis_proc.stop())
        mock = cleanup.enter_context(running(start_mock(tmp_path)))
        gateway = cleanup.enter_context(running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "away"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2, "redis_url": redis_proc.url}},
            name="away")))
        first = chat(gateway.url, "auto", "hello there")
        assert first.status_code == 200
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=request-row]")
        redis_proc.stop()
        expect(page.get_by_test_id("requests-unreadable")).to_have_text(
            "Telemetry store unreachable: no requests to show until it is back.", timeout=15_000)
        expect(page.get_by_test_id("last-updated")).to_contain_text("telemetry store unreachable: numbers as of")
        assert page.get_by_test_id("requests-empty").count() == 0
        listed = get(gateway.url, "/v1/ponder/requests", key=None).json()
        assert listed["store_readable"] is False and listed["requests"] == []
        lookup = get(gateway.url, "/v1/ponder/requests/" + first.headers["x-ponder-request-id"], key=None)
        assert lookup.status_code == 503 and lookup.json()["error"]["code"] == "store_unavailable", lookup.text
        redis_proc = start_redis(port=port, data_dir=tmp_path / "redis")  # back, empty (no persistence)
        again = chat(gateway.url, "auto", "hello again")
        assert again.status_code == 200
        row = page.locator(f"[data-testid=request-row][data-request-id='{again.headers['x-ponder-request-id']}']")
        expect(row).to_have_count(1, timeout=15_000)
        expect(page.get_by_test_id("requests-unreadable")).to_have_count(0, timeout=10_000)
        expect(page.get_by_test_id("last-updated")).not_to_contain_text("unreachable")
        assert get(gateway.url, "/v1/ponder/requests", key=None).json()["store_readable"] is True
        page.close()


@contextlib.contextmanager
def direct_requests_one_arm_failing(tmp_path):
    """A keyless gateway that recorded two direct requests: one answered by mock-b, one mock-a failed
    (502). Yields (gateway, its data dir, the direct policy's summary)."""
    data = tmp_path / "data"
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "lat"), "telemetry": {"data_dir": str(data), "refresh_s": 0.2}},
            name="lat")) as gateway:
        assert chat(gateway.url, "mock-b", "one two three").status_code == 200
        control(mock, script=["500", "500"])
        assert chat(gateway.url, "mock-a", "this one fails").status_code == 502
        deadline = time.monotonic() + 10
        while True:  # `direct` is a 404 (unknown policy) until the store has read its first event
            response = get(gateway.url, "/v1/ponder/summary?policy=direct", key=None)
            if response.status_code == 200 and response.json()["totals"]["requests"] == 2:
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.2)
        yield gateway, data, response.json()


def test_an_arm_that_never_answered_has_no_latency_not_0_ms(tmp_path, browser):
    """An arm whose every request failed has no latency sample: its p50/p95 were 0 ms, in the JSON, in
    `ponder stats` and on the page, where it was drawn as the fastest arm. Now null, "-", and said."""
    from playwright.sync_api import expect

    failed = "mock-a/-/single/1"
    with direct_requests_one_arm_failing(tmp_path) as (gateway, data, summary):
        latency = {row["arm"]: row for row in summary["latency"]}
        assert latency[failed]["p95_latency_ms"] is None and latency[failed]["p50_latency_ms"] is None
        assert latency["mock-b/-/single/1"]["p95_latency_ms"] > 0
        rows = [a for t in summary["tasks"] for a in [*t["arms"], *(x for tier in t["tiers"] for x in tier["arms"])]
                if a["arm"] == failed]
        assert rows and all(a["p95_latency_ms"] is None and a["mean_latency_ms"] is None for a in rows), rows
        stats = subprocess.run([sys.executable, "-m", "gateway.cli", "stats", "--data-dir", str(data), "--json",
                                "--policy", "direct"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr
        [row] = [r for arms in json.loads(stats.stdout)["direct"].values() for arm, r in arms.items() if arm == failed]
        assert row["p95_latency_ms"] is None, row
        text = subprocess.run([sys.executable, "-m", "gateway.cli", "stats", "--data-dir", str(data),
                               "--policy", "direct"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"mock-a/-/single/1 +1 +- +0 +-", text), text
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=policy-select] option[value=direct]", state="attached")
        page.select_option("[data-testid=policy-select]", "direct")
        expect(page.locator(f"[data-testid=latency-row][data-arm='{failed}'] [data-testid=latency-none]")).to_have_text(
            "no answers: 1 request, none answered")
        assert "mock-a/-/single/1: no answers" in page.get_attribute("[data-testid=latency-svg]", "aria-label")
        page.close()


def test_outside_text_shows_as_text_with_its_invisible_characters_named(tmp_path, browser):
    """Markup in what an upstream answers (its error message; names from YAML are validated to
    [A-Za-z0-9._:-]) is shown as text, and the page's CSP allows no inline script. Bidi overrides and
    zero-width characters in it were written as they are: U+202E turned the rest of the line around (an
    error read backwards, "exe.txt" for "txt.exe") and a zero-width space made two different strings
    look the same. They show as [U+202E] / [U+200B] now."""
    payload = "<img src=x onerror=window.__pwned=1></script><script>window.__pwned=2</script>javascript:alert(1)"
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "inject"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="inject")) as gateway:
        control(mock, script=["error", "error"],
                error={"status": 400, "headers": {}, "body": json.dumps({"error": {"message": payload + "\u202eevil\u200b"}})})
        failed = chat(gateway.url, "mock-a", "hello there")
        assert failed.status_code == 400, failed.text
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        response = page.goto(gateway.url + "/dashboard")
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp, csp
        page.click(f"[data-testid=request-row][data-request-id='{failed.headers['x-ponder-request-id']}']")
        page.wait_for_selector("[data-testid=detail-samples]")
        detail = page.text_content("[data-testid=request-detail]")
        assert detail.count(payload + "[U+202E]evil[U+200B]") == 2, detail  # the status line and the call's
        assert "\u202e" not in detail and "\u200b" not in detail
        assert page.locator("img, script:not([src])").count() == 0
        assert page.evaluate("window.__pwned") is None and not errors, errors
        page.close()
        # and nothing a client or an upstream chooses becomes a Prometheus label (unbounded series)
        unknown = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, headers={"x-request-id": "client-id-1"},
                             json={"model": "<b>no-such-model</b>", "user": "user-label-1", "metadata": {"m": "meta-1"},
                                   "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 404
        exposition = get(gateway.url, "/metrics", key=None).text
        for chosen in ("no-such-model", "client-id-1", "user-label-1", "meta-1", "pwned", failed.headers["x-ponder-request-id"]):
            assert chosen not in exposition, chosen
        assert 'ponder_requests_total{alias="-",status_class="4xx",task="-"} 1.0' in exposition


def test_money_reads_the_same_on_the_page_and_in_ponder_stats(tmp_path, browser):
    """A request that cost $1e-9 (one prompt token at $0.001 per million, free output) and one that cost
    $246.913578 (two prompt tokens at $123.456789 each). `ponder stats` printed mean costs with 6 fixed
    decimals (0.000000 for the first, the same as a free model's) and the page rounded $100 and up to
    the dollar ($247). Both write money alike now: 3 significant digits below a cent, cents from $1."""
    from playwright.sync_api import expect

    data = tmp_path / "data"
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock, prices={"input_per_mtok": 0.001, "output_per_mtok": 0}),
                         mock_backend("mock-p", mock, prices={"input_per_mtok": 123_456_789, "output_per_mtok": 0})],
            "policy": write_policy(tmp_path, {"name": "money", "arms": {"a": {"backend": "mock-a"}},
                                              "routes": [{"name": "all", "candidates": ["a"]}]}, "money.yaml"),
            "telemetry": {"data_dir": str(data), "refresh_s": 0.2}}, name="money")) as gateway:
        paid = {}
        for backend, prompt in (("mock-a", "hi"), ("mock-p", "hello there")):
            response = chat(gateway.url, backend, prompt)
            assert response.status_code == 200, response.text
            paid[backend] = response.json()["ponder"]["cost_usd"]
        assert paid == {"mock-a": pytest.approx(1e-9), "mock-p": pytest.approx(246.913578)}
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=policy-select] option[value=direct]", state="attached")
        page.select_option("[data-testid=policy-select]", "direct")
        expect(page.get_by_test_id("total-cost")).to_have_text("$246.91")
        assert float(page.get_attribute("[data-testid=total-cost]", "data-value")) == pytest.approx(sum(paid.values()))
        tips = {arm: page.text_content(f"[data-testid=arm-point][data-arm='{arm}/-/single/1'] title") for arm in paid}
        assert "mean cost $1.00e-9" in tips["mock-a"] and "mean cost $246.91" in tips["mock-p"], tips
        page.close()
        text = subprocess.run([sys.executable, "-m", "gateway.cli", "stats", "--data-dir", str(data), "--policy",
                               "direct"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"mock-a/-/single/1 +1 +- +1\.00e-9 ", text), text
        assert re.search(r"mock-p/-/single/1 +1 +- +246\.91 ", text), text


def test_a_negative_amount_reads_with_its_sign_before_the_dollar(stack, browser):
    """"Saved" is negative where routing cost more than the reference: from $1 the page wrote -$1.00,
    below it $-0.500. Every amount puts the sign first."""
    gateway = stack[0]
    page = browser.new_page()
    page.goto(gateway.url + "/dashboard")
    page.wait_for_selector("[data-testid=login]", state="attached")  # the script has run
    written = page.evaluate("[-1234.5, -0.5, -0.001234, 0.5, 1234.5].map(usd)")
    assert written == ["-$1,234.50", "-$0.500", "-$0.00123", "$0.500", "$1,234.50"]
    page.close()


def test_redis_away_since_the_gateway_started_is_not_shown_as_no_traffic(tmp_path, browser):
    """With Redis unreachable from the start the gateway has read nothing: the panels said "No requests
    recorded for this policy yet." and "Nothing spent", a guess. They say the store is unreachable, and
    the page fills in by itself once Redis answers."""
    from playwright.sync_api import expect

    port = free_port()
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "late"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2,
                          "redis_url": f"redis://127.0.0.1:{port}/0"}}, name="late")) as gateway:
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        expect(page.get_by_test_id("tasks-empty")).to_have_text("Nothing to show: the telemetry store is unreachable.")
        expect(page.get_by_test_id("spend-empty")).to_have_text("Nothing to show: the telemetry store is unreachable.")
        expect(page.get_by_test_id("last-updated")).to_contain_text("telemetry store unreachable: nothing read from it yet")
        redis_proc = start_redis(port=port, data_dir=tmp_path / "redis")
        try:
            assert chat(gateway.url, "auto", "hello there").status_code == 200
            expect(page.get_by_test_id("arm-point")).to_have_count(1, timeout=20_000)
            expect(page.get_by_test_id("last-updated")).not_to_contain_text("unreachable")
        finally:
            redis_proc.stop()
        page.close()


def test_fifty_arms_get_fifty_colours(tmp_path, browser):
    """Each arm has its own colour in the legend and on the scatter: the palette's ten colours were
    reused from the 11th arm on, so with 50 arms five shared each colour and could not be told apart."""
    names = [f"m{i:02d}" for i in range(50)]
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend(name, mock) for name in names],
            "policy": write_policy(tmp_path, {"name": "wide", "arms": {n: {"backend": n} for n in names},
                                              "routes": [{"name": "all", "candidates": names}]}, "wide.yaml"),
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="wide")) as gateway:
        for name in names:  # the same prompt to each: one task type, 50 arms on its chart
            assert chat(gateway.url, name, "hello there").status_code == 200
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=policy-select] option[value=direct]", state="attached")
        page.select_option("[data-testid=policy-select]", "direct")
        points = page.locator("[data-testid=task-chart] [data-testid=arm-point] circle.point")
        points.nth(49).wait_for()
        fills = points.evaluate_all("(cs) => cs.map((c) => getComputedStyle(c).fill)")
        assert len(fills) == 50 and len(set(fills)) == 50, sorted(fills)
        legend = page.locator("[data-testid=arm-legend] i").evaluate_all("(is) => is.map((i) => getComputedStyle(i).backgroundColor)")
        assert len(set(legend)) == 50
        page.close()


def test_savings_against_an_arm_with_no_price_say_so_not_saved_0(tmp_path, browser):
    """Against a reference that answered none of the requests and that the policy has no estimate for,
    every bucket is left out of both totals: the panel read "Always mock-a $0 · Actual routed spend $0 ·
    Saved $0" in green, beside a KPI of what was really spent. The totals are null now and the panel
    says the reference has no price."""
    from playwright.sync_api import expect

    with direct_requests_one_arm_failing(tmp_path) as (gateway, _, summary):
        assert summary["totals"]["spent_usd"] > 0
        savings = get(gateway.url, "/v1/ponder/savings?policy=direct&reference=mock-a/-/single/1", key=None).json()
        assert {b["reference_cost_basis"] for b in savings["buckets"]} == {"unknown"}
        assert savings["reference_cost_usd"] is None and savings["actual_cost_usd"] is None and savings["saved_usd"] is None
        assert savings["priced_buckets"] == 0
        priced = get(gateway.url, "/v1/ponder/savings?policy=direct&reference=mock-b/-/single/1", key=None).json()
        assert priced["priced_buckets"] == len(priced["buckets"]) and priced["actual_cost_usd"] == pytest.approx(
            summary["totals"]["spent_usd"])
        page = browser.new_page()
        page.goto(gateway.url + "/dashboard")
        page.wait_for_selector("[data-testid=policy-select] option[value=direct]", state="attached")
        page.select_option("[data-testid=policy-select]", "direct")
        page.wait_for_selector("[data-testid=reference-select] option[value='mock-a/-/single/1']", state="attached")
        page.select_option("[data-testid=reference-select]", "mock-a/-/single/1")
        expect(page.get_by_test_id("savings-unpriced")).to_contain_text("No price for always mock-a")
        assert page.get_by_test_id("saved").count() == 0
        page.close()


def test_long_names_do_not_push_the_page_sideways(tmp_path, browser):
    """A 128-character backend name (names are validated for their characters, not their length), an
    80-character policy name and a 100-character key id: the policy and reference selects grew to fit
    them and the page scrolled sideways to ~3000 px at 1440, the latency chart's label ran off its
    left edge. Names wrap, selects keep a width, SVG labels and table cells are cut in the middle
    (the full name in their title)."""
    long = "a-very-long-backend-name-" + "x" * 100 + "-end"
    key = "k" * 100
    policy = write_policy(tmp_path, {"name": "p" * 80, "arms": {"l" * 60: {"backend": long}},
                                     "routes": [{"name": "r", "candidates": ["l" * 60]}]}, "long.yaml")
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend(long, mock), mock_backend("mock-b", mock)], "policy": policy,
            "api_keys": [{"id": key, "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True}],
            "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}, name="long")) as gateway:
        for model in ("auto", long):
            response = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(ADMIN_KEY), timeout=30,
                                  json={"model": model, "messages": [{"role": "user", "content": "hello there"}]})
            assert response.status_code == 200, response.text
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(gateway.url + "/dashboard#key=" + ADMIN_KEY)
        page.wait_for_selector("[data-testid=latency-row]")
        page.click("[data-testid=request-row] >> nth=0")
        page.wait_for_selector("[data-testid=detail-reasons] li")
        assert overflowing(page) == [], overflowing(page)[:12]
        assert page.evaluate("document.documentElement.scrollWidth") <= 1440
        label = page.locator(f"[data-testid=latency-row][data-arm='{long}/-/single/1'] text").first
        assert label.bounding_box()["x"] >= 0 and "…" in label.text_content()
        assert page.locator(f"[data-testid=key-spend-row] td[title='{key}']").count() == 1
        page.close()


def test_a_gateway_restarted_while_the_page_is_open(tmp_path, browser):
    """While the gateway is down the page keeps its last numbers and said only "refresh failed: Failed to
    fetch": now it says the gateway is unreachable, how old the numbers are and that it retries; and it
    picks up by itself (same tab, no reload) once the gateway answers again."""
    from playwright.sync_api import expect

    with running(start_mock(tmp_path)) as mock:
        config = {"backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
                  "policy": two_mock_policy(tmp_path, "restart"),
                  "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.2}}
        gateway = start_gateway(tmp_path, config, name="restart")
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(lambda: gateway.stop())
            assert chat(gateway.url, "auto", "hello there").status_code == 200
            page = browser.new_page()
            page.goto(gateway.url + "/dashboard")
            expect(page.get_by_test_id("total-requests")).to_have_text("1")
            page.evaluate("window.__sameDocument = true")
            gateway.stop()
            expect(page.get_by_test_id("last-updated")).to_contain_text(
                re.compile(r"refresh failed at \d\d:\d\d:\d\d UTC: gateway unreachable · numbers from \d\d:\d\d:\d\d UTC · retrying"),
                timeout=10_000)
            expect(page.get_by_test_id("total-requests")).to_have_text("1")  # the last numbers stay
            gateway = Process(list(gateway.process.args), gateway.url, "/readyz", tmp_path / "restart-again.log")
            assert chat(gateway.url, "auto", "hello again").status_code == 200
            expect(page.get_by_test_id("total-requests")).to_have_text("2", timeout=15_000)
            expect(page.get_by_test_id("last-updated")).to_contain_text(re.compile(r"^updated "))
            assert page.evaluate("window.__sameDocument") is True
            page.close()


def test_spend_reads_the_ledger_of_every_configured_key(tmp_path):
    """The spend view read the budget ledger of the first 200 keys only: a key past them showed $0 of
    its cap although it had spent. 250 keys, each with a day cap; the last one spends."""
    keys = [{"id": f"key-{i:03d}", "sha256": hashlib.sha256(f"sk-many-{i}".encode()).hexdigest(),
             "budget_usd_per_day": 5} for i in range(250)]
    keys.append({"id": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True})
    with running(start_mock(tmp_path)) as mock, running(start_gateway(tmp_path, {
            "backends": [mock_backend("mock-a", mock), mock_backend("mock-b", mock)],
            "policy": two_mock_policy(tmp_path, "many"), "api_keys": keys}, name="many")) as gateway:
        answer = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer("sk-many-249"), timeout=30,
                            json={"model": "mock-a", "messages": [{"role": "user", "content": "one two three"}]})
        assert answer.status_code == 200, answer.text
        paid = answer.json()["ponder"]["cost_usd"]
        rows = {row["key_id"]: row for row in get(gateway.url, "/v1/ponder/spend").json()["keys"]}
        assert len(rows) == 251 and paid > 0
        assert rows["key-249"]["spent"]["day"] == pytest.approx(paid)
        assert rows["key-249"]["used"]["day"] == pytest.approx(round(paid / 5, 4))
        assert rows["key-000"]["spent"]["day"] == 0
