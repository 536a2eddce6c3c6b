"""The NVMe tier's storage: KV blocks on a local disk that survive agent restarts and host
reboots; a damaged block is detected and never returned.

Layout of the tier directory (one agent owns it, under its flock):

- ``KVFABRIC-TIER``: marker with the format version; a non-empty directory without it is not
  taken (it is someone else's);
- ``tenant-<name>/`` (``shared/`` without tenancy): one directory per tenant, so tenants' blocks
  never share a file;
- ``index.ckpt``: the index as a clean shutdown left it (each slab's size and modification
  time, and its blocks' slots and keys), checksummed. At open a slab whose size and time still
  match is taken from it; any other slab is scanned (one header read per slot). It is removed
  once read, so after a crash every slab is scanned;
- ``<digest>.slab`` in it: one slab per (namespace, block size). A 4 KiB slab header (magic,
  version, tenant, namespace, block size) then fixed-size slots: a 4 KiB block header (magic,
  version, key, payload length, when it was stored, checksum) and the payload padded to 4 KiB.
  The checksum is XXH3-64 over the header (checksum field zero) and the payload.

Slots are written with one aligned ``pwrite`` (``O_DIRECT`` where the filesystem allows it),
read with one ``pread`` and verified (header and payload) before anything is returned. Freed slots are punched
out (their disk blocks returned) and reused. Eviction is least-recently-used across the tier.

Thread-safe: the index is changed under a lock; reads and writes of slots run outside it (a slot
being written is not in the index until its write completed).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from kvfabric.agent.files import ALIGN, align_up, open_direct, punch_hole

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "KVFABRIC-TIER"
SLAB_MAGIC = b"KVFSLAB1"
BLOCK_MAGIC = b"KVFBLK01"
HEADER_BYTES = ALIGN
# magic, version, key length, namespace length, tenant length, payload length, stored_at, checksum
_BLOCK = struct.Struct("<8sHHHHQdQ")
_SLAB = struct.Struct("<8sHHHQQ")  # magic, version, namespace length, tenant length, payload, slot
MAX_NAME = 1024  # namespace names and keys are far shorter; bounds what a header can claim
CHECKPOINT = "index.ckpt"
CHECKPOINT_PART = CHECKPOINT + ".new"
CKPT_MAGIC = b"KVFCKPT1"
_CKPT = struct.Struct("<8sIQQ")  # magic, version, body length, XXH3-64 of the body
_CKPT_SLAB = struct.Struct("<QQI")  # size, mtime_ns, entries
_CKPT_ENTRY = struct.Struct("<IdH")  # slot, stored_at, key length


class TierUnavailable(RuntimeError):
    """The directory cannot hold a tier (not ours, not writable); the agent runs without it."""


@dataclass
class TierCounters:
    stored_blocks: int = 0
    stored_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    damaged_blocks: int = 0
    write_errors: int = 0
    read_errors: int = 0
    foreign_files: int = 0


def encode_header(key: bytes, namespace: str, tenant: str, payload: memoryview, stored_at: float) -> bytes:
    """The 4 KiB block header for ``payload``, checksum included."""
    ns, tn = namespace.encode(), tenant.encode()
    fixed = _BLOCK.pack(BLOCK_MAGIC, FORMAT_VERSION, len(key), len(ns), len(tn), len(payload), stored_at, 0)
    body = fixed + key + ns + tn
    if len(body) > HEADER_BYTES:
        raise ValueError("key and namespace too long for a block header")
    h = xxhash.xxh3_64(body)
    h.update(payload)
    checksum = h.intdigest()
    return (body[: _BLOCK.size - 8] + struct.pack("<Q", checksum) + body[_BLOCK.size :]).ljust(
        HEADER_BYTES, b"\0"
    )


@dataclass(frozen=True)
class BlockHeader:
    key: bytes
    namespace: str
    tenant: str
    payload_bytes: int
    stored_at: float
    checksum: int


def decode_header(raw: bytes | memoryview) -> BlockHeader | None:
    """The header in ``raw`` (at least its first bytes), or None when it is not one of ours."""
    raw = bytes(raw[:HEADER_BYTES])
    if len(raw) < _BLOCK.size:
        return None
    magic, version, klen, nlen, tlen, plen, stored_at, checksum = _BLOCK.unpack_from(raw)
    if magic != BLOCK_MAGIC or version != FORMAT_VERSION or max(klen, nlen, tlen) > MAX_NAME:
        return None
    end = _BLOCK.size + klen + nlen + tlen
    if end > HEADER_BYTES:
        return None
    key = raw[_BLOCK.size : _BLOCK.size + klen]
    try:
        ns = raw[_BLOCK.size + klen : _BLOCK.size + klen + nlen].decode()
        tn = raw[_BLOCK.size + klen + nlen : end].decode()
    except UnicodeDecodeError:
        return None
    return BlockHeader(key, ns, tn, plen, stored_at, checksum)


def verify(head: memoryview, payload: memoryview, header: BlockHeader) -> bool:
    """True when a slot's header bytes and payload are what was written."""
    end = _BLOCK.size + len(header.key) + len(header.namespace.encode()) + len(header.tenant.encode())
    used = bytearray(head[:end])
    used[_BLOCK.size - 8 : _BLOCK.size] = b"\0" * 8
    h = xxhash.xxh3_64(bytes(used))
    h.update(payload[: header.payload_bytes])
    return h.intdigest() == header.checksum


def _direct_ready(view: memoryview) -> bool:
    """A buffer direct I/O can use as it is: writable, page-aligned, whole pages long."""
    if view.readonly or len(view) % ALIGN:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class _Buffers(threading.local):
    """Per-thread aligned buffers (anonymous maps are page-aligned), reused across calls."""

    def __init__(self) -> None:
        self.head = mmap.mmap(-1, HEADER_BYTES)
        self.body = mmap.mmap(-1, ALIGN)

    def body_of(self, n: int) -> memoryview:
        if len(self.body) < n:
            self.body.close()
            self.body = mmap.mmap(-1, align_up(n))
        return memoryview(self.body)[:n]


@dataclass
class _Slab:
    path: Path
    fd: int
    tenant: str
    namespace: str
    payload_bytes: int
    slot_bytes: int
    slots: int = 0  # slots in the file (used or free)
    free: list[int] = field(default_factory=list)

    def offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes


@dataclass(slots=True)  # one per block on disk: millions
class _Entry:
    slab: _Slab
    slot: int
    stored_at: float


class NvmeTier:
    """Blocks of any size, by (tenant, namespace, key), within ``capacity_bytes`` of disk."""

    def __init__(self, directory: Path, capacity_bytes: int) -> None:
        self.dir = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.counters = TierCounters()
        self.direct = True
        self._lock = threading.Lock()
        self._slabs: dict[tuple[str, str, int], _Slab] = {}
        self._index: OrderedDict[tuple[str, str, bytes], _Entry] = OrderedDict()
        self._used = 0  # bytes of occupied slots
        self._buffers = _Buffers()
        #: called (under the lock, from any thread) with (tenant, namespace, key) for each block
        #: that leaves the tier
        self.on_drop: Callable[[str, str, bytes], None] | None = None
        self._open()

    # -- open and rebuild ----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            marker = self.dir / MARKER
            if not marker.exists():
                if any(self.dir.iterdir()):
                    raise TierUnavailable(f"{self.dir} is not empty and has no {MARKER}: not a KVFabric tier")
                marker.write_text(f"{FORMAT_VERSION}\n")
            elif marker.read_text().strip() != str(FORMAT_VERSION):
                raise TierUnavailable(
                    f"{self.dir}: tier format {marker.read_text().strip()!r} is not {FORMAT_VERSION}"
                )
        except OSError as exc:
            raise TierUnavailable(f"{self.dir}: {exc.strerror or exc}") from None
        started = time.monotonic()
        checkpoint = self._read_checkpoint()
        for tenant_dir in sorted(self.dir.iterdir()):
            if tenant_dir.name in (MARKER, CHECKPOINT):
                continue
            tenant = self._tenant_of(tenant_dir)
            if tenant is None:
                self.counters.foreign_files += 1
                continue
            for path in sorted(tenant_dir.iterdir()):
                if path.suffix != ".slab" or not path.is_file():
                    self.counters.foreign_files += 1
                    continue
                self._load_slab(path, tenant, checkpoint.get(str(path.relative_to(self.dir))))
        # least recently stored first: the first evicted after a restart
        self._index = OrderedDict(sorted(self._index.items(), key=lambda kv: kv[1].stored_at))
        log.info(
            "nvme tier opened",
            extra={
                "dir": str(self.dir),
                "blocks": len(self._index),
                "damaged": self.counters.damaged_blocks,
                "seconds": round(time.monotonic() - started, 3),
                "direct_io": self.direct,
            },
        )

    def _direct(self, direct: bool) -> None:
        if self.direct and not direct:
            log.warning(
                "nvme tier: the filesystem refuses direct I/O; using buffered I/O (the page cache "
                "holds a copy of what is written)",
                extra={"dir": str(self.dir)},
            )
        self.direct = self.direct and direct

    @staticmethod
    def _tenant_of(d: Path) -> str | None:
        if not d.is_dir():
            return None
        if d.name == "shared":
            return ""
        return d.name[len("tenant-") :] if d.name.startswith("tenant-") else None

    def _read_checkpoint(self) -> dict[str, tuple[int, int, list[tuple[int, float, bytes]]]]:
        """{slab path: (size, mtime_ns, [(slot, stored_at, key)])} from a clean shutdown, removed
        once read; {} when there is none or it does not verify."""
        path = self.dir / CHECKPOINT
        (self.dir / CHECKPOINT_PART).unlink(missing_ok=True)  # a write the agent did not finish
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        finally:
            path.unlink(missing_ok=True)
        out: dict[str, tuple[int, int, list[tuple[int, float, bytes]]]] = {}
        try:
            magic, version, length, digest = _CKPT.unpack_from(raw)
            body = memoryview(raw)[_CKPT.size : _CKPT.size + length]
            if magic != CKPT_MAGIC or version != FORMAT_VERSION or len(body) != length:
                raise ValueError("not a checkpoint")
            if xxhash.xxh3_64_intdigest(body) != digest:
                raise ValueError("checksum")
            (n,) = struct.unpack_from("<I", body)
            at = 4
            for _ in range(n):
                (plen,) = struct.unpack_from("<H", body, at)
                name = bytes(body[at + 2 : at + 2 + plen]).decode()
                at += 2 + plen
                size, mtime, count = _CKPT_SLAB.unpack_from(body, at)
                at += _CKPT_SLAB.size
                entries = []
                for _ in range(count):
                    slot, stored_at, klen = _CKPT_ENTRY.unpack_from(body, at)
                    at += _CKPT_ENTRY.size
                    entries.append((slot, stored_at, bytes(body[at : at + klen])))
                    at += klen
                out[name] = (size, mtime, entries)
        except (ValueError, struct.error, UnicodeDecodeError):
            self.counters.damaged_blocks += 1
            log.warning("nvme tier: unreadable index checkpoint; scanning every slab")
            return {}
        return out

    def _write_checkpoint(self) -> None:
        """The index of every slab, for the next open (called with no write in flight)."""
        by_slab: dict[int, list[tuple[int, float, bytes]]] = {}
        for (_, _, key), entry in self._index.items():
            by_slab.setdefault(id(entry.slab), []).append((entry.slot, entry.stored_at, key))
        parts = [struct.pack("<I", len(self._slabs))]
        for slab in self._slabs.values():
            name = str(slab.path.relative_to(self.dir)).encode()
            st = os.fstat(slab.fd)
            entries = by_slab.get(id(slab), [])
            parts.append(
                struct.pack("<H", len(name))
                + name
                + _CKPT_SLAB.pack(st.st_size, st.st_mtime_ns, len(entries))
            )
            parts.extend(_CKPT_ENTRY.pack(slot, at, len(key)) + key for slot, at, key in entries)
        body = b"".join(parts)
        part = self.dir / CHECKPOINT_PART
        with open(part, "wb") as f:
            f.write(_CKPT.pack(CKPT_MAGIC, FORMAT_VERSION, len(body), xxhash.xxh3_64_intdigest(body)) + body)
            f.flush()
            os.fsync(f.fileno())
        part.replace(self.dir / CHECKPOINT)

    def _load_slab(
        self, path: Path, tenant: str, saved: tuple[int, int, list[tuple[int, float, bytes]]] | None = None
    ) -> None:
        fd, direct = open_direct(str(path), os.O_RDWR)
        self._direct(direct)
        buf = mmap.mmap(-1, HEADER_BYTES)
        try:
            ok = os.preadv(fd, [buf], 0) == HEADER_BYTES
            fields = _SLAB.unpack_from(buf) if ok else None
            if fields is None or fields[0] != SLAB_MAGIC or fields[1] != FORMAT_VERSION:
                raise ValueError("not a slab")
            _, _, nlen, tlen, payload, slot_bytes = fields
            ns = bytes(buf[_SLAB.size : _SLAB.size + nlen]).decode()
            tn = bytes(buf[_SLAB.size + nlen : _SLAB.size + nlen + tlen]).decode()
            if tn != tenant or slot_bytes != HEADER_BYTES + align_up(payload):
                raise ValueError("slab header contradicts its place")
        except (ValueError, UnicodeDecodeError, OSError):
            os.close(fd)
            self.counters.damaged_blocks += 1
            log.warning("nvme tier: unreadable slab removed", extra={"path": str(path)})
            path.unlink(missing_ok=True)
            return
        finally:
            buf.close()
        slab = _Slab(path, fd, tenant, ns, payload, slot_bytes)
        st = os.fstat(fd)
        slab.slots = max(0, (st.st_size - HEADER_BYTES) // slot_bytes)
        if st.st_size != HEADER_BYTES + slab.slots * slot_bytes:  # a torn append: drop the partial slot
            os.ftruncate(fd, HEADER_BYTES + slab.slots * slot_bytes)
            self.counters.damaged_blocks += 1
            saved = None  # changed since any checkpoint
        self._slabs[(tenant, ns, payload)] = slab
        if saved is not None and (saved[0], saved[1]) == (st.st_size, st.st_mtime_ns):
            used = set()
            for slot, stored_at, key in saved[2]:  # unchanged since a clean shutdown
                if slot < slab.slots and slot not in used:
                    used.add(slot)
                    self._index[(tenant, ns, key)] = _Entry(slab, slot, stored_at)
                    self._used += slot_bytes
            slab.free = [s for s in range(slab.slots) if s not in used]
            return
        head = mmap.mmap(-1, HEADER_BYTES)
        try:
            for slot in range(slab.slots):
                try:
                    n = os.preadv(fd, [head], slab.offset(slot))
                except OSError:
                    n = 0
                    self.counters.read_errors += 1
                header = decode_header(memoryview(head)) if n == HEADER_BYTES else None
                if header is None:
                    if n == HEADER_BYTES and any(head[: _BLOCK.size]):  # not a hole: damage
                        self.counters.damaged_blocks += 1
                    self._free_slot(slab, slot)
                    continue
                if (header.tenant, header.namespace, header.payload_bytes) != (tenant, ns, payload):
                    self.counters.damaged_blocks += 1  # a block in the wrong slab is never served
                    self._free_slot(slab, slot)
                    continue
                ident = (tenant, ns, header.key)
                old = self._index.get(ident)
                if old is not None:  # the same block twice: keep the newer copy
                    if old.stored_at >= header.stored_at:
                        self._free_slot(slab, slot)
                        continue
                    self._drop(ident)
                self._index[ident] = _Entry(slab, slot, header.stored_at)
                self._used += slot_bytes
        finally:
            head.close()

    # -- reads and writes ----------------------------------------------------------------------

    def __contains__(self, ident: tuple[str, str, bytes]) -> bool:
        with self._lock:
            return ident in self._index

    def __len__(self) -> int:
        return len(self._index)

    def holds(self, tenant: str, namespace: str, key: bytes, payload_bytes: int) -> bool:
        """Whether a block of this size is stored under this identity (not yet verified)."""
        with self._lock:
            entry = self._index.get((tenant, namespace, key))
            return entry is not None and entry.slab.payload_bytes == payload_bytes

    @property
    def used_bytes(self) -> int:
        return self._used

    def put(self, tenant: str, namespace: str, key: bytes, payload: memoryview) -> bool:
        """Stores one block (replacing an older copy); False when it could not be written."""
        payload = memoryview(payload).cast("B")
        ident = (tenant, namespace, key)
        now = time.time()
        try:
            header = encode_header(key, namespace, tenant, payload, now)
        except ValueError:
            return False
        with self._lock:
            slab = self._slab(tenant, namespace, len(payload))
            if slab is None:
                return False
            place = self._take_slot(slab)
            if place is None:
                return False
        bufs = self._buffers
        bufs.head[:] = header
        body_bytes = slab.slot_bytes - HEADER_BYTES
        if _direct_ready(payload):  # written from where it is: no copy
            body = payload
        else:
            body = bufs.body_of(body_bytes)
            body[: len(payload)] = payload
            body[len(payload) :] = bytes(body_bytes - len(payload))  # no stale bytes on disk
        try:
            written = os.pwritev(slab.fd, [bufs.head, body], slab.offset(place))
            if written != slab.slot_bytes:
                raise OSError(28, "short write")
        except OSError as exc:
            with self._lock:
                self.counters.write_errors += 1
                self._release_slot(slab, place)
            log.warning("nvme tier: write failed", extra={"error": exc.strerror or str(exc)})
            return False
        finally:
            if body is not payload:
                body.release()
        with self._lock:
            if ident in self._index:
                self._drop(ident)
            self._index[ident] = _Entry(slab, place, now)
            self.counters.stored_blocks += 1
            self.counters.stored_bytes += len(payload)
        return True

    def get(self, tenant: str, namespace: str, key: bytes, out: memoryview) -> bool:
        """Reads one block into ``out`` (its exact size); False on a miss or a damaged block
        (which is then dropped and counted; ``out`` may have been written)."""
        ident = (tenant, namespace, key)
        with self._lock:
            entry = self._index.get(ident)
            if entry is None or entry.slab.payload_bytes != len(out):
                self.counters.misses += 1
                return False
            self._index.move_to_end(ident)
        slab = entry.slab
        bufs = self._buffers
        out = memoryview(out).cast("B")
        body_bytes = slab.slot_bytes - HEADER_BYTES
        body = out if len(out) == body_bytes and _direct_ready(out) else bufs.body_of(body_bytes)
        try:
            try:
                n = os.preadv(slab.fd, [bufs.head, body], slab.offset(entry.slot))
            except OSError as exc:
                with self._lock:
                    self.counters.read_errors += 1
                    self._forget(ident, entry)
                log.warning("nvme tier: read failed", extra={"error": exc.strerror or str(exc)})
                return False
            head = memoryview(bufs.head)
            header = decode_header(head) if n == slab.slot_bytes else None
            good = (
                header is not None
                and (header.tenant, header.namespace, header.key) == ident
                and header.payload_bytes == len(out)
                and verify(head, body, header)
            )
            head.release()
            if not good:
                with self._lock:
                    self.counters.damaged_blocks += 1
                    self._forget(ident, entry)
                log.warning("nvme tier: damaged block dropped", extra={"namespace": namespace})
                return False
            if body is not out:
                out[:] = body[: len(out)]
        finally:
            if body is not out:
                body.release()
        with self._lock:
            self.counters.hits += 1
        return True

    def close(self) -> None:
        """Writes the index checkpoint (a clean shutdown) and closes every slab."""
        with self._lock:
            try:
                if self._slabs:
                    self._write_checkpoint()
            except OSError as exc:  # the next open scans instead
                log.warning("nvme tier: cannot write the index checkpoint", extra={"error": exc.strerror})
            for slab in self._slabs.values():
                with contextlib.suppress(OSError):
                    os.close(slab.fd)
            self._slabs.clear()
            self._index.clear()

    # -- slots (under the lock) ----------------------------------------------------------------

    def _slab(self, tenant: str, namespace: str, payload: int) -> _Slab | None:
        slab = self._slabs.get((tenant, namespace, payload))
        if slab is not None:
            return slab
        d = self.dir / (f"tenant-{tenant}" if tenant else "shared")
        name = hashlib.blake2b(f"{namespace}\0{payload}".encode(), digest_size=12).hexdigest()
        path = d / f"{name}.slab"
        ns, tn = namespace.encode(), tenant.encode()
        slot_bytes = HEADER_BYTES + align_up(payload)
        head = mmap.mmap(-1, HEADER_BYTES)
        head[: _SLAB.size + len(ns) + len(tn)] = (
            _SLAB.pack(SLAB_MAGIC, FORMAT_VERSION, len(ns), len(tn), payload, slot_bytes) + ns + tn
        )
        fd = -1
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            fd, direct = open_direct(str(path), os.O_RDWR | os.O_CREAT | os.O_EXCL)
            os.pwritev(fd, [head], 0)
        except OSError as exc:
            if fd >= 0:  # created but its header not written: not a slab
                os.close(fd)
                path.unlink(missing_ok=True)
            self.counters.write_errors += 1
            log.warning("nvme tier: cannot create a slab", extra={"error": exc.strerror or str(exc)})
            return None
        finally:
            head.close()
        self._direct(direct)
        slab = _Slab(path, fd, tenant, namespace, payload, slot_bytes)
        self._slabs[(tenant, namespace, payload)] = slab
        return slab

    def _take_slot(self, slab: _Slab) -> int | None:
        """A slot for a new block, evicting least-recently-used blocks to stay in capacity."""
        if slab.slot_bytes > self.capacity_bytes:
            return None
        while self._used + slab.slot_bytes > self.capacity_bytes and self._index:
            ident, _ = next(iter(self._index.items()))
            self._drop(ident)
            self.counters.evictions += 1
        self._used += slab.slot_bytes
        if slab.free:
            return slab.free.pop()
        slab.slots += 1
        return slab.slots - 1

    def _release_slot(self, slab: _Slab, slot: int) -> None:
        self._used -= slab.slot_bytes
        self._free_slot(slab, slot)

    def _free_slot(self, slab: _Slab, slot: int) -> None:
        with contextlib.suppress(OSError):  # a filesystem without holes keeps the bytes
            punch_hole(slab.fd, slab.offset(slot), slab.slot_bytes)
        slab.free.append(slot)

    def _drop(self, ident: tuple[str, str, bytes]) -> None:
        entry = self._index.pop(ident)
        self._release_slot(entry.slab, entry.slot)
        if self.on_drop is not None:
            self.on_drop(*ident)

    def _forget(self, ident: tuple[str, str, bytes], entry: _Entry) -> None:
        """Drops ``entry`` if it is still the block's (a concurrent put may have replaced it)."""
        if self._index.get(ident) is entry:
            self._drop(ident)
