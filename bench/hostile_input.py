"""What one odd or hostile request costs everyone else: the event-loop time it holds.

One uvicorn process serves every client on one event loop, so the CPU a request spends there (reading
the JSON, validating it, the classifier's features, the prompt-token estimate, writing it upstream)
delays every other request. Each body below (all under the default 4 MiB `max_body_bytes`) is sent
while a probe asks GET /healthz every 2 ms; the longest probe wait is the loop time that request held
(plus the probe's own ~1 ms). The gateway's Server-Timing (classify, decide, total) is printed too.

Run:  .venv/bin/python bench/hostile_input.py [--repeats 3]
Writes bench/results/hostile_input.json. Timings, so no pass/fail: docs/performance.md reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, start_ponder, start_upstream, write_result  # noqa: E402

LIMIT = 4 * 1024 * 1024  # the default max_body_bytes
PROBE_EVERY_S = 0.002


def bodies() -> dict[str, bytes]:
    """name -> request body, each just under LIMIT where its shape allows."""
    def chat(messages: list[dict[str, Any]], **extra: Any) -> bytes:
        return orjson.dumps({"model": "auto", "messages": messages, **extra})

    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}
    return {
        "small": chat(hi),
        "one 4 MB message": chat([{"role": "user", "content": "word " * (LIMIT // 5 - 100)}]),
        "100,000 tiny messages": chat([{"role": "user", "content": "a"}] * 100_000),
        "5,000 turns": chat([{"role": "user" if i % 2 == 0 else "assistant", "content": "turn " * 80}
                             for i in range(5000)]),
        "120,000 content parts": chat([{"role": "user", "content": [{"type": "text", "text": "x"}] * 120_000}]),
        "10,000 tools": chat(hi, tools=[tool] * 10_000),
        "200,000 logit_bias entries": chat(hi, logit_bias={str(i): 1 for i in range(200_000)}),
        "150,000 metadata keys": chat(hi, metadata={f"k{i}": "v" * 10 for i in range(150_000)}),
        "4 MB of emoji": chat([{"role": "user", "content": "\U0001f600" * (LIMIT // 4 - 100)}]),
        "4 MB of CJK": chat([{"role": "user", "content": "\u6f22\u5b57" * (LIMIT // 6 - 100)}]),
        "4 MB of combining marks": chat([{"role": "user", "content": "e\u0301" * (LIMIT // 3 - 100)}]),
        "4 MB of NUL": chat([{"role": "user", "content": "\x00" * (LIMIT // 6 - 100)}]),
        "4 MB image data URL": chat([{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (LIMIT - 2000)}}]}]),
    }


async def one(url: str, body: bytes) -> dict[str, Any]:
    waits: list[float] = []
    stop = asyncio.Event()

    async def probe(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await client.get(url + "/healthz")
            waits.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(PROBE_EVERY_S)

    async with httpx.AsyncClient(timeout=120) as client, httpx.AsyncClient(timeout=120) as probe_client:
        prober = asyncio.create_task(probe(probe_client))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        response = await client.post(url + "/v1/chat/completions", content=body,
                                     headers={"content-type": "application/json"})
        wall = (time.perf_counter() - started) * 1000
        stop.set()
        await prober
    timing = dict(part.split(";dur=", 1) for part in
                  (p.split(";desc")[0].strip() for p in response.headers.get("server-timing", "").split(","))
                  if ";dur=" in part)
    return {"status": response.status_code, "wall_ms": wall, "probe_max_ms": max(waits),
            "probe_p50_ms": statistics.median(waits), **{f"{k}_ms": float(v) for k, v in timing.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description="Event-loop time held by odd and hostile request bodies.")
    parser.add_argument("--repeats", type=int, default=3, help="runs per body; the median is reported")
    opts = parser.parse_args()
    policy = {"name": "hostile", "arms": {"direct": {"backend": "upstream", "strategy": "single"}},
              "routes": [{"name": "all", "candidates": ["direct"]}], "exploration": {"share": 0.0}}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ponder-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = start_upstream(tmp)
        try:
            ponder = start_ponder(tmp, upstream, policy, name="ponder-hostile", server_timing=True)
            try:
                for name, body in bodies().items():
                    runs = [asyncio.run(one(ponder.url, body)) for _ in range(opts.repeats)]
                    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]
                           if all(key in run for run in runs)}
                    rows[name] = {"body_mb": round(len(body) / 2**20, 2), **row}
            finally:
                ponder.stop()
        finally:
            upstream.stop()
    path = write_result("hostile_input.json", {"benchmark": "hostile_input", "machine": machine(),
                                               "settings": {"repeats": opts.repeats}, "bodies": rows})
    print("| body | MiB | status | loop held (probe max), ms | classify, ms | decide, ms | total, ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['body_mb']:.2f} | {row['status']:.0f} | {row['probe_max_ms']:.0f} | "
              f"{row.get('classify_ms', 0):.1f} | {row.get('decide_ms', 0):.1f} | {row.get('total_ms', 0):.0f} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
