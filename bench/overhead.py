"""What the gateway adds to every request, side by side with the alternatives, in one run.

Targets, each in front of the same minimal upstream (bench/fast_upstream.py) on loopback:
  direct    the upstream itself (the baseline every "added" number is measured against)
  minimal   a minimal Starlette pass-through proxy (bench/minimal_proxy.py): the floor for Python
  ponder    `ponder serve`, full path: classify + decide + single-arm call + telemetry (embedded store)
  litellm   LiteLLM proxy 1.110.2, one worker, no database, installed into bench/.litellm-venv

Per target: startup time to ready, RSS idle and under load, added latency p50/p99 at concurrency 1
(paired with a direct run just before it), requests/s at concurrency 16 and 64, server CPU ms per
request, and for streaming the added time to first byte and the added time per chunk. Ponder runs
with `server_timing: true`, so its answers also say where its time went (classify, decide, the
upstream call, the handler in all): reported for the median latency round.

Run:  .venv/bin/python bench/overhead.py                  (about 4 minutes; installs LiteLLM the first time)
      .venv/bin/python bench/overhead.py --quick          (shorter runs, for a smoke test)
      .venv/bin/python bench/overhead.py --profile        (cProfile of Ponder's request path, top functions)
Writes bench/results/overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BENCH, PYTHON, Server, free_port, loadgen, machine, print_checks, start_ponder, start_upstream, write_result,
)

LITELLM_VERSION = "1.110.2"
LITELLM_VENV = BENCH / ".litellm-venv"
STREAM_CHUNKS = 32  # the upstream's default; streamed requests below ask for a size with max_tokens
SHORT_STREAM, LONG_STREAM = 16, 256  # content chunks per streamed answer
ROUNDS = 3  # repeats of each measurement; see measure()
# Every target is deployed as in production, with a key: the load generator sends it to all of them.
API_KEY = "sk-bench-" + "0" * 48
REQUEST = {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
           "max_tokens": 16}

PONDER_POLICY = {
    "name": "bench",
    "description": "Everything to the one benchmark upstream, one plain call: measures the path, not a strategy.",
    "arms": {"direct": {"backend": "upstream", "strategy": "single", "tokens": 16}},
    "routes": [{"name": "all", "candidates": ["direct"]}],
    "exploration": {"share": 0.0},
}


# -- the servers ------------------------------------------------------------------------------------


def start_minimal(tmp: Path, upstream: Server) -> Server:
    port = free_port()
    return Server("minimal", [PYTHON, str(BENCH / "minimal_proxy.py"), "--port", str(port),
                              "--upstream", upstream.url + "/v1"], port, "/healthz", tmp / "minimal.log")


def ensure_litellm() -> Path:
    """LiteLLM proxy in its own virtualenv (it pins versions that must not touch Ponder's)."""
    litellm_bin = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if marker.exists() and litellm_bin.exists():
        return litellm_bin
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run([str(base_python), "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    first = subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], capture_output=True, text=True)
    if first.returncode != 0:
        # litellm 1.110.2's `proxy` extra requires a `litellm-proxy==1.110.2` distribution that the
        # registry does not have; the proxy's code ships inside the litellm wheel itself, so install
        # litellm and the rest of that extra's requirements, read from litellm's own metadata.
        print("  litellm[proxy] did not install as a whole "
              f"({first.stderr.strip().splitlines()[-1] if first.stderr.strip() else 'no message'}); "
              "installing litellm + the proxy extra's other requirements", flush=True)
        subprocess.run([*pip, f"litellm=={LITELLM_VERSION}"], check=True)
        requirements = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c", PROXY_REQUIREMENTS],
                                      check=True, capture_output=True, text=True).stdout.split()
        if subprocess.run([*pip, *requirements]).returncode != 0:
            # Some exact pins (litellm-proxy-extras, litellm-enterprise) name releases the registry does
            # not carry either: take the newest release of those, one package at a time.
            for requirement in requirements:
                if subprocess.run([*pip, requirement], capture_output=True).returncode != 0:
                    name = requirement.split("=")[0].split("<")[0].split(">")[0]
                    relaxed = subprocess.run([*pip, name], capture_output=True, text=True)
                    print(f"  {requirement}: not in the registry; "
                          f"{'installed the newest ' + name if relaxed.returncode == 0 else 'skipped'}", flush=True)
    marker.write_text("ok\n")
    return litellm_bin


# Run inside the LiteLLM venv: the `proxy` extra's requirements, minus the missing meta-package.
PROXY_REQUIREMENTS = """
from importlib.metadata import requires
from packaging.requirements import Requirement
for raw in requires("litellm") or []:
    req = Requirement(raw)
    if req.marker is None or not req.marker.evaluate({"extra": "proxy"}) or req.marker.evaluate({"extra": ""}):
        continue
    if req.name == "litellm-proxy":
        continue
    print(f"{req.name}{req.specifier}")
"""


def start_litellm(tmp: Path, upstream: Server) -> Server:
    litellm_bin = ensure_litellm()
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: openai/bench\n"
        f"      api_base: {upstream.url}/v1\n"
        "      api_key: sk-bench\n"
        "general_settings:\n"
        f"  master_key: {API_KEY}\n"
        "litellm_settings:\n"
        "  num_retries: 0\n"
        "  request_timeout: 30\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
    )
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "PYTHONPATH": "", "VIRTUAL_ENV": str(LITELLM_VENV)}
    return Server("litellm", [str(litellm_bin), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1"],
                  port, "/health/readiness", tmp / "litellm.log", env=env, timeout=180)


# -- measuring one target ---------------------------------------------------------------------------


class PeakRss(threading.Thread):
    """Samples a server's RSS every 100 ms while load runs."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self.running = server, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.server.rss_mb())
            time.sleep(0.1)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.peak


def merge_errors(runs: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for run in runs:
        for kind, count in run["errors"].items():
            total[kind] = total.get(kind, 0) + count
    return total


def measure(name: str, url: str, model: str, server: Server | None, direct_url: str, opts: argparse.Namespace,
            direct: dict[str, Any] | None) -> dict[str, Any]:
    endpoint = url + "/v1/chat/completions"
    direct_endpoint = direct_url + "/v1/chat/completions"
    body = {**REQUEST, "model": model}
    auth = {"headers": {"Authorization": f"Bearer {API_KEY}"}}
    out: dict[str, Any] = {"url": url}
    if server is not None:
        out["ready_s"] = round(server.ready_s, 3)
    loadgen({"mode": "closed", "url": endpoint, "body": body, "concurrency": 4, "requests": 200, **auth})  # warm
    time.sleep(1.0)
    if server is not None:
        out["rss_idle_mb"] = round(server.rss_mb(), 1)

    # Other work on a shared machine only ever slows a run down, so each measurement is repeated
    # (ROUNDS times, alternating with its direct baseline) and the least disturbed round is kept:
    # the median round for added latency, the fastest round for requests/s. All rounds are recorded.
    print(f"  {name}: latency at concurrency 1", flush=True)
    single = {"mode": "closed", "concurrency": 1, "requests": opts.latency_requests // ROUNDS, "warmup": 50}
    rounds = []
    for _ in range(ROUNDS):
        base = loadgen({**single, "url": direct_endpoint, "body": {**REQUEST, "model": "bench"}})
        lat = loadgen({**single, "url": endpoint, "body": body, "server_timing": name == "ponder", **auth})
        rounds.append((lat["latency_ms"]["p50"] - base["latency_ms"]["p50"], lat, base))
    rounds.sort(key=lambda r: r[0])
    _, lat, base = rounds[len(rounds) // 2]
    out["latency_c1_ms"] = lat["latency_ms"]
    out["direct_c1_ms"] = base["latency_ms"]
    out["errors_c1"] = merge_errors([r[1] for r in rounds])
    out["added_p50_ms_rounds"] = [r[0] for r in rounds]
    if "server_timing_ms" in lat:  # Ponder's own account of the same round: where its time went
        out["server_timing_c1_p50_ms"] = {step: v["p50"] for step, v in lat["server_timing_ms"].items()}
    if server is not None:
        out["added_p50_ms"] = lat["latency_ms"]["p50"] - base["latency_ms"]["p50"]
        out["added_p99_ms"] = lat["latency_ms"]["p99"] - base["latency_ms"]["p99"]

    for concurrency in (16, 64):
        print(f"  {name}: throughput at concurrency {concurrency}", flush=True)
        warmup = 2 * concurrency
        peak = PeakRss(server) if server is not None else None
        if peak:
            peak.start()
        runs = []
        for _ in range(ROUNDS):
            cpu_before = server.cpu_s() if server is not None else 0.0
            run = loadgen({"mode": "closed", "url": endpoint, "body": body, "concurrency": concurrency,
                           "duration_s": opts.duration / ROUNDS, "warmup": warmup, **auth})
            run["cpu_ms"] = (server.cpu_s() - cpu_before) * 1000 / max(1, run["requests"] + warmup) if server else None
            runs.append(run)
        best = max(runs, key=lambda r: r["rps"])
        row: dict[str, Any] = {"rps": best["rps"], "requests": best["requests"],
                               "errors": merge_errors(runs),
                               "latency_ms": best["latency_ms"], "rps_rounds": [r["rps"] for r in runs]}
        if server is not None:
            row["cpu_ms_per_request"] = best["cpu_ms"]
            row["rss_peak_mb"] = round(peak.stop(), 1) if peak else None
        out[f"c{concurrency}"] = row
    if server is not None:
        out["rss_load_mb"] = max(out["c16"]["rss_peak_mb"], out["c64"]["rss_peak_mb"])

    print(f"  {name}: streaming", flush=True)
    # Short and long streams (the upstream sends `max_tokens` chunks): what the long one adds over the
    # short one, per extra chunk, is the cost of forwarding one chunk, free of per-request costs.
    stream_spec = {"mode": "stream", "requests": opts.stream_requests, "warmup": 10}
    for label, chunks in (("stream", SHORT_STREAM), ("long_stream", LONG_STREAM)):
        sized = {**REQUEST, "max_tokens": chunks}
        out[f"direct_{label}"] = loadgen({**stream_spec, "url": direct_endpoint, "body": {**sized, "model": "bench"}})
        cpu_before = server.cpu_s() if server is not None else 0.0
        out[label] = loadgen({**stream_spec, "url": endpoint, "body": {**sized, "model": model}, **auth})
        if server is not None:
            out[label]["cpu_ms_per_request"] = ((server.cpu_s() - cpu_before) * 1000
                                                / (opts.stream_requests + stream_spec["warmup"]))
    if server is not None:
        out["stream_added_ttfb_ms"] = out["stream"]["ttfb_ms"]["p50"] - out["direct_stream"]["ttfb_ms"]["p50"]
        added = {label: out[label]["total_ms"]["p50"] - out[f"direct_{label}"]["total_ms"]["p50"]
                 for label in ("stream", "long_stream")}
        extra = LONG_STREAM - SHORT_STREAM
        out["stream_added_per_chunk_ms"] = (added["long_stream"] - added["stream"]) / extra
        out["stream_cpu_us_per_chunk"] = (out["long_stream"]["cpu_ms_per_request"]
                                          - out["stream"]["cpu_ms_per_request"]) * 1000 / extra
    return out


# -- the report -------------------------------------------------------------------------------------


def checks(targets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ponder, minimal, litellm = targets.get("ponder"), targets.get("minimal"), targets.get("litellm")
    found: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, ok: bool) -> None:
        found.append({"check": name, "value": round(value, 4), "limit": round(limit, 4), "ok": bool(ok)})

    if ponder and "added_p50_ms" in ponder:
        if minimal and "added_p50_ms" in minimal:
            limit = 1.5 * minimal["added_p50_ms"]
            check("ponder added p50 <= 1.5x minimal proxy's (ms)", ponder["added_p50_ms"], limit,
                  ponder["added_p50_ms"] <= limit)
        if litellm and "added_p50_ms" in litellm:
            limit = litellm["added_p50_ms"] / 10
            check("ponder added p50 <= 1/10 of LiteLLM proxy's (ms)", ponder["added_p50_ms"], limit,
                  ponder["added_p50_ms"] <= limit)
            for c in ("c16", "c64"):
                limit = 10 * litellm[c]["rps"]
                check(f"ponder requests/s at {c} >= 10x LiteLLM proxy's", ponder[c]["rps"], limit,
                      ponder[c]["rps"] >= limit)
        check("ponder RSS idle <= 250 MB", ponder["rss_idle_mb"], 250, ponder["rss_idle_mb"] <= 250)
        check("ponder ready <= 3 s", ponder["ready_s"], 3, ponder["ready_s"] <= 3)
        errors = sum(sum(ponder[c]["errors"].values()) for c in ("c16", "c64")) + sum(ponder["errors_c1"].values())
        check("ponder errors under load == 0", errors, 0, errors == 0)
    return found


def table(targets: dict[str, dict[str, Any]]) -> str:
    names = [n for n in ("direct", "minimal", "ponder", "litellm") if n in targets]
    rows: list[tuple[str, Any]] = [
        ("startup to ready (s)", lambda t: t.get("ready_s")),
        ("RSS idle (MB)", lambda t: t.get("rss_idle_mb")),
        ("RSS under load (MB)", lambda t: t.get("rss_load_mb")),
        ("latency p50 at c=1 (ms)", lambda t: t["latency_c1_ms"]["p50"]),
        ("added p50 at c=1 (ms)", lambda t: t.get("added_p50_ms")),
        ("added p99 at c=1 (ms)", lambda t: t.get("added_p99_ms")),
        ("requests/s at c=16", lambda t: t["c16"]["rps"]),
        ("requests/s at c=64", lambda t: t["c64"]["rps"]),
        ("p99 at c=64 (ms)", lambda t: t["c64"]["latency_ms"].get("p99")),
        ("server CPU ms/request (c=16)", lambda t: t["c16"].get("cpu_ms_per_request")),
        ("server CPU ms/request (c=64)", lambda t: t["c64"].get("cpu_ms_per_request")),
        ("errors (all runs)", lambda t: sum(t["errors_c1"].values()) + sum(t["c16"]["errors"].values())
         + sum(t["c64"]["errors"].values())),
        (f"stream TTFB p50 ({SHORT_STREAM} chunks, ms)", lambda t: t["stream"]["ttfb_ms"]["p50"]),
        ("stream added TTFB (ms)", lambda t: t.get("stream_added_ttfb_ms")),
        (f"stream to last byte p50 ({LONG_STREAM} chunks, ms)", lambda t: t["long_stream"]["total_ms"]["p50"]),
        ("stream added time per chunk (ms)", lambda t: t.get("stream_added_per_chunk_ms")),
        ("stream server CPU per chunk (µs)", lambda t: t.get("stream_cpu_us_per_chunk")),
        ("streams ending in [DONE]", lambda t: f"{t['stream']['complete'] + t['long_stream']['complete']}/"
         f"{t['stream']['requests'] + t['long_stream']['requests']}"),
    ]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, getter in rows:
        cells = []
        for name in names:
            target = targets[name]
            try:
                value = getter(target) if "error" not in target else "failed"
            except (KeyError, TypeError):
                value = None
            cells.append("-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_table(ponder: dict[str, Any]) -> str:
    """Ponder's own account (Server-Timing, p50 of the median c=1 round) of where its time went."""
    steps = ponder.get("server_timing_c1_p50_ms")
    if not steps:
        return ""
    lines = ["", "", "Where Ponder's time went at c=1 (its Server-Timing header, p50 in ms, median round):", "",
             "| classify | decide | upstream call | execute | handler total | handler minus upstream |",
             "|---:|---:|---:|---:|---:|---:|"]
    own = steps["total"] - steps["upstream"]
    lines.append("| " + " | ".join(f"{steps[k]:.3f}" for k in ("classify", "decide", "upstream", "execute", "total"))
                 + f" | {own:.3f} |")
    return "\n".join(lines)


# -- profiling --------------------------------------------------------------------------------------


def profile(tmp: Path, upstream: Server, requests: int) -> None:
    """Ponder under cProfile: the top functions by own time, in microseconds per request."""
    import pstats

    out = tmp / "ponder.prof"
    server = start_ponder(tmp, upstream, PONDER_POLICY, name="ponder-prof", api_key=API_KEY,
                          wrapper=[PYTHON, "-m", "cProfile", "-o", str(out)])
    body = {**REQUEST, "model": "auto"}
    loadgen({"mode": "closed", "url": server.url + "/v1/chat/completions", "body": body, "concurrency": 8,
             "requests": requests, "headers": {"Authorization": f"Bearer {API_KEY}"}})
    # SIGINT: uvicorn re-raises the signal after its graceful shutdown, and a KeyboardInterrupt (unlike
    # a SIGTERM death) still lets cProfile write its file on the way out.
    server.stop(signal.SIGINT)
    stats = pstats.Stats(str(out))
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore
        where = os.path.relpath(file, BENCH.parent) if file.startswith("/") else file
        rows.append((tottime, cumtime, calls, f"{where}:{line}:{func}"))
    print(f"\nPonder under cProfile, {requests} requests at concurrency 8 (µs per request; cProfile inflates"
          " everything, compare rows with each other):")
    print(f"{'own µs':>9} {'cum µs':>9} {'calls/req':>9}  function")
    for tottime, cumtime, calls, where in sorted(rows, reverse=True)[:40]:
        print(f"{tottime / requests * 1e6:9.1f} {cumtime / requests * 1e6:9.1f} {calls / requests:9.2f}  {where}")
    cumulative = sorted(rows, key=lambda r: r[1], reverse=True)
    print("\nBy cumulative time (gateway/, router/, telemetry/ only):")
    for tottime, cumtime, calls, where in [r for r in cumulative if r[3].startswith(("gateway/", "router/",
                                                                                   "telemetry/"))][:30]:
        print(f"{tottime / requests * 1e6:9.1f} {cumtime / requests * 1e6:9.1f} {calls / requests:9.2f}  {where}")


def components(repeats: int = 2000) -> None:
    """The request path's pure steps, timed in-process without a profiler (µs per request)."""
    import orjson

    sys.path.insert(0, str(BENCH.parent))
    from gateway.schemas import parse_chat_request, parse_json_body
    from router import features
    from router.classifier import Classifier
    from router.messages import prompt_from_messages

    raw = orjson.dumps({**REQUEST, "model": "auto"})
    req = parse_chat_request(parse_json_body(raw), max_n=16)
    classifier = Classifier.load()
    prompt = prompt_from_messages(req.messages)
    sparse = features.featurize_sparse([prompt])
    ((_, feeds),) = features.onnx_feeds(sparse)
    session = classifier._session  # the step inside classify() that is the model itself
    outputs = ["task_probs", "difficulty"]
    steps = [
        ("gateway/schemas.py: parse_json_body + parse_chat_request", lambda: parse_chat_request(
            parse_json_body(raw), max_n=16)),
        ("router/classifier.py: Classifier.classify (all of it)", lambda: classifier.classify(req.messages)),
        ("  router/messages.py: prompt_from_messages", lambda: prompt_from_messages(req.messages)),
        ("  router/features.py: featurize_sparse", lambda: features.featurize_sparse([prompt])),
        ("  router/features.py: onnx_feeds", lambda: features.onnx_feeds(sparse)),
        ("  onnxruntime InferenceSession.run", lambda: session.run(outputs, feeds)),
    ]
    print("\nIn-process timings of single steps (no profiler), µs per request, median of 5 rounds:")
    for label, step in steps:
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats // 5):
                step()
            rounds.append((time.perf_counter() - started) / (repeats // 5) * 1e6)
        print(f"{sorted(rounds)[2]:9.1f}  {label}")


# -- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway overhead, side by side (see the module docstring).")
    parser.add_argument("--targets", default="minimal,ponder,litellm", help="comma-separated subset")
    parser.add_argument("--duration", type=float, default=9.0, help="seconds per throughput measurement (all rounds)")
    parser.add_argument("--latency-requests", type=int, default=1500, help="requests per latency run (c=1)")
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    parser.add_argument("--profile", action="store_true", help="profile Ponder instead of benchmarking")
    opts = parser.parse_args()
    if opts.quick:
        opts.duration, opts.latency_requests, opts.stream_requests = 3.0, 300, 30

    with tempfile.TemporaryDirectory(prefix="ponder-bench-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = start_upstream(tmp, chunks=STREAM_CHUNKS)
        try:
            if opts.profile:
                profile(tmp, upstream, 3000)
                components()
                return 0
            result: dict[str, Any] = {"benchmark": "overhead", "machine": machine(), "settings": {
                "duration_s": opts.duration, "latency_requests": opts.latency_requests,
                "stream_requests": opts.stream_requests, "stream_chunks": [SHORT_STREAM, LONG_STREAM],
                "quick": opts.quick,
                "request": REQUEST, "litellm": LITELLM_VERSION}, "targets": {}}
            targets = result["targets"]
            print("direct upstream", flush=True)
            targets["direct"] = measure("direct", upstream.url, "bench", None, upstream.url, opts, None)
            starters = {"minimal": (start_minimal, "bench"), "ponder": (None, "auto"),
                        "litellm": (start_litellm, "bench-model")}
            for name in [t.strip() for t in opts.targets.split(",") if t.strip()]:
                start, model = starters[name]
                print(f"{name}: starting", flush=True)
                try:
                    if name == "ponder":
                        server = start_ponder(tmp, upstream, PONDER_POLICY, api_key=API_KEY, server_timing=True)
                    else:
                        server = start(tmp, upstream)
                except Exception as exc:  # noqa: BLE001 (report a target that cannot start, keep the rest)
                    print(f"{name}: could not start: {exc}", flush=True)
                    targets[name] = {"error": str(exc)[-2000:]}
                    continue
                try:
                    targets[name] = measure(name, server.url, model, server, upstream.url, opts, targets["direct"])
                finally:
                    server.stop()
            result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
            result["checks"] = checks(targets)
            result["table_md"] = table(targets) + steps_table(targets.get("ponder", {}))
        finally:
            upstream.stop()
    path = write_result("overhead.json", result)
    print()
    print(result["table_md"])
    print()
    print_checks(result["checks"])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
