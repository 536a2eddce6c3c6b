"""The pool segment: reserved up front for CPU agents, left to the pinning for CUDA agents."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvfabric.agent.pool import PoolError, Segment

SIZE = 64 << 20


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm (tmpfs), where the agent keeps its pool")
    d = Path("/dev/shm") / f"kvfabric-test-{uuid.uuid4().hex}"
    yield d
    for f in d.glob("*"):
        f.unlink()
    if d.exists():
        d.rmdir()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_reserved_segment_allocates_every_page(shm_dir: Path) -> None:
    seg = Segment(shm_dir / "pool", SIZE, threads=4)
    try:
        assert allocated(seg.path) >= SIZE
    finally:
        seg.close()
    assert not (shm_dir / "pool").exists()


def test_unreserved_segment_allocates_nothing_until_touched(shm_dir: Path) -> None:
    seg = Segment(shm_dir / "pool", SIZE, threads=4, reserve=False)
    try:
        assert allocated(seg.path) == 0
        seg.map[SIZE - 1] = 1  # the pages a pinning agent populates are allocated at first touch
        assert 0 < allocated(seg.path) < SIZE
        seg.prefault(threads=2)
        assert allocated(seg.path) >= SIZE
    finally:
        seg.close()


def test_a_pool_larger_than_the_filesystem_is_refused_either_way(shm_dir: Path) -> None:
    shm_dir.mkdir()
    fs = os.statvfs(shm_dir)
    too_big = fs.f_bavail * fs.f_frsize + (1 << 30)
    for reserve in (True, False):
        with pytest.raises(PoolError, match="does not fit"):
            Segment(shm_dir / "pool", too_big, reserve=reserve)


def test_a_segment_in_several_files_is_one_range_and_replaces_a_crashed_agents_parts(shm_dir: Path) -> None:
    shm_dir.mkdir()
    (shm_dir / "pool.7").write_bytes(b"x")  # a part of an earlier, larger pool of a crashed agent
    seg = Segment(shm_dir / "pool", SIZE, threads=4, parts=4)
    try:
        assert sorted(p.name for p in shm_dir.iterdir()) == ["pool", "pool.1", "pool.2", "pool.3"]
        assert [allocated(p) for p in seg.paths] == [SIZE // 4] * 4  # reserved, each file
        view = memoryview(seg.map)
        view[SIZE // 4 - 1 : SIZE // 4 + 1] = b"ab"  # across the first boundary
        view[SIZE - 1 :] = b"z"
        assert (shm_dir / "pool").read_bytes()[-1:] == b"a"
        assert (shm_dir / "pool.1").read_bytes()[:1] == b"b"
        assert (shm_dir / "pool.3").read_bytes()[-1:] == b"z"
        del view
    finally:
        seg.close()
    assert not list(shm_dir.iterdir())
