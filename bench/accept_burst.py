"""A burst of new connections: how fast a server takes them out of the kernel's accept queue.

N clients connect at once, each on a connection of its own (no keep-alive: curl scripts, serverless
functions, clients without a pool), send one request and read the answer to its end. The kernel
completes every handshake itself; what waits is the process's accept(). A sampler reads the listening
socket's accept queue (Recv-Q, from /proc/net/tcp) every 10 ms while the burst drains. Targets:

  uvloop   a trivial uvicorn app (httptools) on uvloop, as `ponder serve` runs it
  asyncio  the same app on asyncio's loop
  drain    the same app on uvloop with gateway/accept.py's draining server, as `ponder serve` now runs it
  ponder   `ponder serve` in front of bench/fast_upstream.py, `max_requests_in_flight` small, so that
           what the process accepts past it is shed at once with a 503

Each app request costs --work-ms of CPU (busy loop), standing in for a gateway's per-request work.

Run:  python bench/accept_burst.py [--connections 1000] [--repeats 3] [--targets uvloop,asyncio,drain,ponder]
"""

from __future__ import annotations

import argparse
import collections
import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PYTHON, ROOT, Server, free_port, machine, start_ponder, start_upstream, write_result  # noqa: E402

# A trivial ASGI app: --work-ms of CPU a request, then "ok" (uvicorn's own stack otherwise, as ponder's).
TRIVIAL = """
import sys, time, uvicorn
WORK_S = float(sys.argv[3]) / 1000
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    end = time.perf_counter() + WORK_S
    while time.perf_counter() < end:
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop=sys.argv[2], http="httptools",
            log_level="warning", access_log=False)
"""

CHAT = (b'{"model": "auto", "messages": [{"role": "user", "content": "What is 6 times 7?"}], '
        b'"max_tokens": 16}')
POLICY = {"name": "burst", "arms": {"direct": {"backend": "upstream", "strategy": "single", "tokens": 16}},
          "routes": [{"name": "all", "candidates": ["direct"]}], "exploration": {"share": 0.0}}


def accept_queue(port: int) -> int | None:
    """The listening socket's accept queue on 127.0.0.1:port (rx_queue of its LISTEN row), None if none."""
    needle = f":{port:04X} "
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and fields[1].endswith(needle.strip()) and fields[1].startswith("0100007F"):
                return int(fields[4].split(":")[1], 16)
    return None


class QueueSampler:
    """The accept queue every 10 ms, with the time since the burst began."""

    def __init__(self, port: int) -> None:
        self.port, self.samples, self._stop = port, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.wait(0.01):
            depth = accept_queue(self.port)
            if depth is not None:
                self.samples.append((time.perf_counter() - started, depth))

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def burst(port: int, request: bytes, connections: int) -> list[tuple[str, float]]:
    """N connections opened and their requests sent as fast as the kernel takes them (blocking connects on
    loopback: the kernel completes each handshake itself, whatever the server does), then every answer read
    to its end (Connection: close): (status, seconds since the first connect) each."""
    started = time.perf_counter()
    selector = selectors.DefaultSelector()
    answers: list[tuple[str, float]] = []
    for _ in range(connections):
        sock = socket.socket()
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
        except OSError as exc:
            sock.close()
            answers.append((type(exc).__name__, time.perf_counter() - started))
            continue
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, bytearray())
    while selector.get_map():
        for key, _ in selector.select(timeout=60) or [(None, None)]:
            if key is None:
                raise TimeoutError("no answer for 60 s")
            try:
                chunk = key.fileobj.recv(65536)
            except ConnectionError as exc:
                chunk, key.data[:] = b"", type(exc).__name__.encode()
            if chunk:
                key.data.extend(chunk)
                continue
            selector.unregister(key.fileobj)
            key.fileobj.close()
            answer = bytes(key.data)
            # the status code, else the error that ended the connection, else "closed" (no answer at all)
            status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else answer or b"closed"
            answers.append((status.decode(), time.perf_counter() - started))
    return answers


def pick(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client(port: int, request: bytes, connections: int) -> list[tuple[str, float]]:
    """The burst from a process of its own, so that the sampler's thread is not starved of the GIL."""
    out = subprocess.run([PYTHON, __file__, "--client", json.dumps([port, request.decode(), connections])],
                         capture_output=True, text=True, timeout=600, check=True)
    return [tuple(answer) for answer in json.loads(out.stdout)]


def measure(port: int, request: bytes, connections: int, cpu: Any) -> dict[str, Any]:
    cpu_before = cpu()
    with QueueSampler(port) as sampler:
        answers = client(port, request, connections)
    outcomes = collections.Counter(status for status, _ in answers)
    by_status: dict[str, list[float]] = collections.defaultdict(list)
    for status, seconds in answers:
        by_status[status].append(seconds * 1000)
    depths = [depth for _, depth in sampler.samples]
    queued = [t for t, depth in sampler.samples if depth > 0]
    return {
        "outcomes": dict(outcomes),
        "all_answered_s": max(seconds for _, seconds in answers),
        "ms": {status: {"p50": pick(v, 0.5), "p99": pick(v, 0.99), "max": max(v)} for status, v in by_status.items()},
        "accept_queue_max": max(depths, default=0),
        "accept_queue_mean": statistics.fmean(depths) if depths else 0.0,
        "accept_queue_nonempty_s": queued[-1] - queued[0] if queued else 0.0,
        "server_cpu_s": cpu() - cpu_before,
    }


LOOPS = {"uvloop": "uvloop", "asyncio": "asyncio", "drain": "gateway.accept:new_event_loop"}


def trivial_server(tmp: Path, target: str, work_ms: float) -> Server:
    port = free_port()
    script = tmp / "trivial_app.py"
    script.write_text(TRIVIAL)
    return Server(f"trivial-{target}", [PYTHON, str(script), str(port), LOOPS[target], str(work_ms)], port, "/",
                  tmp / f"trivial-{target}.log", env={"PYTHONPATH": str(ROOT)})


def run_target(tmp: Path, target: str, opts: argparse.Namespace) -> list[dict[str, Any]]:
    upstream = None
    if target == "ponder":
        upstream = start_upstream(tmp)
        server = start_ponder(tmp, upstream, POLICY, name="ponder",
                              config={"max_requests_in_flight": opts.ponder_limit, "max_event_loop_lag_ms": 0})
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: " + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
    else:
        server = trivial_server(tmp, target, opts.work_ms)
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    try:
        runs = []
        for _ in range(opts.repeats):
            time.sleep(0.5)
            runs.append(measure(server.port, request, opts.connections, server.cpu_s))
            print(target, runs[-1], flush=True)
        return runs
    finally:
        server.stop()
        if upstream:
            upstream.stop()


def row(target: str, runs: list[dict[str, Any]]) -> str:
    spread = lambda values: f"{min(values):,.0f}-{max(values):,.0f}"  # noqa: E731
    ok = [r["ms"].get("200", {}).get("p50", 0) for r in runs]
    shed = [r["outcomes"].get("503", 0) for r in runs]
    other = [sum(n for status, n in r["outcomes"].items() if status not in ("200", "503")) for r in runs]
    return (f"| {target} | {spread([r['accept_queue_max'] for r in runs])} | "
            f"{spread([r['accept_queue_nonempty_s'] * 1000 for r in runs])} | "
            f"{spread([r['all_answered_s'] * 1000 for r in runs])} | {spread(ok)} | {spread(shed)} | {spread(other)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description="A burst of new connections against uvloop, asyncio, ponder.")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=1.0, help="CPU a request of the trivial app")
    parser.add_argument("--ponder-limit", type=int, default=32, help="max_requests_in_flight of `ponder serve`")
    parser.add_argument("--targets", default="uvloop,asyncio,drain,ponder")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # [port, request, connections]: the burst itself
    opts = parser.parse_args()
    if opts.client:
        port, request, connections = json.loads(opts.client)
        print(json.dumps(burst(port, request.encode(), connections)))
        return 0
    results: dict[str, Any] = {"machine": machine(), "opts": vars(opts)}
    with tempfile.TemporaryDirectory(prefix="ponder-accept-") as tmp_name:
        for target in opts.targets.split(","):
            results[target] = run_target(Path(tmp_name), target, opts)
    print("\n| target | accept queue max | queue non-empty ms | all answered ms | 200 p50 ms | 503s | other |")
    print("|---|---|---|---|---|---|---|")
    for target in opts.targets.split(","):
        print(row(target, results[target]))
    print("wrote", write_result("accept_burst.json", results))
    return 0


if __name__ == "__main__":
    assert ROOT.is_dir()
    sys.exit(main())
