"""Strategy fan-out overhead: N=8 parallel samples cost about one call's wall time, not eight.

An upstream that holds every completion for a fixed delay (200 ms by default) sits behind Ponder,
whose policy answers every prompt with `self_consistency` and n=8 (eight concurrent samples, then
a vote). The wall time of one such request is compared with one direct call to the upstream and
with one Ponder request on a `single` arm. Target: self_consistency/8 <= 1.2x one direct call.

Run:  .venv/bin/python bench/fanout.py [--delay-ms 200] [--repeats 20]
Writes bench/results/fanout.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, print_checks, start_ponder, start_upstream, write_result  # noqa: E402

SAMPLES = 8
BODY = {"messages": [{"role": "user", "content": "What is 6 times 7?"}], "max_tokens": 16}


def policy() -> dict[str, Any]:
    return {
        "name": "fanout",
        "arms": {
            "vote8": {"backend": "upstream", "strategy": "self_consistency", "n": SAMPLES, "tokens": 16},
            "direct": {"backend": "upstream", "strategy": "single", "tokens": 16},
        },
        "routes": [{"name": "all", "candidates": ["vote8"]}],
        "aliases": {"auto": {"description": "always vote"}, "auto-single": {"arms": ["direct"], "explore": False}},
        "exploration": {"share": 0.0},
    }


def timed(client: httpx.Client, url: str, body: dict[str, Any], repeats: int) -> tuple[list[float], dict[str, Any]]:
    walls, last = [], {}
    for i in range(repeats + 2):
        started = time.perf_counter()
        response = client.post(url, json=body)
        wall = time.perf_counter() - started
        response.raise_for_status()
        last = response.json()
        if i >= 2:  # the first two open connections and warm caches
            walls.append(wall * 1000)
    return walls, last


def summary(walls: list[float]) -> dict[str, float]:
    ordered = sorted(walls)
    return {"n": len(ordered), "p50": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description="Fan-out overhead of a parallel sampling strategy.")
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ponder-fanout-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = start_upstream(tmp, delay_ms=opts.delay_ms)
        try:
            ponder = start_ponder(tmp, upstream, policy(), name="ponder-fanout")
            try:
                with httpx.Client(timeout=30) as client:
                    direct, _ = timed(client, upstream.url + "/v1/chat/completions", {**BODY, "model": "bench"},
                                      opts.repeats)
                    single, _ = timed(client, ponder.url + "/v1/chat/completions", {**BODY, "model": "auto-single"},
                                      opts.repeats)
                    fanned, answer = timed(client, ponder.url + "/v1/chat/completions", {**BODY, "model": "auto"},
                                           opts.repeats)
            finally:
                ponder.stop()
        finally:
            upstream.stop()
    extension = answer.get("ponder") or {}
    result = {
        "benchmark": "fanout",
        "machine": machine(),
        "settings": {"delay_ms": opts.delay_ms, "samples": SAMPLES, "repeats": opts.repeats},
        "direct_one_call_ms": summary(direct),
        "ponder_single_ms": summary(single),
        "ponder_self_consistency_ms": summary(fanned),
        "samples_drawn": extension.get("samples"),
        "strategy": extension.get("strategy"),
    }
    ratio = result["ponder_self_consistency_ms"]["p50"] / result["direct_one_call_ms"]["p50"]
    result["ratio_p50"] = ratio
    result["checks"] = [
        {"check": f"self_consistency n={SAMPLES} wall p50 <= 1.2x one direct call", "value": round(ratio, 4),
         "limit": 1.2, "ok": ratio <= 1.2},
        {"check": f"all {SAMPLES} samples drawn", "value": extension.get("samples"), "limit": SAMPLES,
         "ok": extension.get("samples") == SAMPLES},
    ]
    path = write_result("fanout.json", result)
    print(f"| wall time, p50 over {opts.repeats} (upstream delay {opts.delay_ms:.0f} ms) | ms |")
    print("|---|---:|")
    print(f"| one direct call to the upstream | {result['direct_one_call_ms']['p50']:.1f} |")
    print(f"| Ponder, single arm | {result['ponder_single_ms']['p50']:.1f} |")
    print(f"| Ponder, self_consistency n={SAMPLES} ({extension.get('samples')} samples + vote) | "
          f"{result['ponder_self_consistency_ms']['p50']:.1f} |")
    print(f"| ratio (self_consistency / direct) | {ratio:.3f} |")
    print_checks(result["checks"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
