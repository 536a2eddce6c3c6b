import pytest

from kvfabric.agent.index import BlockIndex
from kvfabric.agent.pool import SlotAllocator

BB = 1024  # block bytes


def make(slots_per_arena: int = 4, arenas: int = 2) -> BlockIndex:
    idx = BlockIndex(SlotAllocator(arenas * slots_per_arena * BB, slots_per_arena * BB))
    idx.register("ns", BB, 16)
    return idx


def k(i: int, branch: int = 0) -> bytes:
    return bytes([branch, i]) * 8


def save(idx: BlockIndex, keys: list[bytes], session: int = 1, parent: bytes | None = None) -> list[int]:
    slots = idx.reserve("ns", keys, parent, session)
    idx.commit("ns", [key for key, s in zip(keys, slots, strict=True) if s >= 0], [], session)
    return slots


def test_reserved_blocks_are_invisible_until_committed() -> None:
    idx = make()
    slots = idx.reserve("ns", [k(0), k(1)], None, session=1)
    assert slots == [0, 1]
    assert idx.lookup(["ns"], [k(0), k(1)], 16, 2, None)[0] == 0
    assert idx.commit("ns", [k(0)], [k(1)], session=2) == 0  # not the owner
    assert idx.commit("ns", [k(0)], [k(1)], session=1) == 1
    assert idx.lookup(["ns"], [k(0), k(1)], 16, 2, None)[0] == 1
    assert idx.allocator.used_bytes == BB  # the aborted slot went back


def test_present_keys_are_not_reserved_twice() -> None:
    idx = make()
    save(idx, [k(0)])
    assert idx.reserve("ns", [k(0), k(1)], None, 2) == [-1, 1]
    assert idx.reserve("ns", [k(1)], k(0), 3) == [-1]  # reserved by session 2


def test_lookup_is_a_prefix_across_all_namespaces() -> None:
    idx = make()
    idx.register("ns2", BB, 16)
    save(idx, [k(0), k(1), k(2)])
    idx.reserve("ns2", [k(0), k(1)], None, 1)
    idx.commit("ns2", [k(0), k(1)], [], 1)
    assert idx.lookup(["ns"], [k(0), k(1), k(2)], 16, 1, None)[0] == 3
    assert idx.lookup(["ns", "ns2"], [k(0), k(1), k(2)], 16, 1, None)[0] == 2
    assert idx.lookup(["ns", "missing"], [k(0)], 16, 1, None)[0] == 0
    hits, slots, leases = idx.lookup(["ns", "ns2"], [k(0), k(1), k(2)], 16, 1, "L")
    assert hits == 2 and len(slots) == 2 and set(idx.leases) == {"L#0", "L#1"}
    assert [lid.split("/")[0] for lid in leases] == ["L#0", "L#1"]


def test_eviction_takes_leaves_before_parents_in_lru_order() -> None:
    idx = make(slots_per_arena=4, arenas=1)
    save(idx, [k(0), k(1), k(2)])  # chain a0 <- a1 <- a2
    save(idx, [k(0, 1)])  # another root, newer
    # pool is full (4 slots); saving a new root must evict the chain's tail, not its head
    assert save(idx, [k(0, 2)]) != [-1]
    ns = idx.namespaces["ns"]
    assert k(2) not in ns.entries and k(0) in ns.entries and k(1) in ns.entries
    assert save(idx, [k(0, 3)]) != [-1]
    assert k(1) not in ns.entries and k(0) in ns.entries
    assert idx.counters.evictions == 2


def test_recent_use_protects_from_eviction() -> None:
    idx = make(slots_per_arena=2, arenas=1)
    save(idx, [k(0)])
    save(idx, [k(0, 1)])
    idx.lookup(["ns"], [k(0)], 16, 1, None)  # touch the older one
    save(idx, [k(0, 2)])
    ns = idx.namespaces["ns"]
    assert k(0) in ns.entries and k(0, 1) not in ns.entries


def test_leased_blocks_are_never_evicted_and_full_pool_refuses() -> None:
    idx = make(slots_per_arena=2, arenas=1)
    save(idx, [k(0), k(1)])
    hits = idx.lookup(["ns"], [k(0), k(1)], 16, 7, "L").hits
    assert hits == 2
    assert idx.reserve("ns", [k(0, 1)], None, 1) == [-1]
    assert idx.counters.reserve_refused_full == 1
    assert idx.release_many(["L#0"], loaded_blocks=2) == [True]
    assert idx.counters.loaded_bytes == 2 * BB
    assert idx.release_many(["L#0"]) == [False]
    assert idx.reserve("ns", [k(0, 1)], None, 1) != [-1]


def test_dropping_a_session_frees_its_leases_and_reservations() -> None:
    idx = make()
    save(idx, [k(0), k(1)])
    idx.lookup(["ns"], [k(0), k(1)], 16, 5, "L")
    idx.reserve("ns", [k(2), k(3)], k(1), 5)
    assert idx.drop_session(5) == (1, 2)
    ns = idx.namespaces["ns"]
    assert not idx.leases and k(2) not in ns.entries and ns.entries[k(1)].children == 0
    assert idx.allocator.used_bytes == 2 * BB


def test_repeated_lookup_replaces_the_lease() -> None:
    idx = make()
    save(idx, [k(0)])
    idx.lookup(["ns"], [k(0)], 16, 1, "L")
    idx.lookup(["ns"], [k(0)], 16, 1, "L")
    assert idx.namespaces["ns"].entries[k(0)].leases == 1


def test_namespaces_share_the_pool_by_arena() -> None:
    idx = make(slots_per_arena=4, arenas=2)
    idx.register("big", 2 * BB, 16)
    with pytest.raises(ValueError, match="block_bytes"):
        idx.register("ns", 2 * BB, 16)
    with pytest.raises(ValueError, match="arena"):
        idx.register("huge", 100 * BB, 16)
    save(idx, [k(0)])  # takes arena 0 for "ns"
    slots = idx.reserve("big", [k(0), k(1)], None, 1)
    # arena 1 starts at byte 4*BB = slot 2 in units of 2*BB
    assert slots == [2, 3]
    idx.commit("big", [k(0), k(1)], [], 1)
    assert idx.allocator.free_arenas == 0
    with pytest.raises(KeyError):
        idx.reserve("unknown", [k(0)], None, 1)


def test_a_namespace_refuses_a_second_layout() -> None:
    idx = make()
    idx.register("gpu", BB, 16, "kv_planes")
    idx.register("gpu", BB, 16, "kv_planes")
    with pytest.raises(ValueError, match="layout"):
        idx.register("gpu", BB, 16, "blocks_first")


def test_an_emptied_arena_returns_to_the_pool() -> None:
    idx = make(slots_per_arena=2, arenas=1)
    idx.register("other", BB, 16)
    idx.reserve("ns", [k(0)], None, 1)
    assert idx.allocator.free_arenas == 0
    idx.commit("ns", [], [k(0)], 1)
    assert idx.allocator.free_arenas == 1
    assert idx.reserve("other", [k(0)], None, 1) == [0]


def test_a_new_namespace_reclaims_arenas_from_one_that_holds_them_all() -> None:
    idx = make(slots_per_arena=2, arenas=4)
    save(idx, [k(i) for i in range(8)])  # "ns" fills all 4 arenas with one chain
    idx.register("late", BB, 16)
    assert idx.allocator.free_arenas == 0
    slots = idx.reserve("late", [k(0, 9)], None, 1)
    assert slots != [-1]
    ns = idx.namespaces["ns"]
    # only the emptied arena's two blocks went; the rest of the chain stays (its new head a root)
    assert len(ns.entries) == 6
    roots = [e for e in ns.entries.values() if not e.parent_alive]
    assert [r.key for r in roots] == [k(2)]  # the evicted head's child
    views = list(ns.entries.values())
    assert all(e.children == sum(c.parent == e.slot and c.parent_alive for c in views) for e in views)
    assert idx.allocator.used_bytes == (len(ns.entries) + 1) * BB


def test_reclaim_skips_arenas_with_leased_blocks_and_shares_converge() -> None:
    idx = make(slots_per_arena=2, arenas=4)
    for b in range(4):
        save(idx, [k(0, b), k(1, b)])  # four 2-block chains, one per arena
    idx.lookup(["ns"], [k(0, 0), k(1, 0)], 16, 3, "L")  # arena 0 leased
    idx.register("late", BB, 16)
    for i in range(6):
        assert idx.reserve("late", [k(i, 7)], k(i - 1, 7) if i else None, 1) != [-1]
        idx.commit("late", [k(i, 7)], [], 1)
    ns = idx.namespaces["ns"]
    assert k(0, 0) in ns.entries and k(1, 0) in ns.entries  # leased chain survived
    # equal shares: two arenas each; beyond that "late" evicts its own oldest blocks
    late = idx.namespaces["late"]
    assert len(ns.slots.arenas) == 2 and len(late.slots.arenas) == 2
    assert len(late.entries) == 4 and k(5, 7) in late.entries and k(0, 7) in late.entries


def recount(idx: BlockIndex) -> dict[str, int]:
    """The block counts by walking every entry (what block_counts keeps up to date)."""
    entries = [e for ns in idx.namespaces.values() for e in ns.entries.values()]
    committed = sum(e.state.name == "COMMITTED" for e in entries)
    return {
        "committed": committed,
        "reserved": len(entries) - committed,
        "leased": sum(e.leases > 0 for e in entries),
    }


def test_block_counts_stay_exact_through_random_operations() -> None:
    import random

    rng = random.Random(7)
    idx = make(slots_per_arena=8, arenas=4)
    idx.register("other", 2 * BB, 16)
    leases: list[str] = []
    for step in range(3000):
        ns = rng.choice(["ns", "other"])
        chain = [k(i, rng.randrange(4)) for i in range(rng.randrange(1, 6))]
        session = rng.randrange(1, 4)
        op = rng.randrange(6)
        if op == 0:
            slots = idx.reserve(ns, chain, None, session)
            mine = [key for key, s in zip(chain, slots, strict=True) if s >= 0]
            half = len(mine) // 2
            idx.commit(ns, mine[:half], mine[half:] if rng.random() < 0.5 else [], session)
        elif op == 1:
            idx.reserve(ns, chain, None, session)  # left reserved: a session drop or commit ends it
        elif op == 2:
            lease = f"l{step}"
            if idx.lookup([ns], chain, 16, session, lease)[0]:
                leases.append(f"{lease}#0")
        elif op == 3 and leases:
            idx.release(leases.pop(rng.randrange(len(leases))))
        elif op == 4:
            idx.drop_session(session)
        else:
            idx.commit(ns, chain, [], session)
        assert idx.block_counts() == recount(idx), f"step {step}, op {op}"
    assert sum(recount(idx).values()) > 0


def test_aborting_a_chain_parent_first_leaves_no_stale_links() -> None:
    """The connector aborts a failed save's chain in order, parent first. A key reserved again
    later must not inherit the aborted child (arena reclaim walked such links into a KeyError)."""
    idx = make()
    a, b = k(1), k(2)
    idx.reserve("ns", [a, b], None, 1)
    idx.commit("ns", [], [a, b], 1)
    assert idx.block_counts() == {"committed": 0, "reserved": 0, "leased": 0}
    save(idx, [a])
    ns = idx.namespaces["ns"]
    assert ns.entries[a].children == 0


def check_invariants(idx: BlockIndex) -> None:
    """Everything the index keeps up to date incrementally, recomputed from the columns."""
    alloc = idx.allocator
    leased: dict[tuple[int, int], int] = {}
    for lease in idx.leases.values():
        for slot in lease.slots:
            leased[(id(lease.ns), slot)] = leased.get((id(lease.ns), slot), 0) + 1
    for name, ns in idx.namespaces.items():
        views = list(ns.entries.values())
        assert len(views) == len(ns.entries) == ns.slots.used
        pinned: dict[int, int] = {}
        for e in views:
            assert ns.find(e.key) == e.slot, "the key table finds every resident block"
            a = ns.arena_index(e.slot)
            assert a in ns.slots.arenas, "a block outside its namespace's arenas"
            pinned[a] = pinned.get(a, 0) + int(e.pinned)
            live_children = sum(c.parent == e.slot and c.parent_alive for c in views)
            assert e.children == live_children, (name, e.key)
            assert e.leases == leased.get((id(ns), e.slot), 0)
        assert {a: n for a, n in ns.arena_pinned.items() if a in pinned} == pinned
        assert set(ns.unpinned) == {a for a, n in pinned.items() if n == 0}
        slots = [e.slot for e in views]
        assert len(slots) == len(set(slots))
    assert alloc.used_bytes == sum(len(ns.entries) * ns.block_bytes for ns in idx.namespaces.values())
    for sid, st in idx._sessions.items():
        assert st.reserved_bytes == sum(
            idx.namespaces[n].block_bytes * len(sl) for n, sl in st.reserved.items()
        )
        for n, sl in st.reserved.items():
            ns = idx.namespaces[n]
            for slot in sl:
                view = ns.entries._view(slot)
                assert view.state.name == "RESERVED" and view.owner == sid
        assert st.leased_bytes == sum(idx.leases[lid].bytes for lid in st.leases)


def test_incremental_bookkeeping_stays_exact_through_random_operations_across_tenants() -> None:
    """Random saves, aborts, leases, replaced leases, releases and session drops by several
    sessions of two tenants, in a pool small enough that reclaim and eviction run all the time."""
    import random

    rng = random.Random(11)
    idx = BlockIndex(SlotAllocator(6 * 4 * BB, 4 * BB), max_session_bytes=12 * BB, tenant_arenas=4)
    spaces = [("ns", "", BB), ("other", "", 2 * BB), ("ns", "t2", BB)]
    for name, tenant, bb in spaces:
        idx.register(name, bb, 16, tenant=tenant)
    held: list[tuple[str, str]] = []
    for step in range(4000):
        name, tenant, _ = rng.choice(spaces)
        branch = rng.randrange(6)
        chain = [k(i, branch) for i in range(rng.randrange(1, 7))]
        session = rng.randrange(1, 5)
        op = rng.randrange(7)
        if op <= 1:
            slots = idx.reserve(name, chain, None, session, tenant)
            mine = [key for key, s in zip(chain, slots, strict=True) if s >= 0]
            if op == 0:
                cut = rng.randrange(len(mine) + 1)
                idx.commit(name, mine[:cut], mine[cut:] if rng.random() < 0.5 else [], session, tenant)
        elif op == 2:
            try:
                res = idx.lookup([name], chain, 16, session, f"l{rng.randrange(8)}", tenant)
            except ValueError:  # a lease id of another session, or over the session's cap
                continue
            held += [(lid, tenant) for lid in res.leases]
        elif op == 3 and held:
            lid, t = held.pop(rng.randrange(len(held)))
            idx.release(lid if rng.random() < 0.7 else lid.split("/")[0], t)
        elif op == 4 and rng.random() < 0.3:
            idx.drop_session(session)
        else:
            idx.commit(name, chain, [], session, tenant)
        assert idx.block_counts() == recount(idx), f"step {step}"
        check_invariants(idx)
        assert idx.allocator.tenant_arenas("t2") <= 4
    assert idx.counters.arenas_reclaimed > 0 and idx.counters.evictions > 0


def test_a_blocked_reclaim_fails_at_once_and_never_touches_pinned_blocks() -> None:
    """C2: the pool full of another namespace's leased blocks. Saving thousands of keys of a
    second model must refuse them without walking the victim per key (it did 8 scans of every
    entry per key): the victim has no unpinned arena, so each refusal is O(1)."""
    idx = make(slots_per_arena=64, arenas=16)
    keys = [i.to_bytes(16, "little") for i in range(64 * 16)]
    save(idx, keys)
    idx.lookup(["ns"], keys, 16, 9, "pin-all")
    idx.register("late", BB, 16)
    late = [b"L" + i.to_bytes(15, "little") for i in range(5000)]
    assert idx.reserve("late", late, None, 1) == [-1] * len(late)
    assert idx.counters.evictions == 0 and len(idx.namespaces["ns"].entries) == len(keys)
    assert not idx.namespaces["ns"].unpinned
    idx.release("pin-all#0")
    assert idx.reserve("late", late[:64], None, 1) != [-1] * 64  # unpinned: an arena is reclaimed
    assert idx.counters.arenas_reclaimed >= 1 and idx.counters.evictions == 64  # one arena's blocks only
    check_invariants(idx)


def test_session_and_tenant_caps() -> None:
    idx = BlockIndex(
        SlotAllocator(8 * 4 * BB, 4 * BB), max_session_bytes=5 * BB, max_namespaces=2, tenant_arenas=2
    )
    idx.register("a", BB, 16, tenant="t")
    idx.register("b", BB, 16, tenant="t")
    with pytest.raises(ValueError, match="namespaces"):
        idx.register("c", BB, 16, tenant="t")
    idx.register("c", BB, 16, tenant="u")  # another tenant's own budget
    keys = [k(i) for i in range(12)]
    assert sum(s >= 0 for s in idx.reserve("a", keys, None, 1, "t")) == 5  # session cap
    assert sum(s >= 0 for s in idx.reserve("a", keys[5:], keys[4], 2, "t")) == 3  # tenant quota: 2 arenas
    assert idx.allocator.tenant_arenas("t") == 2
    assert all(s >= 0 for s in idx.reserve("c", keys[:5], None, 3, "u"))  # its own quota


def test_under_pressure_the_tenant_holding_most_gives_arenas_up_first() -> None:
    """Fair eviction between tenants: tenant A fills the pool with two namespaces; tenant B's
    saves take arenas from A (by tenant totals, not by namespace) until their shares meet."""
    idx = BlockIndex(SlotAllocator(8 * 2 * BB, 2 * BB))
    idx.register("a1", BB, 16, tenant="a")
    idx.register("a2", BB, 16, tenant="a")
    idx.register("b", BB, 16, tenant="b")
    for name in ("a1", "a2"):
        keys = [k(i, ord(name[1])) for i in range(8)]
        idx.reserve(name, keys, None, 1, "a")
        idx.commit(name, keys, [], 1, "a")
    assert idx.allocator.tenant_arenas("a") == 8
    for i in range(12):
        assert idx.reserve("b", [k(i, 9)], None, 2, "b") != [-1]
        idx.commit("b", [k(i, 9)], [], 2, "b")
    alloc = idx.allocator
    assert alloc.tenant_arenas("a") == alloc.tenant_arenas("b") == 4
    check_invariants(idx)


def test_a_namespace_listed_twice_is_leased_twice_and_stays_pinned_until_both_end() -> None:
    """TP ranks reading one shared copy (MLA): each releases its own lease, and the block may
    not be evicted while the other still copies."""
    idx = make(slots_per_arena=2, arenas=1)
    save(idx, [k(0), k(1)])
    hits, slots, leases = idx.lookup(["ns", "ns"], [k(0), k(1)], 16, 7, "L")
    assert hits == 2 and slots[0] == slots[1] and len(set(leases)) == 2
    assert idx.namespaces["ns"].entries[k(0)].leases == 2
    assert idx.release_many([leases[0]]) == [True]
    assert idx.reserve("ns", [k(0, 1)], None, 1) == [-1]  # still leased by the other rank
    assert idx.release_many([leases[1]]) == [True]
    assert idx.reserve("ns", [k(0, 1)], None, 1) != [-1]
