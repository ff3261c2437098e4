"""Pure functions that turn the store's summaries and events into the dashboard's JSON.

Input shapes are the store's: a policy table `{bucket: {arm_key: summary_row}}` (telemetry/aggregates.py
`summary_row`), spend rollups (`format_spend`), and event dicts (`Event.to_dict`). Nothing here does
I/O or knows about HTTP, so the numbers the page shows can be tested on plain dicts.

Arithmetic note: a summary row's `count` and `cost_usd` may be decayed (when the store has a half-life)
while `requests` and `spent_usd` are the raw totals. Means and shares use `count` (consistent with the
decayed means the learner sees); what was spent is `spent_usd`, money a decay must not shrink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from router.types import DIFFICULTY_TIERS

TIER_ORDER = [name for name, _ in DIFFICULTY_TIERS]
Row = Mapping[str, Any]
Table = Mapping[str, Mapping[str, Row]]  # bucket -> arm key -> summary row


def arm_parts(key: str) -> dict[str, Any]:
    """`backend/effort/strategy/n` back into its parts (a backend name may itself hold slashes)."""
    parts = key.rsplit("/", 3)
    if len(parts) != 4:
        return {"backend": key, "effort": None, "strategy": "single", "n": 1}
    backend, effort, strategy, n = parts
    return {"backend": backend, "effort": None if effort == "-" else effort, "strategy": strategy,
            "n": int(n) if n.isdigit() else 1}


def split_bucket(bucket: str) -> tuple[str, str]:
    task, _, tier = bucket.partition(":")
    return task, tier


def merge_rows(rows: Iterable[Row]) -> dict[str, Any]:
    """Several summary rows of one arm (e.g. its buckets of one task type) as one row.

    Means are weighted by count (the mean latency by the requests answered), the success rate by scored
    weight. Latency percentiles cannot be merged exactly from percentiles; their mean weighted by the
    requests answered (what they are of) is shown (exact when one bucket dominates): a bucket whose
    requests all failed has no latency, not a p95 of 0 ms."""
    rows = list(rows)
    count = sum(float(r.get("count") or 0) for r in rows)
    weight = sum(float(r.get("scored_weight") or 0) for r in rows)
    successes = sum(float(r["success_rate"]) * float(r.get("scored_weight") or 0)
                    for r in rows if r.get("success_rate") is not None)

    def by_count(name: str) -> float:
        return sum(float(r.get(name) or 0) * float(r.get("count") or 0) for r in rows) / count if count else 0.0

    def answered(r: Mapping[str, Any]) -> float:  # the requests a row's mean latency is over
        if "answered" in r:
            return float(r["answered"] or 0)
        return float(r.get("count") or 0) * (1.0 - float(r.get("error_rate") or 0))

    answers = sum(answered(r) for r in rows)

    def by_answers(name: str) -> float:
        return sum(float(r.get(name) or 0) * answered(r) for r in rows) / answers if answers > 0 else 0.0

    cost = sum(float(r.get("cost_usd") or 0) for r in rows)
    # no answer, no latency: a p95 of no samples is unknown, not 0 ms (the fastest arm on the chart)
    latency = answers > 0
    return {
        "requests": sum(float(r.get("requests") or 0) for r in rows),
        "failed_requests": sum(float(r.get("failed_requests") or 0) for r in rows),
        "count": count,
        "answered": answers,
        "scored_weight": weight,
        "success_rate": successes / weight if weight > 0 else None,
        "error_rate": by_count("error_rate"),
        "cost_usd": cost,
        "spent_usd": sum(float(r.get("spent_usd", r.get("cost_usd")) or 0) for r in rows),
        "mean_cost_usd": cost / count if count else 0.0,
        "mean_latency_ms": sum(float(r.get("mean_latency_ms") or 0) * answered(r) for r in rows) / answers
        if latency else None,
        "p50_latency_ms": by_answers("p50_latency_ms") if latency else None,
        "p95_latency_ms": by_answers("p95_latency_ms") if latency else None,
        "mean_prompt_tokens": by_count("mean_prompt_tokens"),
        "mean_completion_tokens": by_count("mean_completion_tokens"),
        "mean_reasoning_tokens": by_count("mean_reasoning_tokens"),
    }


def pareto_frontier(points: list[Mapping[str, Any]], cost: str = "mean_cost_usd",
                    accuracy: str = "success_rate") -> list[int]:
    """Indices of the points no other point beats on both axes (cheaper-or-equal and at least as
    accurate, one strictly), ordered by cost. Points without an accuracy are not on it."""
    scored = [(float(p[cost]), -float(p[accuracy]), i) for i, p in enumerate(points) if p.get(accuracy) is not None]
    scored.sort()
    frontier, best = [], float("-inf")
    for _, neg_acc, i in scored:
        if -neg_acc > best:
            frontier.append(i)
            best = -neg_acc
    return frontier


LATENCY_FIELDS = ("mean_latency_ms", "p50_latency_ms", "p95_latency_ms")


def _rounded(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, float):
            # money (cost_usd, spent_usd, ...) is fractions of a cent a request: 4 places would show $0
            out[key] = round(value, 10) if key.endswith("_usd") else round(value, 4)
        else:
            out[key] = value
    if "answered" in row and not float(row["answered"] or 0) > 0:  # a store row of an arm that never answered
        out.update(dict.fromkeys(LATENCY_FIELDS))
    return out


def arm_points(rows_by_arm: Mapping[str, Row], choices: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One scatter: every arm's point, the frontier, and which tiers currently choose each arm."""
    total = sum(float(r.get("count") or 0) for r in rows_by_arm.values())
    arms = []
    for key in sorted(rows_by_arm):
        row = rows_by_arm[key]
        count = float(row.get("count") or 0)
        arms.append({"arm": key, **arm_parts(key), **_rounded(row), "share": round(count / total, 4) if total else 0.0,
                     "pareto": False,
                     "current_choice_for": sorted((t for t, a in (choices or {}).items() if a == key),
                                                  key=lambda t: TIER_ORDER.index(t) if t in TIER_ORDER else 99)})
    frontier = pareto_frontier(arms)
    for i in frontier:
        arms[i]["pareto"] = True
    return {"arms": arms, "frontier": [arms[i]["arm"] for i in frontier]}


def task_views(table: Table, choices: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """Per task type: the arms merged over difficulty tiers, the frontier, and per tier the learner's
    current choice (`choices`: bucket -> arm key) with the share of that tier's traffic it got."""
    by_task: dict[str, dict[str, dict[str, Row]]] = {}
    for bucket, arms in table.items():
        task, tier = split_bucket(bucket)
        by_task.setdefault(task, {})[tier] = arms
    views = []
    for task in sorted(by_task):
        tiers = by_task[task]
        per_arm: dict[str, list[Row]] = {}
        for arms in tiers.values():
            for key, row in arms.items():
                per_arm.setdefault(key, []).append(row)
        tier_choice = {tier: choices.get(f"{task}:{tier}") for tier in tiers}
        view = arm_points({k: merge_rows(v) for k, v in per_arm.items()},
                          {t: a for t, a in tier_choice.items() if a})
        tier_rows = []
        for tier in sorted(tiers, key=lambda t: TIER_ORDER.index(t) if t in TIER_ORDER else 99):
            arms = tiers[tier]
            count = sum(float(r.get("count") or 0) for r in arms.values())
            choice = tier_choice.get(tier)
            chosen = float(arms[choice].get("count") or 0) if choice in arms else 0.0
            tier_rows.append({"tier": tier, "bucket": f"{task}:{tier}",
                              "requests": sum(float(r.get("requests") or 0) for r in arms.values()),
                              "current_choice": choice,
                              "current_choice_share": round(chosen / count, 4) if count else 0.0,
                              **arm_points(arms, {tier: choice} if choice else {})})
        merged = merge_rows(r for rows in per_arm.values() for r in rows)
        views.append({"task": task, "requests": merged["requests"], "cost_usd": round(merged["cost_usd"], 10),
                      "spent_usd": round(merged["spent_usd"], 10), "success_rate": merged["success_rate"], **view,
                      "tiers": tier_rows})
    return views


def per_arm(table: Table) -> dict[str, dict[str, Any]]:
    rows: dict[str, list[Row]] = {}
    for arms in table.values():
        for key, row in arms.items():
            rows.setdefault(key, []).append(row)
    return {key: merge_rows(v) for key, v in rows.items()}


def latency_by_arm(table: Table) -> list[dict[str, Any]]:
    merged = per_arm(table)
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return [{"arm": key, "requests": row["requests"], "answered": round(row["answered"], 4),
             **{name: ms(row[name]) for name in LATENCY_FIELDS}}
            for key, row in sorted(merged.items(), key=lambda kv: -kv[1]["requests"])]


def shares(table: Table) -> dict[str, list[dict[str, Any]]]:
    """Share of requests per strategy and per effort level (read from the arm keys)."""
    counts: dict[str, dict[str, float]] = {"strategy": {}, "effort": {}}
    for key, row in per_arm(table).items():
        parts = arm_parts(key)
        for dim, name in (("strategy", parts["strategy"]), ("effort", parts["effort"] or "none")):
            counts[dim][name] = counts[dim].get(name, 0.0) + row["requests"]
    out = {}
    for dim, values in counts.items():
        total = sum(values.values())
        out[dim] = [{"name": name, "requests": n, "share": round(n / total, 4) if total else 0.0}
                    for name, n in sorted(values.items(), key=lambda kv: -kv[1])]
    return out


def totals(table: Table) -> dict[str, Any]:
    merged = merge_rows(r for arms in table.values() for r in arms.values())
    return {"requests": merged["requests"], "cost_usd": round(merged["cost_usd"], 10),
            "spent_usd": round(merged["spent_usd"], 10), "scored_weight": round(merged["scored_weight"], 4),
            "success_rate": merged["success_rate"], "error_rate": round(merged["error_rate"], 4)}


def exploration(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Explore vs exploit over recent routed requests of one policy (direct backend requests bypass the learner)."""
    routed = [e for e in events if e.get("policy") != "direct"]
    explored = sum(1 for e in routed if e.get("explore"))
    return {"window": len(routed), "explored": explored, "exploited": len(routed) - explored,
            "share": round(explored / len(routed), 4) if routed else 0.0}


# --- savings versus a reference arm ------------------------------------------------------------------

CostEstimate = Callable[[str, float], float | None]  # (arm key, mean prompt tokens) -> USD per request


def _unfailed(row: Row) -> float:
    """A row's (decayed) requests that did not fail: answered, or left by their client."""
    return float(row.get("count") or 0) * (1.0 - float(row.get("error_rate") or 0))


def savings(table: Table, reference: str, estimate: CostEstimate | None = None) -> dict[str, Any]:
    """What always answering with `reference` would have cost, bucket by bucket, and the success delta.

    The reference's cost per request in a bucket is, in order of preference: its observed mean there
    (`observed`), its observed mean over all buckets (`observed_elsewhere`), the policy's estimate for
    the bucket's mean prompt size (`policy_estimate`); an observed mean is over the requests that did
    not fail. A bucket with none of them is left out of both totals (`unknown`). Both sides are money
    spent, which a half-life must not fade: the bucket's `spent_usd` against that cost per request times
    its requests less its failed ones (a request refused, or that no arm answered, cost $0 or a cut
    prompt; priced at the reference's answer, every refusal read as money saved). The success delta
    compares, over the buckets where both were scored, the actual success rate with the reference's
    own success rate there, weighted by the bucket's traffic."""
    overall = per_arm(table).get(reference)
    buckets = []
    actual_cost = reference_cost = 0.0
    acc_num = ref_num = acc_den = 0.0
    for bucket in sorted(table):
        arms = table[bucket]
        merged = merge_rows(arms.values())
        count = merged["count"]
        ref_row = arms.get(reference)
        if ref_row is not None and _unfailed(ref_row) > 0:
            per_request, basis = float(ref_row.get("cost_usd") or 0) / _unfailed(ref_row), "observed"
        elif overall is not None and _unfailed(overall) > 0:
            per_request, basis = overall["cost_usd"] / _unfailed(overall), "observed_elsewhere"
        else:
            # the prompt of the requests it prices (one refused before it was read billed no tokens)
            answered = _unfailed(merged)
            prompt = merged["mean_prompt_tokens"] * merged["count"] / answered if answered > 0 else 0.0
            guess = estimate(reference, prompt) if estimate else None
            per_request, basis = (guess, "policy_estimate") if guess is not None else (None, "unknown")
        ref_success = ref_row.get("success_rate") if ref_row is not None else None
        requests, failed = merged["requests"], merged["failed_requests"]
        priced = max(0.0, requests - failed)
        row = {"bucket": bucket, "requests": requests, "failed_requests": failed,
               "actual_cost_usd": round(merged["spent_usd"], 10),
               "reference_cost_usd": round(per_request * priced, 10) if per_request is not None else None,
               "reference_cost_basis": basis, "actual_success_rate": merged["success_rate"],
               "reference_success_rate": ref_success}
        buckets.append(row)
        if per_request is not None:
            actual_cost += merged["spent_usd"]
            reference_cost += per_request * priced
        if merged["success_rate"] is not None and ref_success is not None:
            acc_num += merged["success_rate"] * count
            ref_num += float(ref_success) * count
            acc_den += count
    actual_rate = acc_num / acc_den if acc_den else None
    ref_rate = ref_num / acc_den if acc_den else None
    # No bucket priced (the reference never answered and the policy has no estimate for it): totals
    # over nothing would read "$0 against $0, saved $0", as if the routed requests had cost nothing.
    priced = sum(1 for b in buckets if b["reference_cost_usd"] is not None)

    def total(value: float) -> float | None:
        return round(value, 10) if priced or not buckets else None

    return {
        "reference": reference,
        "priced_buckets": priced,
        "actual_cost_usd": total(actual_cost),
        "reference_cost_usd": total(reference_cost),
        "saved_usd": total(reference_cost - actual_cost),
        "saved_share": round(1 - actual_cost / reference_cost, 4) if reference_cost > 0 else None,
        "actual_success_rate": actual_rate,
        "reference_success_rate": ref_rate,
        "success_rate_delta": round(actual_rate - ref_rate, 4) if acc_den else None,
        "buckets": buckets,
    }


def default_reference(table: Table) -> str | None:
    """The most expensive arm seen: the 'always use the strongest' baseline. Ranked by its cost per
    request that did not fail, as savings() prices it: its failures cost $0 (or a cut prompt), and a
    mean over them made a flaky expensive arm rank below a cheap one that always answers."""
    merged = per_arm(table)

    def per_request(key: str) -> float:
        unfailed = _unfailed(merged[key])
        return merged[key]["cost_usd"] / unfailed if unfailed > 0 else 0.0

    return max(merged, key=lambda k: (per_request(k), k)) if merged else None


# --- spend against budgets -------------------------------------------------------------------------


def spend_view(spend: Mapping[str, Any], budgets: Mapping[str, Mapping[str, float | None]],
               spent: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Spend over time plus one row per API key: current day/month spend against its caps."""
    by_key = spend.get("by_key") or {}
    keys = []
    for key_id in sorted(set(by_key) | set(budgets) | set(spent)):
        caps = dict(budgets.get(key_id) or {})
        now = spent.get(key_id) or {}
        # a cap of 0 (a key that may spend nothing) is used up, not absent
        used = {p: (round(float(now.get(p, 0.0)) / cap, 4) if cap else 1.0) for p, cap in caps.items()}
        keys.append({"key_id": key_id, "cost_usd_30d": round(float(by_key.get(key_id, {}).get("cost_usd", 0.0)), 10),
                     "requests_30d": int(by_key.get(key_id, {}).get("requests", 0)),
                     "spent": {p: round(float(v), 10) for p, v in now.items()}, "budget": caps, "used": used})
    by_hour, by_day = spend.get("by_hour") or [], spend.get("by_day") or []
    return {"by_hour": by_hour, "by_day": by_day, "keys": keys,
            "cost_usd_24h": round(sum(float(h.get("cost_usd", 0)) for h in by_hour), 10),
            "cost_usd_30d": round(sum(float(d.get("cost_usd", 0)) for d in by_day), 10)}


# --- requests --------------------------------------------------------------------------------------

REQUEST_FIELDS = ("request_id", "ts", "key_id", "alias", "policy", "task", "difficulty", "bucket", "arm", "strategy",
                  "effort", "n", "explore", "cost_usd", "latency_ms", "prompt_tokens", "completion_tokens",
                  "reasoning_tokens", "status", "error", "success", "success_source")


def request_row(event: Mapping[str, Any]) -> dict[str, Any]:
    row = {name: event.get(name) for name in REQUEST_FIELDS}
    details = event.get("details") or {}
    # answers drawn, not calls: a retried failure or a call the client's leaving cut off is no sample
    row["samples"] = details.get("samples", sum(1 for call in event.get("calls") or () if call.get("ok", True)))
    return row


def request_detail(event: Mapping[str, Any]) -> dict[str, Any]:
    """Why a request was routed the way it was: classifier output, candidates, explore, samples and votes."""
    candidates = sorted((dict(c) for c in event.get("candidates") or []),
                        key=lambda c: (c.get("excluded") is not None, -(c.get("utility") or 0.0)))
    for c in candidates:
        c["chosen"] = c.get("arm") == event.get("arm")
    details = dict(event.get("details") or {})
    return {
        "request": request_row(event),
        "classifier": {"task": event.get("task"), "task_probs": event.get("task_probs") or {},
                       "difficulty": event.get("difficulty"), "bucket": event.get("bucket")},
        "decision": {"policy": event.get("policy"), "arm": event.get("arm"), "explore": bool(event.get("explore")),
                     "reasons": list(event.get("reasons") or []), "candidates": candidates},
        "execution": {"samples": request_row(event)["samples"], "votes": details.get("votes"),
                      "calls": list(event.get("calls") or []), "details": details},
    }


# --- eval reports ----------------------------------------------------------------------------------

ACCURACY_KEYS = ("accuracy", "success_rate", "acc", "quality")
COST_KEYS = ("cost_usd", "mean_cost_usd", "cost_per_query_usd", "total_cost_usd", "cost", "relative_cost",
             "cost_share", "mean_samples", "samples", "mean_output_tokens", "output_tokens", "tokens")
NAME_KEYS = ("name", "method", "arm", "baseline", "router", "model")
MAX_REPORT_POINTS = 500


def report_points(report: Any) -> dict[str, Any]:
    """Every (cost, accuracy) pair in a `ponder eval` report.json, wherever it sits.

    Any object holding a number under one of ACCURACY_KEYS and one of COST_KEYS is a point, named by
    its `name`/`method`/`arm`/... field or else by its path in the report. Reports mix cost units
    (USD, samples, tokens), so the most common cost key is the x axis and other units are left out."""
    found: list[tuple[str, str, float, float]] = []  # (name, cost key, cost, accuracy)

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def walk(node: Any, path: list[str]) -> None:
        if len(found) >= MAX_REPORT_POINTS or len(path) > 12:
            return
        if isinstance(node, dict):
            acc = next((number(node[k]) for k in ACCURACY_KEYS if number(node.get(k)) is not None), None)
            cost_key = next((k for k in COST_KEYS if number(node.get(k)) is not None), None)
            if acc is not None and cost_key is not None:
                label = next((str(node[k]) for k in NAME_KEYS if isinstance(node.get(k), str)), None)
                found.append((label or " / ".join(path) or "report", cost_key, float(node[cost_key]), acc))
            for key, value in node.items():
                walk(value, [*path, str(key)])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, [*path, str(i)])

    walk(report, [])
    units: dict[str, int] = {}
    for _, key, _, _ in found:
        units[key] = units.get(key, 0) + 1
    unit = max(units, key=lambda k: (units[k], -COST_KEYS.index(k))) if units else None
    points = [{"name": name, "cost": cost, "accuracy": acc} for name, key, cost, acc in found if key == unit]
    frontier = pareto_frontier(points, cost="cost", accuracy="accuracy")
    for i, p in enumerate(points):
        p["pareto"] = i in frontier
    title = None
    if isinstance(report, dict):
        table = report.get("table") if isinstance(report.get("table"), dict) else {}
        title = report.get("suite") or report.get("title") or report.get("name") or table.get("name")
    return {"title": title, "cost_unit": unit, "points": points,
            "frontier": [points[i]["name"] for i in frontier],
            "left_out": {k: v for k, v in units.items() if k != unit}}
