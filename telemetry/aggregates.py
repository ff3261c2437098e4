"""Per-(policy, bucket, arm) aggregates as flat {field: number} maps, and the math on them.

Both stores keep an arm's aggregates as one flat map (a Redis hash, or a dict persisted to sqlite) so
an update is a handful of float additions that Redis can apply atomically in one Lua call. The same
update rule is written twice, here in Python (embedded store) and in Lua (redis_schema.AGG_UPDATE_LUA);
tests compare both backends on the same events.

Fields (all floats):
  count, successes, weight, cost_usd, est2_cost_usd and est2_count (the cost model's estimates for the
  requests that carry one, and how many do; named after the cost model's version, see EST_COST),
  est_prompt_tokens and est_prompt_count (likewise the decision's prompt-token estimates), est_choices
  (the client's n, over the same requests; a record from before it starts it at n=1 each), cap_tokens
  and cap_count (the client's max_tokens, and how many requests sent one),
  latency_ms (of the requests answered: not of those counted in errors or left; a fallback's own time,
  Event.arm_latency_ms), prompt_tokens, completion_tokens, reasoning_tokens, errors, left (requests the
  client hung up on, status 499), h<i> (latency histogram bucket i: the requests answered, at the
  answering arm's own time, as latency_ms)  -- decayed when a half-life is configured
  total  -- raw request count, never decayed (for dashboards)
  errors_total  -- raw count of the requests in `errors`, never decayed: the savings view prices the
               reference arm for the others only (a refusal costs $0 whichever arm it is sent to); a
               record from before it starts it from its `errors`
  spent_usd  -- what the requests cost, never decayed: the spend the dashboard shows (cost_usd is the
               learner's, faded with its half-life)
  t      -- the time the decayed fields are expressed at (only with a half-life)

Latency histogram: fixed log buckets, 4 per doubling, bucket i holds latencies in
(2^((i-1)/4), 2^(i/4)] ms; bucket 0 holds <= 1 ms and bucket 80 everything above ~17 minutes. A
percentile interpolated inside a bucket is within about +-9% of the exact value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from router.types import ArmStats

from .events import Event

HIST_PER_DOUBLING = 4
HIST_MAX_INDEX = 80
UNDECAYED_FIELDS = frozenset({"total", "errors_total", "spent_usd", "t"})

# The cost model's estimates are summed under names that change when the model does: the learned
# cost ratio (actual / estimated) must compare like with like. v1 (`est_cost_usd`) charged a vote's
# prompt once, v2 once per sample; v1 sums left in old records are ignored, and those records count
# as records without an estimate (router.decide: the typical prompt's estimate stands in).
EST_COST, EST_COUNT = "est2_cost_usd", "est2_count"


def latency_bucket(latency_ms: float) -> int:
    if latency_ms <= 1.0:
        return 0
    return min(HIST_MAX_INDEX, math.ceil(HIST_PER_DOUBLING * math.log2(latency_ms) - 1e-9))


def _bucket_bounds(i: int) -> tuple[float, float]:
    if i == 0:
        return 0.0, 1.0
    return 2.0 ** ((i - 1) / HIST_PER_DOUBLING), 2.0 ** (i / HIST_PER_DOUBLING)


def histogram(fields: Mapping[str, float]) -> dict[int, float]:
    return {int(k[1:]): float(v) for k, v in fields.items() if k[:1] == "h" and k[1:].isdigit()}


def percentile(hist: Mapping[int, float], q: float) -> float:
    """Latency (ms) at quantile q in [0, 1], interpolated geometrically inside the bucket."""
    total = sum(v for v in hist.values() if v > 0)
    if total <= 0:
        return 0.0
    target = q * total
    cumulative = 0.0
    for i in sorted(hist):
        n = hist[i]
        if n <= 0:
            continue
        if cumulative + n >= target:
            lower, upper = _bucket_bounds(i)
            frac = min(1.0, max(0.0, (target - cumulative) / n))
            if lower == 0.0:
                return upper * frac
            return lower * (upper / lower) ** frac
        cumulative += n
    return _bucket_bounds(max(hist))[1]


CLIENT_CLOSED_STATUS = 499  # the status a request the client left is recorded with


def event_delta(event: Event) -> dict[str, float]:
    """What one event adds to its arm's aggregates (zero fields left out)."""
    weight = event.success_weight
    answer_ms = float(event.latency_ms if event.arm_latency_ms is None else event.arm_latency_ms)
    delta: dict[str, float] = {
        "count": 1.0,
        "total": 1.0,
        # the arm's own cost (a fallback is not charged the cut prompt of the arm that failed before
        # it); what the request spent, every call of it, is spent_usd
        "cost_usd": float(event.cost_usd if event.arm_cost_usd is None else event.arm_cost_usd),
        "spent_usd": float(event.cost_usd),
        # the answering arm's own time (a fallback's, not the failed arms' before it): the mean's sum
        "latency_ms": answer_ms,
        "prompt_tokens": float(event.prompt_tokens),
        "completion_tokens": float(event.completion_tokens),
        "reasoning_tokens": float(event.reasoning_tokens),
    }
    left = event.status == CLIENT_CLOSED_STATUS
    failed = not left and (event.status >= 400 or bool(event.error))
    if event.estimated_cost_usd is not None:  # the cost model's estimate, and that this outcome has one
        # It estimates an answer: a request no arm answered (every call failed, which bills nothing or
        # a cut prompt) or whose client left (billed its cut calls, a part of an answer) is compared
        # with $0 of it, else a flaky or just-recovered arm, or one clients give up on, looks cheap.
        delta[EST_COST] = 0.0 if failed or left else float(event.estimated_cost_usd)
        delta[EST_COUNT] = 1.0
    if event.estimated_prompt_tokens is not None:
        delta["est_prompt_tokens"] = float(event.estimated_prompt_tokens)
        delta["est_prompt_count"] = 1.0
        delta["est_choices"] = float(event.choices)
        if event.max_output_tokens is not None:
            delta["cap_tokens"] = float(event.max_output_tokens)
            delta["cap_count"] = 1.0
    if weight > 0:
        delta["weight"] = weight
        delta["successes"] = weight * float(event.success or 0.0)
    if left:
        # The client hung up: not the arm's error, and not its latency either (the answer's time is
        # unknown, only that it took longer than the client waited): counted in `left`, which the mean
        # latency's denominator leaves out as it does errors. Its cost and tokens count above.
        del delta["latency_ms"]
        delta["left"] = 1.0
        return {k: v for k, v in delta.items() if v}
    if failed:
        # No answer, so no answer's latency: a fast failure would make a flaky arm look fast, a timeout
        # slow (the mean is over the requests answered, ArmStats.answered, and so is the histogram).
        del delta["latency_ms"]
        delta["errors"] = delta["errors_total"] = 1.0
        return {k: v for k, v in delta.items() if v}
    # The percentiles are of the same answers as the mean, at the same time: the arm's own. At the
    # request's whole time a fallback's p95 held the timeouts of the arm it stood in for, and a policy's
    # max_p95_latency_ms then ruled out the fallback that answered them (and the requests failed).
    delta[f"h{latency_bucket(answer_ms)}"] = 1.0
    return {k: v for k, v in delta.items() if v}


def event_problem(event: object) -> str | None:
    """Why an event cannot be aggregated (None when it can): one bad event must not poison a batch."""
    if not isinstance(event, Event):
        return f"not an Event: {type(event).__name__}"
    try:
        values = [event.ts, *event_delta(event).values()]
        time.gmtime(event.ts)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not all(math.isfinite(v) for v in values):
        return "non-finite number"
    return None


def decay_factor(dt_s: float, half_life_s: float | None) -> float:
    if not half_life_s or dt_s <= 0:
        return 1.0
    return 0.5 ** (dt_s / half_life_s)


def group_deltas(
    events: Iterable[Event], half_life_s: float | None
) -> dict[tuple[str, str, str], tuple[float, dict[str, float]]]:
    """Sum the deltas of a batch's arm outcomes per (policy, bucket, arm), expressed at the group's
    latest event time.

    Returns {(policy, bucket, arm): (t, delta)}; one atomic update per group instead of per event."""
    grouped: dict[tuple[str, str, str], list[Event]] = {}
    for ev in events:
        if ev.arm_outcome:  # an embedding is billed (spend_deltas) but answers with no arm
            grouped.setdefault((ev.policy, ev.bucket, ev.arm), []).append(ev)
    out: dict[tuple[str, str, str], tuple[float, dict[str, float]]] = {}
    for key, evs in grouped.items():
        t = max(ev.ts for ev in evs)
        total: dict[str, float] = {}
        for ev in evs:
            f = decay_factor(t - ev.ts, half_life_s)
            for k, v in event_delta(ev).items():
                total[k] = total.get(k, 0.0) + (v if k in UNDECAYED_FIELDS else v * f)
        out[key] = (t, total)
    return out


def apply_delta(fields: dict[str, float], delta: Mapping[str, float], t: float, half_life_s: float | None) -> None:
    """Add `delta` (expressed at time t) to `fields` in place. Mirror of the Lua AGG_UPDATE script."""
    if "spent_usd" not in fields and "count" in fields:
        # a record from before spent_usd was kept: its cost so far (exact unless it was decayed) is the
        # best start there is
        fields["spent_usd"] = fields.get("cost_usd", 0.0)
    if "errors_total" not in fields and "errors" in fields:
        # a record from before errors_total was kept: its errors so far (exact unless they were decayed),
        # else the savings priced its failures at the reference's answer for good (total never fades)
        fields["errors_total"] = fields["errors"]
    if "est_choices" not in fields and "est_prompt_count" in fields:
        # a record from before the client's n was kept: its requests asked for one answer, the default
        # (read as n=0, they pulled the bucket's typical n below what its clients send)
        fields["est_choices"] = fields["est_prompt_count"]
    if half_life_s:
        t0 = fields.get("t")
        scale = 1.0
        if t0 is None:
            fields["t"] = t
        elif t > t0:
            f = decay_factor(t - t0, half_life_s)
            for k in fields:
                if k not in UNDECAYED_FIELDS:
                    fields[k] *= f
            fields["t"] = t
        elif t < t0:  # a late event: age its contribution to the stored reference time
            scale = decay_factor(t0 - t, half_life_s)
        for k, v in delta.items():
            fields[k] = fields.get(k, 0.0) + (v if k in UNDECAYED_FIELDS else v * scale)
        return
    for k, v in delta.items():
        fields[k] = fields.get(k, 0.0) + v


def _decayed_to(fields: Mapping[str, float], now: float, half_life_s: float | None) -> dict[str, float]:
    t0 = fields.get("t")
    f = decay_factor(now - t0, half_life_s) if (half_life_s and t0 is not None) else 1.0
    return {k: (v if k in UNDECAYED_FIELDS else v * f) for k, v in fields.items()}


def arm_stats(fields: Mapping[str, float], now: float, half_life_s: float | None = None) -> ArmStats:
    d = _decayed_to(fields, now, half_life_s)
    count = max(0.0, d.get("count", 0.0))
    weight = max(0.0, d.get("weight", 0.0))
    return ArmStats(
        count=count,
        successes=min(max(0.0, d.get("successes", 0.0)), weight),
        weight=weight,
        cost_usd=max(0.0, d.get("cost_usd", 0.0)),
        latency_ms=max(0.0, d.get("latency_ms", 0.0)),
        latency_p95_ms=percentile(histogram(d), 0.95),
        estimated_cost_usd=max(0.0, d.get(EST_COST, 0.0)),
        estimated_count=min(max(0.0, d.get(EST_COUNT, 0.0)), count),
        estimated_prompt_tokens=max(0.0, d.get("est_prompt_tokens", 0.0)),
        estimated_prompt_count=min(max(0.0, d.get("est_prompt_count", 0.0)), count),
        errors=min(max(0.0, d.get("errors", 0.0)), count),
        left=min(max(0.0, d.get("left", 0.0)), count),
        # a record from before the client's n was kept, not updated since: n=1 (apply_delta's start)
        estimated_choices=max(0.0, d["est_choices"] if "est_choices" in d else d.get("est_prompt_count", 0.0)),
        output_cap_tokens=max(0.0, d.get("cap_tokens", 0.0)),
        capped_count=min(max(0.0, d.get("cap_count", 0.0)), count),
    )


def summary_row(fields: Mapping[str, float], now: float, half_life_s: float | None = None) -> dict[str, float | None]:
    """One dashboard row: requests, success rate, means, latency percentiles."""
    d = _decayed_to(fields, now, half_life_s)
    count = d.get("count", 0.0)
    weight = d.get("weight", 0.0)
    hist = histogram(d)

    def mean(name: str) -> float:
        return d.get(name, 0.0) / count if count > 0 else 0.0

    # the requests with an answer's latency, by the learner's rule (not those no arm answered, nor those
    # the client left)
    answered = ArmStats(count=count, errors=max(0.0, d.get("errors", 0.0)), left=max(0.0, d.get("left", 0.0))).answered

    return {
        "requests": d.get("total", 0.0),
        # a record from before errors_total, not updated since: its errors as stored (apply_delta's start)
        "failed_requests": d["errors_total"] if "errors_total" in d else float(fields.get("errors", 0.0)),
        "count": count,
        "scored_weight": weight,
        # clamped as arm_stats clamps it: feedback on a request from before a reset of the stats replaces
        # an automatic score the record no longer holds, and can leave successes below 0
        "success_rate": (min(max(0.0, d.get("successes", 0.0)), weight) / weight) if weight > 0 else None,
        "error_rate": (d.get("errors", 0.0) / count) if count > 0 else 0.0,
        "mean_cost_usd": mean("cost_usd"),
        "answered": answered,
        "mean_latency_ms": d.get("latency_ms", 0.0) / answered if answered > 0 else 0.0,
        "p50_latency_ms": percentile(hist, 0.50),
        "p95_latency_ms": percentile(hist, 0.95),
        "mean_prompt_tokens": mean("prompt_tokens"),
        "mean_completion_tokens": mean("completion_tokens"),
        "mean_reasoning_tokens": mean("reasoning_tokens"),
        "cost_usd": d.get("cost_usd", 0.0),
        "spent_usd": d.get("spent_usd", d.get("cost_usd", 0.0)),
    }


# --- spend rollups: per hour and per day, totals and per key (for the dashboard) ---------------------

SPEND_HOURS = 24
SPEND_DAYS = 30


def spend_deltas(events: Iterable[Event]) -> dict[str, dict[str, float]]:
    """{"h:YYYYMMDDHH" | "d:YYYYMMDD": {"_cost", "_n", "k:<key_id>", "n:<key_id>": amount}}."""
    out: dict[str, dict[str, float]] = {}
    periods_of: dict[int, tuple[str, str]] = {}  # UTC hour -> its two ids: formatted once a batch, not per event
    for ev in events:
        hour = int(ev.ts // 3600)
        periods = periods_of.get(hour)
        if periods is None:
            tm = time.gmtime(ev.ts)
            periods = periods_of[hour] = (time.strftime("h:%Y%m%d%H", tm), time.strftime("d:%Y%m%d", tm))
        key = ev.key_id or "anonymous"
        for period in periods:
            fields = out.setdefault(period, {})
            for name, value in (("_cost", ev.cost_usd), ("_n", 1.0), (f"k:{key}", ev.cost_usd), (f"n:{key}", 1.0)):
                fields[name] = fields.get(name, 0.0) + float(value)
    return out


def add_spend(rollups: dict[str, dict[str, float]], deltas: Mapping[str, Mapping[str, float]]) -> None:
    """Add `spend_deltas(...)` into `rollups`, in place."""
    for period, fields in deltas.items():
        row = rollups.setdefault(period, {})
        for name, value in fields.items():
            row[name] = row.get(name, 0.0) + float(value)


def spend_periods(now: float) -> tuple[list[str], list[str]]:
    """The rollup ids of the last 24 hours and the last 30 days, oldest first."""
    hours = [time.strftime("h:%Y%m%d%H", time.gmtime(now - 3600 * i)) for i in range(SPEND_HOURS - 1, -1, -1)]
    days = [time.strftime("d:%Y%m%d", time.gmtime(now - 86400 * i)) for i in range(SPEND_DAYS - 1, -1, -1)]
    return hours, days


def format_spend(rollups: Mapping[str, Mapping[str, float]], now: float) -> dict:
    """Spend by hour (24 h), by day (30 days) and by key (30 days) from the rollup hashes."""
    hours, days = spend_periods(now)

    def at(period: str) -> dict:
        f = rollups.get(period, {})
        return {"cost_usd": float(f.get("_cost", 0.0)), "requests": int(float(f.get("_n", 0.0)))}

    by_key: dict[str, dict[str, float]] = {}
    for period in days:
        for name, value in rollups.get(period, {}).items():
            if name[:2] in ("k:", "n:"):
                row = by_key.setdefault(name[2:], {"cost_usd": 0.0, "requests": 0})
                if name[0] == "k":
                    row["cost_usd"] += float(value)
                else:
                    row["requests"] += int(float(value))
    return {
        "by_hour": [{"hour": f"{p[2:6]}-{p[6:8]}-{p[8:10]}T{p[10:12]}:00Z", **at(p)} for p in hours],
        "by_day": [{"day": f"{p[2:6]}-{p[6:8]}-{p[8:10]}", **at(p)} for p in days],
        "by_key": by_key,
    }
