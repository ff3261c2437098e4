"""Shared plumbing for the benchmarks: server processes, readiness, CPU and memory of a process tree,
and the load generator (bench/loadgen.py) run as a separate process."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class Server:
    """A server process started in its own session; `ready_s` is Popen-to-first-200 on `ready_url`."""

    def __init__(self, name: str, args: list[str], port: int, ready_path: str, log_path: Path, *,
                 env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        ready_url = self.url + ready_path
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1", **(env or {})}
        started = time.perf_counter()
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                        start_new_session=True)
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if http_status(ready_url) == 200:
                break
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{name} was not ready within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.01)
        self.ready_s = time.perf_counter() - started
        self.ps = psutil.Process(self.process.pid)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def start_upstream(tmp: Path, *, delay_ms: float = 0, chunks: int = 32) -> Server:
    port = free_port()
    return Server("upstream", [PYTHON, str(BENCH / "fast_upstream.py"), "--port", str(port), "--delay-ms",
                               str(delay_ms), "--chunks", str(chunks)],
                  port, "/health", tmp / f"upstream-{port}.log")


def start_ponder(tmp: Path, upstream: Server, policy: dict[str, Any], *, name: str = "ponder",
                 wrapper: list[str] | None = None, api_key: str | None = None, server_timing: bool = False,
                 config: dict[str, Any] | None = None) -> Server:
    """`ponder serve` exactly as deployed: one uvicorn worker, uvloop + httptools, embedded store.
    `wrapper` replaces the interpreter (e.g. `python -m cProfile -o F`); `server_timing` turns on the
    Server-Timing header (where each request's time went); `config` adds or replaces top-level keys."""
    port = free_port()
    upstream_url = upstream.url + "/v1"
    policy_path = tmp / f"{name}-policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    config = {
        "backends": [{"name": "upstream", "model": "openai/bench", "api_base": upstream_url,
                      "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}, "max_retries": 1}],
        "policy": str(policy_path),
        "local_model": {"enabled": False},
        "telemetry": {"data_dir": str(tmp / f"{name}-data")},
        "server_timing": server_timing,
        **(config or {}),
    }
    if api_key:
        config["api_keys"] = [{"id": "bench", "sha256": hashlib.sha256(api_key.encode()).hexdigest()}]
    config_path = tmp / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    args = [*(wrapper or [PYTHON]), "-m", "gateway.cli", "serve", "--config", str(config_path), "--port", str(port),
            "--log-level", "warning"]
    return Server(name, args, port, "/readyz", tmp / f"{name}.log")


def loadgen(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    out = subprocess.run([PYTHON, str(BENCH / "loadgen.py"), json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def print_checks(checks: list[dict[str, Any]]) -> None:
    """One PASS/MISS line per target, the way every bench reports them."""
    for check in checks:
        print(f"{'PASS' if check['ok'] else 'MISS'}  {check['check']}: {check['value']} (limit {check['limit']})")


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
