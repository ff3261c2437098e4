"""Start and stop a real `redis-server` on a loopback port, for tests and local development.

    proc = start_redis()            # free port, no persistence, daemonized
    store = await open_store(proc.url, ...)
    proc.kill()                     # SIGKILL, to test failure handling
    proc = start_redis(port=proc.port)   # back on the same port, empty
    proc.stop()

The server is daemonized and tracked by its pidfile, so it outlives nothing but this object's owner:
call stop() (tests do it in a session fixture's teardown).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _server_pid(port: int, timeout: float = 0.2) -> int | None:
    """The pid of the redis-server answering on `port` (INFO server), so we never mistake another
    process's server, started on the same port a moment earlier, for ours."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
            return int(data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])
    except (OSError, ValueError):
        return None


@dataclass
class RedisProcess:
    port: int
    pid: int
    data_dir: Path
    pidfile: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def alive(self) -> bool:
        # The daemon is re-parented to PID 1, which may be slow to reap it: a zombie counts as dead.
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Wait until the port is free again, so a restart on the same port can bind it.
        while _ping(self.port, 0.05) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (clean shutdown), then SIGKILL if it is still there after `timeout`."""
        self._signal_and_wait(signal.SIGTERM, timeout)
        if self.alive():
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the abrupt failure the telemetry store must survive."""
        self._signal_and_wait(signal.SIGKILL, 5.0)


def start_redis(
    port: int | None = None, data_dir: Path | str | None = None, timeout: float = 10.0, *, cluster: bool = False
) -> RedisProcess:
    """Start a daemonized redis-server and wait until it answers PING. With no `port`, a free one is
    picked, and another one if that was taken in the meantime by someone else."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    data = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ponder-redis-"))
    data.mkdir(parents=True, exist_ok=True)
    error = ""
    for _ in range(1 if port else 5):
        chosen = port or (_free_cluster_port() if cluster else free_port())
        proc, error = _spawn(exe, chosen, data, timeout, cluster)
        if proc is not None:
            return proc
    raise RuntimeError(error)


def _spawn(exe: str, port: int, data: Path, timeout: float, cluster: bool) -> tuple[RedisProcess | None, str]:
    pidfile = data / f"redis-{port}.pid"
    logfile = data / f"redis-{port}.log"
    pidfile.unlink(missing_ok=True)
    logfile.unlink(missing_ok=True)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "yes", "--pidfile", str(pidfile), "--dir", str(data), "--logfile", str(logfile)]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = logfile.read_text(errors="replace") if logfile.exists() else ""
        if "aborting" in log or "Failed listening" in log:  # e.g. the port was taken after we picked it
            return None, f"redis-server on port {port} failed: {log[-300:]}"
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            proc = RedisProcess(port=port, pid=int(text), data_dir=data, pidfile=pidfile)
            if not proc.alive():  # it exited: most likely the port was taken after we picked it
                tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
                return None, f"redis-server on port {port} exited: {tail}"
            if _server_pid(port) == proc.pid:
                return proc, ""
        time.sleep(0.02)
    return None, f"redis-server did not answer PING on port {port} within {timeout}s"


def _free_cluster_port() -> int:
    # A cluster node also listens on port + 10000 (the cluster bus).
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
                return port
    raise RuntimeError("no free port pair for a cluster node")


def start_redis_cluster(nodes: int = 3, data_dir: Path | str | None = None, timeout: float = 20.0) -> list[RedisProcess]:
    """A Redis Cluster of `nodes` primaries on loopback (no replicas), for testing hash-tagged keys.
    Connect with `procs[0].url + "?cluster=1"`; stop every node when done."""
    data = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ponder-redis-cluster-"))
    procs: list[RedisProcess] = []
    try:
        for _ in range(nodes):
            procs.append(start_redis(None, data, timeout, cluster=True))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in procs),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # every node must agree, not only the first
            states = [subprocess.run(["redis-cli", "-p", str(p.port), "cluster", "info"],
                                     capture_output=True, text=True, timeout=timeout).stdout for p in procs]
            if all("cluster_state:ok" in out for out in states):
                return procs
            time.sleep(0.05)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")
    except BaseException:
        for p in procs:
            p.stop()
        raise
