"""File operations the standard library lacks: punching holes (freeing a range's blocks) and
opening for direct I/O with a buffered fallback."""

from __future__ import annotations

import ctypes
import errno
import functools
import os

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
#: Direct I/O needs offsets, lengths and buffers aligned to the device's logical block; 4 KiB
#: covers every NVMe and most filesystems.
ALIGN = 4096


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    return libc


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Frees the blocks of ``[offset, offset + length)`` (reads then return zeros); the file keeps
    its size. Raises OSError where the filesystem cannot."""
    if _libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def open_direct(path: str, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """(fd, direct): opened with O_DIRECT where the filesystem allows it (not tmpfs or some
    overlays, which refuse it with EINVAL), else buffered."""
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC, mode), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags | os.O_CLOEXEC, mode), False
