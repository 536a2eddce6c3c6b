"""A CUDA pool serves while it is still being pinned: the order pieces are pinned in, and which
arenas may be lent as pieces complete (pure bookkeeping; the GPU side is tests/gpu)."""

from __future__ import annotations

from kvfabric.agent.index import BlockIndex
from kvfabric.agent.pool import SlotAllocator, interleaved_chunks

MIB = 1 << 20


def test_pieces_lie_on_one_grid_and_go_round_robin_over_the_files() -> None:
    sizes = [3 * MIB, 3 * MIB, 1 * MIB + 512]  # the last file shorter, not a multiple
    pieces = interleaved_chunks(sizes, MIB)
    assert pieces[:3] == [(0, MIB), (3 * MIB, MIB), (6 * MIB, MIB)]  # one per file first
    assert pieces[3:6] == [(MIB, MIB), (4 * MIB, MIB), (7 * MIB, 512)]
    # every piece on the grid from the pool's start: the GPU copies split their runs there
    assert sorted(pieces) == [(i * MIB, MIB) for i in range(7)] + [(7 * MIB, 512)]
    # files smaller than a piece: the grid still rules, a piece spans files
    small = interleaved_chunks([MIB // 2] * 6, MIB)
    assert sorted(small) == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)]
    assert small == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)]  # each starts in another file


def test_an_arena_is_lent_only_once_every_byte_of_it_is_usable() -> None:
    # arenas of 3 MiB over pieces of 2 MiB: arena 1 (3-6 MiB) straddles pieces 1 and 2
    alloc = SlotAllocator(12 * MIB, 3 * MIB, usable=False)
    ns = alloc.add_namespace("m", MIB)
    assert alloc.usable_arenas == 0
    assert alloc.allocate(ns) is None  # nothing pinned yet: a save is refused, not misplaced
    assert alloc.make_usable(2 * MIB, 4 * MIB) == 0  # piece 1 alone covers no arena
    assert alloc.make_usable(4 * MIB, 6 * MIB) == 1  # with piece 2, arena 1 (3-6 MiB) is whole
    assert alloc.usable_arenas == 1 and alloc.free_arenas == 1
    slots = [alloc.allocate(ns) for _ in range(3)]
    assert sorted(s for s in slots if s is not None) == [3, 4, 5]  # arena 1's bytes, 3-6 MiB
    assert alloc.allocate(ns) is None  # arena 0 still lacks bytes 0-2 MiB
    assert alloc.make_usable(0, 2 * MIB) == 1  # arena 0 (0-3 MiB) now whole
    assert alloc.allocate(ns) in (0, 1, 2)
    assert alloc.make_all_usable() == 2  # arenas 2 and 3
    assert alloc.usable_arenas == 4 and alloc.make_usable(6 * MIB, 12 * MIB) == 0


def test_a_usable_allocator_lends_everything_and_ignores_progress() -> None:
    alloc = SlotAllocator(8 * MIB, 2 * MIB)
    assert alloc.usable_arenas == alloc.free_arenas == 4
    assert alloc.make_usable(0, 8 * MIB) == 0 and alloc.free_arenas == 4


def test_a_pool_that_is_still_pinning_evicts_within_its_usable_arenas() -> None:
    """Saves into a partly pinned pool take only usable slots: when those are full the index
    evicts among them (it never reaches for an arena that is not pinned yet)."""
    bb = 1024
    alloc = SlotAllocator(4 * 4 * bb, 4 * bb, usable=False)
    idx = BlockIndex(alloc)
    idx.register("ns", bb, 16)
    alloc.make_usable(8 * bb, 12 * bb)  # arena 2 only: slots 8-11
    taken: list[int] = []
    for i in range(10):  # ten single-block chains
        key = bytes([1, i]) * 8
        slot = idx.reserve("ns", [key], None, 1)[0]
        assert slot >= 0, "a full usable part evicts its oldest block for the next save"
        idx.commit("ns", [key], [], 1)
        taken.append(slot)
    assert set(taken) == set(range(8, 12))
    assert idx.counters.evictions >= 6  # at least one per save beyond the four usable slots
    alloc.make_all_usable()
    assert idx.reserve("ns", [bytes([2, 0]) * 8], None, 1)[0] in range(0, 16)
