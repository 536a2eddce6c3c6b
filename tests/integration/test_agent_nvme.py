"""A real agent process with an NVMe tier: write-behind, promotion after restarts, damage."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.agent import AgentProcess, wait_until
from kvfabric.connector.client import AgentClient

pytestmark = pytest.mark.integration
BLOCK = 8192
KEYS = [bytes([i + 1]) * 16 for i in range(8)]


def _until(what: str, cond: Callable[[], bool]) -> None:
    wait_until(what, cond, timeout=15.0, every=0.02)


def _agent(tmp: Path, nvme: Path, *more: str) -> AgentProcess:
    return AgentProcess(
        tmp,
        "64MiB",
        extra_args=["--arena-size", "4MiB", "--nvme-path", str(nvme), "--nvme-size", "64MiB", *more],
    )


class Engine:
    """A CPU engine's view: a session and the pool mapped (what the connector's worker does)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.client = AgentClient(str(agent.socket_path), "test")
        assert self.client.connect()
        hello = self.client.hello
        assert hello is not None
        fd = os.open(hello.pool_path, os.O_RDWR)
        try:
            self.pool = mmap.mmap(fd, hello.pool_bytes)
        finally:
            os.close(fd)
        self.client.register_namespace("ns", BLOCK, 16)

    def save(self, keys: list[bytes], payloads: list[bytes]) -> None:
        slots = self.client.reserve("ns", keys, None).slots
        assert -1 not in slots
        for slot, data in zip(slots, payloads, strict=True):
            self.pool[slot * BLOCK : (slot + 1) * BLOCK] = data
        assert self.client.commit("ns", keys, [], 0.0).committed == len(keys)

    def load(self, keys: list[bytes], *, expect: int) -> list[bytes]:
        """Asks with promotion until ``expect`` leading blocks are hits; their bytes, leased."""
        reply = self.client.lookup(["ns"], keys, 16, promote=True)
        _until(
            f"{expect} hits",
            lambda: (
                self.client.lookup(["ns"], keys, 16, promote=True).hits >= expect
                and self.client.lookup(["ns"], keys, 16).hits == expect
            ),
        )
        reply = self.client.lookup(["ns"], keys, 16, lease_id="L")
        out = [bytes(self.pool[s * BLOCK : (s + 1) * BLOCK]) for s in reply.slots[0]]
        self.client.release(reply.leases)
        return out

    def close(self) -> None:
        self.client.close()
        self.pool.close()


@pytest.fixture
def payloads() -> list[bytes]:
    return [os.urandom(BLOCK) for _ in KEYS]


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        e.close()


def _fill(agent: AgentProcess, engines: list[Engine], payloads: list[bytes]) -> None:
    e = Engine(agent)
    engines.append(e)
    e.save(KEYS, payloads)
    _until("written", lambda: agent.stats()["nvme_written_blocks"] == len(KEYS))


@pytest.mark.parametrize("restart", ["clean", "sigkill"])
def test_blocks_survive_an_agent_restart_and_come_back_through_the_pool(
    tmp_path: Path, payloads: list[bytes], engines: list[Engine], restart: str
) -> None:
    nvme = tmp_path / "nvme"
    with _agent(tmp_path / "a", nvme) as a:
        a.wait_nvme()
        _fill(a, engines, payloads)
        if restart == "sigkill":
            a.kill()
    with _agent(tmp_path / "b", nvme) as b:
        b.wait_nvme()
        e = Engine(b)
        engines.append(e)
        first = e.client.lookup(["ns"], KEYS, 16, promote=True)
        assert first.hits == 0 and first.promoting == len(KEYS)  # the pool is new, the disk is not
        assert e.load(KEYS, expect=len(KEYS)) == payloads
        s = b.stats()
        assert s["nvme_promoted_blocks"] == len(KEYS) and s["nvme_damaged_blocks"] == 0
        assert s["nvme_written_blocks"] == 0  # promoted blocks are not written back
        assert 'kvfabric_lookup_blocks_total{result="hit",tier="nvme"} 8.0' in b.metrics_text()


def _slab(nvme: Path) -> Path:
    (slab,) = (nvme / "shared").glob("*.slab")
    return slab


@pytest.mark.parametrize("damage", ["payload", "header", "truncated"])
def test_a_block_damaged_between_restarts_is_never_served(
    tmp_path: Path, payloads: list[bytes], engines: list[Engine], damage: str
) -> None:
    nvme = tmp_path / "nvme"
    with _agent(tmp_path / "a", nvme) as a:
        a.wait_nvme()
        _fill(a, engines, payloads)
    # Slot order on disk is write order; find block 3's slot by its payload.
    slab = _slab(nvme)
    raw = slab.read_bytes()
    at = raw.index(payloads[3])
    with open(slab, "r+b") as f:
        if damage == "payload":
            f.seek(at + 100)
            f.write(bytes(b ^ 0xFF for b in payloads[3][100:108]))
        elif damage == "header":
            # Flip a byte inside the block header (its time stored, under the checksum): a constant
            # written there is no damage whenever the byte already holds it (1 run in 256).
            f.seek(at - 4096 + 24)
            f.write(bytes([raw[at - 4096 + 24] ^ 0xFF]))
        else:
            f.truncate(at + BLOCK // 2)  # the slab ends inside block 3; blocks after it are gone too
    with _agent(tmp_path / "b", nvme) as b:
        b.wait_nvme()
        e = Engine(b)
        engines.append(e)
        # Whatever was damaged, the first 3 blocks come back intact and nothing past them is a hit.
        assert e.load(KEYS, expect=3) == payloads[:3]
        assert e.client.lookup(["ns"], KEYS, 16).hits == 3
        s = b.stats()
        assert s["nvme_damaged_blocks"] >= 1
        assert e.client.lookup(["ns"], KEYS, 16, promote=True).promoting == 0  # dropped, not retried
        assert "kvfabric_nvme_damaged_blocks_total" in b.metrics_text()


def test_writes_past_the_queue_are_dropped_and_counted(
    tmp_path: Path, payloads: list[bytes], engines: list[Engine]
) -> None:
    with _agent(tmp_path / "a", tmp_path / "nvme", "--nvme-queue-blocks", "1") as a:
        a.wait_nvme()
        e = Engine(a)
        engines.append(e)
        e.save(KEYS, payloads)  # one commit: one write queued, the others find the queue full
        _until("written", lambda: a.stats()["nvme_writes_queued"] == 0)
        s = a.stats()
        assert s["nvme_written_blocks"] == 1 and s["nvme_writes_dropped_queue_full"] == len(KEYS) - 1
        assert e.client.lookup(["ns"], KEYS, 16).hits == len(KEYS)  # the pool still has them all


def test_an_unusable_tier_directory_leaves_the_agent_serving_from_memory(
    tmp_path: Path, payloads: list[bytes], engines: list[Engine]
) -> None:
    nvme = tmp_path / "not-a-tier"
    nvme.mkdir()
    (nvme / "someone-elses-file").write_text("keep me")
    with _agent(tmp_path / "a", nvme) as a:
        _until("tier opening ended", lambda: a.stats()["nvme_error"] != "")
        assert a.stats()["nvme_ready"] == 0 and "not a KVFabric tier" in a.stats()["nvme_error"]
        e = Engine(a)
        engines.append(e)
        e.save(KEYS, payloads)
        assert e.load(KEYS, expect=len(KEYS)) == payloads
    assert (nvme / "someone-elses-file").read_text() == "keep me"
    assert sorted(p.name for p in nvme.iterdir()) == ["someone-elses-file"]


def test_tenants_are_kept_apart_on_disk_and_never_promote_each_others_blocks(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))
    for t in ("team-a", "team-b"):
        (root / t).mkdir()
    nvme = tmp_path / "nvme"
    iso = ["--tenancy", "isolated", "--tenant-socket-dir", str(root)]
    opened: list[AgentClient] = []

    def tenant(t: str) -> tuple[AgentClient, mmap.mmap]:
        sock = root / t / "agent.sock"
        _until("tenant socket", sock.exists)
        c = AgentClient(str(sock), t)
        opened.append(c)
        c.register_namespace("ns", BLOCK, 16)  # the same model, the same keys, in both tenants
        reply, fd = c.open_pool()
        try:
            return c, mmap.mmap(fd, reply.pool_bytes, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    try:
        with _agent(tmp_path / "a", nvme, *iso) as a:
            a.wait_nvme()
            c, pool = tenant("team-a")
            slot = c.reserve("ns", KEYS[:1], None).slots[0]
            pool[slot * BLOCK : (slot + 1) * BLOCK] = payloads[0]
            c.commit("ns", KEYS[:1], [], 0.0)
            _until("written", lambda: a.stats()["nvme_written_blocks"] == 1)
            pool.close()
        assert [p.name for p in (nvme / "tenant-team-a").iterdir()] != []
        assert not (nvme / "tenant-team-b").exists() and not (nvme / "shared").exists()
        with _agent(tmp_path / "b", nvme, *iso) as b:
            b.wait_nvme()
            cb, pool_b = tenant("team-b")
            assert cb.lookup(["ns"], KEYS[:1], 16, promote=True).promoting == 0  # A's block, not B's
            ca, pool_a = tenant("team-a")
            assert ca.lookup(["ns"], KEYS[:1], 16, promote=True).promoting == 1
            _until("promoted", lambda: ca.lookup(["ns"], KEYS[:1], 16).hits == 1)
            reply = ca.lookup(["ns"], KEYS[:1], 16, lease_id="L")
            (s,) = reply.slots[0]
            assert pool_a[s * BLOCK : (s + 1) * BLOCK] == payloads[0]  # into A's own pool file
            assert pool_b[s * BLOCK : (s + 1) * BLOCK] == bytes(BLOCK)
            assert cb.lookup(["ns"], KEYS[:1], 16).hits == 0
            pool_a.close()
            pool_b.close()
    finally:
        for c in opened:
            c.close()
        shutil.rmtree(root, ignore_errors=True)
