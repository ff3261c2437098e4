"""The telemetry store against a real redis-server, and the embedded store against a real sqlite file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import yaml

from telemetry.aggregates import (EST_COST, EST_COUNT, apply_delta, arm_stats, event_delta, histogram, latency_bucket,
                                  percentile, spend_deltas, summary_row)
from telemetry.budgets import BudgetExceeded, period_id
from telemetry.cli import stats_cli
from telemetry.events import Event
from telemetry.redis_schema import RedisKeys
from telemetry import unwritten_events
from telemetry.redis_server import free_port, start_redis
from telemetry.store import open_store

ROOT = Path(__file__).resolve().parents[1]
ARM = "mock/-/single/1"
ARM2 = "mock/high/self_consistency/5"
STREAM = "ponder:{events}:stream"


def run(coro):
    return asyncio.run(coro)


def event(i: int, **kw) -> Event:
    base = dict(
        request_id=f"req-{i}",
        key_id="key-a",
        policy="p",
        task="math",
        difficulty=0.9,
        arm=ARM,
        latency_ms=50.0 + i % 200,
        cost_usd=0.001 * (1 + i % 3),
        prompt_tokens=10,
        completion_tokens=20 + i % 5,
        calls=[{"backend": "mock", "prompt_tokens": 10, "completion_tokens": 20, "ok": True}],
    )
    base.update(kw)
    return Event(**base)


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.02) -> float:
    """Seconds until predicate() (sync or async) is true; fails the test after `timeout`."""
    start = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)



def test_estimates_of_an_older_cost_model_are_not_compared_with_todays_costs():
    """The cost model changed (a vote's prompt was charged once, now once per sample): estimates it
    summed before would make the learned ratio 3-4x for vote arms. They are ignored; the record
    counts as one without an estimate."""
    t = time.time()
    old = {"count": 10.0, "cost_usd": 0.05, "est_cost_usd": 0.0125, "est_count": 10.0}
    assert (arm_stats(old, t).estimated_cost_usd, arm_stats(old, t).estimated_count) == (0.0, 0.0)
    fresh = event_delta(event(1, estimated_cost_usd=0.004))
    both = {k: old.get(k, 0.0) + fresh.get(k, 0.0) for k in old.keys() | fresh.keys()}
    stats = arm_stats(both, t)
    assert (stats.count, stats.estimated_count) == (11.0, 1.0)
    assert stats.estimated_cost_usd == pytest.approx(0.004)

def test_spend_rollups_split_a_batch_at_hour_and_day_boundaries():
    """One batch across midnight UTC: each event counts in its own hour and day (the rollup ids are
    formatted once per hour of a batch, not per event)."""
    midnight = 1764460800.0  # 2025-11-30 00:00:00 UTC
    batch = [Event(request_id=f"r{i}", ts=ts, key_id=key, cost_usd=0.25)
             for i, (ts, key) in enumerate([(midnight - 0.5, "a"), (midnight + 0.5, "a"), (midnight + 3599.9, None),
                                            (midnight + 3600.0, "a"), (midnight - 0.1, "b")])]
    assert spend_deltas(batch) == {
        "h:2025112923": {"_cost": 0.5, "_n": 2.0, "k:a": 0.25, "n:a": 1.0, "k:b": 0.25, "n:b": 1.0},
        "d:20251129": {"_cost": 0.5, "_n": 2.0, "k:a": 0.25, "n:a": 1.0, "k:b": 0.25, "n:b": 1.0},
        "h:2025113000": {"_cost": 0.5, "_n": 2.0, "k:a": 0.25, "n:a": 1.0, "k:anonymous": 0.25, "n:anonymous": 1.0},
        "h:2025113001": {"_cost": 0.25, "_n": 1.0, "k:a": 0.25, "n:a": 1.0},
        "d:20251130": {"_cost": 0.75, "_n": 3.0, "k:a": 0.5, "n:a": 2.0, "k:anonymous": 0.25, "n:anonymous": 1.0},
    }


def test_events_land_in_the_stream(redis_url, tmp_path):
    async def go():
        store = await open_store(redis_url, tmp_path)
        try:
            for i in range(50):
                store.record(event(i, reasons=["hard math"], details={"votes": {"42": 3}}))
            assert await store.flush()
            client = aioredis.from_url(redis_url, decode_responses=True)
            assert await client.xlen("ponder:{events}:stream") == 50
            await client.aclose()
            recent = await store.recent_events(10)
            assert [e["request_id"] for e in recent] == [f"req-{i}" for i in range(49, 39, -1)]
            assert recent[0]["details"] == {"votes": {"42": 3}} and recent[0]["bucket"] == "math:hard"
            assert Event.from_dict(recent[0]).calls[0]["backend"] == "mock"
        finally:
            await store.close()

    run(go())


def test_aggregates_exact_under_concurrent_records(redis_url, tmp_path):
    async def go():
        store = await open_store(redis_url, tmp_path, refresh_s=0.1)
        rng = random.Random(7)
        expected = {"count": 0, "successes": 0.0, "weight": 0.0, "cost": 0.0, "latency": []}
        events = []
        for i in range(2000):
            score = rng.random()
            source = rng.choice(["vote", "verifier", None])
            ev = event(i, latency_ms=rng.lognormvariate(6, 0.6), success=score if source else None, success_source=source)
            events.append(ev)
            expected["count"] += 1
            expected["weight"] += 0.3 if source else 0.0
            expected["successes"] += 0.3 * score if source else 0.0
            expected["cost"] += ev.cost_usd
            expected["latency"].append(ev.latency_ms)

        async def producer(chunk):
            for ev in chunk:
                store.record(ev)
                if rng.random() < 0.3:
                    await asyncio.sleep(0)  # interleave with the flush task mid-stream

        try:
            await asyncio.gather(*(producer(events[i::50]) for i in range(50)))
            assert await store.flush()
            await store.refresh()
            stats = store.snapshot("p")["math:hard"][ARM]
            assert stats.count == expected["count"]
            assert stats.weight == pytest.approx(expected["weight"], rel=1e-9)
            assert stats.successes == pytest.approx(expected["successes"], rel=1e-9)
            assert stats.cost_usd == pytest.approx(expected["cost"], rel=1e-9)
            assert stats.latency_ms == pytest.approx(sum(expected["latency"]), rel=1e-9)
            exact_p95 = sorted(expected["latency"])[int(0.95 * 2000)]
            assert stats.latency_p95_ms == pytest.approx(exact_p95, rel=0.10)
            assert store.health()["dropped"] == 0
        finally:
            await store.close()

    run(go())


def test_two_replicas_converge_on_one_snapshot(redis_url, tmp_path):
    async def go():
        a = await open_store(redis_url, tmp_path / "a", refresh_s=0.1)
        b = await open_store(redis_url, tmp_path / "b", refresh_s=0.1)
        try:
            for i in range(30):
                (a if i % 2 else b).record(event(i, arm=ARM if i % 3 else ARM2, success=1.0, success_source="verifier"))
            await wait_for(lambda: a.snapshot("p") == b.snapshot("p") and sum(
                s.count for arms in a.snapshot("p").values() for s in arms.values()) == 30)
        finally:
            await a.close()
            await b.close()

    run(go())


async def _race_reserves(stores, n=64, amount=1.0, cap=10.0):
    async def one(i):
        try:
            await stores[i % len(stores)].reserve("key-b", amount, {"day": cap, "month": 100.0})
            return True
        except BudgetExceeded as exc:
            assert exc.period == "day" and exc.limit == cap and exc.spent >= cap - amount
            return False

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def test_budget_reserve_is_atomic_on_one_and_two_replicas(redis_url, tmp_path):
    async def go():
        a = await open_store(redis_url, tmp_path / "a")
        b = await open_store(redis_url, tmp_path / "b")
        try:
            assert await _race_reserves([a]) == 10, a.health()
            assert (await a.spent("key-b"))["day"] == pytest.approx(10.0)
            client = aioredis.from_url(redis_url)
            await client.flushdb()
            await client.aclose()
            assert await _race_reserves([a, b]) == 10, repr((a.health(), b.health()))
            assert (await b.spent("key-b")) == {"day": pytest.approx(10.0), "month": pytest.approx(10.0)}
        finally:
            await a.close()
            await b.close()

    run(go())


def test_settle_replaces_the_reservation(redis_url, tmp_path):
    async def go():
        store = await open_store(redis_url, tmp_path)
        try:
            res = await store.reserve("key-c", 2.0, {"day": 3.0})
            assert res.mode == "redis" and (await store.spent("key-c", ["day"]))["day"] == pytest.approx(2.0)
            with pytest.raises(BudgetExceeded):
                await store.reserve("key-c", 1.5, {"day": 3.0})
            await store.settle(res, 0.25)
            await store.settle(res, 0.25)  # idempotent
            assert (await store.spent("key-c", ["day"]))["day"] == pytest.approx(0.25)
            free = await store.reserve("key-c", 5.0, {})
            assert free.mode == "none"  # no limits: no round trip, nothing charged
        finally:
            await store.close()

    run(go())


async def _feedback_checks(store):
    now = time.time()
    store.record(event(1, success=1.0, success_source="vote"))
    store.record(event(2, ts=now - 8 * 86400))  # older than the 7-day window
    store.record(event(3, key_id=None, success=0.0, success_source="verifier"))
    # Feedback right after the response: the event may still be buffered, and must still be found.
    first = await store.feedback("req-1", 0.0, "key-a")
    assert first.status == "accepted" and first.arm == ARM and first.bucket == "math:hard"
    assert (await store.feedback("req-1", 1.0, "key-a")).status == "duplicate"
    assert (await store.feedback("req-2", 1.0, "key-a")).status == "expired"
    assert (await store.feedback("req-3", 1.0, "key-x")).status == "accepted"  # recorded without a key
    assert (await store.feedback("req-1", 1.0, "key-other")).status == "forbidden"
    assert (await store.feedback("nope", 1.0, None)).status == "unknown_request"
    await store.refresh()
    stats = store.snapshot("p")["math:hard"][ARM]
    # req-1: vote 1.0 at weight 0.3 replaced by feedback 0.0 at weight 1; req-3: verifier 0 -> feedback 1.
    assert stats.count == 3
    assert stats.weight == pytest.approx(2.0)
    assert stats.successes == pytest.approx(1.0)


def test_feedback_is_idempotent_windowed_and_replaces_the_auto_signal(redis_url, tmp_path):
    async def go():
        store = await open_store(redis_url, tmp_path)
        try:
            await _feedback_checks(store)
        finally:
            await store.close()

    run(go())


def test_a_feedback_whose_reply_was_lost_is_counted_once_when_sent_again(redis_url, tmp_path):
    """The store frees a feedback's claim when its aggregate update fails, so the client can retry; a
    reply lost to a timeout after Redis applied the update looks the same. The retry must not count
    the feedback a second time (the learner would see two outcomes for one request)."""
    async def go():
        store = await open_store(redis_url, tmp_path)
        try:
            store.record(event(1, success=1.0, success_source="vote"))
            assert (await store.feedback("req-1", 0.0, "key-a")).status == "accepted"
            await store.refresh()
            once = store.snapshot("p")["math:hard"][ARM]
            await store._client.delete(store.keys.claim("req-1"))  # what the failure path does
            assert (await store.feedback("req-1", 0.0, "key-a")).status == "accepted"
            await store.refresh()
            again = store.snapshot("p")["math:hard"][ARM]
            assert (again.weight, again.successes) == pytest.approx((once.weight, once.successes))
            assert once.weight == pytest.approx(1.0) and once.successes == pytest.approx(0.0)
        finally:
            await store.close()

    run(go())


def test_embedded_store_has_the_same_semantics_and_survives_restart(tmp_path):
    async def go():
        store = await open_store(None, tmp_path, refresh_s=0.1)
        await _feedback_checks(store)
        assert await _race_reserves([store]) == 10
        res = await store.reserve("key-c", 2.0, {"day": 3.0, "month": 10.0})
        await store.settle(res, 0.5)
        for i in range(10, 40):
            store.record(event(i, arm=ARM2, success=1.0, success_source="verifier"))
        await store.flush()
        await store.refresh()
        before = store.snapshot("p")
        assert before["math:hard"][ARM2].count == 30
        with pytest.raises(RuntimeError, match="in use"):
            await open_store(None, tmp_path)  # one process per data_dir
        await store.close()

        again = await open_store(None, tmp_path)
        try:
            assert again.snapshot("p") == before
            assert (await again.spent("key-b"))["day"] == pytest.approx(10.0)
            assert await again.spent("key-c") == {"day": pytest.approx(0.5), "month": pytest.approx(0.5)}
            assert (await again.feedback("req-1", 1.0, "key-a")).status == "duplicate"
            assert (await again.recent_events(1))[0]["request_id"] == "req-39"
            summary = await again.summary("p")
            assert summary["policies"]["p"]["math:hard"][ARM2]["requests"] == 30
            assert summary["spend"]["by_key"]["key-a"]["requests"] == 32
        finally:
            await again.close()

    run(go())


def test_decay_is_the_same_in_lua_and_python(redis_url, tmp_path):
    """The Redis (Lua) and embedded (Python) updates agree, with out-of-order event times too."""

    async def go():
        now = time.time()
        rng = random.Random(3)
        # every kind of outcome, so that every field is written: answered (by a fallback at its own time
        # and cost), failed, left by its client; with and without estimates, max_tokens and n
        outcomes = ({}, {"status": 502, "error": "upstream failed"}, {"status": 499, "error": "client left"},
                    {"arm_latency_ms": 40.0, "arm_cost_usd": 0.0005})
        events = [event(i, ts=now - rng.uniform(0, 7200), success=rng.random(), success_source="vote",
                        estimated_prompt_tokens=rng.randint(5, 500) if i % 3 else None,
                        estimated_cost_usd=rng.uniform(0, 0.01) if i % 5 else None,
                        max_output_tokens=rng.randint(1, 900) if i % 2 else None, choices=1 + i % 4,
                        **outcomes[0 if i % 7 else 1 + i % 3]) for i in range(300)]
        snaps = []
        for url, path in ((redis_url, tmp_path / "r"), (None, tmp_path / "e")):
            store = await open_store(url, path, decay_half_life_s=3600.0)
            try:
                for start in range(0, 300, 37):  # several batches, arriving out of time order
                    for ev in events[start : start + 37]:
                        store.record(ev)
                    await store.flush()
                await store.refresh()
                snaps.append(dict(store._raw["p"][("math:hard", ARM)]))
            finally:
                await store.close()
        t_read = time.time()
        assert snaps[0].keys() == snaps[1].keys()
        for name in snaps[0]:  # every field the update writes, the new ones with the old
            assert snaps[0][name] == pytest.approx(snaps[1][name], rel=1e-9), name
        assert {"errors_total", "left", "est_choices", "cap_tokens", "cap_count", EST_COST} <= snaps[0].keys()
        red, emb = (arm_stats(fields, t_read, 3600.0) for fields in snaps)
        expected_count = sum(0.5 ** ((t_read - ev.ts) / 3600.0) for ev in events)
        for got in (red, emb):
            assert got.count == pytest.approx(expected_count, rel=1e-3)
            assert 0 < got.weight < 0.3 * 300
        assert red.count == pytest.approx(emb.count, rel=1e-6)
        assert red.successes == pytest.approx(emb.successes, rel=1e-6)
        assert red.latency_p95_ms == pytest.approx(emb.latency_p95_ms, rel=1e-6)
        estimated = [ev for ev in events if ev.estimated_prompt_tokens is not None]
        expected_tokens = sum(ev.estimated_prompt_tokens * 0.5 ** ((t_read - ev.ts) / 3600.0) for ev in estimated)
        expected_estimates = sum(0.5 ** ((t_read - ev.ts) / 3600.0) for ev in estimated)
        for got in (red, emb):
            assert got.estimated_prompt_tokens == pytest.approx(expected_tokens, rel=1e-3)
            assert got.estimated_prompt_count == pytest.approx(expected_estimates, rel=1e-3)
        assert red.estimated_prompt_tokens == pytest.approx(emb.estimated_prompt_tokens, rel=1e-6)
        assert red.estimated_prompt_count == pytest.approx(emb.estimated_prompt_count, rel=1e-6)
        for fields in snaps:  # money spent is never decayed (the dashboard's spend and savings), nor are
            row = summary_row(fields, t_read, 3600.0)  # the requests that failed (the savings leave them out)
            assert row["spent_usd"] == pytest.approx(sum(ev.cost_usd for ev in events), rel=1e-9)
            failed = sum(1 for ev in events if ev.status >= 400 and ev.status != 499)  # a hang-up is no failure
            assert row["failed_requests"] == pytest.approx(failed, rel=1e-9)
            assert row["cost_usd"] < 0.9 * row["spent_usd"]

    run(go())


def test_records_from_before_spent_usd_keep_their_cost(redis_url, tmp_path):
    """An aggregate written before `spent_usd` was kept starts it from its cost so far, in Lua and in
    Python alike, so the dashboard's spend does not restart from zero after an upgrade."""
    old = {"count": 2.0, "total": 2.0, "cost_usd": 0.004, "latency_ms": 100.0}
    fields = dict(old)
    apply_delta(fields, event_delta(event(1, cost_usd=0.001)), time.time(), None)
    assert fields["spent_usd"] == pytest.approx(0.005)
    assert summary_row(old, time.time())["spent_usd"] == pytest.approx(0.004)  # not updated since: its cost

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.hset(RedisKeys("ponder").agg("p", "math:hard", ARM), mapping=old)
        finally:
            await client.aclose()
        store = await open_store(redis_url, tmp_path, decay_half_life_s=3600.0)
        try:
            store.record(event(1, cost_usd=0.001))
            await store.flush()
            await store.refresh()
            return dict(store._raw["p"][("math:hard", ARM)])
        finally:
            await store.close()

    assert run(go())["spent_usd"] == pytest.approx(0.005)


def test_records_from_before_errors_total_keep_their_failures_out_of_the_savings(redis_url, tmp_path):
    """An aggregate written before `errors_total` was kept (10 requests, 4 failed in an outage) starts it
    from its `errors`, in Lua and in Python alike, and a summary reads them there until it is updated:
    counted as 0, the savings priced the 4 failures at the reference's answer for good (`total` never
    fades), and routing every request to the reference arm itself read as money saved."""
    from telemetry.summaries import savings

    old = {"count": 10.0, "total": 10.0, "errors": 4.0, "cost_usd": 0.006, "spent_usd": 0.006, "latency_ms": 600.0}
    answer = event(1, cost_usd=0.001)

    def saved(fields: dict[str, float]) -> tuple[float, dict]:
        row = summary_row(fields, time.time())
        bucket = savings({"math:hard": {ARM: row}}, ARM)["buckets"][0]
        return row["failed_requests"], bucket

    failed, bucket = saved(old)  # not updated since the upgrade
    assert failed == 4 and bucket["reference_cost_usd"] == pytest.approx(bucket["actual_cost_usd"]) == 0.006
    fields = dict(old)
    apply_delta(fields, event_delta(answer), time.time(), None)
    assert fields["errors_total"] == 4 and saved(fields)[1]["reference_cost_usd"] == pytest.approx(0.007)

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.hset(RedisKeys("ponder").agg("p", "math:hard", ARM), mapping=old)
        finally:
            await client.aclose()
        store = await open_store(redis_url, tmp_path)
        try:
            store.record(answer)
            await store.flush()
            await store.refresh()
            return dict(store._raw["p"][("math:hard", ARM)])
        finally:
            await store.close()

    assert run(go())["errors_total"] == 4


def test_requests_recorded_before_the_clients_n_was_kept_count_as_n_1(redis_url, tmp_path):
    """A record from before `est_choices` was kept has 100 priced requests of unknown `n`; 60 more send
    n=3. Its requests count as n=1 (a client's default) in Lua and Python alike: read as n=0, the
    bucket's typical n was 180 / 160, rounded 1, and its current choice was priced for one answer."""
    from router.learner import typical_output

    old = {"count": 100.0, "total": 100.0, "cost_usd": 0.1, "spent_usd": 0.1, "latency_ms": 5000.0,
           "est_prompt_tokens": 3000.0, "est_prompt_count": 100.0}
    voted = [event(i, estimated_prompt_tokens=30, choices=3) for i in range(60)]
    assert typical_output({ARM: arm_stats(old, time.time())}) == (None, 1)
    fields = dict(old)
    for ev in voted:
        apply_delta(fields, event_delta(ev), time.time(), None)
    assert fields["est_choices"] == 100 + 180 and typical_output({ARM: arm_stats(fields, time.time())}) == (None, 2)
    fresh: dict[str, float] = {}  # the 60 on another arm: the old record, not updated since, is read alike
    for ev in voted:
        apply_delta(fresh, event_delta(ev), time.time(), None)
    assert typical_output({ARM: arm_stats(old, time.time()), ARM2: arm_stats(fresh, time.time())}) == (None, 2)

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.hset(RedisKeys("ponder").agg("p", "math:hard", ARM), mapping=old)
        finally:
            await client.aclose()
        store = await open_store(redis_url, tmp_path)
        try:
            for ev in voted:
                store.record(ev)
            await store.flush()
            await store.refresh()
            return dict(store._raw["p"][("math:hard", ARM)])
        finally:
            await store.close()

    assert run(go())["est_choices"] == pytest.approx(100 + 180)


def test_records_from_before_prompt_estimates_still_load():
    """Events and aggregates written before the decision's prompt estimate was kept carry none: they
    load, count as requests, and add nothing to the estimate's sum or count."""
    old = event(1).to_dict()
    del old["estimated_prompt_tokens"]
    loaded = Event.from_dict(json.loads(json.dumps(old)))
    assert loaded.estimated_prompt_tokens is None
    delta = event_delta(loaded)
    assert delta["count"] == 1.0 and "est_prompt_tokens" not in delta and "est_prompt_count" not in delta
    stats = arm_stats({"count": 4.0, "total": 4.0, "cost_usd": 0.01, "est_cost_usd": 0.01, "est_count": 4.0}, time.time())
    assert (stats.count, stats.estimated_prompt_tokens, stats.estimated_prompt_count) == (4.0, 0.0, 0.0)
    assert event_delta(event(2, estimated_prompt_tokens=15))["est_prompt_tokens"] == 15.0


def test_the_clients_max_tokens_and_n_reach_the_arms_stats():
    """What the decision priced besides the prompt (router.learner.typical_output reads it)."""
    fields: dict[str, float] = {}
    for extra in ({"max_output_tokens": 50, "choices": 3}, {}):
        ev = Event.from_dict(json.loads(event(1, estimated_prompt_tokens=15, **extra).to_json()))
        apply_delta(fields, event_delta(ev), time.time(), None)
    stats = arm_stats(fields, time.time())
    assert (stats.estimated_choices, stats.output_cap_tokens, stats.capped_count) == (4.0, 50.0, 1.0)


def test_redis_killed_then_restarted(tmp_path):
    """Kill -9 Redis: nothing raises into the request path, stats stay cached, events buffer, budgets go
    local; restart on the same port: the buffer is flushed within 5 s and the learned stats restored."""
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        nonlocal proc
        store = await open_store(proc.url, tmp_path, refresh_s=0.2, buffer_max=1000)
        try:
            for i in range(100):
                store.record(event(i, success=1.0, success_source="vote"))
            await store.flush()
            await store.refresh()
            cached = store.snapshot("p")
            assert cached["math:hard"][ARM].count == 100
            await store.reserve("key-d", 4.0, {"day": 10.0})

            proc.kill()
            for i in range(100, 400):
                store.record(event(i))  # must not raise
                if i % 50 == 0:
                    await asyncio.sleep(0.05)
            await wait_for(lambda: not store.health()["connected"])
            await asyncio.sleep(0.5)  # refreshes fail meanwhile
            assert store.snapshot("p") == cached
            health = store.health()
            assert health["buffered"] == 300 and health["budget_mode"] == "local" and health["last_error"]
            # Budgets still answer, from the last known spend plus this replica's own reservations.
            local = await store.reserve("key-d", 5.0, {"day": 10.0})
            assert local.mode == "local"
            with pytest.raises(BudgetExceeded):
                await store.reserve("key-d", 2.0, {"day": 10.0})
            await store.settle(local, 1.0)
            assert (await store.feedback("req-1", 1.0, "key-a")).status == "unavailable"

            proc = start_redis(port=proc.port, data_dir=tmp_path / "redis")  # empty: no persistence
            client = aioredis.from_url(proc.url)
            took = await wait_for(lambda: client.xlen("ponder:{events}:stream"), timeout=5.0, step=0.05)
            await wait_for(lambda: store.health()["buffered"] == 0, timeout=5.0)
            assert await client.xlen("ponder:{events}:stream") == 300
            # The replica noticed Redis came back empty and re-added its cached aggregates.
            await wait_for(lambda: store.snapshot("p").get("math:hard", {}).get(ARM) is not None
                           and store.snapshot("p")["math:hard"][ARM].count == 400, timeout=5.0)
            assert store.health()["restores"] == 1
            # Budget changes made while Redis was down were pushed: 5 reserved, settled at 1.
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=5.0)
            assert float(await client.get(store.keys.budget("key-d", "day", time.strftime("%Y%m%d", time.gmtime())))) == 1.0
            await client.aclose()
            print(f"events flowed again {took:.2f}s after restart")
        finally:
            await store.close()

    try:
        run(go())
    finally:
        proc.stop()


def test_the_spend_views_keep_what_was_spent_while_redis_is_away(tmp_path):
    """While Redis is away the spend rollups cannot be read: the dashboard's spend per hour, per day and
    per key showed $0 ("Nothing spent in the last 24 hours") for the whole outage. They show the spend
    as last seen, this replica's batches written since, and the events waiting in the buffer."""
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        store = await open_store(proc.url, tmp_path, refresh_s=0.2, buffer_max=1000)
        try:
            other = aioredis.from_url(proc.url)  # another replica's spend, in Redis before this one looked
            hour = time.strftime("h:%Y%m%d%H", time.gmtime())
            await other.hset(store.keys.spend(hour), mapping={"_cost": 0.5, "_n": 1, "k:key-b": 0.5, "n:key-b": 1})
            day = time.strftime("d:%Y%m%d", time.gmtime())
            await other.hset(store.keys.spend(day), mapping={"_cost": 0.5, "_n": 1, "k:key-b": 0.5, "n:key-b": 1})
            await other.aclose()
            await store.summary()  # the dashboard looked once
            for i in range(6):
                store.record(event(i))  # written: 0.001 + 0.002 + 0.003, twice
            await store.flush()
            proc.kill()
            for i in range(6, 9):
                store.record(event(i))  # buffered while Redis is away
            await wait_for(lambda: not store.health()["connected"])
            spend = (await store.summary())["spend"]
            assert not store.health()["connected"]
            assert sum(h["cost_usd"] for h in spend["by_hour"]) == pytest.approx(0.5 + 0.018)
            assert sum(d["requests"] for d in spend["by_day"]) == 10
            assert spend["by_key"] == {"key-a": {"cost_usd": pytest.approx(0.018), "requests": 9},
                                       "key-b": {"cost_usd": pytest.approx(0.5), "requests": 1}}
        finally:
            await store.close()

    try:
        run(go())
    finally:
        proc.stop()


def test_a_redis_outage_is_logged_once_when_it_begins_and_once_when_it_ends(tmp_path, caplog):
    """An operator reading the logs saw nothing while Redis was away (its budgets enforced per replica,
    its events only buffered), nor when it came back: one line when the outage begins, one when it ends,
    not one per failed try of the reconnect loop (which tries several times a second)."""
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        nonlocal proc
        store = await open_store(proc.url, tmp_path, refresh_s=0.1)
        try:
            store.record(event(0))
            await store.flush()
            proc.kill()
            for i in range(1, 30):  # ~3 s of events and refreshes against a dead Redis
                store.record(event(i))
                await asyncio.sleep(0.1)
            assert not store.health()["connected"]
            proc = start_redis(port=proc.port, data_dir=tmp_path / "redis")
            await wait_for(lambda: store.health()["connected"] and store.health()["buffered"] == 0, timeout=5.0)
        finally:
            await store.close()

    with caplog.at_level("WARNING", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            proc.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    assert len([line for line in lines if line.startswith("Redis is unreachable")]) == 1, lines
    assert len([line for line in lines if line.startswith("Redis answers again after")]) == 1, lines
    assert len(lines) == 2, lines


def test_a_redis_user_not_allowed_scripts_is_said_once_and_leaks_no_connection(redis_server, redis_url, tmp_path,
                                                                                caplog):
    """An ACL user without @scripting: Redis answers, and refuses every EVALSHA and SCRIPT EXISTS. The
    gateway said nothing (events dropped, budgets per replica, only `last_error` knew), and each refused
    pipeline (a budget push per flush turn) kept its pooled connection: after 32 the store had none left,
    not even for the reads it is allowed. One ERROR line names the command; the pool stays whole."""
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "noscript", "reset", "on", ">pw-noscript", "~*", "&*", "+@all",
                          "-@scripting")
    url = f"redis://noscript:pw-noscript@127.0.0.1:{redis_server.port}/0"

    async def go():
        store = await open_store(url, tmp_path, op_timeout_s=0.5)
        try:
            res = await store.reserve("key-a", 0.5, {"day": 10.0})  # refused: the local ledger takes it
            assert res.mode == "local"
            for _ in range(40):  # one budget push per flush turn, each refused
                with contextlib.suppress(Exception):
                    await store._periodic()
            assert await store._client.set("ponder:probe", "1") and await store._client.get("ponder:probe") == "1"
        finally:
            await store.close(timeout_s=1.0)

    with caplog.at_level("ERROR", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            admin.execute_command("ACL", "DELUSER", "noscript")
            admin.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    refusals = [line for line in lines if line.startswith("Redis refuses a command the gateway needs")]
    assert refusals and all("no permissions to run" in line for line in refusals), lines
    assert len(refusals) == len(set(refusals)) <= 3, refusals  # once per command, not once per refusal


def test_a_redis_user_not_allowed_the_write_probe_is_served_and_told_to_grant_it(redis_server, redis_url, tmp_path,
                                                                                caplog):
    """The reconnect's write probe (LPUSHX) tells a Redis that takes writes from one that is full: an ACL
    without it leaves the store serving (a refusal of the probe that is not Redis refusing writes says
    nothing of them), and one ERROR says what to grant."""
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "noprobe", "reset", "on", ">pw-noprobe", "~*", "&*", "+@all", "-lpushx")
    url = f"redis://noprobe:pw-noprobe@127.0.0.1:{redis_server.port}/0"

    async def go():
        store = await open_store(url, tmp_path)
        try:
            store.record(event(1))
            assert await store.flush() and store.health()["connected"]
        finally:
            await store.close()

    with caplog.at_level("ERROR", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            admin.execute_command("ACL", "DELUSER", "noprobe")
            admin.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    assert len(lines) == 1 and "'lpushx'" in lines[0] and lines[0].startswith("Redis refuses a command"), lines


def test_a_primary_demoted_to_a_read_only_replica_is_one_outage_not_a_reconnect_loop(tmp_path, caplog):
    """A failover left the URL on a replica: PING answers, every write is refused with READONLY. The
    store took each PING as "back", failed its next write at once and reconnected again: hundreds of
    reconnects and two log lines each, a second. It is one outage (a write probe on reconnect), and the
    buffered events are written once the server is a primary again."""
    proc = start_redis(data_dir=tmp_path / "redis")
    primary = start_redis(data_dir=tmp_path / "other")

    async def go():
        admin = aioredis.Redis.from_url(proc.url)
        store = await open_store(proc.url, tmp_path, refresh_s=0.1)
        try:
            await admin.replicaof("127.0.0.1", primary.port)
            for i in range(20):  # ~2 s of events against a server that takes no writes
                store.record(event(i))
                await asyncio.sleep(0.1)
            assert not store.health()["connected"] and store.health()["buffered"] == 20
            assert store.reconnects <= 3, store.reconnects
            await admin.replicaof("NO", "ONE")
            await wait_for(lambda: store.health()["written"] == 20, timeout=5.0)
            assert await admin.xlen(RedisKeys("ponder").stream) == 20
        finally:
            await store.close()
            await admin.aclose()

    with caplog.at_level("WARNING", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            proc.stop()
            primary.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    assert len([line for line in lines if line.startswith("Redis takes no writes")]) == 1, lines
    assert len([line for line in lines if line.startswith("Redis takes writes again after")]) == 1, lines
    # (a replica loading the primary's data answers LOADING for a moment: on a slow machine the store may
    # meet it, one "unreachable" and one "answers again" more; the loop this guards against was hundreds)
    assert len(lines) <= 4, lines


def test_events_buffered_at_a_shutdown_while_redis_is_full_are_written_once_by_the_next_start(tmp_path, caplog):
    """A gateway stopped while Redis takes no writes (full) lost every event it had buffered. They are
    saved under data_dir and the next start writes them, once: here a taker already wrote the first
    batch before it died (so it is sent again, and skipped by its mark), and the file has a truncated
    and a garbage line (skipped, said once, the file kept as *.bad)."""
    proc = start_redis(data_dir=tmp_path / "redis")
    client = redis.Redis.from_url(proc.url, decode_responses=True)
    data = tmp_path / "data"

    async def go():
        store = await open_store(proc.url, data, refresh_s=0.1)
        store.record(event(0))
        assert await store.flush()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        for i in range(1, 1201):
            store.record(event(i))
        await wait_for(lambda: not store.health()["connected"])
        await store.close(timeout_s=1.0)
        [saved] = data.glob("events-unwritten-*.jsonl")
        batches, bad = unwritten_events.read(saved.read_bytes())
        assert [len(b) for b in batches] == [500, 500, 200] and bad == 0
        with saved.open("ab") as f:
            f.write(b"not json\n[2, {\"request_id\": \"cut")

        client.config_set("maxmemory", 0)
        crashed = await open_store(proc.url, tmp_path / "elsewhere")
        await crashed._write_batch(batches[0])  # a taker wrote batch 0, then died before the rest
        await crashed.close()
        assert client.xlen(STREAM) == 501

        again = await open_store(proc.url, data, refresh_s=0.1)
        try:
            assert client.xlen(STREAM) == 1201  # written before it serves
            assert not list(data.glob("events-unwritten-*.jsonl")) and len(list(data.glob("*.bad"))) == 1
            assert (await again.feedback("req-1200", 1.0, "key-a")).accepted
            await again.refresh()
            assert again.snapshot("p")["math:hard"][ARM].count == 1201
        finally:
            await again.close()
        third = await open_store(proc.url, data)  # nothing left to write twice
        await third.close()
        assert client.xlen(STREAM) == 1201

    with caplog.at_level("INFO", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            client.close()
            proc.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    assert len([line for line in lines if "1200 buffered events by shutdown: saved to" in line]) == 1, lines
    assert len([line for line in lines if line.startswith("unreadable saved events")
                and "2 unreadable lines" in line]) == 1, lines


def test_buffer_is_bounded_and_redis_down_at_start_is_served(tmp_path):
    async def go():
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        t0 = time.monotonic()
        store = await open_store(url, tmp_path, buffer_max=10)
        try:
            assert time.monotonic() - t0 < 2.0
            for i in range(25):
                store.record(event(i))
            health = store.health()
            assert (health["connected"], health["buffered"], health["dropped"]) == (False, 10, 15)
            assert store.snapshot("p") == {}
            assert [e["request_id"] for e in await store.recent_events(3)] == ["req-24", "req-23", "req-22"]
            t0 = time.monotonic()
            assert (await store.reserve("key-e", 1.0, {"day": 1.0})).mode == "local"
            assert time.monotonic() - t0 < 0.1  # no waiting on a dead Redis in the request path
        finally:
            await store.close(timeout_s=0.5)

    run(go())


def test_stats_cli_prints_the_table(tmp_path, capsys, redis_url):
    async def fill(url):
        store = await open_store(url, tmp_path / "data")
        for i in range(12):
            store.record(event(i, arm=ARM if i % 4 else ARM2, success=1.0 if i % 2 else 0.0, success_source="vote"))
        await store.close()

    run(fill(None))
    assert stats_cli(["--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "policy p" in out and ARM in out and ARM2 in out and "p95 ms" in out
    assert stats_cli(["--data-dir", str(tmp_path / "data"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["p"]["math:hard"][ARM]["requests"] == 9
    assert report["p"]["math:hard"][ARM2]["success_rate"] == 0.0

    run(fill(redis_url))
    assert stats_cli(["--redis-url", redis_url, "--policy", "p", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["p"]["math:hard"][ARM]["requests"] == 9
    assert stats_cli(["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 1


def test_stats_cli_says_why_a_policy_has_no_choice_column(tmp_path, capsys):
    """docs/telemetry.md: a policy that does not load leaves the current-choice column out "with one line
    on stderr saying why"; one with no policies/<name>.yaml (a user's own, read without --config) was left
    out silently. `direct` (requests naming a backend) has no policy to load and gets no line."""
    async def fill():
        store = await open_store(None, tmp_path / "data")
        store.record(event(0))
        store.record(event(1, policy="direct"))
        await store.close()

    run(fill())
    assert stats_cli(["--data-dir", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr()
    assert "policy p\n" in printed.out and "policy direct\n" in printed.out and "choice" not in printed.out
    assert printed.err.splitlines() == ["ponder stats: no current-choice column for policy 'p': no policies/p.yaml; "
                                        "give the gateway's --config, or the policy's file as --policy-file"]


def test_stats_cli_does_not_quote_a_redis_url_it_cannot_parse(capsys, monkeypatch):
    """A password with a raw `/` (base64 ones have it) in --redis-url or $PONDER_REDIS_URL: redis-py reads
    its first piece as the port and says so, and `ponder stats` printed that piece to the terminal (and to
    whatever log catches it), as the gateway's config check no longer does."""
    url = f"redis://:pw-secret/rest-secret@127.0.0.1:{free_port()}/0"
    assert stats_cli(["--redis-url", url]) == 1
    monkeypatch.setenv("PONDER_REDIS_URL", url)
    assert stats_cli([]) == 1
    printed = capsys.readouterr()
    assert "secret" not in printed.out + printed.err, printed.err
    assert printed.err.count("percent-encode") == 2, printed.err


def test_stats_cli_on_a_directory_no_gateway_wrote_says_so(tmp_path, capsys):
    """`ponder stats` without --config reads .ponder; run beside a gateway whose data_dir is elsewhere
    (or with a mistyped --data-dir) it said "no telemetry recorded yet", as if the telemetry were lost."""
    assert stats_cli(["--data-dir", str(tmp_path / "typo")]) == 1
    printed = capsys.readouterr()
    assert "no telemetry recorded yet" not in printed.out
    assert f"no embedded store in {tmp_path / 'typo'}" in printed.err and "--config" in printed.err

    async def fresh():  # a store opened and closed with nothing recorded: that is what the line is for
        await (await open_store(None, tmp_path / "empty")).close()

    run(fresh())
    assert stats_cli(["--data-dir", str(tmp_path / "empty")]) == 0
    assert "no telemetry recorded yet" in capsys.readouterr().out


def _stats_from(cwd: Path, config: Path, *, from_environment: bool = False,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ponder stats --config` run as an operator runs it, from a directory of their choosing (or with the
    config in $PONDER_CONFIG, as the image sets it for `ponder serve`), `env` added to the environment."""
    named = [] if from_environment else ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"PONDER_CONFIG": str(config)} if from_environment else {}),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "stats", *named, "--json"], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_relative_data_dir_is_the_config_folders_and_an_old_store_is_kept(tmp_path):
    """`telemetry.data_dir: data` was taken from the current directory, though load_config resolves the
    config's paths against its folder: `ponder stats --config /x/gw.yaml` run elsewhere than `ponder serve`
    found no store. A store an earlier version left in the current directory is still used, with a warning."""
    folder, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    (folder / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "arms": {"a": {"backend": "mock", "strategy": "single"}},
        "routes": [{"name": "all", "candidates": ["a"]}]}))
    config = folder / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "local_model": {"enabled": False}, "policy": "p.yaml", "telemetry": {"data_dir": "data"},
        "backends": [{"name": "mock", "model": "openai/mock", "api_base": "http://127.0.0.1:9/v1"}]}))

    async def fill(data_dir: Path, requests: int):
        store = await open_store(None, data_dir)
        for i in range(requests):
            store.record(event(i))
        await store.close()

    run(fill(folder / "data", 3))
    stats = _stats_from(elsewhere, config)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["p"]["math:hard"][ARM]["requests"] == 3
    assert "current directory" not in stats.stderr
    # the config `ponder serve` reads from the environment (the image's $PONDER_CONFIG) is stats' too
    stats = _stats_from(elsewhere, config, from_environment=True)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["p"]["math:hard"][ARM]["requests"] == 3

    run(fill(elsewhere / "data", 5))  # where an earlier version, run from here, kept it: still found
    (folder / "data" / "telemetry.sqlite3").unlink()
    stats = _stats_from(elsewhere, config)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["p"]["math:hard"][ARM]["requests"] == 5
    assert f"read from the current directory ({elsewhere / 'data'})" in stats.stderr
    assert f"{folder / 'data'}): move it there, or write an absolute path" in stats.stderr


def test_stats_reads_the_configs_embedded_store_whatever_ponder_redis_url_says(tmp_path):
    """A config without redis_url serves from its embedded store; `ponder stats --config` read
    $PONDER_REDIS_URL instead (another deployment's Redis, or none: exit 1), though the config beats
    the environment for every other setting."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "arms": {"a": {"backend": "mock", "strategy": "single"}},
        "routes": [{"name": "all", "candidates": ["a"]}]}))
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "local_model": {"enabled": False}, "policy": "p.yaml", "telemetry": {"data_dir": "data"},
        "backends": [{"name": "mock", "model": "openai/mock", "api_base": "http://127.0.0.1:9/v1"}]}))

    async def fill():
        store = await open_store(None, tmp_path / "data")
        for i in range(3):
            store.record(event(i))
        await store.close()

    run(fill())
    stats = _stats_from(tmp_path, config, env={"PONDER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["p"]["math:hard"][ARM]["requests"] == 3


def test_stats_cli_writes_nothing_to_redis(tmp_path, capsys, redis_url):
    """`ponder stats` is a reader: it works against a read replica, and it takes no policy's marker (a
    replica whose refresh finds the marker gone restores its cached stats after Redis lost its data;
    a marker taken by the CLI would leave those stats lost)."""
    import redis as sync_redis

    async def fill():
        store = await open_store(redis_url, tmp_path / "data")
        for i in range(5):
            store.record(event(i))
        await store.close()

    run(fill())
    primary = sync_redis.Redis.from_url(redis_url)
    primary.delete("ponder:{policy:p}:alive")  # as after a restart without data, with the policy re-added
    replica = start_redis(data_dir=tmp_path / "replica")
    try:
        client = sync_redis.Redis(port=replica.port)
        client.replicaof("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        deadline = time.monotonic() + 10
        while client.info("replication").get("master_link_status") != "up" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats_cli(["--redis-url", f"redis://127.0.0.1:{replica.port}/0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["p"]["math:hard"][ARM]["requests"] == 5
        client.close()
    finally:
        replica.stop()
    assert stats_cli(["--redis-url", redis_url, "--json"]) == 0
    assert not primary.exists("ponder:{policy:p}:alive")
    primary.close()


def test_percentile_of_the_log_histogram():
    hist = {}
    values = [float(v) for v in range(1, 1001)]
    for v in values:
        hist[latency_bucket(v)] = hist.get(latency_bucket(v), 0) + 1
    for q in (0.5, 0.95, 0.99):
        assert percentile(hist, q) == pytest.approx(values[int(q * 1000) - 1], rel=0.09)
    assert percentile({}, 0.95) == 0.0


def test_budget_periods_reset_at_utc_boundaries():
    import calendar

    from telemetry.budgets import seconds_until_reset

    now = calendar.timegm((2026, 12, 31, 23, 30, 0, 0, 0, 0)) + 0.25  # a Thursday, 30 min to the new year
    assert seconds_until_reset("hour", now) == seconds_until_reset("day", now) == 1799.75
    assert seconds_until_reset("month", now) == 1799.75
    assert seconds_until_reset("week", now) == 1799.75 + 3 * 86400  # ISO weeks start on Monday
    assert seconds_until_reset("total", now) is None


def test_a_budget_counter_is_the_utc_days_whatever_the_servers_zone(monkeypatch):
    """The day rolls over at UTC midnight (as seconds_until_reset tells clients), not the host's: a
    replica in New York and one in UTC must charge the same counter."""
    import calendar

    from telemetry.budgets import period_id

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        before = calendar.timegm((2026, 12, 31, 23, 59, 59, 0, 0, 0))
        assert period_id("day", before)[0] == "20261231" and period_id("month", before)[0] == "202612"
        assert period_id("day", before + 1)[0] == "20270101" and period_id("month", before + 1)[0] == "202701"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_latency_percentiles_are_of_the_requests_answered_at_the_arms_own_time():
    """Two answers at 800 ms, two requests refused before any call (every backend cooling down), a
    timeout, and a fallback that answered in 800 ms after another arm's 60 s timeout: the arm's p50 and
    p95 are 800 ms, its answers' as its mean latency is. A failure's wait, fast or slow, is no answer's
    time, and the timeout the fallback stood in for is the other arm's (its p95 of 60 s ruled out the
    fallback under a policy's max_p95_latency_ms)."""
    refused = dict(status=503, latency_ms=0.4, error="cooling down")
    timeout = dict(status=504, latency_ms=60_000.0, error="timed out", calls=[{"backend": "b", "ok": False}])
    fallback = dict(latency_ms=60_800.0, arm_latency_ms=800.0, calls=[{"backend": "a", "ok": False}, {"backend": "b"}])
    fields: dict[str, float] = {}
    for kind in (dict(latency_ms=800.0), refused, dict(latency_ms=800.0), refused, timeout, fallback):
        for k, v in event_delta(Event(request_id="r", **kind)).items():
            fields[k] = fields.get(k, 0.0) + v
    hist = histogram(fields)
    assert sum(hist.values()) == 3 and percentile(hist, 0.5) == pytest.approx(800, rel=0.09)
    assert percentile(hist, 0.95) == pytest.approx(800, rel=0.09)
    assert arm_stats(fields, time.time()).latency_p95_ms == pytest.approx(800, rel=0.09)
    assert fields["count"] == 6 and fields["errors"] == 3
    # a client that hung up (499) is billed, but is neither the arm's error nor a latency sample
    left = event_delta(Event(request_id="r", status=499, latency_ms=300.0, error="client left", cost_usd=0.01,
                             estimated_cost_usd=0.05, calls=[{"backend": "b", "ok": False}]))
    assert left["count"] == 1 and left["cost_usd"] == 0.01 and "errors" not in left
    assert EST_COST not in left and left[EST_COUNT] == 1  # its cut bill is no answer's: no answer's estimate
    assert "latency_ms" not in left and left["left"] == 1  # out of the mean latency's sum and its denominator
    assert not any(k.startswith("h") for k in left)


def test_redis_cluster_keys_share_slots(tmp_path):
    """Every multi-key operation (Lua aggregate update, budget reservation, settle, push) works on Redis
    Cluster."""
    from telemetry.redis_server import start_redis_cluster

    nodes = start_redis_cluster(3, data_dir=tmp_path / "cluster")

    async def go():
        url = nodes[0].url + "?cluster=1"
        a = await open_store(url, tmp_path / "a", refresh_s=0.1)
        b = await open_store(url, tmp_path / "b", refresh_s=0.1)
        try:
            for i in range(40):
                (a if i % 2 else b).record(event(i, policy=f"pol{i % 4}", success=1.0, success_source="vote"))
            assert await a.flush() and await b.flush(), repr((a.health(), b.health()))
            assert (await a.feedback("req-1", 0.0, "key-a")).status == "accepted"
            def both_see_the_feedback():
                stats = [s.snapshot("pol1").get("math:hard", {}).get(ARM) for s in (a, b)]
                return all(st and st.count == 10 and abs(st.weight - (0.3 * 9 + 1)) < 1e-9 for st in stats)

            await wait_for(both_see_the_feedback)
            assert await _race_reserves([a, b]) == 10, repr((a.health(), b.health()))
            # a settle (counters + hold) and a push of the ledger's changes (counter + mark): one slot each
            res = await a.reserve("key-c", 1.0, {"day": 5.0, "month": 5.0})
            await a.settle(res, 0.5)
            a._budgets.add(res.keys[0], 0.25, 86400, time.time(), track_unsynced=True)
            await a._periodic()
            assert await b.spent("key-c") == {"day": pytest.approx(0.75), "month": pytest.approx(0.5)}
            assert a.health()["connected"] and b.health()["connected"], (a.health(), b.health())
        finally:
            await a.close()
            await b.close()

    try:
        run(go())
    finally:
        for node in nodes:
            node.stop()


def test_stats_cli_shows_the_learners_choice_when_available(tmp_path, capsys):
    try:
        from policies.loader import load_policy
        from router.learner import current_choice

        policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "local.yaml")
        expected = current_choice("math:hard", policy, {}).key
    except Exception as exc:  # the learner is optional for `ponder stats`
        pytest.skip(f"learner or shipped policy unavailable: {exc}")

    async def fill():
        store = await open_store(None, tmp_path)
        store.record(event(1, policy="local", arm=expected))
        store.record(event(2, policy="local", arm="local/-/single/1"))
        await store.close()

    run(fill())
    assert stats_cli(["--data-dir", str(tmp_path), "--policy", "local"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].rstrip().endswith("choice")
    assert [line.split()[1] for line in lines if line.rstrip().endswith("*")] == [expected]


def test_stats_cli_policy_file_marks_only_the_policy_of_its_name(tmp_path, capsys):
    """Two policies recorded the same arm: --policy-file local.yaml marks `local`'s table, not the other
    policy's (whose choice it cannot know: it was marked as if it were `local`), and a policy file whose
    name has no telemetry says so instead of printing no mark without a word."""
    from policies.loader import load_policy
    from router.learner import current_choice

    shipped = Path(__file__).resolve().parents[1] / "policies" / "local.yaml"
    expected = current_choice("math:hard", load_policy(shipped), {}).key

    async def fill():
        store = await open_store(None, tmp_path / "data")
        store.record(event(1, policy="local", arm=expected))
        store.record(event(2, policy="other", arm=expected))
        await store.close()

    run(fill())
    copy = tmp_path / "mine.yaml"
    copy.write_text(shipped.read_text())
    assert stats_cli(["--data-dir", str(tmp_path / "data"), "--policy-file", str(copy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["local"]["math:hard"][expected]["current_choice"] is True
    assert "current_choice" not in report["other"]["math:hard"][expected]
    copy.write_text(shipped.read_text().replace("\nname: local\n", "\nname: local-v2\n"))
    assert stats_cli(["--data-dir", str(tmp_path / "data"), "--policy-file", str(copy), "--json"]) == 0
    printed = capsys.readouterr()
    assert "is policy 'local-v2', which has no telemetry here (recorded: local, other)" in printed.err
    assert "current_choice" not in json.loads(printed.out)["other"]["math:hard"][expected]
    with pytest.raises(SystemExit):
        stats_cli(["--data-dir", str(tmp_path / "data"), "--half-life-s", "-5"])
    assert "must be above 0 seconds" in capsys.readouterr().err


def test_stats_cli_marks_every_bucket_it_can_when_one_has_no_choice(tmp_path, capsys):
    """`auto` has only a 1000-token backend, `auto-long` only a large one. chat:easy's requests came
    through `auto-long` with ~20,000-token prompts: no arm of `auto` holds its typical prompt, so it
    has no current choice; math:hard (after it in the table) still has its own."""
    policy = tmp_path / "long.yaml"
    policy.write_text("""\
name: long
backends:
  - {name: small, model: t/small, max_context: 1000, prices: {input_per_mtok: 0, output_per_mtok: 0}}
  - {name: big, model: t/big, max_context: 200000, prices: {input_per_mtok: 0, output_per_mtok: 0}}
arms:
  small: {backend: small}
  big: {backend: big}
routes:
  - {name: short, candidates: [small]}
  - {name: long, candidates: [big]}
aliases:
  auto: {routes: [short], arms: [small]}
  auto-long: {routes: [long], arms: [big]}
""")

    async def fill():
        store = await open_store(None, tmp_path / "data")
        store.record(event(1, policy="long", task="chat", difficulty=0.1, arm="big/-/single/1",
                           estimated_prompt_tokens=20_000))
        store.record(event(2, policy="long", arm="small/-/single/1", estimated_prompt_tokens=20))
        await store.close()

    run(fill())
    assert stats_cli(["--data-dir", str(tmp_path / "data"), "--policy-file", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].rstrip().endswith("choice")
    assert [line.split()[:2] for line in lines[2:4]] == [["chat:easy", "big/-/single/1"],
                                                         ["math:hard", "small/-/single/1"]]
    assert not lines[2].rstrip().endswith("*") and lines[3].rstrip().endswith("*")


def test_stats_cli_reads_a_gateway_config(tmp_path, capsys):
    """The README's pattern: backends in the gateway config, the policy naming them. --policy-file
    alone cannot load such a policy: it says so (the table still prints); --config loads it as the
    gateway does and reads the config's telemetry."""
    import yaml

    from tests.servers import two_mock_policy

    policy_path = two_mock_policy(tmp_path, "shared")
    backends = [{"name": name, "model": f"openai/{name}", "api_base": "http://127.0.0.1:9/v1"}
                for name in ("mock-a", "mock-b")]
    config = tmp_path / "ponder.yaml"
    config.write_text(yaml.safe_dump({"backends": backends, "policy": policy_path, "local_model": {"enabled": False},
                                      "telemetry": {"data_dir": str(tmp_path / "data")}}))

    async def fill():
        store = await open_store(None, tmp_path / "data")
        store.record(event(1, policy="shared", arm="mock-a/-/single/1"))
        await store.close()

    run(fill())
    assert stats_cli(["--data-dir", str(tmp_path / "data"), "--policy-file", policy_path]) == 0
    printed = capsys.readouterr()
    assert f"no current-choice column from --policy-file {policy_path}" in printed.err and "--config" in printed.err
    assert "mock-a/-/single/1" in printed.out and not printed.out.splitlines()[1].rstrip().endswith("choice")
    assert stats_cli(["--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].rstrip().endswith("choice") and "mock-a/-/single/1" in lines[2]
    assert stats_cli(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_local_budget_ledger_is_pessimistic():
    """The fallback ledger never under-counts: late replies cannot lower it, in-flight reservations count."""
    from telemetry.budgets import LocalBudgets, make_reservation

    ledger = LocalBudgets()
    now = time.time()
    res = make_reservation("k", 3.0, {"day": 10.0}, now, lambda *parts: "|".join(parts))
    key = res.keys[0]
    ledger.observe(key, 6.0, 60, now, at_least=True)
    ledger.observe(key, 4.0, 60, now, at_least=True)  # an older reply arriving late
    assert ledger.get(key, now) == 6.0
    ledger.track_inflight(res.keys, 3.0)  # another reservation on its way to Redis
    with pytest.raises(BudgetExceeded):
        ledger.reserve(res, [10.0], now, track_unsynced=True)
    ledger.track_inflight(res.keys, -3.0)
    ledger.reserve(res, [10.0], now, track_unsynced=True)
    assert ledger.unsynced == {key: 3.0} and ledger.get(key, now) == 9.0


def test_a_bad_event_does_not_poison_the_batch(redis_url, tmp_path):
    async def go():
        for url, path in ((redis_url, tmp_path / "r"), (None, tmp_path / "e")):
            store = await open_store(url, path)
            try:
                store.record(event(1))
                store.record(event(2, cost_usd=None))
                store.record(event(3, latency_ms=float("nan")))
                store.record({"request_id": "not-an-event"})
                store.record(event(4, details={"obj": object()}))  # serialised with str()
                assert await store.flush()
                await store.refresh()
                assert store.snapshot("p")["math:hard"][ARM].count == 2
                assert store.health()["dropped"] == 3 and "invalid event" in store.health()["last_error"]
            finally:
                await store.close()

    run(go())


@pytest.mark.parametrize("message, refused", [
    ("OOM command not allowed when used memory > 'maxmemory'.", True),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist", True),
    # Redis 6.2 wraps a refusal met inside a Lua script in its own error (7.0 passes the code on)
    ("Error running script (call to f_0123): @user_script:1: @user_script: 1: -OOM command not allowed when "
     "used memory > 'maxmemory'.", True),
    ("Error running script (call to f_0123): @user_script:1: -READONLY You can't write against a read only "
     "replica.", True),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ("Error running script (call to f_0123): @user_script:3: user_script:3: attempt to compare nil", False),
])
def test_a_refusal_of_writes_is_told_from_a_refusal_of_the_batch(message, refused):
    """Writes refused for now (full, a replica, failing to persist) are an outage: the batch waits. A
    batch refused for itself (a key of the wrong type, a script error) is dropped after three tries. On
    Redis 6.2 the code of a refusal inside a script comes wrapped, and a full Redis dropped events there."""
    from redis.exceptions import OutOfMemoryError, ResponseError

    from telemetry.redis_connection import refuses_writes

    error = OutOfMemoryError(message) if message.startswith("OOM") else ResponseError(message)
    assert refuses_writes(error) is refused


def test_a_cluster_in_failover_is_down_not_refusing_the_batch():
    """A Redis Cluster mid-failover answers CLUSTERDOWN or TRYAGAIN, which redis-py raises as
    ResponseErrors: they were taken for a batch Redis keeps refusing, and its events dropped after three
    tries, where a lost connection keeps them buffered until the cluster answers again."""
    from redis.exceptions import ClusterDownError, TryAgainError

    from telemetry.redis_connection import DOWN_ERRORS

    assert isinstance(ClusterDownError("The cluster is down"), DOWN_ERRORS)
    assert isinstance(TryAgainError("Multiple keys request during rehashing of slot"), DOWN_ERRORS)


def test_a_batch_redis_keeps_refusing_is_dropped_not_retried_forever(redis_url, tmp_path, caplog):
    """A refusal that is no outage (a key of the wrong type; a full or read-only Redis is an outage) drops
    the batch after its third try, with one ERROR when the drops begin and one WARNING when Redis takes
    events again (nothing was logged: only a gauge and `last_error` knew learned outcomes were lost)."""
    async def go():
        client = aioredis.from_url(redis_url)
        await client.set("ponder:{events}:stream", "not a stream")  # XADD now fails with WRONGTYPE
        store = await open_store(redis_url, tmp_path)
        try:
            for i in range(5):
                store.record(event(i))
            for _ in range(3):
                await store.flush()
            health = store.health()
            assert (health["buffered"], health["dropped"], health["connected"]) == (0, 5, True)
            assert "WRONGTYPE" in health["last_error"]
            await client.delete("ponder:{events}:stream")
            store.record(event(9))
            assert await store.flush()
            assert await client.xlen("ponder:{events}:stream") == 1
        finally:
            await store.close()
            await client.aclose()

    with caplog.at_level("WARNING", logger="ponder.telemetry"):
        run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    dropping = [line for line in lines if line.startswith("the telemetry store refuses to write events")]
    assert len(dropping) == 1 and "WRONGTYPE" in dropping[0], lines
    assert len([line for line in lines if line.startswith("the telemetry store takes events again")]) == 1, lines


def test_redis_full_says_budgets_are_local_and_stats_keep_refreshing(tmp_path):
    """Redis at maxmemory with noeviction refuses every write but still answers: reservations fall back
    to the in-process ledger, and health (budget_mode, read by /readyz, the dashboard and /metrics) must
    say so; the refresh, whose data-loss marker is a write, must keep reading the stats; and when Redis
    takes writes again the ledger's changes are pushed once."""
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        store = await open_store(proc.url, tmp_path, refresh_s=0.1)
        client = aioredis.from_url(proc.url, decode_responses=True)
        try:
            for i in range(10):
                store.record(event(i))
            await store.flush()
            assert (await store.reserve("key-f", 1.0, {"day": 10.0})).mode == "redis"
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", 1)  # every write refused with OOM from now on
            local = await store.reserve("key-f", 2.0, {"day": 10.0})
            assert local.mode == "local"
            health = store.health()  # an outage of the writes (events buffered, not dropped: see below)
            assert not health["connected"] and health["budget_mode"] == "local", health
            # Another replica's outcomes (written straight to the aggregate, as Redis allows reads and
            # this is only a check of the reads) reach this replica's snapshot while Redis is full.
            await client.config_set("maxmemory", 0)
            await client.hincrbyfloat(store.keys.agg("p", "math:hard", ARM), "count", 5)
            await client.config_set("maxmemory", 1)
            await wait_for(lambda: getattr(store.snapshot("p").get("math:hard", {}).get(ARM), "count", 0) == 15,
                           timeout=3.0)
            assert "OOM" in store.health()["last_error"] or "maxmemory" in store.health()["last_error"]
            await client.config_set("maxmemory", 0)
            await wait_for(lambda: store.health()["budget_mode"] == "redis", timeout=3.0)
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=3.0)
            day = time.strftime("%Y%m%d", time.gmtime())
            assert float(await client.get(store.keys.budget("key-f", "day", day))) == pytest.approx(3.0)
        finally:
            await store.close()
            await client.aclose()

    try:
        run(go())
    finally:
        proc.stop()


def test_stats_read_while_redis_refused_their_marker_are_not_added_back_once_it_takes_it(tmp_path):
    """A policy's data-loss marker is written by the refresh after its first events. When Redis refuses
    that write (full: the batch that brought the policy took its last bytes; a replica), the refresh
    still reads the stats; once Redis takes writes, the marker's SET NX succeeds, which read as "Redis
    lost its data" and added the cached stats back on top of the same stats in Redis: every count
    doubled. Only a marker this replica has seen in place is a loss when it is gone."""
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        client = aioredis.from_url(proc.url, decode_responses=True)
        await client.config_set("maxmemory-policy", "noeviction")
        store = await open_store(proc.url, tmp_path, refresh_s=3600)  # refreshed here only
        try:
            for i in range(3):
                store.record(event(i))
            assert await store.flush()  # the policy's first events: no marker yet
            await client.config_set("maxmemory", 1)
            await store.refresh()
            assert store.snapshot("p")["math:hard"][ARM].count == 3
            await client.config_set("maxmemory", 0)
            await store.refresh()
            assert store.snapshot("p")["math:hard"][ARM].count == 3 and store.restores == 0
            assert float(await client.hget(store.keys.agg("p", "math:hard", ARM), "count")) == 3
            # A replica started while Redis is full sees the marker in place (a read), so when Redis then
            # loses its data, the marker gone is a loss, and its cached stats are added back as before.
            await client.config_set("maxmemory", 1)
            other = await open_store(proc.url, tmp_path / "other", refresh_s=3600)
            await client.config_set("maxmemory", 0)
            await client.flushall()
            await other.refresh()
            await other.close()
            assert other.restores == 1
            assert float(await client.hget(store.keys.agg("p", "math:hard", ARM), "count")) == 3
        finally:
            await store.close()
            await client.aclose()

    try:
        run(go())
    finally:
        proc.stop()


# A refusal that says Redis takes no writes now, the setting that makes it and the one that lifts it, and
# what its error says.
WRITES_REFUSED = {
    "full": ("maxmemory", 1, 0, "maxmemory"),  # OOM at maxmemory under noeviction (docs/deploy.md)
    "short of replicas": ("min-replicas-to-write", 1, 0, "NOREPLICAS"),
}


@pytest.mark.parametrize("refusal", sorted(WRITES_REFUSED))
def test_events_redis_refuses_while_it_takes_no_writes_are_kept_and_written_once_it_does(tmp_path, caplog, refusal):
    """Redis full (OOM under noeviction) or short of the replicas it must write to answers every write with a
    refusal. Such a batch was taken for one Redis "keeps refusing" and dropped after 3 tries (they came fast:
    the flush loop and every feedback's own flush), so the requests' spend rollups, learned stats and feedback
    records were lost for good, and a feedback sent again after its 503 got a 404. It is an outage of the
    writes: the events stay buffered, feedback is unavailable meanwhile, the store does not reconnect in a
    loop (its write probe is refused too), and everything, budget spend included, is written once Redis
    takes writes again."""
    setting, refuse, allow, said = WRITES_REFUSED[refusal]
    proc = start_redis(data_dir=tmp_path / "redis")

    async def go():
        client = aioredis.from_url(proc.url, decode_responses=True)
        await client.config_set("maxmemory-policy", "noeviction")
        store = await open_store(proc.url, tmp_path, refresh_s=0.1)
        try:
            store.record(event(9, key_id="key-f"))
            assert await store.flush()
            await client.config_set(setting, refuse)
            for i in range(5):
                store.record(event(i, key_id="key-f"))
            await asyncio.sleep(0.2)  # the flush loop's first try is refused
            reservation = await store.reserve("key-f", 1.0, {"day": 10.0})  # a request admitted meanwhile
            for _ in range(10):
                assert (await store.feedback("req-0", 1.0, "key-f")).status == "unavailable"
                await asyncio.sleep(0.1)
            await store.settle(reservation, 0.25)
            health = store.health()
            assert (health["buffered"], health["dropped"], health["connected"]) == (5, 0, False), health
            assert said in health["last_error"] and health["budget_mode"] == "local", health
            assert store.reconnects <= 1, store.reconnects
            # the dashboard's recent events: the buffered ones, and Redis's, which it still reads
            assert [e["request_id"] for e in await store.recent_events(10)] == [f"req-{i}" for i in (4, 3, 2, 1, 0, 9)]
            await client.config_set(setting, allow)
            await wait_for(lambda: store.health()["written"] == 6, timeout=5.0)
            assert await client.xlen(store.keys.stream) == 6
            assert (await store.feedback("req-0", 1.0, "key-f")).status == "accepted"
            await store.refresh()
            assert store.snapshot("p")["math:hard"][ARM].count == 6
            day = time.strftime("%Y%m%d", time.gmtime())
            spend = await client.hgetall(store.keys.spend(f"d:{day}"))
            assert float(spend["k:key-f"]) == pytest.approx(sum(event(i).cost_usd for i in (0, 1, 2, 3, 4, 9)))
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=3.0)
            assert float(await client.get(store.keys.budget("key-f", "day", day))) == pytest.approx(0.25)
        finally:
            await store.close()
            await client.aclose()

    with caplog.at_level("WARNING", logger="ponder.telemetry"):
        try:
            run(go())
        finally:
            proc.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.telemetry"]
    # One line as the outage begins and one as it ends, not one per try. The end says "takes writes
    # again", or "answers again" where a call timed out meanwhile (seen once on a loaded CI machine: the
    # store then counts Redis as unreachable, and says so).
    assert [line.split(" (")[0].split(" after ")[0] for line in lines] in (
        ["Redis takes no writes", "Redis takes writes again"], ["Redis takes no writes", "Redis answers again"]), lines


def test_a_budget_push_redis_refuses_half_way_is_not_pushed_twice(redis_url, tmp_path):
    """The push of the ledger's changes is one pipeline of INCRBYFLOATs: when Redis takes some and
    refuses others, the ones it took must not be pushed again on the next turn."""
    async def go():
        store = await open_store(redis_url, tmp_path)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            now = time.time()
            day, month = (store.keys.budget("key-g", p, period_id(p, now)[0]) for p in ("day", "month"))
            await client.rpush(month, "not a counter")  # INCRBYFLOAT on it fails with WRONGTYPE
            store._budgets.add(day, 1.0, 86400, now, track_unsynced=True)
            store._budgets.add(month, 1.0, 86400, now, track_unsynced=True)
            for _ in range(3):
                with contextlib.suppress(Exception):
                    await store._periodic()
            assert float(await client.get(day)) == pytest.approx(1.0)
            assert "WRONGTYPE" in store.health()["last_error"]
            assert store._budgets.unsynced == {month: 1.0}
        finally:
            await store.close()
            await client.aclose()

    run(go())


def test_a_reservation_over_several_caps_names_the_one_that_frees_it_last(redis_url, tmp_path):
    """Day and month both spent: the error names the month (the day resets first, which frees nothing),
    with every failing period in `failures`; a request over a whole cap names that cap (it never fits)."""
    async def go():
        for url, path in ((redis_url, tmp_path / "r"), (None, tmp_path / "e")):
            store = await open_store(url, path)
            try:
                limits = {"day": 2.0, "month": 2.0}
                await store.reserve("key-h", 2.0, limits)
                with pytest.raises(BudgetExceeded) as both:
                    await store.reserve("key-h", 1.0, limits)
                assert both.value.period == "month" and both.value.spent == pytest.approx(2.0)
                assert sorted(p for p, _, _ in both.value.failures) == ["day", "month"]
                # over the whole hourly cap, which no reset helps, though the month resets later
                limits = {"hour": 1.0, "month": 1.5}
                await store.reserve("key-i", 1.0, limits)
                with pytest.raises(BudgetExceeded) as never:
                    await store.reserve("key-i", 1.2, limits)
                assert never.value.period == "hour" and len(never.value.failures) == 2
            finally:
                await store.close()

    run(go())


def test_a_settle_redis_takes_in_one_period_only_is_not_charged_twice_there(redis_url, tmp_path):
    """A settle writes the day and the month counters; when Redis refuses one (here WRONGTYPE, as OOM
    would), the other, already corrected, must not get the delta again from the ledger's push."""
    async def go():
        store = await open_store(redis_url, tmp_path)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            res = await store.reserve("key-j", 1.0, {"day": 10.0, "month": 10.0})
            day, month = res.keys
            await client.delete(month)
            await client.rpush(month, "not a counter")
            await store.settle(res, 0.25)
            for _ in range(3):
                with contextlib.suppress(Exception):
                    await store._periodic()
            assert float(await client.get(day)) == pytest.approx(0.25)
            assert store._budgets.unsynced == {month: pytest.approx(-0.75)}
        finally:
            await store.close()
            await client.aclose()

    run(go())


# A script that keeps Redis busy for ARGV[1] µs: every other client waits (a latency spike, a blocked
# server), so a command sent meanwhile times out on our side and is applied by Redis all the same.
BUSY_LUA = ("local t = redis.call('TIME') while true do local n = redis.call('TIME') "
            "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > tonumber(ARGV[1]) then return 1 end end")


@contextlib.asynccontextmanager
async def redis_blocked(url: str, seconds: float):
    client = aioredis.from_url(url)
    busy = asyncio.create_task(client.eval(BUSY_LUA, 0, int(seconds * 1e6)))
    await asyncio.sleep(0.1)  # the script is running
    try:
        yield
    finally:
        await busy
        await client.aclose()


def test_a_settle_or_push_whose_reply_is_lost_is_applied_once(redis_url, tmp_path):
    """Redis blocked past the store's timeout while it settles a reservation, or pushes the ledger's
    changes: it applies the command once it is free, but the store saw a timeout and sends it again
    when Redis answers. The key must end at its actual spend, not refunded (or charged) twice."""
    async def go():
        store = await open_store(redis_url, tmp_path, op_timeout_s=0.3)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            res = await store.reserve("key-k", 1.0, {"day": 10.0, "month": 10.0})
            async with redis_blocked(redis_url, 0.8):
                await store.settle(res, 0.2)
            assert store.health()["unsynced_budget_usd"] == pytest.approx(-1.6)  # day and month
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=5.0)
            assert [float(v) for v in await client.mget(res.keys)] == [pytest.approx(0.2)] * 2
            assert not await client.keys("*hold*")  # the settle consumed the reservation's hold

            day = res.keys[0]
            store._budgets.add(day, 0.5, 86400, time.time(), track_unsynced=True)
            async with redis_blocked(redis_url, 0.8):
                with contextlib.suppress(Exception):
                    await store._periodic()
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=5.0)
            assert float(await client.get(day)) == pytest.approx(0.7)
        finally:
            await store.close()
            await client.aclose()

    run(go())


@contextlib.asynccontextmanager
async def reply_delaying_proxy(redis_port: int):
    """A TCP proxy in front of Redis whose replies can be held back (`proxy.hold_s`): Redis runs a
    command at once, and its reply reaches the client late, as after a stall or a lost packet."""
    class Proxy:
        hold_s = 0.0
        url = ""

    proxy, handlers = Proxy(), set()

    async def relay(reader, writer, delayed: bool) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if delayed and proxy.hold_s:
                    await asyncio.sleep(proxy.hold_s)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def connection(client_reader, client_writer) -> None:
        handlers.add(asyncio.current_task())
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", redis_port)
        await asyncio.gather(relay(client_reader, server_writer, False), relay(server_reader, client_writer, True))

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    proxy.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    try:
        yield proxy
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def test_a_batch_of_events_whose_reply_is_lost_is_written_once(redis_server, redis_url, tmp_path):
    """Redis runs a batch, but its reply comes after the store's timeout: the store sends the batch
    again when Redis answers. Each event must be in the stream once, and counted once in the learned
    stats and the spend rollups."""
    async def go():
        client = aioredis.from_url(redis_url, decode_responses=True)
        async with reply_delaying_proxy(redis_server.port) as proxy:
            store = await open_store(proxy.url, tmp_path, op_timeout_s=0.3)
            try:
                store.record(event(0))  # the batch script is loaded
                await wait_for(lambda: store.written == 1)
                proxy.hold_s = 0.6
                for i in range(1, 4):
                    store.record(event(i))
                await wait_for(lambda: store.health()["connected"] is False, timeout=2.0)  # the write timed out
                proxy.hold_s = 0.0
                await wait_for(lambda: store.written == 4, timeout=5.0)
                assert await client.xlen(store.keys.stream) == 4
                await store.refresh()
                assert store.snapshot("p")["math:hard"][ARM].count == pytest.approx(4.0)
                spend = (await store.summary("p"))["spend"]["by_key"]
                assert spend["key-a"] == {"cost_usd": pytest.approx(0.007), "requests": 4}, spend
            finally:
                await store.close()
        await client.aclose()

    run(go())


def test_a_reservation_whose_reply_is_lost_is_not_charged_twice(redis_url, tmp_path):
    """A reservation that times out falls back to the in-process ledger, which charges it too; when
    Redis did apply it, its amount is given back once Redis answers, so the key ends at its spend."""
    async def go():
        store = await open_store(redis_url, tmp_path, op_timeout_s=0.3)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            async with redis_blocked(redis_url, 0.8):
                res = await store.reserve("key-l", 1.0, {"day": 10.0})
            assert res.mode == "local"
            await store.settle(res, 0.25)

            async def pushed():  # the hold is gone once the ledger's changes reached Redis
                return store.health()["unsynced_budget_usd"] == 0 and not await client.keys("*hold*")

            await wait_for(pushed, timeout=5.0)
            assert float(await client.get(res.keys[0])) == pytest.approx(0.25)
        finally:
            await store.close()
            await client.aclose()

    run(go())


async def assert_the_next_start_pushes_all(redis_url: str, data_dir, client, counter: str, spent: float) -> None:
    """A store started on `data_dir` takes over the budget changes saved there and pushes them: none is
    left unsynced or on disk, and Redis's `counter` holds `spent`."""
    store = await open_store(redis_url, data_dir)
    try:
        assert store.health()["unsynced_budget_usd"] == 0 and not list(data_dir.glob("budget-unsynced-*"))
        assert float(await client.get(counter)) == pytest.approx(spent)
    finally:
        await store.close()


def test_a_settle_in_doubt_at_shutdown_is_saved_and_applied_once_by_the_next_start(redis_url, tmp_path):
    """A settle whose reply is lost just before shutdown is saved with its hold, and the next start
    sends it again: applied once whether or not Redis had applied it. A file an older version saved
    ([counter, delta, expiry] rows, no tokens) is still pushed."""
    async def go():
        client = aioredis.from_url(redis_url, decode_responses=True)
        store = await open_store(redis_url, tmp_path, op_timeout_s=0.3)
        res = await store.reserve("key-m", 1.0, {"day": 10.0})
        async with redis_blocked(redis_url, 1.5):
            await store.settle(res, 0.4)
            await store.close(timeout_s=0.2)  # Redis is still blocked: nothing reaches it
        assert list(tmp_path.glob("budget-unsynced-*"))
        old = tmp_path / "budget-unsynced-1-old.json"
        old.write_bytes(json.dumps([[res.keys[0], 0.1, time.time() + 3600]]).encode())
        try:
            await assert_the_next_start_pushes_all(redis_url, tmp_path, client, res.keys[0], 0.5)
        finally:
            await client.aclose()

    run(go())


def test_a_journaled_change_pushed_just_before_a_crash_is_not_applied_twice(redis_url, tmp_path):
    """A replica dies after Redis applied its push but before its journal said so: the next start takes
    the journal over and pushes the changes again under their marks and holds, and Redis applies
    none of them twice."""
    async def go():
        store = await open_store(redis_url, tmp_path, op_timeout_s=0.3)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            async with redis_blocked(redis_url, 0.8):
                res = await store.reserve("key-j", 1.0, {"day": 10.0})  # times out: the ledger admits it
                await store.settle(res, 0.25)
                [journal] = tmp_path.glob("budget-unsynced-*.jsonl")
                as_at_the_crash = journal.read_bytes()
            assert res.mode == "local" and as_at_the_crash
            await wait_for(lambda: store.health()["unsynced_budget_usd"] == 0, timeout=5.0)
            assert not journal.exists()  # Redis confirmed everything in it
            assert float(await client.get(res.keys[0])) == pytest.approx(0.25)
        finally:
            await store.close()
        (tmp_path / "budget-unsynced-1-dead.jsonl").write_bytes(as_at_the_crash)  # no process holds it
        try:
            await assert_the_next_start_pushes_all(redis_url, tmp_path, client, res.keys[0], 0.25)
        finally:
            await client.aclose()

    run(go())


def test_a_live_replicas_journal_is_not_taken_and_a_long_one_is_compacted(tmp_path, monkeypatch):
    """Replicas share the data directory: a start takes over only the journals no live process holds
    (the owner's lock), so a change is never pushed by two. A journal written through a long outage is
    rewritten with just its live changes, and still replays to the ledger's unpushed spend."""
    from telemetry import budget_journal
    from telemetry.budget_journal import BudgetJournal, replay, take_over
    from telemetry.budgets import LocalBudgets

    monkeypatch.setattr(budget_journal, "COMPACT_AFTER", 10)
    now = time.time()
    ledger = LocalBudgets(BudgetJournal(tmp_path))
    for _ in range(25):
        ledger.charge(("day-counter", "month-counter"), (86400, 86400), 0.5, now, track_unsynced=True)
    path = ledger.journal.path
    assert path is not None and len(path.read_bytes().splitlines()) <= 10
    changes, bad = replay(path.read_bytes())
    assert bad == 0 and sorted((c.keys, c.delta) for c in changes) == [
        (("day-counter",), pytest.approx(12.5)), (("month-counter",), pytest.approx(12.5))]

    adopted: list = []
    assert take_over(tmp_path, lambda c: adopted.append(c) or True, str) == []
    assert adopted == [] and path.exists()  # its process (this one) is alive
    ledger.journal.close()  # as the process dying lets go of it
    assert take_over(tmp_path, lambda c: adopted.append(c) or True, str) == []
    assert [sum(c.delta for c in batch) for batch in adopted] == [pytest.approx(25.0)] and not path.exists()


def test_spend_a_late_settle_adds_after_shutdown_saved_the_journal_is_kept_too(tmp_path):
    """A request the shutdown did not wait for settles after the store saved its journal: that change
    goes to a new journal under a new token, so taking over both files counts every cent once."""
    from telemetry.budget_journal import BudgetJournal, take_over
    from telemetry.budgets import LocalBudgets

    now = time.time()
    ledger = LocalBudgets(BudgetJournal(tmp_path))
    ledger.charge(("day-counter",), (86400,), 1.0, now, track_unsynced=True)
    ledger.stage_unsynced()  # as the shutdown does, before it rewrites and lets go of the journal
    assert ledger.journal.rewrite(ledger.unconfirmed())
    ledger.journal.close()
    ledger.charge(("day-counter",), (86400,), 0.5, now, track_unsynced=True)  # the late settle
    ledger.journal.close()  # the process exits
    assert len(list(tmp_path.glob("budget-unsynced-*.jsonl"))) == 2
    taker = LocalBudgets(BudgetJournal(tmp_path / "next"))
    assert take_over(tmp_path, lambda changes: taker.add_unsynced(changes, now), str) == []
    assert taker.unpushed_usd() == pytest.approx(1.5) and not list(tmp_path.glob("budget-unsynced-*"))


def test_a_journal_line_with_an_amount_that_is_no_finite_number_is_unreadable():
    """A journal's amounts and expiries are finite JSON numbers, as its writer writes them; a line with a
    string, infinity or NaN there was planted in data_dir by someone else: unreadable, never pushed (an
    infinite delta was taken as a change)."""
    from telemetry.budget_journal import replay

    planted = [b'["put","u",true,["k"],["inf"],"1e999",false]', b'["put","v",false,["k"],[0],"0.5",true]',
               b'["add","w","k",0,1e999]', b'["put","x",false,["k"],[0],true,true]']
    assert replay(b"\n".join(planted)) == ([], len(planted))
    changes, bad = replay(b'["put","ok",false,["k"],[0],0.25,true]')
    assert bad == 0 and [(c.token, c.delta) for c in changes] == [("ok", 0.25)]


def test_a_journal_replays_to_the_changes_redis_has_not_confirmed(tmp_path):
    """A change Redis confirmed is marked done in the journal: a start taking the journal over (perhaps
    days later, when Redis has forgotten the change's once-mark) must not push it again."""
    from telemetry.budget_journal import BudgetJournal, replay
    from telemetry.budgets import BudgetChange, LocalBudgets

    expires = (time.time() + 86400,)
    ledger = LocalBudgets(BudgetJournal(tmp_path))
    ledger.hold_pending(BudgetChange("confirmed", False, ("day-counter",), expires, 1.0))
    ledger.hold_pending(BudgetChange("in-doubt", False, ("day-counter",), expires, 0.25))
    ledger.confirm("confirmed")
    changes, bad = replay(ledger.journal.path.read_bytes())
    assert bad == 0 and [(c.token, c.delta) for c in changes] == [("in-doubt", 0.25)]
    ledger.journal.close()


def test_a_dead_journal_is_deleted_only_once_its_changes_are_safe_in_this_ones(tmp_path):
    """Taking over a dead replica's journal: while this process cannot make the changes durable in its
    own journal (a full disk), the dead one stays, to be taken at the next look; then it goes."""
    from telemetry.budget_journal import BudgetJournal, take_over
    from telemetry.budgets import LocalBudgets

    dead = LocalBudgets(BudgetJournal(tmp_path))
    dead.charge(("day-counter",), (86400,), 0.5, time.time(), track_unsynced=True)
    path = dead.journal.path
    dead.journal.close()  # the process died
    assert take_over(tmp_path, lambda changes: False, str) == []
    assert path.exists()
    adopted: list = []
    assert take_over(tmp_path, lambda changes: adopted.extend(changes) or True, str) == []
    assert [c.delta for c in adopted] == [0.5] and not path.exists()


def test_reservation_replies_arriving_out_of_order_leave_the_higher_spend_for_the_fallback(redis_url, tmp_path):
    """Two reservations of one key run together; Redis applies the first (spent: 4) then the second
    (spent: 6), but the first's reply is read last. The ledger keeps 6, so when Redis then stops
    answering, a reservation of 5 against a cap of 10 is refused on the local fallback, not admitted
    on a stale 4."""
    async def go():
        store = await open_store(redis_url, tmp_path, op_timeout_s=0.3)
        real = store._reserve_script
        first_applied, second_read = asyncio.Event(), asyncio.Event()
        started: list[int] = []

        async def in_this_order(**kwargs):
            started.append(1)
            if len(started) == 1:
                out = await real(**kwargs)
                first_applied.set()
                await second_read.wait()
                return out
            await first_applied.wait()
            out = await real(**kwargs)
            second_read.set()
            return out

        store._reserve_script = in_this_order
        try:
            await asyncio.wait_for(asyncio.gather(store.reserve("key-o", 4.0, {"day": 10.0}),
                                                  store.reserve("key-o", 2.0, {"day": 10.0})), 5.0)
            async with redis_blocked(redis_url, 0.8):
                with pytest.raises(BudgetExceeded):
                    await store.reserve("key-o", 5.0, {"day": 10.0})
        finally:
            await store.close()

    run(go())
