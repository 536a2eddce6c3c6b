"""A pool kept in several files, mapped back to back as one address range.

One tmpfs file serialises its page faults (its page cache and accounting are per file): on the
H200 host, faulting 64 GiB of one file in took 15.5 s with 16 threads, of 16 files 5.3 s
(``benchmarks/RESULTS.md``). A pinning agent therefore keeps a large pool in ``parts`` files of
equal size (the last may be shorter), ``<pool>``, ``<pool>.1``, ... and maps them into one
reserved range, so the agent, its CUDA registration and every engine still see one contiguous
pool: slot ``s`` lies at byte ``s * block_bytes`` of the range whatever file holds it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

#: Parts are multiples of this (a huge page), so no mapping boundary splits one.
PART_ALIGN = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # PROT_NONE is 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def part_sizes(total: int, parts: int) -> list[int]:
    """Sizes of the ``parts`` files of a ``total``-byte pool (fewer parts when it is small)."""
    if parts <= 1:
        return [total]
    each = max(PART_ALIGN, -(-total // parts // PART_ALIGN) * PART_ALIGN)
    sizes = [each] * (total // each)
    if total % each:
        sizes.append(total % each)
    return sizes


def part_path(path: Path, i: int) -> Path:
    return path if i == 0 else path.with_name(f"{path.name}.{i}")


def _check(address: int | None, what: str) -> int:
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return address


class _Range:
    """Unmaps the range when the last buffer over it is gone (views keep their buffer alive)."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size

    def __del__(self) -> None:
        _libc.munmap(self.address, self.size)


def map_parts(fds: list[int], sizes: list[int], writable: bool) -> memoryview:
    """One writable-or-not shared mapping of the files ``fds`` (of ``sizes``) back to back, as a
    byte memoryview (numpy and torch read it in place; read-only unless ``writable``). The range
    stays mapped while it or any view of it lives; the fds may be closed once this returns."""
    total = sum(sizes)
    # Reserve the whole range first (no memory behind it), then map each file over its place.
    base = _check(
        _libc.mmap(None, total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0),
        "reserving the pool's address range",
    )
    owner = _Range(base, total)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    offset = 0
    for fd, size in zip(fds, sizes, strict=True):
        got = _check(
            _libc.mmap(base + offset, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0), "mapping a pool file"
        )
        assert got == base + offset
        offset += size
    buf = (ctypes.c_ubyte * total).from_address(base)
    buf._kvfabric_range = owner  # type: ignore[attr-defined]  # the buffer owns the mapping
    view = memoryview(buf).cast("B")  # ctypes says "<B", which memoryview cannot assign to
    return view if writable else view.toreadonly()


#: What holds a pool's bytes: one file's mmap, or the range of several (:func:`map_parts`).
PoolBuffer = mmap.mmap | memoryview


def pool_sizes(total: int, parts: int) -> list[int]:
    """Sizes of the files an agent said its ``total``-byte pool is kept in (``parts`` of them);
    ValueError if that many cannot hold it."""
    if parts <= 1:
        return [total]
    sizes = part_sizes(total, parts)
    if len(sizes) != parts:
        raise ValueError(f"{parts} pool files cannot hold {total} bytes")
    return sizes


def map_pool(path: Path, total: int, parts: int, writable: bool) -> PoolBuffer:
    """A pool of ``total`` bytes in ``parts`` files from ``path`` (:func:`part_path`), mapped
    shared as one range. Raises OSError, or ValueError (see :func:`pool_sizes`)."""
    sizes = pool_sizes(total, parts)
    flags = os.O_RDWR if writable else os.O_RDONLY
    fds: list[int] = []
    try:
        for i in range(len(sizes)):
            fds.append(os.open(part_path(path, i), flags))
        if len(fds) == 1:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(fds[0], total, mmap.MAP_SHARED, prot)
        return map_parts(fds, sizes, writable)
    finally:
        for fd in fds:
            os.close(fd)


def madvise(address: int, length: int, advice: int) -> None:
    """``madvise`` through ctypes, so the GIL is free meanwhile (CPython's ``mmap.madvise``
    holds it: threads populating a pool would run one at a time). Raises OSError."""
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def advise(buf: PoolBuffer, start: int, length: int, advice: int) -> None:
    """:func:`madvise` on ``[start, start + length)`` of a writable pool buffer (either kind)."""
    madvise(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + start, length, advice)
