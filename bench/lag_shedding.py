"""Shedding by event-loop lag: what clients see of a process past its CPU, with and without it.

Two open-loop streams over kept-alive connections (as SDK pools or a balancer keep them), into one
`ponder serve` with the default `max_requests_in_flight` (1,024): light chat requests (the clients
measured) and heavy ones, conversations of 20,000 messages that cost the gateway ~30 ms of CPU each
(parsing and validation), offered past what one core serves. The in-flight count stays far under its
limit (the work is CPU, not waiting), so without the lag bound nothing is shed and every client
waits behind the queue; run once with `max_event_loop_lag_ms: 0` and once with the bound given. Each
run reports the light requests' latency and shed share, the heavy ones' outcomes, and the loop's lag
as the gateway's gauge said it (sampled every 100 ms). First, the lag of a process that keeps up:
single calls from 64 closed-loop clients, its CPU busy with no queue beyond them: the lag a default
must stay above.

Run:  python bench/lag_shedding.py [--heavy-rate 40] [--light-rate 50] [--duration-s 8] [--bound-ms 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import loadgen, machine, start_ponder, start_upstream, write_result  # noqa: E402

LIGHT = {"model": "auto", "messages": [{"role": "user", "content": "What is 6 times 7?"}], "max_tokens": 16}
HEAVY_MESSAGES = 20_000
POLICY = {"name": "lag", "arms": {"direct": {"backend": "upstream", "strategy": "single", "tokens": 16}},
          "routes": [{"name": "all", "candidates": ["direct"]}], "exploration": {"share": 0.0}}


class LagSampler:
    """ponder_event_loop_lag_seconds read from /metrics every 100 ms while a run lasts (a path never shed)."""

    def __init__(self, url: str) -> None:
        self.url, self.samples_ms, self._stop = url + "/metrics", [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(0.1):
                try:
                    text = client.get(self.url).text
                except httpx.HTTPError:
                    continue
                for line in text.splitlines():
                    if line.startswith("ponder_event_loop_lag_seconds "):
                        self.samples_ms.append(float(line.split()[1]) * 1000)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.samples_ms) or [0.0]
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"n": len(self.samples_ms), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
                "max": ordered[-1], "mean": statistics.fmean(ordered)}


def shed_by_reason(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("ponder_shed_requests_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = found.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return found


def run(tmp: Path, upstream: Any, bound_ms: float, specs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The loads in `specs` at once (one loadgen process each) against a fresh gateway."""
    ponder = start_ponder(tmp, upstream, POLICY, name=name,
                          config={"max_event_loop_lag_ms": bound_ms, "max_body_bytes": 64_000_000})
    try:
        url = ponder.url + "/v1/chat/completions"
        loadgen({"mode": "closed", "url": url, "body": LIGHT, "concurrency": 4, "requests": 50})  # warm
        cpu_before = ponder.cpu_s()
        with LagSampler(ponder.url) as lag, ThreadPoolExecutor(len(specs)) as pool:
            futures = {key: pool.submit(loadgen, {**spec, "url": url}) for key, spec in specs.items()}
            result: dict[str, Any] = {key: future.result() for key, future in futures.items()}
        result["server_cpu_s"] = ponder.cpu_s() - cpu_before
        result["lag_ms"] = lag.summary()
        result["shed"] = shed_by_reason(ponder.url)
        result["bound_ms"] = bound_ms
        return result
    finally:
        ponder.stop()


def row(label: str, result: dict[str, Any], key: str) -> str:
    load = result[key]
    outcomes = load.get("outcomes") or {"200": load.get("ok", 0), **load.get("errors", {})}
    total = sum(outcomes.values())
    served = load.get("served_ms", load.get("latency_ms", {}))
    errors = sum(v for k, v in outcomes.items() if k not in ("200", "503"))
    return (f"| {label} | {total} | {outcomes.get('503', 0) / total:.0%} | {served.get('p50', 0):,.0f} | "
            f"{served.get('p99', 0):,.0f} | {load.get('refused_ms', {}).get('p50', 0):,.0f} | {errors} | "
            f"{result['lag_ms']['p50']:,.0f} / {result['lag_ms']['max']:,.0f} | "
            f"{load.get('client_loop_lag_ms', {}).get('max', 0):,.0f} | {result['server_cpu_s']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description="Load shedding by event-loop lag, with and without.")
    parser.add_argument("--light-rate", type=float, default=50.0, help="light requests offered a second")
    parser.add_argument("--heavy-rate", type=float, default=40.0, help="heavy requests offered a second")
    parser.add_argument("--connections", type=int, default=200, help="kept-alive connections of each stream")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--bound-ms", type=float, default=500.0, help="max_event_loop_lag_ms of the run with it")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the lag of a process that keeps up")
    opts = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "opts": vars(opts)}
    with tempfile.TemporaryDirectory(prefix="ponder-lag-") as tmp_name:
        tmp = Path(tmp_name)
        heavy_path = tmp / "heavy.json"
        heavy_path.write_bytes(orjson.dumps({**LIGHT, "messages": [{"role": "user", "content": "word " * 10}]
                                             * HEAVY_MESSAGES}))
        common = {"mode": "open", "duration_s": opts.duration_s}
        specs = {"light": {**common, "body": LIGHT, "rate": opts.light_rate, "connections": opts.connections},
                 "heavy": {**common, "body_path": str(heavy_path), "rate": opts.heavy_rate, "connections": opts.connections}}
        upstream = start_upstream(tmp)
        try:
            if not opts.skip_baseline:
                results["keeping_up"] = run(tmp, upstream, 0, {"light": {
                    "mode": "closed", "body": LIGHT, "concurrency": 64, "duration_s": opts.duration_s}},
                    "ponder-keeping-up")
            results["without"] = run(tmp, upstream, 0, specs, "ponder-without")
            results["with"] = run(tmp, upstream, opts.bound_ms, specs, "ponder-with")
        finally:
            upstream.stop()
    print("| run | requests | shed | served p50 ms | served p99 ms | 503 p50 ms | errors | loop lag p50 / max ms "
          "| client's own lag max ms | server CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if "keeping_up" in results:
        print(row("keeping up: light, 64 closed-loop clients", results["keeping_up"], "light"))
    for key, label in (("without", "max_event_loop_lag_ms 0"), ("with", f"max_event_loop_lag_ms {opts.bound_ms:.0f}")):
        print(row(f"{label}: light {opts.light_rate:.0f}/s", results[key], "light"))
        print(row(f"{label}: heavy {opts.heavy_rate:.0f}/s", results[key], "heavy"))
    print("written to", write_result("lag_shedding.json", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
