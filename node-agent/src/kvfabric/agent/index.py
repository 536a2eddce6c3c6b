"""Block index: which keys live in which slots, leases, reservations and eviction.

Per namespace a dict ``key -> Entry``. A saved block goes RESERVED (slot handed to one session,
invisible to lookups) then COMMITTED (visible). Eviction is prefix-aware LRU: only *leaves* —
committed blocks with no resident children and no lease — are candidates, the least recently
used first, so a chain is trimmed from its tail and a parent never goes before its children.
Candidates sit in a lazy min-heap keyed by last use; stale heap items are skipped on pop.

Tenants: every namespace and lease belongs to one tenant and is invisible to the others (the
same namespace digest in two tenants is two namespaces). Tenant ``""`` is the shared domain.

Cost discipline (everything here runs inline on the agent's event loop): every operation costs
O(its own keys), O(the session's own state) or O(one arena), never O(pool). Giving an arena to
another namespace evicts only that arena's blocks: children elsewhere become roots (unreachable
until their parent is saved again, and evicted by LRU like any leaf). Each namespace keeps, per
arena, its resident keys and how many of them are *pinned* (reserved or leased), and in order
the arenas with none pinned, so finding an arena to empty is O(1).

Everything here runs on the agent's event loop thread: no locks.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from kvfabric.agent.pool import NamespaceSlots, SlotAllocator


class State(Enum):
    RESERVED = 1
    COMMITTED = 2


@dataclass(slots=True)
class Entry:
    key: bytes
    slot: int
    #: The parent's entry while both are resident (an object, not a key: a parent evicted and
    #: saved again is a new entry, and must not inherit the old one's children).
    parent: Entry | None
    state: State
    owner: int  # session id that reserved it (meaningful while RESERVED)
    tick: int = 0
    children: int = 0
    leases: int = 0
    alive: bool = True

    @property
    def pinned(self) -> bool:
        return self.state is State.RESERVED or self.leases > 0


@dataclass
class Namespace:
    name: str  # as the tenant named it
    tenant: str
    block_tokens: int
    slots: NamespaceSlots
    description: str = ""
    entries: dict[bytes, Entry] = field(default_factory=dict)
    heap: list[tuple[int, bytes]] = field(default_factory=list)
    #: arena index -> resident keys in it, and how many of them are pinned.
    arena_keys: dict[int, set[bytes]] = field(default_factory=dict)
    arena_pinned: dict[int, int] = field(default_factory=dict)
    #: arenas holding blocks none of which is pinned, oldest first (an ordered set).
    unpinned: dict[int, None] = field(default_factory=dict)
    #: slot -> live leases on it (what a GPU load may read).
    leased_slots: dict[int, int] = field(default_factory=dict)

    @property
    def block_bytes(self) -> int:
        return self.slots.block_bytes


@dataclass
class Lease:
    lease_id: str
    session: int
    tenant: str
    generation: int
    ns: Namespace
    keys: list[bytes]

    @property
    def bytes(self) -> int:
        return len(self.keys) * self.ns.block_bytes


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
    reserve_refused_quota: int = 0
    committed_blocks: int = 0
    committed_bytes: int = 0
    aborted_blocks: int = 0
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    arenas_reclaimed: int = 0
    leases_granted: int = 0
    leases_lost: int = 0


class LookupResult(NamedTuple):
    hits: int
    #: per namespace, the leased blocks' slots (empty without a lease)
    slots: list[list[int]]
    #: per namespace, the id that ends exactly this lease (``"<id>#<i>/<generation>"``)
    leases: list[str]


class LeaseConflict(ValueError):
    """A lease id another session holds."""


class QuotaExceeded(ValueError):
    """A session or tenant is over one of its limits."""


def scoped(tenant: str, name: str) -> str:
    """The index's name for a tenant's namespace or lease id (tenant ``""``: the name itself).
    Tenant names hold no ``/``, so no tenant can spell another's scoped names."""
    return f"{tenant}/{name}" if tenant else name


@dataclass
class _SessionState:
    #: namespace (scoped) -> keys this session holds reserved
    reserved: dict[str, set[bytes]] = field(default_factory=dict)
    reserved_bytes: int = 0
    leases: set[str] = field(default_factory=set)  # scoped lease ids
    leased_bytes: int = 0


class BlockIndex:
    def __init__(
        self,
        allocator: SlotAllocator,
        *,
        max_session_bytes: int | None = None,
        max_namespaces: int = 1 << 20,
        tenant_arenas: int | None = None,
    ) -> None:
        """``max_session_bytes``: most bytes of blocks one session may hold reserved, and as
        many leased, at once;
        ``max_namespaces``: per tenant; ``tenant_arenas``: most arenas one tenant holds (its
        quota; None: the whole pool)."""
        self.allocator = allocator
        self.namespaces: dict[str, Namespace] = {}
        self.leases: dict[str, Lease] = {}
        self.counters = Counters()
        self.max_session_bytes = max_session_bytes
        self.max_namespaces = max_namespaces
        self.tenant_arenas = tenant_arenas
        self._tenant_namespaces: dict[str, int] = {}
        self._sessions: dict[int, _SessionState] = {}
        self._tick = 0
        self._generation = 0
        # Blocks by state, kept up to date as they change: a scrape must not walk millions of
        # entries on the event loop.
        self._live = {"committed": 0, "reserved": 0, "leased": 0}

    # -- namespaces ------------------------------------------------------------------------------

    def register(
        self, name: str, block_bytes: int, block_tokens: int, description: str = "", tenant: str = ""
    ) -> Namespace:
        self.check_layout(name, description, tenant)
        key = scoped(tenant, name)
        ns = self.namespaces.get(key)
        if ns is None and self._tenant_namespaces.get(tenant, 0) >= self.max_namespaces:
            raise QuotaExceeded(f"tenant {tenant!r} already has {self.max_namespaces} namespaces")
        slots = self.allocator.add_namespace(key, block_bytes, tenant)  # raises on a size conflict
        if ns is None:
            ns = Namespace(
                name=name, tenant=tenant, block_tokens=block_tokens, slots=slots, description=description
            )
            self.namespaces[key] = ns
            self._tenant_namespaces[tenant] = self._tenant_namespaces.get(tenant, 0) + 1
        return ns

    def check_layout(self, name: str, description: str, tenant: str = "") -> None:
        """Raises ValueError when ``name`` is registered with another non-empty layout."""
        ns = self.namespaces.get(scoped(tenant, name))
        if ns is not None and description and ns.description and description != ns.description:
            raise ValueError(
                f"namespace {name} is registered with layout {ns.description!r}, not {description!r}"
            )

    def namespace(self, name: str, tenant: str = "") -> Namespace:
        ns = self.namespaces.get(scoped(tenant, name))
        if ns is None:
            raise KeyError(f"namespace {name} is not registered in this session's agent")
        return ns

    # -- lookups and leases ----------------------------------------------------------------------

    def lookup(
        self,
        names: list[str],
        keys: list[bytes],
        block_tokens: int,
        session: int,
        lease_id: str | None,
        tenant: str = "",
    ) -> LookupResult:
        """Longest run of leading keys committed in every namespace; leases them if asked."""
        if len(set(names)) != len(names):
            raise ValueError("a lookup names each namespace once")
        spaces = [self.namespaces.get(scoped(tenant, n)) for n in names]
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
        slots: list[list[int]] = []
        names_out: list[str] = []
        if lease_id is not None and hits:
            lids = [scoped(tenant, f"{lease_id}#{i}") for i in range(len(spaces))]
            for lid in lids:  # checked for every namespace before any lease changes
                held = self.leases.get(lid)
                if held is not None and held.session != session:
                    raise LeaseConflict(f"lease {lease_id} is held by another session")
            st = self._session(session)
            replaced = sum(self.leases[lid].bytes for lid in lids if lid in self.leases)
            wanted = hits * sum(ns.block_bytes for ns in spaces if ns is not None)
            if self.max_session_bytes is not None and (
                st.leased_bytes - replaced + wanted > self.max_session_bytes
            ):
                raise QuotaExceeded(f"this session would lease more than {self.max_session_bytes} bytes")
            for i, (ns, lid) in enumerate(zip(spaces, lids, strict=True)):
                assert ns is not None
                if (old := self.leases.get(lid)) is not None:
                    self._drop_lease(lid, old)  # a repeated lookup replaces the request's lease
                self._generation += 1
                held_keys = keys[:hits]
                ns_slots = []
                for key in held_keys:
                    e = ns.entries[key]
                    self._lease(ns, e)
                    ns_slots.append(e.slot)
                slots.append(ns_slots)
                self.leases[lid] = Lease(lid, session, tenant, self._generation, ns, list(held_keys))
                st.leases.add(lid)
                st.leased_bytes += hits * ns.block_bytes
                names_out.append(f"{lease_id}#{i}/{self._generation}")
                self.counters.leases_granted += 1
        c = self.counters
        c.lookups += 1
        c.hit_blocks += hits
        c.miss_blocks += len(keys) - hits
        c.hit_tokens += hits * block_tokens
        c.miss_tokens += (len(keys) - hits) * block_tokens
        for ns in spaces:
            if ns is not None and hits:
                self._touch(ns, keys[:hits])
        return LookupResult(hits, slots, names_out)

    def release(self, lease_id: str, tenant: str = "") -> bool:
        """Ends a lease: ``"<id>#<i>"`` whatever its generation, ``"<id>#<i>/<gen>"`` only that
        generation. False when it was not held (then bytes copied under it are suspect)."""
        return self._end_lease(lease_id, tenant) is not None

    def release_many(self, lease_ids: list[str], loaded_blocks: int = 0, tenant: str = "") -> list[bool]:
        """Ends leases; ``loaded_blocks`` (copied under the first one) count as loads if it held,
        up to that lease's size (a client cannot inflate the load metrics)."""
        held: list[bool] = []
        for i, lid in enumerate(lease_ids):
            lease = self._end_lease(lid, tenant)
            held.append(lease is not None)
            if i == 0 and lease is not None and loaded_blocks:
                n = min(loaded_blocks, len(lease.keys))
                self.counters.loaded_blocks += n
                self.counters.loaded_bytes += n * lease.ns.block_bytes
        return held

    def _end_lease(self, lease_id: str, tenant: str) -> Lease | None:
        name, generation = lease_id, None
        if "/" in lease_id:
            name, _, gen = lease_id.rpartition("/")
            if not gen.isdigit():
                return None
            generation = int(gen)
        lid = scoped(tenant, name)
        lease = self.leases.get(lid)
        if lease is None or (generation is not None and lease.generation != generation):
            return None
        self._drop_lease(lid, lease)
        return lease

    def _drop_lease(self, lid: str, lease: Lease) -> None:
        del self.leases[lid]
        st = self._sessions.get(lease.session)
        if st is not None:
            st.leases.discard(lid)
            st.leased_bytes -= lease.bytes
        ns = lease.ns
        for key in lease.keys:
            e = ns.entries.get(key)
            if e is not None:
                self._unlease(ns, e)
                self._maybe_candidate(ns, e)

    def leased_slots_ok(self, ns: Namespace, slots: Iterable[int]) -> bool:
        """Whether every slot is under a live lease in ``ns`` (a GPU load may read only those)."""
        held = ns.leased_slots
        return all(s in held for s in slots)

    def reserved_slots_ok(self, ns: Namespace, slots: Iterable[int], session: int) -> bool:
        """Whether every slot is reserved by ``session`` in ``ns`` (a GPU save writes only those)."""
        st = self._sessions.get(session)
        mine = st.reserved.get(scoped(ns.tenant, ns.name), set()) if st else set()
        if not mine:
            return not any(True for _ in slots)
        own = {ns.entries[k].slot for k in mine}
        return all(s in own for s in slots)

    # -- saves -------------------------------------------------------------------------------------

    def reserve(
        self, name: str, keys: list[bytes], parent: bytes | None, session: int, tenant: str = ""
    ) -> list[int]:
        ns = self.namespace(name, tenant)
        st = self._session(session)
        mine = st.reserved.setdefault(scoped(tenant, name), set())
        out: list[int] = []
        prev = parent
        room = _Room(self, ns)
        for key in keys:
            if key in ns.entries:
                out.append(-1)
                self.counters.reserve_refused_present += 1
            elif (
                self.max_session_bytes is not None
                and st.reserved_bytes + ns.block_bytes > self.max_session_bytes
            ):
                out.append(-1)
                self.counters.reserve_refused_quota += 1
            else:
                slot = room.take()
                if slot is None:
                    out.append(-1)
                    self.counters.reserve_refused_full += 1
                else:
                    # Link to the parent only if it is resident: its child count must match
                    # exactly the entries that will decrement it when they go.
                    pe = ns.entries.get(prev) if prev is not None else None
                    if pe is not None:
                        pe.children += 1
                    e = Entry(key=key, slot=slot, parent=pe, state=State.RESERVED, owner=session)
                    ns.entries[key] = e
                    arena = self.allocator.arena_of(ns.slots, slot)
                    ns.arena_keys.setdefault(arena, set()).add(key)
                    self._pin(ns, arena, +1)
                    mine.add(key)
                    st.reserved_bytes += ns.block_bytes
                    out.append(slot)
                    self.counters.reserved_blocks += 1
                    self._live["reserved"] += 1
            prev = key
        return out

    def commit(
        self, name: str, keys: Iterable[bytes], abort: Iterable[bytes], session: int, tenant: str = ""
    ) -> int:
        ns = self.namespace(name, tenant)
        st = self._sessions.get(session)
        mine = st.reserved.get(scoped(tenant, name)) if st else None
        done = 0
        if mine:
            for key in keys:
                e = ns.entries.get(key)
                if e is None or e.state is not State.RESERVED or e.owner != session:
                    continue
                e.state = State.COMMITTED
                self._unreserve(st, mine, key, ns.block_bytes)
                if not e.leases:
                    self._pin(ns, self.allocator.arena_of(ns.slots, e.slot), -1)
                self._live["reserved"] -= 1
                self._live["committed"] += 1
                self._tick += 1
                e.tick = self._tick
                self._maybe_candidate(ns, e)
                done += 1
            for key in abort:
                e = ns.entries.get(key)
                if e is not None and e.state is State.RESERVED and e.owner == session:
                    self._drop(ns, key, e)
                    self.counters.aborted_blocks += 1
        self.counters.committed_blocks += done
        self.counters.committed_bytes += done * ns.block_bytes
        return done

    def drop_session(self, session: int) -> tuple[int, int]:
        """Frees a vanished session's leases and reservations; returns (leases, reservations).
        O(what the session held)."""
        st = self._sessions.pop(session, None)
        if st is None:
            return 0, 0
        lease_ids = list(st.leases)
        for lid in lease_ids:
            if (lease := self.leases.get(lid)) is not None:
                self._drop_lease(lid, lease)
        self.counters.leases_lost += len(lease_ids)
        dropped = 0
        for ns_name, keys in st.reserved.items():
            ns = self.namespaces[ns_name]
            for key in list(keys):
                e = ns.entries.get(key)
                if e is not None and e.state is State.RESERVED and e.owner == session:
                    self._drop(ns, key, e)
                    dropped += 1
        return len(lease_ids), dropped

    def session_usage(self, session: int) -> tuple[int, int]:
        """(bytes reserved, bytes leased) by ``session``."""
        st = self._sessions.get(session)
        return (st.reserved_bytes, st.leased_bytes) if st else (0, 0)

    # -- pins, leases, reservations ---------------------------------------------------------------

    def _session(self, session: int) -> _SessionState:
        st = self._sessions.get(session)
        if st is None:
            st = self._sessions[session] = _SessionState()
        return st

    def _unreserve(self, st: _SessionState | None, mine: set[bytes] | None, key: bytes, size: int) -> None:
        if st is not None and mine is not None and key in mine:
            mine.discard(key)
            st.reserved_bytes -= size

    def _pin(self, ns: Namespace, arena: int, delta: int) -> None:
        """Counts a block of ``arena`` becoming pinned (+1) or unpinned (-1)."""
        n = ns.arena_pinned.get(arena, 0) + delta
        ns.arena_pinned[arena] = n
        if n == 0:
            ns.unpinned[arena] = None  # now the newest unpinned arena
        elif delta > 0 and n == 1:
            ns.unpinned.pop(arena, None)

    def _lease(self, ns: Namespace, e: Entry) -> None:
        e.leases += 1
        ns.leased_slots[e.slot] = ns.leased_slots.get(e.slot, 0) + 1
        if e.leases == 1:
            self._live["leased"] += 1
            if e.state is State.COMMITTED:
                self._pin(ns, self.allocator.arena_of(ns.slots, e.slot), +1)

    def _unlease(self, ns: Namespace, e: Entry) -> None:
        e.leases -= 1
        n = ns.leased_slots[e.slot] - 1
        if n:
            ns.leased_slots[e.slot] = n
        else:
            del ns.leased_slots[e.slot]
        if e.leases == 0:
            self._live["leased"] -= 1
            if e.state is State.COMMITTED:
                self._pin(ns, self.allocator.arena_of(ns.slots, e.slot), -1)

    # -- eviction ----------------------------------------------------------------------------------

    def _touch(self, ns: Namespace, keys: list[bytes]) -> None:
        # Parents first: along a chain the tail gets the newest tick.
        for key in keys:
            e = ns.entries[key]
            self._tick += 1
            e.tick = self._tick
            self._maybe_candidate(ns, e)

    def _maybe_candidate(self, ns: Namespace, e: Entry) -> None:
        if e.state is State.COMMITTED and e.children == 0 and e.leases == 0:
            heapq.heappush(ns.heap, (e.tick, e.key))
            if len(ns.heap) > 4 * len(ns.entries) + 1024:
                self._compact(ns)

    def _compact(self, ns: Namespace) -> None:
        # Amortised O(1) per push: runs when the heap holds 4x more items than entries.
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
        e.alive = False  # children still resident (they point here) become roots
        self._live["committed" if e.state is State.COMMITTED else "reserved"] -= 1
        if e.state is State.RESERVED:
            st = self._sessions.get(e.owner)
            self._unreserve(
                st, st.reserved.get(scoped(ns.tenant, ns.name)) if st else None, key, ns.block_bytes
            )
        arena = self.allocator.arena_of(ns.slots, e.slot)
        if e.pinned:
            self._pin(ns, arena, -1)
        if e.leases:
            self._live["leased"] -= 1
            ns.leased_slots.pop(e.slot, None)
        keys = ns.arena_keys[arena]
        keys.discard(key)
        if not keys:  # the arena goes back to the pool with its last block
            del ns.arena_keys[arena]
            ns.arena_pinned.pop(arena, None)
            ns.unpinned.pop(arena, None)
        self.allocator.free(ns.slots, e.slot)
        pe = e.parent
        if pe is not None and pe.alive:
            pe.children -= 1
            self._maybe_candidate(ns, pe)

    def reclaim(self, victim: Namespace) -> bool:
        """Empties ``victim``'s arena that has been without pinned blocks the longest, evicting
        only that arena's blocks; False, at once, when every arena of it holds a pinned block."""
        if not victim.unpinned:
            return False
        arena = next(iter(victim.unpinned))
        for key in list(victim.arena_keys.get(arena, ())):
            e = victim.entries[key]
            self._drop(victim, key, e)
            self.counters.evictions += 1
            self.counters.evicted_bytes += victim.block_bytes
        self.counters.arenas_reclaimed += 1
        return True

    # -- stats ---------------------------------------------------------------------------------------

    def block_counts(self) -> dict[str, int]:
        """Blocks committed, reserved, and leased (a leased block is committed too); O(1)."""
        return dict(self._live)


class _Room:
    """Finds slots for one request's keys in ``ns``, in this order: its free slots or a free
    arena (while its tenant is within quota); an arena of the largest other holder when that
    holds at least two arenas more (shares converge; between tenants their totals count); its
    own least recently used leaf; an arena of any other namespace (of its own tenant only, once
    the tenant is at its quota). Holders are ranked once per request, not once per key."""

    def __init__(self, index: BlockIndex, ns: Namespace) -> None:
        self.index, self.ns = index, ns
        self._others: list[Namespace] | None = None

    def _within_quota(self) -> bool:
        quota = self.index.tenant_arenas
        return quota is None or self.index.allocator.tenant_arenas(self.ns.tenant) < quota

    def _share(self, o: Namespace) -> int:
        """What ``o`` holds, compared with ``ns``: its tenant's arenas if another tenant's."""
        alloc = self.index.allocator
        return len(o.slots.arenas) if o.tenant == self.ns.tenant else alloc.tenant_arenas(o.tenant)

    def _mine(self, o: Namespace) -> int:
        alloc = self.index.allocator
        return (
            len(self.ns.slots.arenas) if o.tenant == self.ns.tenant else alloc.tenant_arenas(self.ns.tenant)
        )

    def _ranked(self) -> list[Namespace]:
        if self._others is None:
            self._others = sorted(
                (o for o in self.index.namespaces.values() if o is not self.ns and o.slots.arenas),
                key=self._share,
                reverse=True,
            )
        return self._others

    def _allocate(self) -> int | None:
        return self.index.allocator.allocate(self.ns.slots, new_arena=self._within_quota())

    def take(self) -> int | None:
        index, ns = self.index, self.ns
        slot = self._allocate()
        if slot is not None:
            return slot
        within = self._within_quota()
        others = [o for o in self._ranked() if within or o.tenant == ns.tenant]
        if others and self._share(others[0]) > self._mine(others[0]) + 1 and index.reclaim(others[0]):
            return self._allocate()
        if index._evict_one(ns):
            return self._allocate()
        for victim in others:
            if index.reclaim(victim):
                return self._allocate()
        return None
