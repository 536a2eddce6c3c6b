"""Block index: which keys live in which slots, leases, reservations and eviction.

A saved block goes RESERVED (slot handed to one session, invisible to lookups) then COMMITTED
(visible). Eviction is prefix-aware LRU: only *leaves* — committed blocks with no resident
children and no lease — are candidates, the least recently used first, so a chain is trimmed
from its tail and a parent never goes before its children.

Tenants: every namespace and lease belongs to one tenant and is invisible to the others (the
same namespace digest in two tenants is two namespaces). Tenant ``""`` is the shared domain.

Compact storage (a 500 GiB pool of 64 KiB blocks is 8M blocks): no Python object per block.
A block's state lives in array columns of the arena that holds its slot (:class:`_Cols`: about
50 bytes per slot), and a namespace finds a key's slot through an open-addressing table of slot
numbers (:class:`KeyTable`: about 16 bytes per block), whose keys are read back from the columns.
Nothing per block is tracked by Python's garbage collector.

Cost discipline (everything runs inline on the agent's event loop): every operation costs
O(its own keys), O(the session's own state) or O(one arena), never O(pool). Giving an arena to
another namespace evicts only that arena's blocks: children elsewhere become roots (unreachable
until their parent is saved again, and evicted by LRU like any leaf). Each namespace keeps, per
arena, how many of its blocks are *pinned* (reserved or leased), and in order the arenas with
none pinned, so finding an arena to empty is O(1). The key table grows one partition at a time
(a few thousand entries), never the whole namespace at once.

Everything here runs on the agent's event loop thread: no locks.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from kvfabric.agent.pool import NamespaceSlots, SlotAllocator


class State(Enum):
    EMPTY = 0
    RESERVED = 1
    COMMITTED = 2


_EMPTY, _RESERVED, _COMMITTED = 0, 1, 2
KEY_BYTES = 16
_GEN_MASK = 0x7FFFFFFF  # generations fit the int32 columns


def normalize_key(key: bytes) -> bytes:
    """Keys are stored in 16 bytes: the connector's keys already are; longer or shorter ones
    (the protocol accepts 1-64 bytes) are replaced by their BLAKE2b-128 digest."""
    return key if len(key) == KEY_BYTES else hashlib.blake2b(key, digest_size=KEY_BYTES).digest()


class _Cols:
    """Per-slot state of one arena of one namespace, indexed by ``slot - first``, packed into
    four buffers (a Python object costs about 100 bytes: per field it would be a few per slot):

    - ``meta`` (int32 x 6): owner session, resident children, leases, the parent's slot (-1: a
      root), the parent's generation when linked, this occupant's generation;
    - ``tick`` (int64): last use;
    - ``flags`` (2 bytes): state, and whether an eviction candidate item is queued for it;
    - ``keys`` (16 bytes): the block's key.
    """

    __slots__ = ("first", "flags", "keys", "meta", "tick")

    def __init__(self, first: int, n: int) -> None:
        self.first = first
        self.meta = array("i", [0, 0, 0, -1, 0, 0]) * n
        self.tick = array("q", bytes(8 * n))
        self.flags = bytearray(2 * n)
        self.keys = bytearray(KEY_BYTES * n)

    def states(self) -> bytes:
        return bytes(self.flags[0::2])


class KeyTable:
    """Key -> slot, open addressing with linear probing over ``array('q')`` partitions. Only
    slot numbers are stored; a probe compares the key read back from the slot's columns
    (``key_at``). Positions come from Python's per-process salted hash of the key, so no client
    can craft keys that collide in the table. Each partition grows alone: at most a few thousand
    entries are moved at once."""

    _FREE, _GONE = -1, -2

    def __init__(self, max_entries: int) -> None:
        n = 1
        while n * 4096 < max_entries:
            n *= 2
        self._parts = [array("q", [self._FREE]) * 8 for _ in range(n)]
        self._count = [0] * n
        self._used = [0] * n  # live + tombstones
        self._mask = n - 1

    def _part(self, key: bytes) -> tuple[int, int]:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        return h & self._mask, h >> 20

    def _probe(self, key: bytes, key_at: object) -> tuple[array[int], int]:
        """(partition, position) holding ``key``, or of the free position ending its probe."""
        p, h = self._part(key)
        part = self._parts[p]
        mask = len(part) - 1
        i = h & mask
        while True:
            slot = part[i]
            if slot == self._FREE or (slot >= 0 and key_at(slot) == key):  # type: ignore[operator]
                return part, i
            i = (i + 1) & mask

    def find(self, key: bytes, key_at: object) -> int:
        part, i = self._probe(key, key_at)
        return part[i]  # FREE (-1) when absent

    def bucket(self, key: bytes) -> tuple[array[int], int, int]:
        """The partition ``key`` hashes to, the position its probe starts at, and the mask: for
        a batch lookup that compares keys inline (no function call per probe step)."""
        h = hash(key) & 0xFFFFFFFFFFFFFFFF  # as _part, inlined
        part = self._parts[h & self._mask]
        mask = len(part) - 1
        return part, (h >> 20) & mask, mask

    def insert(self, key: bytes, slot: int, key_at: object) -> None:
        """Adds a key known to be absent."""
        p, h = self._part(key)
        if (self._used[p] + 1) * 10 > len(self._parts[p]) * 7:
            self._rehash(p, key_at)
        part = self._parts[p]
        mask = len(part) - 1
        i = h & mask
        while part[i] >= 0:
            i = (i + 1) & mask
        if part[i] == self._FREE:
            self._used[p] += 1
        part[i] = slot
        self._count[p] += 1

    def remove_slot(self, key: bytes, slot: int) -> None:
        """Removes ``key``, known to be in ``slot`` (compares slot numbers, not keys)."""
        p, h = self._part(key)
        part = self._parts[p]
        mask = len(part) - 1
        i = h & mask
        while part[i] != slot:
            if part[i] == self._FREE:
                return
            i = (i + 1) & mask
        part[i] = self._GONE
        self._count[p] -= 1

    def remove(self, key: bytes, key_at: object) -> None:
        part, i = self._probe(key, key_at)
        if part[i] >= 0:
            part[i] = self._GONE
            self._count[self._part(key)[0]] -= 1

    def _rehash(self, p: int, key_at: object) -> None:
        old = self._parts[p]
        live = self._count[p]
        size = len(old)
        while (live + 1) * 10 > size * 7 // 2:  # after it: at most 35% full
            size *= 2
        while size > 8 and live * 10 < size * 7 // 4:  # shrink a partition emptied by deletes
            size //= 2
        new = array("q", [self._FREE]) * size
        mask = size - 1
        for slot in old:
            if slot >= 0:
                i = self._part(key_at(slot))[1] & mask  # type: ignore[operator]
                while new[i] != self._FREE:
                    i = (i + 1) & mask
                new[i] = slot
        self._parts[p] = new
        self._used[p] = live


@dataclass
class Namespace:
    name: str  # as the tenant named it
    tenant: str
    block_tokens: int
    slots: NamespaceSlots
    table: KeyTable
    arena_bytes: int
    description: str = ""
    #: the served model name routers know it by, and its TP rank 0's namespace (``routing``)
    model: str = ""
    group: str = ""
    #: its slots live in the shared segment GPU engines copy through (else, with isolated
    #: tenancy, in its tenant's own pool file)
    gpu: bool = False
    count: int = 0  # resident blocks
    #: eviction candidates: (tick, slot, generation); stale items are skipped on pop
    heap: list[tuple[int, int, int]] = field(default_factory=list)
    #: arena index -> how many of its blocks are pinned (reserved or leased)
    arena_pinned: dict[int, int] = field(default_factory=dict)
    #: arenas holding blocks none of which is pinned, oldest first (an ordered set).
    unpinned: dict[int, None] = field(default_factory=dict)
    next_gen: int = 0

    @property
    def block_bytes(self) -> int:
        return self.slots.block_bytes

    def arena_index(self, slot: int) -> int:
        return (slot * self.slots.block_bytes) // self.arena_bytes

    def cols(self, slot: int) -> tuple[_Cols, int]:
        """The columns holding ``slot`` and its index there (its arena must be this namespace's)."""
        arena = self.slots.arenas[(slot * self.slots.block_bytes) // self.arena_bytes]
        c = arena.cols
        if c is None:
            c = arena.cols = _Cols(arena.first_slot, arena.n_slots)
        return c, slot - c.first

    def cols_if_held(self, slot: int) -> tuple[_Cols, int] | None:
        """Like :meth:`cols`, or None when the slot's arena is no longer this namespace's."""
        arena = self.slots.arenas.get((slot * self.slots.block_bytes) // self.arena_bytes)
        if (
            arena is None
            or arena.cols is None
            or not arena.first_slot <= slot < arena.first_slot + arena.n_slots
        ):
            return None
        return arena.cols, slot - arena.first_slot

    def held_cols(self, slots: Iterable[int]) -> Iterator[tuple[int, _Cols | None, int]]:
        """``(slot, columns, index)`` per slot, columns None where :meth:`cols_if_held` would
        say None: one pass over a long run without a call per slot."""
        arenas, bb, ab = self.slots.arenas, self.slots.block_bytes, self.arena_bytes
        for slot in slots:
            arena = arenas.get((slot * bb) // ab)
            if arena is None or arena.cols is None or not 0 <= slot - arena.first_slot < arena.n_slots:
                yield slot, None, 0
            else:
                yield slot, arena.cols, slot - arena.first_slot

    def key_at(self, slot: int) -> bytes:
        c, i = self.cols(slot)
        return bytes(c.keys[KEY_BYTES * i : KEY_BYTES * (i + 1)])

    def find(self, key: bytes) -> int:
        """The slot holding ``key`` (normalized), or -1."""
        return self.table.find(key, self.key_at)

    def committed_prefix(self, keys: list[bytes], limit: int) -> tuple[list[int], list[tuple[_Cols, int]]]:
        """Slots of the leading ``keys`` (normalized) committed here, at most ``limit``, with
        their columns. One pass with the probe inlined: a 10k-token prompt's 624 keys are the
        agent's share of a warm TTFT, and per-key calls tripled it."""
        bucket, free = self.table.bucket, KeyTable._FREE
        arenas, bb, ab = self.slots.arenas, self.slots.block_bytes, self.arena_bytes
        slots: list[int] = []
        cols: list[tuple[_Cols, int]] = []
        for key in keys[:limit]:
            part, i, mask = bucket(key)
            while True:
                slot = part[i]
                if slot == free:
                    return slots, cols
                if slot >= 0:
                    c = arenas[(slot * bb) // ab].cols  # a slot in the table has its columns
                    j = slot - c.first
                    if c.keys[KEY_BYTES * j : KEY_BYTES * (j + 1)] == key:
                        break
                i = (i + 1) & mask
            if c.flags[2 * j] != _COMMITTED:
                break
            slots.append(slot)
            cols.append((c, j))
        return slots, cols

    @property
    def entries(self) -> Entries:
        return Entries(self)


class EntryView(NamedTuple):
    """One resident block, read from the columns (for tests, stats and tools)."""

    key: bytes
    slot: int
    state: State
    owner: int
    tick: int
    children: int
    leases: int
    parent: int  # the parent's slot, -1: none (or evicted: see ``parent_alive``)
    parent_alive: bool

    @property
    def pinned(self) -> bool:
        return self.state is State.RESERVED or self.leases > 0


class Entries:
    """A read-only mapping view ``key -> EntryView`` of a namespace's resident blocks."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    def __len__(self) -> int:
        return self.ns.count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.ns.find(normalize_key(key)) >= 0

    def __getitem__(self, key: bytes) -> EntryView:
        slot = self.ns.find(normalize_key(key))
        if slot < 0:
            raise KeyError(key)
        return self._view(slot)

    def _view(self, slot: int) -> EntryView:
        ns = self.ns
        c, i = ns.cols(slot)
        ps = c.meta[6 * i + 3]
        alive = False
        if ps >= 0 and (held := ns.cols_if_held(ps)) is not None:
            pc, pi = held
            alive = pc.flags[2 * pi] != _EMPTY and pc.meta[6 * pi + 5] == c.meta[6 * i + 4]
        return EntryView(
            bytes(c.keys[KEY_BYTES * i : KEY_BYTES * (i + 1)]),
            slot,
            State(c.flags[2 * i]),
            c.meta[6 * i],
            c.tick[i],
            c.meta[6 * i + 1],
            c.meta[6 * i + 2],
            ps,
            alive,
        )

    def slots(self) -> Iterator[int]:
        for arena in self.ns.slots.arenas.values():
            c = arena.cols
            if c is not None:
                for i, st in enumerate(c.states()):
                    if st != _EMPTY:
                        yield c.first + i

    def __iter__(self) -> Iterator[bytes]:
        return (self.ns.key_at(s) for s in self.slots())

    def values(self) -> Iterator[EntryView]:
        return (self._view(s) for s in self.slots())

    def items(self) -> Iterator[tuple[bytes, EntryView]]:
        return ((v.key, v) for v in self.values())


@dataclass
class Lease:
    lease_id: str
    session: int
    tenant: str
    generation: int
    ns: Namespace
    #: the leased blocks: their slots and occupant generations
    slots: array[int]
    gens: array[int]

    @property
    def bytes(self) -> int:
        return len(self.slots) * self.ns.block_bytes


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
    #: namespace (scoped) -> slots this session holds reserved
    reserved: dict[str, set[int]] = field(default_factory=dict)
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
        many leased, at once; ``max_namespaces``: per tenant; ``tenant_arenas``: most arenas one
        tenant holds (its quota; None: the whole pool)."""
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
        #: each called with (namespace, slot, key, session) for each block a commit makes visible
        #: (the NVMe tier's write-behind, the fabric's publishing)
        self.commit_listeners: list[Callable[[Namespace, int, bytes, int], None]] = []
        #: each called with (namespace, key) for each committed block that leaves the pool
        self.drop_listeners: list[Callable[[Namespace, bytes], None]] = []

    # -- namespaces ------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        block_bytes: int,
        block_tokens: int,
        description: str = "",
        tenant: str = "",
        model: str = "",
        group: str = "",
    ) -> Namespace:
        self.check_layout(name, description, tenant)
        key = scoped(tenant, name)
        ns = self.namespaces.get(key)
        if ns is None and self._tenant_namespaces.get(tenant, 0) >= self.max_namespaces:
            raise QuotaExceeded(f"tenant {tenant!r} already has {self.max_namespaces} namespaces")
        slots = self.allocator.add_namespace(key, block_bytes, tenant)  # raises on a size conflict
        if ns is None:
            ns = Namespace(
                name=name,
                tenant=tenant,
                block_tokens=block_tokens,
                slots=slots,
                table=KeyTable(self.allocator.pool_bytes // block_bytes),
                arena_bytes=self.allocator.arena_bytes,
                description=description,
            )
            self.namespaces[key] = ns
            self._tenant_namespaces[tenant] = self._tenant_namespaces.get(tenant, 0) + 1
        if model and not ns.model:  # the first engine to name it (one digest: the same weights)
            ns.model, ns.group = model, group or name
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
        """Longest run of leading keys committed in every namespace; leases them if asked (one
        lease per entry of ``names``: a namespace listed twice is leased twice, for two readers)."""
        spaces = [self.namespaces.get(scoped(tenant, n)) for n in names]
        found: list[tuple[list[int], list[tuple[_Cols, int]]]] = []
        hits = 0
        if spaces and all(ns is not None for ns in spaces):
            wanted_keys = [normalize_key(k) for k in keys]
            hits = len(wanted_keys)
            for ns in spaces:  # the run committed in every namespace: the shortest one
                assert ns is not None
                found.append(ns.committed_prefix(wanted_keys, hits))
                hits = len(found[-1][0])
            found = [(f[:hits], c[:hits]) for f, c in found]
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
            for i, (ns, lid, (held_slots, held_cols)) in enumerate(zip(spaces, lids, found, strict=True)):
                assert ns is not None
                if (old := self.leases.get(lid)) is not None:
                    self._drop_lease(lid, old)  # a repeated lookup replaces the request's lease
                self._generation += 1
                gens = self._lease_run(ns, held_slots, held_cols)
                slots.append(held_slots)
                self.leases[lid] = Lease(
                    lid, session, tenant, self._generation, ns, array("q", held_slots), gens
                )
                st.leases.add(lid)
                st.leased_bytes += hits * ns.block_bytes
                names_out.append(f"{lease_id}#{i}/{self._generation}")
                self.counters.leases_granted += 1
        n = self.counters
        n.lookups += 1
        n.hit_blocks += hits
        n.miss_blocks += len(keys) - hits
        n.hit_tokens += hits * block_tokens
        n.miss_tokens += (len(keys) - hits) * block_tokens
        if hits:
            for ns, (held_slots, held_cols) in zip(spaces, found, strict=True):
                assert ns is not None
                self._touch(ns, held_slots, held_cols)
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
                n = min(loaded_blocks, len(lease.slots))
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
        bb, ab = ns.slots.block_bytes, ns.arena_bytes
        unpinned: dict[int, int] = {}  # arena -> its blocks this release unpins
        last_leases = 0
        for (slot, c, i), gen in zip(ns.held_cols(lease.slots), lease.gens, strict=True):
            # _unlease inlined, arenas unpinned once each: a release of a long prompt's lease
            # is hundreds of blocks on the agent's loop
            if c is None or c.meta[6 * i + 5] != gen or c.flags[2 * i] == _EMPTY:
                continue
            m = c.meta
            m[6 * i + 2] -= 1
            if m[6 * i + 2] == 0:
                last_leases += 1
                if c.flags[2 * i] == _COMMITTED:
                    a = (slot * bb) // ab
                    unpinned[a] = unpinned.get(a, 0) + 1
                    if m[6 * i + 1] == 0 and not c.flags[2 * i + 1]:
                        self._maybe_candidate(ns, c, i, slot)
        self._live["leased"] -= last_leases
        for index, n in unpinned.items():
            self._pin(ns, index, -n)

    def hold(self, ns: Namespace, slot: int) -> int:
        """Pins a committed block against eviction as a lease does (the agent reads it: a
        write to the NVMe tier); returns its generation, for :meth:`unhold`."""
        c, i = ns.cols(slot)
        self._lease(ns, c, i, slot)
        return c.meta[6 * i + 5]

    def unhold(self, ns: Namespace, slot: int, generation: int) -> None:
        """Ends a :meth:`hold` (a no-op when the block is no longer that occupant)."""
        held = ns.cols_if_held(slot)
        if held is not None and held[0].meta[6 * held[1] + 5] == generation and held[0].flags[2 * held[1]]:
            c, i = held
            self._unlease(ns, c, i, slot)
            self._maybe_candidate(ns, c, i, slot)

    def committed_slot(self, ns: Namespace, key: bytes) -> int:
        """The slot of ``key`` (normalized) when it is committed in ``ns``, else -1."""
        slot = ns.find(key)
        if slot >= 0:
            c, i = ns.cols(slot)
            if c.flags[2 * i] == _COMMITTED:
                return slot
        return -1

    def leased_slots_ok(self, ns: Namespace, slots: Iterable[int]) -> bool:
        """Whether every slot is under a live lease in ``ns`` (a GPU load may read only those)."""
        for _, c, i in ns.held_cols(slots):
            if c is None or c.flags[2 * i] != _COMMITTED or c.meta[6 * i + 2] <= 0:
                return False
        return True

    def reserved_slots_ok(self, ns: Namespace, slots: Iterable[int], session: int) -> bool:
        """Whether every slot is reserved by ``session`` in ``ns`` (a GPU save writes only those)."""
        for _, c, i in ns.held_cols(slots):
            if c is None or c.flags[2 * i] != _RESERVED or c.meta[6 * i] != session:
                return False
        return True

    # -- saves -------------------------------------------------------------------------------------

    def reserve(
        self, name: str, keys: list[bytes], parent: bytes | None, session: int, tenant: str = ""
    ) -> list[int]:
        ns = self.namespace(name, tenant)
        st = self._session(session)
        mine = st.reserved.setdefault(scoped(tenant, name), set())
        out: list[int] = []
        prev = normalize_key(parent) if parent is not None else None
        room = _Room(self, ns)
        for key in keys:
            key = normalize_key(key)
            if ns.find(key) >= 0:
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
                    self._occupy(ns, slot, key, prev, session)
                    mine.add(slot)
                    st.reserved_bytes += ns.block_bytes
                    out.append(slot)
                    self.counters.reserved_blocks += 1
                    self._live["reserved"] += 1
            prev = key
        return out

    def _occupy(self, ns: Namespace, slot: int, key: bytes, parent: bytes | None, session: int) -> None:
        """A new RESERVED block in ``slot``, linked to its parent only if that is resident: the
        parent's child count must match exactly the blocks that will decrement it."""
        c, i = ns.cols(slot)
        ns.next_gen = (ns.next_gen + 1) & _GEN_MASK
        c.meta[6 * i + 5] = ns.next_gen
        c.flags[2 * i] = _RESERVED
        c.meta[6 * i] = session
        c.tick[i] = 0
        c.meta[6 * i + 1] = 0
        c.meta[6 * i + 2] = 0
        c.flags[2 * i + 1] = 0
        c.keys[KEY_BYTES * i : KEY_BYTES * (i + 1)] = key
        c.meta[6 * i + 3] = -1
        ps = ns.find(parent) if parent is not None else -1
        if ps >= 0:
            pc, pi = ns.cols(ps)
            pc.meta[6 * pi + 1] += 1
            c.meta[6 * i + 3] = ps
            c.meta[6 * i + 4] = pc.meta[6 * pi + 5]
        ns.table.insert(key, slot, ns.key_at)
        ns.count += 1
        self._pin(ns, ns.arena_index(slot), +1)

    def commit(
        self, name: str, keys: Iterable[bytes], abort: Iterable[bytes], session: int, tenant: str = ""
    ) -> int:
        ns = self.namespace(name, tenant)
        st = self._sessions.get(session)
        mine = st.reserved.get(scoped(tenant, name)) if st else None
        done = 0
        if st is not None and mine:
            for key in keys:
                slot = ns.find(normalize_key(key))
                if slot < 0 or slot not in mine:
                    continue
                c, i = ns.cols(slot)
                if c.flags[2 * i] != _RESERVED or c.meta[6 * i] != session:
                    continue
                c.flags[2 * i] = _COMMITTED
                mine.discard(slot)
                st.reserved_bytes -= ns.block_bytes
                if not c.meta[6 * i + 2]:
                    self._pin(ns, ns.arena_index(slot), -1)
                self._live["reserved"] -= 1
                self._live["committed"] += 1
                self._tick += 1
                c.tick[i] = self._tick
                self._maybe_candidate(ns, c, i, slot)
                done += 1
                if self.commit_listeners:
                    key = bytes(c.keys[KEY_BYTES * i : KEY_BYTES * (i + 1)])
                    for listener in self.commit_listeners:
                        listener(ns, slot, key, session)
            for key in abort:
                slot = ns.find(normalize_key(key))
                if slot >= 0 and slot in mine:
                    c, i = ns.cols(slot)
                    if c.flags[2 * i] == _RESERVED and c.meta[6 * i] == session:
                        self._drop(ns, slot)
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
        for ns_name, slots in st.reserved.items():
            ns = self.namespaces[ns_name]
            for slot in list(slots):
                held = ns.cols_if_held(slot)
                if (
                    held is not None
                    and held[0].flags[2 * (held[1])] == _RESERVED
                    and held[0].meta[6 * (held[1])] == session
                ):
                    self._drop(ns, slot)
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

    def _pin(self, ns: Namespace, arena: int, delta: int) -> None:
        """Counts ``delta`` blocks of ``arena`` becoming pinned (> 0) or unpinned (< 0)."""
        before = ns.arena_pinned.get(arena, 0)
        n = before + delta
        ns.arena_pinned[arena] = n
        if n == 0:
            ns.unpinned[arena] = None  # now the newest unpinned arena
        elif before == 0:
            ns.unpinned.pop(arena, None)

    def _lease(self, ns: Namespace, c: _Cols, i: int, slot: int) -> None:
        c.meta[6 * i + 2] += 1
        if c.meta[6 * i + 2] == 1:
            self._live["leased"] += 1
            if c.flags[2 * i] == _COMMITTED:
                self._pin(ns, ns.arena_index(slot), +1)

    def _lease_run(self, ns: Namespace, slots: list[int], cols: list[tuple[_Cols, int]]) -> array[int]:
        """:meth:`_lease` over committed blocks at once (their arenas pinned once each);
        returns their occupant generations."""
        gens = array("I")
        first_leases = 0
        arenas: dict[int, int] = {}
        bb, ab = ns.slots.block_bytes, ns.arena_bytes
        for slot, (c, i) in zip(slots, cols, strict=True):
            m = c.meta
            m[6 * i + 2] += 1
            if m[6 * i + 2] == 1:
                first_leases += 1
                a = (slot * bb) // ab
                arenas[a] = arenas.get(a, 0) + 1
            gens.append(m[6 * i + 5])
        self._live["leased"] += first_leases
        for a, n in arenas.items():
            self._pin(ns, a, n)
        return gens

    def _unlease(self, ns: Namespace, c: _Cols, i: int, slot: int) -> None:
        c.meta[6 * i + 2] -= 1
        if c.meta[6 * i + 2] == 0:
            self._live["leased"] -= 1
            if c.flags[2 * i] == _COMMITTED:
                self._pin(ns, ns.arena_index(slot), -1)

    # -- eviction ----------------------------------------------------------------------------------

    def _touch(self, ns: Namespace, slots: list[int], cols: list[tuple[_Cols, int]]) -> None:
        # Parents first: along a chain the tail gets the newest tick. A queued candidate keeps
        # its old tick in the heap and is requeued when popped (one heap item per block).
        tick = self._tick
        for slot, (c, i) in zip(slots, cols, strict=True):
            tick += 1
            c.tick[i] = tick
            if c.meta[6 * i + 2] == 0:  # a leased block is no candidate (_maybe_candidate)
                self._maybe_candidate(ns, c, i, slot)
        self._tick = tick

    def _maybe_candidate(self, ns: Namespace, c: _Cols, i: int, slot: int) -> None:
        if (
            c.flags[2 * i] == _COMMITTED
            and c.meta[6 * i + 1] == 0
            and c.meta[6 * i + 2] == 0
            and not c.flags[2 * i + 1]
        ):
            c.flags[2 * i + 1] = 1
            heapq.heappush(ns.heap, (c.tick[i], slot, c.meta[6 * i + 5]))
            if len(ns.heap) > 4 * ns.count + 1024:
                self._compact(ns)

    def _compact(self, ns: Namespace) -> None:
        # Amortised O(1) per push (items of blocks gone since): at most one per live block.
        keep = []
        for tick, slot, gen in ns.heap:
            held = ns.cols_if_held(slot)
            if (
                held is not None
                and held[0].meta[6 * (held[1]) + 5] == gen
                and held[0].flags[2 * (held[1])] == _COMMITTED
            ):
                keep.append((tick, slot, gen))
        heapq.heapify(keep)
        ns.heap = keep

    def _evict_one(self, ns: Namespace) -> bool:
        heap = ns.heap
        while heap:
            tick, slot, gen = heapq.heappop(heap)
            held = ns.cols_if_held(slot)
            if held is None:
                continue  # its arena went meanwhile
            c, i = held
            if c.meta[6 * i + 5] != gen or c.flags[2 * i] != _COMMITTED:
                continue  # another occupant now
            c.flags[2 * i + 1] = 0
            if c.meta[6 * i + 1] or c.meta[6 * i + 2]:
                continue  # not a leaf now: queued again when it becomes one
            if c.tick[i] != tick:  # used since it was queued: back in line with its new tick
                c.flags[2 * i + 1] = 1
                heapq.heappush(heap, (c.tick[i], slot, gen))
                continue
            self._drop(ns, slot)
            self.counters.evictions += 1
            self.counters.evicted_bytes += ns.block_bytes
            return True
        return False

    def _drop(self, ns: Namespace, slot: int) -> None:
        c, i = ns.cols(slot)
        state = c.flags[2 * i]
        key = bytes(c.keys[KEY_BYTES * i : KEY_BYTES * (i + 1)])
        ns.table.remove(key, ns.key_at)
        if state == _RESERVED:
            self._live["reserved"] -= 1
            st = self._sessions.get(c.meta[6 * i])
            mine = st.reserved.get(scoped(ns.tenant, ns.name)) if st else None
            if st is not None and mine is not None and slot in mine:
                mine.discard(slot)
                st.reserved_bytes -= ns.block_bytes
        else:
            self._live["committed"] -= 1
            for listener in self.drop_listeners:
                listener(ns, key)
        if state == _RESERVED or c.meta[6 * i + 2]:
            self._pin(ns, ns.arena_index(slot), -1)
        if c.meta[6 * i + 2]:
            self._live["leased"] -= 1
        ps, pgen = c.meta[6 * i + 3], c.meta[6 * i + 4]
        c.flags[2 * i] = _EMPTY
        ns.count -= 1
        arena = ns.arena_index(slot)
        if ns.slots.arenas[arena].used == 1:  # its last block: the arena goes back to the pool
            ns.arena_pinned.pop(arena, None)
            ns.unpinned.pop(arena, None)
        self.allocator.free(ns.slots, slot)
        if ps >= 0 and (held := ns.cols_if_held(ps)) is not None:
            pc, pi = held
            if pc.meta[6 * pi + 5] == pgen and pc.flags[2 * pi] != _EMPTY:
                pc.meta[6 * pi + 1] -= 1
                self._maybe_candidate(ns, pc, pi, ps)

    def reclaim(self, victim: Namespace) -> bool:
        """Empties ``victim``'s arena that has been without pinned blocks the longest, evicting
        only that arena's blocks; False, at once, when every arena of it holds a pinned block.

        In bulk (the arena's blocks are all committed and unleased): keys leave the table by
        slot, parents outside the arena lose a child, and the arena goes back whole. Children
        elsewhere keep a link that no longer matches (their parent's generation): roots now."""
        if not victim.unpinned:
            return False
        index = next(iter(victim.unpinned))
        arena = victim.slots.arenas[index]
        c = arena.cols
        first, end = arena.first_slot, arena.first_slot + arena.n_slots
        evicted = 0
        if c is not None:
            table, meta, keys = victim.table, c.meta, c.keys
            listeners = self.drop_listeners
            for i, state in enumerate(c.states()):
                if state == _EMPTY:
                    continue
                key = bytes(keys[KEY_BYTES * i : KEY_BYTES * (i + 1)])
                table.remove_slot(key, first + i)
                for listener in listeners:  # the fabric's index and the KV events forget it too
                    listener(victim, key)
                ps = meta[6 * i + 3]
                if ps >= 0 and not first <= ps < end and (held := victim.cols_if_held(ps)) is not None:
                    pc, pi = held
                    if pc.meta[6 * pi + 5] == meta[6 * i + 4] and pc.flags[2 * pi] != _EMPTY:
                        pc.meta[6 * pi + 1] -= 1
                        self._maybe_candidate(victim, pc, pi, ps)
                evicted += 1
        victim.count -= evicted
        self._live["committed"] -= evicted
        victim.unpinned.pop(index, None)
        victim.arena_pinned.pop(index, None)
        self.allocator.free_arena(victim.slots, index)
        self.counters.evictions += evicted
        self.counters.evicted_bytes += evicted * victim.block_bytes
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
