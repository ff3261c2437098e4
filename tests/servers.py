"""Real servers on loopback for the tests: the gateway (uvicorn, as `ponder serve` runs it), the mock
OpenAI-compatible upstream, and the mock Anthropic and Gemini APIs. Each is a separate process, talked
to over HTTP only; `serving` runs, in this process, an app a test built (to add what no production app
has, such as a route that raises), on uvicorn on loopback all the same."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class Process:
    def __init__(self, args: list[str], url: str, ready_path: str, log_path: Path, timeout: float = 60,
                 env: dict[str, str] | None = None) -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            wait_http(url + ready_path, timeout, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"{args} failed to start:\n{log_path.read_text()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    """Stop the process however the block ends (a failed fixture must not leak servers)."""
    try:
        yield process
    finally:
        process.stop()


def start_mock_server(tmp: Path, script: str, log_name: str) -> Process:
    """One of the mocks (tests/mock_*.py, their control plumbing in tests/mock_server.py) on a free port."""
    port = free_port()
    return Process([PYTHON, str(ROOT / "tests" / script), "--port", str(port)],
                   f"http://127.0.0.1:{port}", "/calls", tmp / f"{log_name}-{port}.log")


def start_mock(tmp: Path) -> Process:
    return start_mock_server(tmp, "mock_upstream.py", "mock")


def start_anthropic_mock(tmp: Path) -> Process:
    """A mock of Anthropic's Messages API (tests/mock_anthropic.py), for backends called through litellm."""
    return start_mock_server(tmp, "mock_anthropic.py", "anthropic")


def start_gemini_mock(tmp: Path) -> Process:
    """A mock of the Gemini API (tests/mock_gemini.py), for `gemini/` backends called through litellm."""
    return start_mock_server(tmp, "mock_gemini.py", "gemini")


def start_bedrock_mock(tmp: Path) -> Process:
    """A mock of Bedrock's InvokeModel for Titan embeddings (tests/mock_bedrock.py), for `bedrock/` backends
    called through litellm (give the gateway any AWS credentials and region: BEDROCK_ENV)."""
    return start_mock_server(tmp, "mock_bedrock.py", "bedrock")


BEDROCK_ENV = {"AWS_ACCESS_KEY_ID": "AKIDMOCK", "AWS_SECRET_ACCESS_KEY": "mock-secret", "AWS_REGION_NAME": "us-east-1"}


def control(mock: Process, **state) -> None:
    """Set the mock's state for the next requests (its POST /control: script, answers, ...)."""
    httpx.post(mock.url + "/control", json=state).raise_for_status()


def calls(mock: Process) -> dict:
    """What the mock got: {"count": N, "bodies": [...], ...} (its GET /calls)."""
    return httpx.get(mock.url + "/calls").json()


def sent(mock: Process) -> list[dict]:
    """The request bodies the mock got, the latest last."""
    return calls(mock)["bodies"]


def reset(*mocks: Process) -> None:
    """Each mock as it started: no script, no calls (its POST /reset)."""
    for mock in mocks:
        httpx.post(mock.url + "/reset").raise_for_status()


def mock_backend(name: str, mock: Process, **extra) -> dict:
    spec = {"name": name, "model": f"openai/{name}", "api_base": mock.url + "/v1",
            "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}, "max_retries": 1,
            "timeout_s": 5, "first_byte_timeout_s": 2}
    spec.update(extra)
    return spec


def start_gateway(tmp: Path, config: dict, *, timeout: float = 90, name: str = "gateway",
                  env: dict[str, str] | None = None, log_level: str = "warning") -> Process:
    port = free_port()
    config = {"telemetry": {"data_dir": str(tmp / f"{name}-data")}, **config}
    config.setdefault("local_model", {"enabled": False})
    path = tmp / f"{name}-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Process([PYTHON, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port),
                    "--log-level", log_level], f"http://127.0.0.1:{port}", "/readyz", tmp / f"{name}-{port}.log",
                   timeout=timeout, env=env)


def write_policy(tmp: Path, policy: dict, name: str = "policy.yaml") -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return str(path)


def two_mock_policy(tmp: Path, name: str) -> str:
    """A policy over backends `mock-a` (cheap) and `mock-b` (strong), with a 5-sample vote arm, no
    exploration, the strategy header honoured for `single` and `self_consistency`, and the task
    label `legal-qa` allowed."""
    return write_policy(tmp, {
        "name": name,
        "arms": {
            "cheap": {"backend": "mock-a", "strategy": "single", "prior": 0.8},
            "strong": {"backend": "mock-b", "strategy": "single", "prior": 0.7},
            "vote": {"backend": "mock-a", "strategy": "self_consistency", "n": 5},
        },
        "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
        "exploration": {"share": 0.0},
        "overrides": {"strategy_header": ["self_consistency", "single"], "task_header": ["legal-qa"]},
        # no decay: the tests compare recorded sums with what they sent, exactly
        "learner": {"half_life_hours": None},
    }, f"{name}.yaml")


# Today's chat format, which basic servers (llama.cpp's) answer with a 500: a developer turn, text
# parts, an assistant turn that only called a tool (no content), and the tool's result.
TODAYS_CHAT_MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}, {"type": "text", "text": "Use f."}]},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "5"},
]


@contextlib.contextmanager
def serving(app, **uvicorn_options) -> Iterator[str]:
    """An ASGI app the test built, served by uvicorn on a free loopback port in a thread of this process
    (lifespan included), as `ponder serve` serves its own; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
