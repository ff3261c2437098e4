"""Load generator for the benchmarks: an asyncio aiohttp client in its own process.

It runs apart from the servers it measures, so its CPU is not charged to them, and every target is
measured with the same client, so the client's own cost cancels out of "added latency".

Run:  python bench/loadgen.py '{"mode": "closed", "url": ..., "body": {...}, "concurrency": 16, ...}'
Prints one JSON object on stdout. Modes:
  closed    `concurrency` workers back to back, for `requests` requests or `duration_s` seconds
            (after `warmup` requests): latency percentiles, requests/s, errors; with
            `"server_timing": true` also the percentiles of each Server-Timing entry the server sent.
  open      `rate` requests a second for `duration_s`, each sent on time however the earlier ones fare
            (an open loop: what a crowd of independent clients does to an overloaded server): latency
            percentiles of the answers in `accept` and of the others, counts by status or error; with
            `connections`, over a pool of that many connections opened first.
  stream    `requests` streamed completions one after another: time to first byte, time from the
            first to the last byte, to the last byte, events received, whether each ended with [DONE].
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
            "mean": statistics.fmean(ordered), "max": ordered[-1]}


async def closed_loop(spec: dict[str, Any]) -> dict[str, Any]:
    url, body = spec["url"], orjson.dumps(spec["body"])
    headers = {"Content-Type": "application/json", **spec.get("headers", {})}
    concurrency = int(spec.get("concurrency", 1))
    accept = set(spec.get("accept", [200]))  # statuses that count as answered (probes time errors too)
    limit_requests = spec.get("requests")
    duration = spec.get("duration_s")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    timing_headers: list[str] = []  # parsed after the run, off the timed path
    want_timing = bool(spec.get("server_timing"))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status in accept
                    key = str(response.status)
                    timing = response.headers.get("Server-Timing") if want_timing else None
            except Exception as exc:  # every failure is counted, none aborts the run
                ok, key, timing = False, type(exc).__name__, None
            if ok:
                latencies.append(time.perf_counter() - started)
                if timing:
                    timing_headers.append(timing)
            else:
                errors[key] = errors.get(key, 0) + 1

        for _ in range(int(spec.get("warmup", 0))):
            await one()
        latencies.clear()
        errors.clear()
        timing_headers.clear()
        issued = 0
        started = time.perf_counter()
        stop_at = started + duration if duration else float("inf")

        async def worker() -> None:
            nonlocal issued
            while time.perf_counter() < stop_at and (limit_requests is None or issued < limit_requests):
                issued += 1
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    done = len(latencies) + sum(errors.values())
    out = {"mode": "closed", "concurrency": concurrency, "elapsed_s": elapsed, "requests": done,
           "ok": len(latencies), "errors": errors, "rps": len(latencies) / elapsed if elapsed else 0.0,
           "latency_ms": {k: (v * 1000 if k != "n" else v) for k, v in percentiles(latencies).items()}}
    if want_timing:
        out["server_timing_ms"] = {name: percentiles(values) for name, values in server_timings(timing_headers).items()}
    return out


async def open_loop(spec: dict[str, Any]) -> dict[str, Any]:
    # `body_path`: the body read from a file (one too large for a command line)
    url = spec["url"]
    body = open(spec["body_path"], "rb").read() if "body_path" in spec else orjson.dumps(spec["body"])
    headers = {"Content-Type": "application/json", **spec.get("headers", {})}
    accept = set(spec.get("accept", [200]))
    rate, duration = float(spec["rate"]), float(spec["duration_s"])
    served: list[float] = []
    refused: list[float] = []
    outcomes: dict[str, int] = {}
    # `connections`: a pool of that many kept-alive connections opened before the run (as an SDK's pool,
    # a balancer's), so the requests arrive on open connections; 0: a new connection whenever none is idle
    pool = int(spec.get("connections", 0))
    connector = aiohttp.TCPConnector(limit=pool, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        if pool:
            warm_url = url.split("/v1/", 1)[0] + "/healthz"

            async def opened() -> None:
                async with session.get(warm_url) as response:
                    await response.read()
                    await asyncio.sleep(0.5)  # held, so that every one opens its own connection

            await asyncio.gather(*(opened() for _ in range(pool)))

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
                    (served if response.status in accept else refused).append(time.perf_counter() - started)
            except Exception as exc:  # every failure is counted, none aborts the run
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

        own_lag: list[float] = []  # this client's own loop, late: a starved client's waits are its own

        async def watch() -> None:
            while True:
                due = time.perf_counter() + 0.05
                await asyncio.sleep(0.05)
                own_lag.append(time.perf_counter() - due)

        watcher = asyncio.ensure_future(watch())
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * duration)):
            if (delay := started + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        sent_s = time.perf_counter() - started
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        watcher.cancel()
    ms = lambda values: {k: (v * 1000 if k != "n" else v) for k, v in percentiles(values).items()}  # noqa: E731
    return {"mode": "open", "rate": rate, "sent": len(tasks), "sent_s": sent_s, "elapsed_s": elapsed,
            "outcomes": outcomes, "served_ms": ms(served), "refused_ms": ms(refused),
            "client_loop_lag_ms": ms(own_lag)}


def server_timings(headers: list[str]) -> dict[str, list[float]]:
    """`Server-Timing: classify;dur=0.1, total;dur=0.5` headers as {name: [ms, ...]}."""
    found: dict[str, list[float]] = {}
    for header in headers:
        for entry in header.split(","):
            name, *params = (part.strip() for part in entry.split(";"))
            for param in params:
                if param.startswith("dur="):
                    found.setdefault(name, []).append(float(param[4:]))
    return found


async def streams(spec: dict[str, Any]) -> dict[str, Any]:
    url, body = spec["url"], orjson.dumps({**spec["body"], "stream": True})
    headers = {"Content-Type": "application/json", **spec.get("headers", {})}
    ttfb, spans, totals, events, complete = [], [], [], [], 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(int(spec.get("warmup", 0)) + int(spec["requests"])):
            started = time.perf_counter()
            first = last = None
            data = b""
            async with session.post(url, data=body, headers=headers) as response:
                async for chunk in response.content.iter_any():
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    last = now
                    data += chunk
            if i < int(spec.get("warmup", 0)) or first is None:
                continue
            ttfb.append(first - started)
            spans.append(last - first)
            totals.append(last - started)
            events.append(data.count(b"data:"))
            complete += data.rstrip().endswith(b"data: [DONE]")
    ms = lambda values: {k: (v * 1000 if k != "n" else v) for k, v in percentiles(values).items()}  # noqa: E731
    return {"mode": "stream", "requests": len(ttfb), "complete": complete, "ttfb_ms": ms(ttfb),
            "first_to_last_ms": ms(spans), "total_ms": ms(totals),
            "events_p50": statistics.median(events) if events else 0}


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    import uvloop

    runner = {"closed": closed_loop, "open": open_loop, "stream": streams}[spec["mode"]]
    result = uvloop.run(runner(spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
