"""The shared-memory pool: a file engines map, carved into arenas and block slots.

The pool is cut into equal *arenas*; an arena is lent to one namespace (layout) at a time and
cut into slots of that namespace's ``block_bytes``. Slots are numbered in units of
``block_bytes`` from the start of the file (``slot * block_bytes`` is the byte offset), so a
client views the whole file as ``[n, block_bytes]`` and gathers many slots in one operation;
the first slot of an arena is aligned up to that unit, wasting under one block per arena.
An arena whose slots are all free goes back to the shared list, so layouts can come and go.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import fcntl
import itertools
import logging
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfabric.connector.pool_files import PoolBuffer, advise, madvise, map_parts, part_path, part_sizes

log = logging.getLogger(__name__)


MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def chunks_of(size: int, chunk: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each ``chunk``-sized piece of ``size`` bytes (the last may be short)."""
    return [(a, min(chunk, size - a)) for a in range(0, size, chunk)]


def interleaved_chunks(part_sizes: list[int], chunk: int) -> list[tuple[int, int]]:
    """The pool cut into ``chunk``-sized pieces on one grid from its start, ``(offset, length)``
    (the grid the GPU copies split their runs on: one CUDA registration per piece), taken
    round-robin across the files the pieces start in: the first pieces pinned are in different
    files, whose first-touch faults run in parallel (one file's serialise), so the first arenas
    become usable soonest."""
    bounds = list(itertools.accumulate(part_sizes))
    per_part: list[list[tuple[int, int]]] = [[] for _ in part_sizes]
    for off, n in chunks_of(sum(part_sizes), chunk):
        per_part[bisect.bisect_right(bounds, off)].append((off, n))
    out: list[tuple[int, int]] = []
    for i in range(max((len(c) for c in per_part), default=0)):
        out += [c[i] for c in per_part if i < len(c)]
    return out


def populate(
    address: int, size: int, threads: int, chunk: int = 1 << 30, stop: threading.Event | None = None
) -> float:
    """Faults every page of ``[address, address + size)`` in (tmpfs allocates and zeroes a page
    at its first touch), one thread per chunk. Through ctypes, so the threads really run in
    parallel: CPython's ``mmap.madvise`` holds the GIL. Returns seconds; raises OSError."""
    chunks = chunks_of(size, chunk)
    started = time.perf_counter()

    def one(c: tuple[int, int]) -> None:
        if stop is not None and stop.is_set():
            return  # the agent is stopping: the mapping is about to go
        try:
            madvise(address + c[0], c[1], MADV_POPULATE_WRITE)
        except OSError as exc:
            raise OSError(exc.errno, f"populating the pool failed: {exc.strerror}") from exc

    with ThreadPoolExecutor(max(1, threads), "kvfabric-populate") as ex:
        list(ex.map(one, chunks))
    return time.perf_counter() - started


def _fallocate(fds: list[int], sizes: list[int], threads: int, chunk: int = 1 << 30) -> None:
    """Reserves every file's bytes, chunks in parallel: on tmpfs reserving means allocating and
    zeroing every page, which one thread does at a few GB/s (on the H200 host, 16 threads made a
    64 GiB agent ready 10 s sooner)."""
    jobs = [(fd, a, n) for fd, size in zip(fds, sizes, strict=True) for a, n in chunks_of(size, chunk)]
    with ThreadPoolExecutor(max(1, min(threads, len(jobs))), "kvfabric-fallocate") as ex:
        list(ex.map(lambda j: os.posix_fallocate(*j), jobs))


def address_of(buffer: PoolBuffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class PoolError(RuntimeError):
    """The pool segment could not be created."""


class PoolDoesNotFit(PoolError):
    """Not enough free space for the pool now (e.g. engines still map a dead agent's pool)."""


class Segment:
    """The pool's backing files, reserved up front so an undersized tmpfs fails now, not later."""

    def __init__(
        self,
        path: Path,
        size: int,
        huge_pages: bool = False,
        threads: int = 16,
        reserve: bool = True,
        parts: int = 1,
    ) -> None:
        """``reserve``: allocate every page now (fallocate). An agent that pins the pool right
        away passes False: pinning touches every page anyway, and on tmpfs the first touch is
        what costs (allocating and zeroing), so reserving first would pay for it in a step
        that cannot overlap the registration.

        ``parts``: files to keep the pool in (``path``, ``path.1``, ...), mapped back to back
        (:mod:`kvfabric.connector.pool_files`): faults into one tmpfs file do not run in
        parallel, faults into several do."""
        self.path = path
        self.size = size
        self.sizes = part_sizes(size, parts)
        self.paths = [part_path(path, i) for i in range(len(self.sizes))]
        self.pool_id = uuid.uuid4().hex
        self.prefaulted_bytes = 0
        #: set when the agent stops: background populating and pinning end at their next chunk,
        #: before the mapping is unmapped under them
        self.stopping = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._refuse_if_in_use(path)
        # stale segment of a crashed agent (a live one holds its lock), in as many parts as it had
        for stale in [path, *path.parent.glob(f"{path.name}.[0-9]*")]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        # Checked before fallocate: on tmpfs an oversized fallocate fills RAM before it fails.
        fs = os.statvfs(path.parent)
        if size > fs.f_bavail * fs.f_frsize:
            raise PoolDoesNotFit(
                f"pool of {size} bytes does not fit in {path.parent} "
                f"({fs.f_bavail * fs.f_frsize} bytes free); lower --pool-size or grow the filesystem"
            )
        fds: list[int] = []
        try:
            for part, part_size in zip(self.paths, self.sizes, strict=True):
                fds.append(os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660))
                os.fchmod(fds[-1], 0o660)  # not the umask's choice: group-member engines open it O_RDWR
                os.ftruncate(fds[-1], part_size)
            fcntl.flock(fds[0], fcntl.LOCK_SH | fcntl.LOCK_NB)  # held while the agent lives
            try:
                if reserve:
                    _fallocate(fds, self.sizes, threads)
            except OSError as exc:
                raise PoolError(
                    f"cannot reserve {size} bytes for the pool at {path}: {exc.strerror} "
                    f"(is the filesystem large enough? lower --pool-size)"
                ) from exc
            if len(fds) == 1:
                self.map: PoolBuffer = mmap.mmap(
                    fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
            else:
                self.map = map_parts(fds, self.sizes, writable=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for part in self.paths:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            raise
        for fd in fds[1:]:
            os.close(fd)
        self._lock_fd = fds[0]  # kept open: its shared lock marks the pool as in use
        if huge_pages:
            try:
                advise(self.map, 0, size, mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError) as exc:
                log.warning("huge pages refused for the pool", extra={"reason": str(exc)})

    @staticmethod
    def _refuse_if_in_use(path: Path) -> None:
        """A pool file another live agent holds (its lock) is never replaced."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PoolError(f"the pool file {path} is held by another running agent") from None
        finally:
            os.close(fd)

    def prefault(self, threads: int = 4) -> None:
        """Populates every page in the background, so engines' first saves into the pool run at
        copy speed. Best effort: an old kernel without MADV_POPULATE_WRITE faults lazily."""
        try:
            populate(address_of(self.map), self.size, threads, chunk=256 << 20, stop=self.stopping)
            self.prefaulted_bytes = self.size
        except (OSError, ValueError) as exc:
            log.info("pool not prefaulted", extra={"reason": str(exc)})

    def close(self) -> None:
        """Unmaps and removes the segment (engines that still map it keep their pages; a
        several-file range goes when the last view of it does)."""
        if isinstance(self.map, mmap.mmap):
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
        for part in self.paths:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


@dataclass(slots=True)
class _Arena:
    index: int
    first_slot: int
    n_slots: int
    used: int = 0
    #: slots below ``first_slot + fresh`` have been handed out before; ``free`` holds those
    #: returned since (the arena is never materialised as a list of every slot).
    fresh: int = 0
    free: list[int] = field(default_factory=list)
    #: the block index's per-slot columns for this arena (its owner's; dropped with the arena)
    cols: Any = None

    def take(self) -> int:
        self.used += 1
        if self.free:
            return self.free.pop()
        self.fresh += 1
        return self.first_slot + self.fresh - 1

    @property
    def has_free(self) -> bool:
        return self.used < self.n_slots


@dataclass
class NamespaceSlots:
    """Slots of one namespace: the arenas it holds, and which of them have free slots."""

    block_bytes: int
    tenant: str = ""
    arenas: dict[int, _Arena] = field(default_factory=dict)
    #: arenas with a free slot, lowest index first when taken in order (an ordered set)
    partial: dict[int, None] = field(default_factory=dict)
    used: int = 0

    @property
    def has_free(self) -> bool:
        return bool(self.partial)


class SlotAllocator:
    """Arena-and-slot bookkeeping; touches no memory. Every operation is O(1) (taking an arena
    does not list its slots; returning one does not scan free lists)."""

    def __init__(self, pool_bytes: int, arena_bytes: int, usable: bool = True) -> None:
        """``usable=False``: no arena is lent until ``make_usable`` says its bytes are ready (a
        CUDA pool serves while it is still being pinned, from the arenas pinned so far)."""
        if arena_bytes > pool_bytes:
            arena_bytes = pool_bytes
        self.pool_bytes = pool_bytes
        self.arena_bytes = arena_bytes
        self.n_arenas = pool_bytes // arena_bytes
        # Lowest-numbered arenas first keeps use compact and predictable in tests.
        self._free_arenas = list(range(self.n_arenas - 1, -1, -1)) if usable else []
        #: arenas whose bytes are not usable yet, and the usable byte ranges so far (merged)
        self._pending: set[int] = set() if usable else set(range(self.n_arenas))
        self._usable_ranges: list[tuple[int, int]] = []
        self.namespaces: dict[str, NamespaceSlots] = {}
        self._tenant_arenas: dict[str, int] = {}
        self._used_bytes = 0
        #: called with (tenant, arena index) when an arena leaves a tenant (its bytes may be
        #: dropped: with isolated tenancy each tenant's pool file punches the arena out)
        self.on_arena_returned: Callable[[str, int], None] | None = None

    def add_namespace(self, namespace: str, block_bytes: int, tenant: str = "") -> NamespaceSlots:
        existing = self.namespaces.get(namespace)
        if existing is not None:
            if existing.block_bytes != block_bytes:
                raise ValueError(
                    f"namespace {namespace} is registered with block_bytes="
                    f"{existing.block_bytes}, not {block_bytes}"
                )
            return existing
        if block_bytes > self.arena_bytes:
            raise ValueError(
                f"block_bytes={block_bytes} exceeds the arena size {self.arena_bytes}; "
                "raise the agent's --arena-size"
            )
        ns = NamespaceSlots(block_bytes=block_bytes, tenant=tenant)
        self.namespaces[namespace] = ns
        return ns

    def make_usable(self, start: int, end: int) -> int:
        """Pool bytes ``[start, end)`` are ready (pinned): every arena now wholly inside ready
        bytes joins the free list. Returns how many joined."""
        if not self._pending:
            return 0
        ranges = sorted([*self._usable_ranges, (start, end)])
        merged = [ranges[0]]
        for a, b in ranges[1:]:
            if a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._usable_ranges = merged
        ab = self.arena_bytes
        first, last = start // ab, min(self.n_arenas, -(-end // ab))
        joined = [
            i
            for i in range(first, last)
            if i in self._pending and any(a <= i * ab and (i + 1) * ab <= b for a, b in merged)
        ]
        return self._join(joined)

    def make_all_usable(self) -> int:
        """Every arena is usable (pinning ended or failed before any GPU engine could use it)."""
        return self._join(sorted(self._pending))

    def _join(self, arenas: list[int]) -> int:
        self._pending.difference_update(arenas)
        self._free_arenas.extend(arenas)
        self._free_arenas.sort(reverse=True)  # lowest first, as at the start
        if not self._pending:
            self._usable_ranges = []
        return len(arenas)

    @property
    def usable_arenas(self) -> int:
        return self.n_arenas - len(self._pending)

    @property
    def free_arenas(self) -> int:
        return len(self._free_arenas)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def tenant_arenas(self, tenant: str) -> int:
        return self._tenant_arenas.get(tenant, 0)

    def allocate(self, ns: NamespaceSlots, new_arena: bool = True) -> int | None:
        """A free slot for ``ns``, taking a new arena if needed and allowed; None when none."""
        if not ns.partial and not (new_arena and self._take_arena(ns)):
            return None
        index = next(iter(ns.partial))
        arena = ns.arenas[index]
        slot = arena.take()
        if not arena.has_free:
            del ns.partial[index]
        ns.used += 1
        self._used_bytes += ns.block_bytes
        return slot

    def free(self, ns: NamespaceSlots, slot: int) -> None:
        arena = ns.arenas[self.arena_of(ns, slot)]
        arena.used -= 1
        ns.used -= 1
        self._used_bytes -= ns.block_bytes
        arena.free.append(slot)
        ns.partial[arena.index] = None
        if arena.used == 0:
            self._return_arena(ns, arena)

    def free_arena(self, ns: NamespaceSlots, index: int) -> None:
        """Frees every slot of one of ``ns``'s arenas at once and returns it to the pool."""
        arena = ns.arenas[index]
        ns.used -= arena.used
        self._used_bytes -= arena.used * ns.block_bytes
        arena.used = 0
        self._return_arena(ns, arena)

    def arena_of(self, ns: NamespaceSlots, slot: int) -> int:
        return (slot * ns.block_bytes) // self.arena_bytes

    def _take_arena(self, ns: NamespaceSlots) -> bool:
        while self._free_arenas:
            index = self._free_arenas.pop()
            start = index * self.arena_bytes
            first = -(-start // ns.block_bytes)
            end = (start + self.arena_bytes) // ns.block_bytes
            if end <= first:
                self._free_arenas.insert(0, index)
                return False
            ns.arenas[index] = _Arena(index=index, first_slot=first, n_slots=end - first)
            ns.partial[index] = None
            self._tenant_arenas[ns.tenant] = self._tenant_arenas.get(ns.tenant, 0) + 1
            return True
        return False

    def _return_arena(self, ns: NamespaceSlots, arena: _Arena) -> None:
        del ns.arenas[arena.index]
        ns.partial.pop(arena.index, None)
        self._tenant_arenas[ns.tenant] -= 1
        self._free_arenas.append(arena.index)
        if self.on_arena_returned is not None:
            self.on_arena_returned(ns.tenant, arena.index)
