"""Block index: which keys live in which slots, leases, reservations and eviction.

Per namespace a dict ``key -> Entry``. A saved block goes RESERVED (slot handed to one session,
invisible to lookups) then COMMITTED (visible). Eviction is prefix-aware LRU: only *leaves* —
committed blocks with no resident children and no lease — are candidates, the least recently
used first, so a chain is trimmed from its tail and a parent never goes before its children.
Candidates sit in a lazy min-heap keyed by last use; stale heap items are skipped on pop.

Everything here runs on the agent's event loop thread: no locks.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from kvfabric.agent.pool import NamespaceSlots, SlotAllocator


class State(Enum):
    RESERVED = 1
    COMMITTED = 2


@dataclass(slots=True)
class Entry:
    slot: int
    parent: bytes | None
    state: State
    owner: int  # session id that reserved it (meaningful while RESERVED)
    tick: int = 0
    children: int = 0
    leases: int = 0


@dataclass
class Namespace:
    name: str
    block_tokens: int
    slots: NamespaceSlots
    description: str = ""
    entries: dict[bytes, Entry] = field(default_factory=dict)
    heap: list[tuple[int, bytes]] = field(default_factory=list)
    #: parent key -> resident child keys (``Entry.children`` is its size); walked only when an
    #: arena is reclaimed for another namespace.
    kids: dict[bytes, set[bytes]] = field(default_factory=dict)

    @property
    def block_bytes(self) -> int:
        return self.slots.block_bytes


@dataclass
class Lease:
    lease_id: str
    session: int
    blocks: list[tuple[Namespace, bytes]]


@dataclass
class Counters:
    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    reserved_blocks: int = 0
    reserve_refused_present: int = 0
    reserve_refused_full: int = 0
    committed_blocks: int = 0
    committed_bytes: int = 0
    aborted_blocks: int = 0
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    leases_granted: int = 0
    leases_lost: int = 0


class BlockIndex:
    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.namespaces: dict[str, Namespace] = {}
        self.leases: dict[str, Lease] = {}
        self.counters = Counters()
        self._tick = 0
        # Blocks by state, kept up to date as they change: a scrape must not walk millions of
        # entries on the event loop.
        self._live = {"committed": 0, "reserved": 0, "leased": 0}

    # -- namespaces ------------------------------------------------------------------------------

    def register(self, name: str, block_bytes: int, block_tokens: int, description: str = "") -> Namespace:
        self.check_layout(name, description)
        ns = self.namespaces.get(name)
        slots = self.allocator.add_namespace(name, block_bytes)  # raises on a size conflict
        if ns is None:
            ns = Namespace(name=name, block_tokens=block_tokens, slots=slots, description=description)
            self.namespaces[name] = ns
        return ns

    def check_layout(self, name: str, description: str) -> None:
        """Raises ValueError when ``name`` is registered with another non-empty layout."""
        ns = self.namespaces.get(name)
        if ns is not None and description and ns.description and description != ns.description:
            raise ValueError(
                f"namespace {name} is registered with layout {ns.description!r}, not {description!r}"
            )

    # -- lookups and leases ----------------------------------------------------------------------

    def lookup(
        self, names: list[str], keys: list[bytes], block_tokens: int, session: int, lease_id: str | None
    ) -> tuple[int, list[list[int]]]:
        """Longest run of leading keys committed in every namespace; leases them if asked."""
        spaces = [self.namespaces.get(n) for n in names]
        hits = 0
        if all(ns is not None for ns in spaces):
            present = [ns.entries for ns in spaces if ns is not None]
            for key in keys:
                ok = True
                for entries in present:
                    e = entries.get(key)
                    if e is None or e.state is not State.COMMITTED:
                        ok = False
                        break
                if not ok:
                    break
                hits += 1
        c = self.counters
        c.lookups += 1
        c.hit_blocks += hits
        c.miss_blocks += len(keys) - hits
        c.hit_tokens += hits * block_tokens
        c.miss_tokens += (len(keys) - hits) * block_tokens
        slots: list[list[int]] = []
        if lease_id is not None and hits:
            for i, ns in enumerate(spaces):
                assert ns is not None
                lid = f"{lease_id}#{i}"
                self.release(lid)  # a repeated lookup replaces the request's earlier lease
                ns_slots = []
                for key in keys[:hits]:
                    e = ns.entries[key]
                    e.leases += 1
                    if e.leases == 1:
                        self._live["leased"] += 1
                    ns_slots.append(e.slot)
                slots.append(ns_slots)
                self.leases[lid] = Lease(lid, session, [(ns, k) for k in keys[:hits]])
                c.leases_granted += 1
        for ns in spaces:
            if ns is not None and hits:
                self._touch(ns, keys[:hits])
        return hits, slots

    def release(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        for ns, key in lease.blocks:
            e = ns.entries.get(key)
            if e is not None:
                e.leases -= 1
                if e.leases == 0:
                    self._live["leased"] -= 1
                self._maybe_candidate(ns, key, e)
        return True

    def release_many(self, lease_ids: list[str], loaded_blocks: int = 0) -> list[bool]:
        """Ends leases; ``loaded_blocks`` (copied under the first one) count as loads if it held."""
        first = self.leases.get(lease_ids[0]) if lease_ids else None
        if first is not None and first.blocks and loaded_blocks:
            self.counters.loaded_blocks += loaded_blocks
            self.counters.loaded_bytes += loaded_blocks * first.blocks[0][0].block_bytes
        return [self.release(lid) for lid in lease_ids]

    # -- saves -------------------------------------------------------------------------------------

    def reserve(self, name: str, keys: list[bytes], parent: bytes | None, session: int) -> list[int]:
        ns = self._namespace(name)
        out: list[int] = []
        prev = parent
        for key in keys:
            if key in ns.entries:
                out.append(-1)
                self.counters.reserve_refused_present += 1
            else:
                slot = self._make_room(ns)
                if slot is None:
                    out.append(-1)
                    self.counters.reserve_refused_full += 1
                else:
                    # Link to the parent only if it is resident: its child count must match
                    # exactly the entries that will decrement it when they go.
                    pe = ns.entries.get(prev) if prev is not None else None
                    if pe is not None:
                        assert prev is not None
                        pe.children += 1
                        ns.kids.setdefault(prev, set()).add(key)
                    ns.entries[key] = Entry(
                        slot=slot,
                        parent=prev if pe is not None else None,
                        state=State.RESERVED,
                        owner=session,
                    )
                    out.append(slot)
                    self.counters.reserved_blocks += 1
                    self._live["reserved"] += 1
            prev = key
        return out

    def commit(self, name: str, keys: Iterable[bytes], abort: Iterable[bytes], session: int) -> int:
        ns = self._namespace(name)
        done = 0
        for key in keys:
            e = ns.entries.get(key)
            if e is None or e.state is not State.RESERVED or e.owner != session:
                continue
            e.state = State.COMMITTED
            self._live["reserved"] -= 1
            self._live["committed"] += 1
            self._tick += 1
            e.tick = self._tick
            self._maybe_candidate(ns, key, e)
            done += 1
        self.counters.committed_blocks += done
        self.counters.committed_bytes += done * ns.block_bytes
        for key in abort:
            e = ns.entries.get(key)
            if e is not None and e.state is State.RESERVED and e.owner == session:
                self._drop(ns, key, e)
                self.counters.aborted_blocks += 1
        return done

    def drop_session(self, session: int) -> tuple[int, int]:
        """Frees a vanished session's leases and reservations; returns (leases, reservations)."""
        lease_ids = [lid for lid, lease in self.leases.items() if lease.session == session]
        for lid in lease_ids:
            self.release(lid)
        self.counters.leases_lost += len(lease_ids)
        dropped = 0
        for ns in self.namespaces.values():
            stale = [k for k, e in ns.entries.items() if e.state is State.RESERVED and e.owner == session]
            # Children first so parents' child counts reach zero cleanly.
            for key in reversed(stale):
                e = ns.entries.get(key)
                if e is not None:
                    self._drop(ns, key, e)
                    dropped += 1
        return len(lease_ids), dropped

    # -- eviction ----------------------------------------------------------------------------------

    def _touch(self, ns: Namespace, keys: list[bytes]) -> None:
        # Parents first: along a chain the tail gets the newest tick.
        for key in keys:
            e = ns.entries[key]
            self._tick += 1
            e.tick = self._tick
            self._maybe_candidate(ns, key, e)

    def _maybe_candidate(self, ns: Namespace, key: bytes, e: Entry) -> None:
        if e.state is State.COMMITTED and e.children == 0 and e.leases == 0:
            heapq.heappush(ns.heap, (e.tick, key))
            if len(ns.heap) > 4 * len(ns.entries) + 1024:
                self._compact(ns)

    def _compact(self, ns: Namespace) -> None:
        ns.heap = [
            (e.tick, k)
            for k, e in ns.entries.items()
            if e.state is State.COMMITTED and e.children == 0 and e.leases == 0
        ]
        heapq.heapify(ns.heap)

    def _evict_one(self, ns: Namespace) -> bool:
        while ns.heap:
            tick, key = heapq.heappop(ns.heap)
            e = ns.entries.get(key)
            if e is None or e.tick != tick or e.state is not State.COMMITTED or e.children or e.leases:
                continue  # stale heap item
            self._drop(ns, key, e)
            self.counters.evictions += 1
            self.counters.evicted_bytes += ns.block_bytes
            return True
        return False

    def _drop(self, ns: Namespace, key: bytes, e: Entry) -> None:
        del ns.entries[key]
        # Children still resident (an abort lists a chain parent first) become roots: no link
        # may outlive the entry, or a key reserved again later would inherit stale children.
        for child in ns.kids.pop(key, ()):
            if (ce := ns.entries.get(child)) is not None:
                ce.parent = None
        self._live["committed" if e.state is State.COMMITTED else "reserved"] -= 1
        if e.leases:
            self._live["leased"] -= 1
        self.allocator.free(ns.slots, e.slot)
        if e.parent is not None and (pe := ns.entries.get(e.parent)) is not None:
            pe.children -= 1
            siblings = ns.kids[e.parent]
            siblings.discard(key)
            if not siblings:
                del ns.kids[e.parent]
            self._maybe_candidate(ns, e.parent, pe)

    # -- sharing the pool between namespaces ------------------------------------------------------------

    def _make_room(self, ns: Namespace) -> int | None:
        """A slot for ``ns``: free, else taken from an over-share namespace, else by eviction.

        Under pressure arenas drift towards an equal share per namespace: a namespace holding
        at least two arenas more than ``ns`` gives one up before ``ns`` evicts its own blocks.
        """
        slot = self.allocator.allocate(ns.slots)
        if slot is not None:
            return slot
        others = sorted(
            (o for o in self.namespaces.values() if o is not ns and o.slots.arenas),
            key=lambda o: len(o.slots.arenas),
            reverse=True,
        )
        if others and len(others[0].slots.arenas) > len(ns.slots.arenas) + 1 and self._reclaim(others[0]):
            return self.allocator.allocate(ns.slots)
        if self._evict_one(ns):
            return self.allocator.allocate(ns.slots)
        for victim in others:
            if self._reclaim(victim):
                return self.allocator.allocate(ns.slots)
        return None

    def _reclaim(self, victim: Namespace, max_arenas: int = 4) -> bool:
        """Empties one of ``victim``'s arenas (its blocks and their descendants are evicted).

        An arena holding a leased or reserved block, or the ancestor of one, is skipped.
        """
        arenas = sorted(victim.slots.arenas.values(), key=lambda a: a.used)[:max_arenas]
        for arena in arenas:
            lo, hi = arena.first_slot, arena.first_slot + arena.n_slots
            roots = [k for k, e in victim.entries.items() if lo <= e.slot < hi]
            order: list[bytes] = []
            if all(self._subtree(victim, k, order) for k in roots):
                seen: set[bytes] = set()
                for key in order:  # children before parents
                    if key in seen or key not in victim.entries:
                        continue
                    seen.add(key)
                    self._drop(victim, key, victim.entries[key])
                    self.counters.evictions += 1
                    self.counters.evicted_bytes += victim.block_bytes
                return True
        return False

    def _subtree(self, ns: Namespace, key: bytes, order: list[bytes]) -> bool:
        """Appends ``key``'s subtree in post-order; False if any of it is leased or reserved."""
        stack: list[tuple[bytes, bool]] = [(key, False)]
        while stack:
            k, expanded = stack.pop()
            if expanded:
                order.append(k)
                continue
            e = ns.entries[k]
            if e.leases or e.state is not State.COMMITTED:
                return False
            stack.append((k, True))
            stack.extend((c, False) for c in ns.kids.get(k, ()))
        return True

    def _namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            raise KeyError(f"namespace {name} is not registered in this session's agent")
        return ns

    # -- stats ---------------------------------------------------------------------------------------

    def block_counts(self) -> dict[str, int]:
        """Blocks committed, reserved, and leased (a leased block is committed too); O(1)."""
        return dict(self._live)
