"""The NVMe tier's write-behind and promotion (:mod:`kvfabric.agent.tiering`) with a real index,
a real tier on disk and real threads; the loop is a real asyncio loop run until they are done."""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path

import pytest

from kvfabric.agent.index import BlockIndex, Namespace
from kvfabric.agent.pool import SlotAllocator
from kvfabric.agent.tiering import TierService

BB = 8192
SLOTS = 16
KEYS = [bytes([i + 1]) * 16 for i in range(8)]


class Rig:
    """An index over a pool mapping, a tier service on it, and the loop its threads report to."""

    def __init__(self, directory: Path, **kw: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = mmap.mmap(-1, SLOTS * BB)
        self.index = BlockIndex(SlotAllocator(SLOTS * BB, 4 * BB))
        self.service = TierService(
            directory,
            64 << 20,
            self.index,
            lambda ns: self.pool,
            threads=int(kw.get("threads", 2)),
            queue_blocks=int(kw.get("queue_blocks", 64)),
            read_deadline_s=kw.get("read_deadline_s", 5.0),
        )
        self.service.start(self.loop)
        assert self.service.opened.wait(10) and self.service.ready

    def ns(self, name: str = "ns") -> Namespace:
        return self.index.register(name, BB, 16)

    def save(self, name: str, keys: list[bytes], payloads: list[bytes]) -> None:
        slots = self.index.reserve(name, keys, None, 1)
        for s, data in zip(slots, payloads, strict=True):
            self.pool[s * BB : (s + 1) * BB] = data
        assert self.index.commit(name, keys, [], 1) == len(keys)

    def settle(self) -> None:
        """Runs the loop until no write or read is queued (their completions run on it)."""

        async def wait() -> None:
            while self.service.writes_queued or self.service.reads_queued:
                await asyncio.sleep(0.005)

        self.loop.run_until_complete(asyncio.wait_for(wait(), 10))

    def bytes_of(self, name: str, key: bytes) -> bytes:
        slot = self.index.committed_slot(self.index.namespace(name), key)
        assert slot >= 0
        return bytes(self.pool[slot * BB : (slot + 1) * BB])

    def close(self) -> None:
        self.service.close()
        self.settle_quietly()
        self.loop.close()
        self.pool.close()

    def settle_quietly(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))


def restart(rig: Rig, **kw: float) -> Rig:
    """An agent restart: the pool and index are lost, the tier's directory is kept."""
    rig.close()
    return Rig(rig.service.directory, **kw)


def filled(directory: Path, payloads: list[bytes], **kw: float) -> Rig:
    """A restarted rig whose tier holds every ``KEYS`` block and whose pool holds none."""
    rig = Rig(directory)
    rig.ns()
    rig.save("ns", KEYS, payloads)
    rig.settle()
    return restart(rig, **kw)


@pytest.fixture
def payloads() -> list[bytes]:
    return [os.urandom(BB) for _ in KEYS]


def test_committed_blocks_are_written_once_and_pinned_until_written(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    rig = Rig(tmp_path / "tier")
    try:
        rig.ns()
        rig.save("ns", KEYS[:4], payloads[:4])
        # the loop has not run yet: the writes' completions are not in, their blocks stay pinned
        assert rig.service.writes_queued == 4 and rig.index.block_counts()["leased"] == 4
        rig.settle()
        assert rig.service.stats.written_blocks == 4 and rig.index.block_counts()["leased"] == 0
        rig = restart(rig)
        rig.ns()
        rig.save("ns", KEYS[:4], payloads[:4])  # an engine saving them again (not asked for first)
        assert rig.service.stats.write_skipped_present == 4 and rig.service.writes_queued == 0
    finally:
        rig.close()


def test_promotion_needs_every_namespace_and_brings_the_right_bytes(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    rig = Rig(tmp_path / "tier")
    try:
        rig.ns("rank0")
        rig.ns("rank1")
        rig.save("rank0", KEYS[:4], payloads[:4])
        rig.save("rank1", KEYS[:2], payloads[4:6])  # rank 1 holds only two of them
        rig.settle()
        rig = restart(rig)
        spaces = [rig.ns("rank0"), rig.ns("rank1")]
        assert rig.service.promote(spaces, KEYS[:4], None) == 2  # a hit needs every rank's block
        rig.settle()
        assert rig.index.lookup(["rank0", "rank1"], KEYS[:4], 16, 1, None).hits == 2
        assert [rig.bytes_of("rank0", k) for k in KEYS[:2]] == payloads[:2]
        assert [rig.bytes_of("rank1", k) for k in KEYS[:2]] == payloads[4:6]
        assert rig.service.stats.promoted_blocks == 4 and rig.service.stats.written_blocks == 0
        assert rig.service.read_rate > 0 and rig.service.eta_s() == 0.0  # measured; nothing queued
        assert rig.service.promote(spaces, KEYS[:4], None) == 0  # in the pool now; the rest on no tier
    finally:
        rig.close()


def test_reads_that_would_arrive_too_late_are_skipped_and_free_their_slots(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    rig = filled(tmp_path / "tier", payloads, read_deadline_s=0.0)  # every read starts too late
    try:
        ns = rig.ns()
        assert rig.service.promote([ns], KEYS, None) == len(KEYS)
        rig.settle()
        assert rig.service.stats.reads_skipped_late == len(KEYS)
        assert rig.index.lookup(["ns"], KEYS, 16, 1, None).hits == 0
        assert rig.index.allocator.used_bytes == 0  # the reserved slots went back
    finally:
        rig.close()


def test_a_full_read_queue_stops_promotion_and_a_full_write_queue_drops_writes(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    rig = Rig(tmp_path / "tier", queue_blocks=3)
    try:
        rig.ns()
        rig.save("ns", KEYS, payloads)  # one commit on the loop: 3 queued, 5 dropped
        assert rig.service.stats.writes_dropped_queue_full == len(KEYS) - 3
        rig.settle()
        assert rig.service.stats.written_blocks == 3
        rig = restart(rig, queue_blocks=2)
        assert rig.service.promote([rig.ns()], KEYS, None) == 2  # 3 on disk, 2 may be read at once
        assert rig.service.stats.reads_skipped_queue_full == 1
        rig.settle()
    finally:
        rig.close()


def test_the_time_promotion_takes_is_estimated_from_the_reads_so_far(
    tmp_path: Path, payloads: list[bytes]
) -> None:
    rig = filled(tmp_path / "tier", payloads)
    try:
        ns = rig.ns()
        assert rig.service.eta_s() == 0.0  # nothing read yet: no estimate
        rig.service.promote([ns], KEYS[:2], None)
        rig.settle()
        rate = rig.service.read_rate
        assert rate > 0
        rig.service.promote([ns], KEYS[2:], KEYS[1])  # 6 queued: their completions wait for the loop
        expected = 6 * BB / (rate * min(rig.service.threads, 6))
        assert rig.service.eta_s() == pytest.approx(expected)
        rig.settle()
    finally:
        rig.close()
