"""What needs no GPU of the engine's own saves: how its pool registration is cut, and the pool
mapping it shares with CPU engines (the copies themselves: tests/gpu/test_gpu_engine_saves.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvfabric.connector.engine_saves import piece_bounds
from kvfabric.connector.pool_files import PART_ALIGN, map_pool, part_path, part_sizes, pool_sizes

MiB = 1 << 20


def _pieces_of(bounds: np.ndarray, start: int, end: int) -> set[int]:
    """The pieces that hold any byte of ``[start, end)``."""
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, end - 1, side="right")) - 1
    return set(range(first, last + 1))


@pytest.mark.parametrize(
    ("files", "slot"),
    [
        ([64 * MiB], 2 * MiB),  # the 8B shape's 2 MiB slots, one file
        ([6 * MiB, 6 * MiB, 2 * MiB], 96 * 1024),  # a slot size that does not divide the files
        ([10 * MiB, 10 * MiB], 3 * 4096 + 512),  # not even a whole number of pages
    ],
)
def test_pieces_are_page_aligned_bounded_and_split_no_slot_but_at_a_file_boundary(
    files: list[int], slot: int
) -> None:
    most = 4 * MiB
    bounds = piece_bounds(files, slot, most)
    total = sum(files)
    assert bounds[0] == 0 and bounds[-1] == total
    assert np.all(np.diff(bounds) > 0) and np.all(np.diff(bounds) <= most)
    assert np.all(bounds[:-1] % 4096 == 0)
    file_ends = set(np.cumsum(files).tolist())
    for f_start, f_end in zip([0, *np.cumsum(files)[:-1].tolist()], np.cumsum(files).tolist(), strict=True):
        inside = bounds[(bounds > f_start) & (bounds < f_end)]
        assert not set(inside.tolist()) & file_ends  # no piece spans two files: their ends are bounds
    assert file_ends <= set(bounds.tolist())
    split = [s for s in range(total // slot) if len(_pieces_of(bounds, s * slot, (s + 1) * slot)) > 1]
    crossing = [s for s in range(total // slot) if any(s * slot < e < (s + 1) * slot for e in file_ends)]
    if 4096 % slot == 0 or slot % 4096 == 0 or np.lcm(slot, 4096) <= most:
        assert split == crossing  # only a slot that crosses a file boundary lies in two pieces


def test_map_pool_maps_every_part_back_to_back_and_refuses_a_part_count_that_cannot_hold_it(
    tmp_path: Path,
) -> None:
    total = 3 * PART_ALIGN + 4096
    sizes = part_sizes(total, 4)
    assert pool_sizes(total, 4) == sizes and pool_sizes(total, 1) == [total]
    for i, size in enumerate(sizes):
        part_path(tmp_path / "pool", i).write_bytes(bytes([i + 1]) * size)
    m = map_pool(tmp_path / "pool", total, len(sizes), writable=True)
    view = np.frombuffer(m, dtype=np.uint8)
    offsets = np.cumsum([0, *sizes])
    for i in range(len(sizes)):
        assert np.all(view[offsets[i] : offsets[i + 1]] == i + 1)
    view[offsets[1]] = 0xEE  # written through the one range, lands in the second file
    del view
    assert part_path(tmp_path / "pool", 1).read_bytes()[0] == 0xEE
    with pytest.raises(ValueError, match="cannot hold"):
        pool_sizes(total, 9)


def test_runs_split_where_neighbours_do_not_belong_together() -> None:
    from kvfabric.connector.engine_saves import _runs

    blocks = np.array([3, 4, 5, 9, 8, 7, 20, 21])
    first, n = _runs(np.diff(blocks) == 1)
    assert first.tolist() == [0, 3, 4, 5, 6] and n.tolist() == [3, 1, 1, 1, 2]
    first, n = _runs(np.diff(np.array([7])) == 1)
    assert first.tolist() == [0] and n.tolist() == [1]
