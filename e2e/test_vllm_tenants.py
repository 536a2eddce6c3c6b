"""Real vLLM engines of two tenants on one isolated agent (CPU, float32, greedy).

The tenant comes from the socket an engine connects through (what the operator's webhook mounts
per Kubernetes namespace); nothing the engine sets chooses it. Tenant B sending the very prompt
tenant A cached must get no hit, and B's pool file must not hold A's KV.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from kvfabric.connector.client import AgentClient

pytestmark = pytest.mark.vllm


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    root = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))
    for t in ("team-a", "team-b"):
        (root / t).mkdir()
    args = ["--tenancy", "isolated", "--tenant-socket-dir", str(root)]
    try:
        with AgentProcess(tmp_path / "agent", "1GiB", extra_args=args) as agent:
            deadline = time.monotonic() + 10
            while not all((root / t / "agent.sock").exists() for t in ("team-a", "team-b")):
                assert time.monotonic() < deadline, "tenant sockets not served"
                time.sleep(0.05)
            yield agent, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_tenants_share_nothing_and_each_stays_warm(
    tenants: tuple[AgentProcess, Path],
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    agent, root = tenants
    assert not agent.pool_path.exists()  # no shared pool file to open: each tenant's comes by fd

    def engine(tenant: str, name: str) -> EngineProcess:
        cfg = {"socket_path": str(root / tenant / "agent.sock"), "backoff_initial_ms": 50}
        e = EngineProcess(model_dir, tmp_path, cfg, log_name=name)
        engines.append(e)
        return e

    a1 = engine("team-a", "a1")
    (cold,) = a1.generate([PROMPTS["P"]], MAX_TOKENS)
    assert cold.cached_tokens == 0 and cold.tokens == baseline["P"]
    a1.close()
    usable = (len(PROMPTS["P"]) - 1) // BLOCK

    b = engine("team-b", "b")  # the same model and prompt, another tenant
    (other,) = b.generate([PROMPTS["P"]], MAX_TOKENS)
    assert other.cached_tokens == 0, "tenant B hit tenant A's blocks"
    assert other.tokens == baseline["P"]
    b.close()

    a2 = engine("team-a", "a2")  # A restarted: warm, through its own pool file
    (warm,) = a2.generate([PROMPTS["P"]], MAX_TOKENS)
    assert warm.cached_tokens == usable * BLOCK and warm.tokens == baseline["P"]
    a2.close()

    # Where A's blocks live, B's file holds B's own bytes or zeros, never A's.
    ca = AgentClient(str(root / "team-a" / "agent.sock"), "check-a", timeout_s=5)
    cb = AgentClient(str(root / "team-b" / "agent.sock"), "check-b", timeout_s=5)
    try:
        maps = []
        for c in (ca, cb):
            reply, fd = c.open_pool(writable=False)
            try:
                maps.append(mmap.mmap(fd, reply.pool_bytes, mmap.MAP_SHARED, mmap.PROT_READ))
            finally:
                os.close(fd)
        stats = agent.stats()
        assert stats["tenants"] == 2 and stats["namespaces"] == 2  # one model, registered per tenant
        map_a, map_b = maps
        chunk = 1 << 20
        zero = bytes(chunk)
        a_chunks = [o for o in range(0, len(map_a), chunk) if map_a[o : o + chunk] != zero]
        assert len(a_chunks) >= usable // 2  # A's KV (a 128-token block is 512 KiB here)
        assert all(map_b[o : o + chunk] != map_a[o : o + chunk] for o in a_chunks)
        for m in maps:
            m.close()
    finally:
        ca.close()
        cb.close()
