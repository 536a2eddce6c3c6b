"""The shared-memory pool: a file engines map, carved into arenas and block slots.

The pool is cut into equal *arenas*; an arena is lent to one namespace (layout) at a time and
cut into slots of that namespace's ``block_bytes``. Slots are numbered in units of
``block_bytes`` from the start of the file (``slot * block_bytes`` is the byte offset), so a
client views the whole file as ``[n, block_bytes]`` and gathers many slots in one operation;
the first slot of an arena is aligned up to that unit, wasting under one block per arena.
An arena whose slots are all free goes back to the shared list, so layouts can come and go.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def chunks_of(size: int, chunk: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each ``chunk``-sized piece of ``size`` bytes (the last may be short)."""
    return [(a, min(chunk, size - a)) for a in range(0, size, chunk)]


def populate(address: int, size: int, threads: int, chunk: int = 1 << 30) -> float:
    """Faults every page of ``[address, address + size)`` in (tmpfs allocates and zeroes a page
    at its first touch), one thread per chunk. Through ctypes, so the threads really run in
    parallel: CPython's ``mmap.madvise`` holds the GIL. Returns seconds; raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    chunks = chunks_of(size, chunk)
    started = time.perf_counter()

    def one(c: tuple[int, int]) -> None:
        if libc.madvise(address + c[0], c[1], MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"populating the pool failed: {os.strerror(err)}")

    with ThreadPoolExecutor(max(1, threads), "kvfabric-populate") as ex:
        list(ex.map(one, chunks))
    return time.perf_counter() - started


def _fallocate(fd: int, size: int, threads: int, chunk: int = 1 << 30) -> None:
    """Reserves ``size`` bytes, chunks in parallel: on tmpfs reserving means allocating and
    zeroing every page, which one thread does at a few GB/s (on the H200 host, 16 threads made a
    64 GiB agent ready 10 s sooner)."""
    chunks = chunks_of(size, chunk)
    with ThreadPoolExecutor(max(1, min(threads, len(chunks))), "kvfabric-fallocate") as ex:
        list(ex.map(lambda c: os.posix_fallocate(fd, c[0], c[1]), chunks))


def address_of(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class PoolError(RuntimeError):
    """The pool segment could not be created."""


class Segment:
    """The pool's backing file, reserved up front so an undersized tmpfs fails now, not later."""

    def __init__(
        self, path: Path, size: int, huge_pages: bool = False, threads: int = 16, reserve: bool = True
    ) -> None:
        """``reserve``: allocate every page now (fallocate). An agent that pins the pool right
        away passes False: pinning touches every page anyway, and on tmpfs the first touch is
        what costs (allocating and zeroing), so reserving first would pay for it in a step
        that cannot overlap the registration."""
        self.path = path
        self.size = size
        self.pool_id = uuid.uuid4().hex
        self.prefaulted_bytes = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale segment of a crashed agent (a live one is ruled out by the socket)
        # Checked before fallocate: on tmpfs an oversized fallocate fills RAM before it fails.
        fs = os.statvfs(path.parent)
        if size > fs.f_bavail * fs.f_frsize:
            raise PoolError(
                f"pool of {size} bytes does not fit in {path.parent} "
                f"({fs.f_bavail * fs.f_frsize} bytes free); lower --pool-size or grow the filesystem"
            )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o660)
        try:
            os.ftruncate(fd, size)
            try:
                if reserve:
                    _fallocate(fd, size, threads)
            except OSError as exc:
                raise PoolError(
                    f"cannot reserve {size} bytes for the pool at {path}: {exc.strerror} "
                    f"(is the filesystem large enough? lower --pool-size)"
                ) from exc
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        os.close(fd)
        if huge_pages:
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError) as exc:
                log.warning("huge pages refused for the pool", extra={"reason": str(exc)})

    def prefault(self, threads: int = 4) -> None:
        """Populates every page in the background, so engines' first saves into the pool run at
        copy speed. Best effort: an old kernel without MADV_POPULATE_WRITE faults lazily."""
        try:
            populate(address_of(self.map), self.size, threads, chunk=256 << 20)
            self.prefaulted_bytes = self.size
        except (OSError, ValueError) as exc:
            log.info("pool not prefaulted", extra={"reason": str(exc)})

    def close(self) -> None:
        """Unmaps and removes the segment (engines that still map it keep their pages)."""
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class _Arena:
    index: int
    first_slot: int
    n_slots: int
    used: int = 0


@dataclass
class NamespaceSlots:
    """Slots of one namespace: the arenas it holds and its free slots."""

    block_bytes: int
    arenas: dict[int, _Arena] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    used: int = 0


class SlotAllocator:
    """Arena-and-slot bookkeeping; touches no memory."""

    def __init__(self, pool_bytes: int, arena_bytes: int) -> None:
        if arena_bytes > pool_bytes:
            arena_bytes = pool_bytes
        self.pool_bytes = pool_bytes
        self.arena_bytes = arena_bytes
        self.n_arenas = pool_bytes // arena_bytes
        # Lowest-numbered arenas first keeps use compact and predictable in tests.
        self._free_arenas = list(range(self.n_arenas - 1, -1, -1))
        self.namespaces: dict[str, NamespaceSlots] = {}

    def add_namespace(self, namespace: str, block_bytes: int) -> NamespaceSlots:
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
        ns = NamespaceSlots(block_bytes=block_bytes)
        self.namespaces[namespace] = ns
        return ns

    @property
    def free_arenas(self) -> int:
        return len(self._free_arenas)

    @property
    def used_bytes(self) -> int:
        return sum(ns.used * ns.block_bytes for ns in self.namespaces.values())

    def allocate(self, ns: NamespaceSlots) -> int | None:
        """A free slot for ``ns``, taking a new arena if needed; None when the pool is full."""
        if not ns.free and not self._take_arena(ns):
            return None
        slot = ns.free.pop()
        ns.arenas[self._arena_of(ns, slot)].used += 1
        ns.used += 1
        return slot

    def free(self, ns: NamespaceSlots, slot: int) -> None:
        arena = ns.arenas[self._arena_of(ns, slot)]
        arena.used -= 1
        ns.used -= 1
        ns.free.append(slot)
        if arena.used == 0:
            self._return_arena(ns, arena)

    def _arena_of(self, ns: NamespaceSlots, slot: int) -> int:
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
            # Reversed so pop() hands out ascending slots: contiguous runs for coalesced copies.
            ns.free.extend(range(end - 1, first - 1, -1))
            return True
        return False

    def _return_arena(self, ns: NamespaceSlots, arena: _Arena) -> None:
        lo, hi = arena.first_slot, arena.first_slot + arena.n_slots
        ns.free = [s for s in ns.free if not lo <= s < hi]
        del ns.arenas[arena.index]
        self._free_arenas.append(arena.index)
