"""Runs a real ``kvfabric-agent`` process for tests, the demo and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_reply(s: socket.socket) -> Any:
    """One reply frame from a raw agent socket, decoded; None when the agent closed it."""
    from kvfabric.connector import protocol as p

    header = s.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        return None
    (n,) = p.HEADER.unpack(header)
    return p.reply_decoder.decode(s.recv(n, socket.MSG_WAITALL))


def wait_until(what: str, cond: Callable[[], object], timeout: float, every: float = 0.05) -> None:
    """Polls ``cond`` until it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_value(lines: list[str], series: str) -> float:
    """One sample of a Prometheus text exposition by its full series name; 0 if absent."""
    return next((float(x.split()[-1]) for x in lines if x.startswith(series + " ")), 0.0)


class AgentProcess:
    def __init__(
        self,
        workdir: Path,
        pool_size: str = "1GiB",
        *,
        extra_args: list[str] | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``prefix``: runs the agent under it (``ip netns exec NS``: a "node" of its own; its
        HTTP port is then out of reach, and stats come through its socket)."""
        self.workdir = workdir
        self.prefix = prefix or []
        self.env = env
        workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes: keep it short whatever the checkout's depth.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="kvf-", dir="/tmp"))
        self.socket_path = self._socket_dir / "agent.sock"
        self.pool_path = Path("/dev/shm") / f"kvfabric-test-{os.getpid()}-{abs(hash(str(workdir)))}"
        self.pool_size = pool_size
        self.extra_args = extra_args or []
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "agent.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> AgentProcess:
        args = [
            *self.prefix,
            sys.executable,
            "-m",
            "kvfabric.agent.main",
            "--pool-size",
            self.pool_size,
            "--pool-path",
            str(self.pool_path),
            "--socket",
            str(self.socket_path),
            "--http-port",
            str(self.http_port),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.prefix:
                if self._ready_by_socket():
                    return self
                time.sleep(0.05)
                continue
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout}s:\n{self.log_tail()}")

    def wait_prefaulted(self, timeout: float = 120.0) -> None:
        """Waits until the agent has touched every pool page (benchmarks measure copies only)."""
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["pool_prefaulted_bytes"] < stats["pool_bytes"]:
            if time.monotonic() > deadline:
                raise TimeoutError("pool not prefaulted")
            time.sleep(0.05)

    def wait_nvme(self, timeout: float = 120.0) -> None:
        """Waits until the NVMe tier is open."""
        self._wait("NVMe tier open", lambda s: s["nvme_ready"] == 1, timeout)

    def wait_nvme_written(self, timeout: float = 120.0) -> None:
        """Waits until every block an engine committed is on the NVMe tier (blocks promoted from
        it, or that it held already, are not written again)."""

        def done(s: dict[str, Any]) -> bool:
            on_disk = s["nvme_written_blocks"] + s["nvme_write_skipped_present"]
            engines_committed = s["committed_blocks"] - s["nvme_promoted_blocks"]
            return s["nvme_writes_queued"] == 0 and on_disk >= engines_committed

        self._wait("every committed block written to the NVMe tier", done, timeout)

    def _wait(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        wait_until(what, lambda: cond(self.stats()), timeout)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace") if self.log_path.exists() else ""

    def _ready_by_socket(self) -> bool:
        from kvfabric.connector.client import AgentClient

        if not self.socket_path.exists():
            return False
        c = AgentClient(str(self.socket_path), "probe", timeout_s=2)
        try:
            return c.connect()
        finally:
            c.close()

    def stats(self) -> dict[str, Any]:
        if self.prefix:  # in a namespace of its own: through its socket
            from kvfabric.connector.client import AgentClient

            c = AgentClient(str(self.socket_path), "stats", timeout_s=5)
            try:
                return dict(c.stats())
            finally:
                c.close()
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as r:
            return dict(json.loads(r.read()))

    def http_status(self, path: str) -> int:
        """Status code of an admin endpoint (``/healthz``, ``/readyz``)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, series: str) -> float:
        """One sample of /metrics by its full series name (``name{label="v"}``); 0 if absent."""
        return metric_value(self.metrics_text().splitlines(), series)

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to clean up (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait: the clean shutdown path."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        if self.pool_path.exists():
            self.pool_path.unlink()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        # --cuda agents are ready once --cuda-ready-bytes are pinned (all of it with 0): allow
        # for a large pool on a slow host.
        return self.start(timeout=600 if "--cuda" in self.extra_args else 30)

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
