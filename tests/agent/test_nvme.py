"""The NVMe tier's storage: format, rebuild at open, and every damage case, on real files.

Every damage test checks the one property that matters: a block that is returned is exactly
the block that was stored (payloads are derived from their keys), and damage is counted."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvfabric.agent import nvme
from kvfabric.agent.nvme import HEADER_BYTES, NvmeTier, TierUnavailable, decode_header, encode_header

BLOCK = 16384


def payload(key: bytes, size: int = BLOCK) -> bytes:
    seed = hashlib.blake2b(key, digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


def keys(n: int, tag: str = "k") -> list[bytes]:
    return [f"{tag}{i}".encode().ljust(16, b".") for i in range(n)]


def read(tier: NvmeTier, key: bytes, ns: str = "ns", tenant: str = "", size: int = BLOCK) -> bytes | None:
    out = bytearray(size)
    return bytes(out) if tier.get(tenant, ns, key, memoryview(out)) else None


def slab_files(d: Path) -> list[Path]:
    return sorted(d.rglob("*.slab"))


def test_header_round_trip_and_checksum_covers_header_and_payload() -> None:
    body = memoryview(payload(b"k"))
    raw = bytearray(encode_header(b"k" * 16, "ns", "team-a", body, 12.5) + bytes(body))
    h = decode_header(raw)
    assert h is not None and (h.key, h.namespace, h.tenant, h.payload_bytes) == (
        b"k" * 16,
        "ns",
        "team-a",
        BLOCK,
    )

    def ok(h: nvme.BlockHeader) -> bool:
        return nvme.verify(memoryview(raw)[:HEADER_BYTES], memoryview(raw)[HEADER_BYTES:], h)

    assert ok(h)
    raw[HEADER_BYTES + 100] ^= 1
    assert not ok(h)
    raw[HEADER_BYTES + 100] ^= 1
    raw[40] ^= 1  # the key's first byte
    h2 = decode_header(raw)
    assert h2 is not None and not ok(h2)
    assert decode_header(b"\0" * HEADER_BYTES) is None and decode_header(b"junk") is None


def test_blocks_survive_reopen_and_tenants_and_namespaces_stay_apart(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    assert tier.direct  # ext4 here: O_DIRECT
    for k in keys(5):
        assert tier.put("", "ns", k, memoryview(payload(k)))
        assert tier.put("team-a", "ns", k, memoryview(payload(k + b"a")))
    assert tier.put("", "other", b"x" * 16, memoryview(payload(b"x", 4096)))
    tier.close()
    again = NvmeTier(tmp_path, 64 << 20)  # an agent restart: the index is rebuilt from disk
    assert len(again) == 11
    for k in keys(5):
        assert read(again, k) == payload(k)
        assert read(again, k, tenant="team-a") == payload(k + b"a")
    assert read(again, keys(1)[0], tenant="team-b") is None  # another tenant sees nothing
    assert read(again, keys(1)[0], ns="other") is None  # another namespace neither
    assert read(again, b"x" * 16, ns="other", size=4096) == payload(b"x", 4096)
    assert {p.parent.name for p in slab_files(tmp_path)} == {"shared", "tenant-team-a"}
    again.close()


def test_overwritten_payload_bytes_are_detected_dropped_and_counted(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    ks = keys(3)
    for k in ks:
        tier.put("", "ns", k, memoryview(payload(k)))
    tier.close()
    (slab,) = slab_files(tmp_path)
    slot = HEADER_BYTES + HEADER_BYTES + BLOCK  # slab header, then slots of 4 KiB + payload
    with open(slab, "r+b") as f:  # one byte of the second block's payload
        f.seek(HEADER_BYTES + slot + HEADER_BYTES + 777)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    tier = NvmeTier(tmp_path, 64 << 20)
    assert read(tier, ks[1]) is None
    assert tier.counters.damaged_blocks == 1 and (("", "ns", ks[1]) not in tier)
    assert read(tier, ks[1]) is None and tier.counters.damaged_blocks == 1  # gone, not re-read
    assert read(tier, ks[0]) == payload(ks[0]) and read(tier, ks[2]) == payload(ks[2])
    tier.close()


def test_damaged_headers_truncated_files_and_foreign_files_at_open(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    ks = keys(4)
    for k in ks:
        tier.put("", "ns", k, memoryview(payload(k)))
    tier.close()
    (slab,) = slab_files(tmp_path)
    slot_bytes = HEADER_BYTES + BLOCK
    with open(slab, "r+b") as f:
        f.seek(HEADER_BYTES + 0 * slot_bytes + 3)  # the first block's magic
        f.write(b"XX")
        f.truncate(HEADER_BYTES + 3 * slot_bytes + 5000)  # the last block cut mid-slot
    (tmp_path / "shared" / "notes.txt").write_text("not ours")
    (tmp_path / "someone-else").mkdir()
    bad = tmp_path / "shared" / "0123.slab"
    bad.write_bytes(b"garbage" * 100)
    tier = NvmeTier(tmp_path, 64 << 20)
    assert read(tier, ks[0]) is None and read(tier, ks[3]) is None
    assert read(tier, ks[1]) == payload(ks[1]) and read(tier, ks[2]) == payload(ks[2])
    # the bad header, the torn last slot and the unreadable slab
    assert tier.counters.damaged_blocks == 3
    assert tier.counters.foreign_files == 2  # counted, never deleted: not ours
    assert (tmp_path / "shared" / "notes.txt").exists() and (tmp_path / "someone-else").is_dir()
    assert not bad.exists()  # named like ours, in our directory, unreadable: cleaned up
    assert slab.stat().st_size == HEADER_BYTES + 3 * slot_bytes  # the partial slot is gone
    # the freed slots are reused
    assert tier.put("", "ns", b"new".ljust(16, b"."), memoryview(payload(b"new")))
    assert slab.stat().st_size == HEADER_BYTES + 3 * slot_bytes
    tier.close()


def test_a_header_without_its_payload_is_never_served(tmp_path: Path) -> None:
    """A torn write where the header reached the disk and the payload did not."""
    tier = NvmeTier(tmp_path, 64 << 20)
    k = keys(1)[0]
    tier.put("", "ns", k, memoryview(payload(k)))
    tier.close()
    (slab,) = slab_files(tmp_path)
    with open(slab, "r+b") as f:
        f.seek(HEADER_BYTES + HEADER_BYTES)
        f.write(b"\0" * BLOCK)
    tier = NvmeTier(tmp_path, 64 << 20)
    assert k in {i[2] for i in tier._index}  # the header alone looks fine ...
    assert read(tier, k) is None and tier.counters.damaged_blocks == 1  # ... the checksum does not
    tier.close()


WRITER = """
import os, sys, hashlib
sys.path[:0] = {paths!r}
from kvfabric.agent.nvme import NvmeTier
def payload(key, size):
    seed = hashlib.blake2b(key, digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]
tier = NvmeTier({d!r}, 1 << 40)
print("ready", flush=True)
i = 0
while True:
    k = f"k{{i}}".encode().ljust(16, b".")
    tier.put("", "ns", k, memoryview(payload(k, {size})))
    i += 1
"""


def test_sigkill_mid_write_never_serves_a_torn_block(tmp_path: Path) -> None:
    size = 4 << 20  # large slots: a kill is likely to land inside a write
    script = WRITER.format(paths=sys.path, d=str(tmp_path), size=size)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        tier = NvmeTier(tmp_path, 1 << 40)  # the agent always starts
        served = 0
        for ident in list(tier._index):
            got = read(tier, ident[2], size=size)
            if got is not None:
                assert got == payload(ident[2], size)  # exactly what was stored, or nothing
                served += 1
        assert served > 0
        tier.close()


def test_a_full_disk_fails_writes_cleanly_and_keeps_what_was_stored(tmp_path: Path) -> None:
    """The file size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail."""
    script = f"""
import json, resource, signal, sys
sys.path[:0] = {sys.path!r}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from kvfabric.agent.nvme import NvmeTier
tier = NvmeTier({str(tmp_path)!r}, 1 << 30)
ok = [tier.put("", "ns", b"%015d." % i, memoryview(bytes([i]) * 16384)) for i in range(20)]
out = bytearray(16384)
def back(i):
    return tier.get("", "ns", b"%015d." % i, memoryview(out)) and out == bytes([i]) * 16384
good = [back(i) for i in range(20) if ok[i]]
print(json.dumps({{"ok": ok, "good": good, "errors": tier.counters.write_errors, "used": tier.used_bytes}}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    stored = sum(result["ok"])
    assert 0 < stored < 20 and result["errors"] == 20 - stored
    assert all(result["good"])  # everything it said it stored reads back intact
    assert result["used"] == stored * (HEADER_BYTES + 16384)  # failed writes hold no capacity


def test_a_read_error_drops_the_block_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    k = keys(1)[0]
    tier.put("", "ns", k, memoryview(payload(k)))

    def eio(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(nvme.os, "preadv", eio)  # the device failing (cannot be caused for real here)
    assert read(tier, k) is None and tier.counters.read_errors == 1
    monkeypatch.undo()
    assert read(tier, k) is None and ("", "ns", k) not in tier
    tier.close()


def test_capacity_is_kept_by_evicting_the_least_recently_used(tmp_path: Path) -> None:
    slot = HEADER_BYTES + BLOCK
    tier = NvmeTier(tmp_path, 3 * slot)
    a, b, c, d = keys(4)
    for k in (a, b, c):
        assert tier.put("", "ns", k, memoryview(payload(k)))
    assert read(tier, a) == payload(a)  # a is now the most recently used
    assert tier.put("", "ns", d, memoryview(payload(d)))
    assert read(tier, b) is None and tier.counters.evictions == 1
    assert all(read(tier, k) == payload(k) for k in (a, c, d))
    assert tier.used_bytes == 3 * slot
    # a block of another size evicts too, and the disk holds about the capacity (holes punched)
    assert tier.put("", "big", b"z" * 16, memoryview(payload(b"z", 2 * BLOCK)))
    assert tier.used_bytes <= 3 * slot
    on_disk = sum(p.stat().st_blocks * 512 for p in slab_files(tmp_path))
    assert on_disk <= 3 * slot + 2 * HEADER_BYTES + 2 * slot  # slab headers and one slot of slack
    assert not tier.put("", "huge", b"h" * 16, memoryview(bytes(4 * slot)))  # never fits
    tier.close()


def test_the_newest_copy_of_a_block_wins_after_a_restart(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    k = keys(1)[0]
    tier.put("", "ns", k, memoryview(payload(b"old")))
    tier.close()
    # a second copy of the same key, as a crash between writing a new copy and freeing the old leaves
    tier = NvmeTier(tmp_path, 64 << 20)
    slab = next(iter(tier._slabs.values()))
    with tier._lock:
        spare = tier._take_slot(slab)
    assert spare is not None
    time.sleep(0.01)
    raw = encode_header(k, "ns", "", memoryview(payload(b"new")), time.time()) + payload(b"new")
    with open(slab.path, "r+b") as f:  # buffered: the tier's own descriptor is O_DIRECT
        f.seek(slab.offset(spare))
        f.write(raw)
    tier.close()
    (tmp_path / nvme.CHECKPOINT).unlink()  # a crash leaves no checkpoint: every slab is scanned
    tier = NvmeTier(tmp_path, 64 << 20)
    assert len(tier) == 1 and read(tier, k) == payload(b"new")
    tier.close()


def test_buffered_io_where_direct_io_is_refused_and_foreign_directories_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # what tmpfs on older kernels and some overlays answer
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(nvme.os, "open", no_direct)
    tier = NvmeTier(tmp_path / "tier", 1 << 20)
    k = keys(1)[0]
    assert tier.put("", "ns", k, memoryview(payload(k))) and read(tier, k) == payload(k)
    assert not tier.direct and "buffered" in caplog.text
    tier.close()
    monkeypatch.undo()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(TierUnavailable, match="not a KVFabric tier"):
        NvmeTier(tmp_path / "photos", 1 << 20)


def test_page_aligned_buffers_are_written_and_read_in_place(tmp_path: Path) -> None:
    """Pool memory (page-aligned, whole pages) goes to and from the disk without a copy."""
    import mmap

    src, dst = mmap.mmap(-1, 2 * BLOCK), mmap.mmap(-1, 2 * BLOCK)
    src[:] = payload(b"aligned", 2 * BLOCK)
    tier = NvmeTier(tmp_path, 64 << 20)
    s, d = memoryview(src), memoryview(dst)
    assert nvme._direct_ready(s) and tier.put("", "ns", b"a" * 16, s)
    assert tier.get("", "ns", b"a" * 16, d) and bytes(dst) == payload(b"aligned", 2 * BLOCK)
    d[100] = 0  # damage in the caller's buffer is not the tier's: a fresh read is intact
    assert tier.get("", "ns", b"a" * 16, d) and bytes(dst) == payload(b"aligned", 2 * BLOCK)
    s.release()
    d.release()
    src.close()
    dst.close()
    tier.close()


def test_a_clean_shutdown_checkpoint_is_used_and_never_trusted_over_the_data(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, 64 << 20)
    ks = keys(3)
    for k in ks:
        tier.put("", "ns", k, memoryview(payload(k)))
    tier.close()
    assert (tmp_path / nvme.CHECKPOINT).exists()
    (slab,) = slab_files(tmp_path)
    st = slab.stat()
    with open(slab, "r+b") as f:  # the first block's header wiped, the file's times put back
        f.seek(HEADER_BYTES)
        f.write(b"\0" * 64)
    os.utime(slab, ns=(st.st_atime_ns, st.st_mtime_ns))
    tier = NvmeTier(tmp_path, 64 << 20)
    assert not (tmp_path / nvme.CHECKPOINT).exists()  # consumed: a crash from here rescans
    assert len(tier) == 3  # taken from the checkpoint, without reading headers ...
    assert read(tier, ks[0]) is None and tier.counters.damaged_blocks == 1  # ... yet never served
    assert read(tier, ks[1]) == payload(ks[1])
    tier.close()
    (tmp_path / nvme.CHECKPOINT).write_bytes(b"KVFCKPT1" + b"\xff" * 64)  # a damaged checkpoint
    (tmp_path / nvme.CHECKPOINT_PART).write_bytes(b"half")  # one a killed agent did not finish
    tier = NvmeTier(tmp_path, 64 << 20)
    assert tier.counters.damaged_blocks == 1 and len(tier) == 2  # ignored: the slab is scanned
    assert tier.counters.foreign_files == 0 and not (tmp_path / nvme.CHECKPOINT_PART).exists()
    assert read(tier, ks[2]) == payload(ks[2])
    tier.close()
