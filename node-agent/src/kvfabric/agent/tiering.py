"""Moves blocks between the pool and the NVMe tier (:mod:`kvfabric.agent.nvme`), off the loop.

**Write-behind.** A block an engine commits is pinned in the pool (:meth:`BlockIndex.hold`)
and queued; a writer thread copies it from pool memory to the tier, and the pin ends on the
loop. A block the tier holds already is not written again. When ``--nvme-queue-blocks`` writes
are waiting, further ones are dropped and counted: the block stays in the pool, only its disk
copy is missing. Blocks go to disk when committed, not when evicted: an agent restart or crash
loses the pool, and only what was written before survives it; and writing at eviction would put
the disk on the save path (the slot is needed at once). ``benchmarks/tier_policy.py`` measures
the hit rates of both.

**Promotion.** A lookup that asks for it and misses the pool checks whether the next keys are
on the tier, in every namespace of the lookup (all TP ranks). Those are reserved in the pool
under the agent's own session (:data:`PROMOTER_SESSION`), read by reader threads straight into
their slots, verified (a damaged block is dropped and counted by the tier), then committed on
the loop, or aborted. The lookup's reply says how many blocks are on their way and when the
last of them should be in (from the reads' measured rate); the connector asks again until they
are committed, and does not wait at all when they would come later than it may wait (a slow
disk loses to recomputing: it then recomputes, and the blocks still arrive for later requests).
A read still queued ``--nvme-read-deadline-ms`` after its lookup is skipped: nobody waits for it
any more.

Index changes happen on the event loop only; threads touch pool memory and the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvfabric.agent.index import BlockIndex, Namespace, normalize_key, scoped
from kvfabric.agent.nvme import NvmeTier, TierUnavailable
from kvfabric.connector.pool_files import PoolBuffer

log = logging.getLogger(__name__)

#: The index session that holds blocks being promoted (engine sessions count from 1).
PROMOTER_SESSION = 0
#: Most blocks one lookup starts promoting (a 128k-token prompt is 8k blocks of 16 tokens).
MAX_PROMOTE_PER_LOOKUP = 8192


@dataclass
class TierStats:
    written_blocks: int = 0
    written_bytes: int = 0
    write_skipped_present: int = 0
    writes_dropped_queue_full: int = 0
    writes_failed: int = 0
    promoted_blocks: int = 0
    promoted_bytes: int = 0
    promote_failed: int = 0  # missing, damaged or unreadable when read
    reads_skipped_late: int = 0
    reads_skipped_queue_full: int = 0
    lookup_misses: int = 0  # blocks a lookup wanted that neither the pool nor the tier held


class TierService:
    """The NVMe tier of one agent, its writer and reader threads, and its bookkeeping."""

    def __init__(
        self,
        directory: Path,
        capacity_bytes: int,
        index: BlockIndex,
        memory: Callable[[Namespace], PoolBuffer],
        *,
        threads: int,
        queue_blocks: int,
        read_deadline_s: float,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        """``memory(ns)``: the mapping that holds ``ns``'s slots (slot ``s`` at
        ``s * ns.block_bytes``); ``observe(op, seconds)``: one disk read or write's time."""
        self.directory = directory
        self.capacity_bytes = capacity_bytes
        self.index = index
        self.memory = memory
        self.queue_blocks = queue_blocks
        self.read_deadline_s = read_deadline_s
        self.observe = observe or (lambda op, s: None)
        self.stats = TierStats()
        self.tier: NvmeTier | None = None
        self.open_error = ""
        self.opened = threading.Event()  # set once opening ended, whether or not it worked
        self.writes_queued = 0
        self.reads_queued = 0
        self.reads_queued_bytes = 0
        self.threads = threads
        #: one reader thread's rate (bytes/s), a moving average of completed reads; 0: unknown
        self.read_rate = 0.0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._promoting: set[tuple[str, bytes]] = set()  # (scoped namespace, key) being read
        self._writers = ThreadPoolExecutor(threads, "kvfabric-nvme-write")
        self._readers = ThreadPoolExecutor(threads, "kvfabric-nvme-read")
        self._opener: threading.Thread | None = None
        #: each called on the loop with (tenant, namespace, key, stored) when a block is written
        #: to the tier (True) or leaves it (False): the KV events
        self.disk_listeners: list[Callable[[str, str, bytes, bool], None]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Opens the tier in a thread (a scan after a crash takes a while at millions of blocks):
        the agent serves from the pool meanwhile, and without the tier if it cannot be opened."""
        self._loop = loop
        self.index.commit_listeners.append(self._committed)
        self._opener = threading.Thread(target=self._open, name="kvfabric-nvme-open", daemon=True)
        self._opener.start()

    def _open(self) -> None:
        try:
            tier = NvmeTier(self.directory, self.capacity_bytes)
        except TierUnavailable as exc:
            self.open_error = str(exc)
            log.error("the NVMe tier is off: %s", exc, extra={"dir": str(self.directory)})
        except Exception as exc:  # the agent serves on without the tier
            self.open_error = repr(exc)
            log.exception("the NVMe tier could not be opened", extra={"dir": str(self.directory)})
        else:
            if self._closing:
                tier.close()
            else:
                tier.on_drop = self._left_disk
                self.tier = tier
        finally:
            self.opened.set()

    def close(self) -> None:
        """Blocking: finishes queued writes (queued reads are skipped), then closes the tier,
        which writes its index checkpoint. Call it off the loop, before pool memory goes."""
        self._closing = True
        if self._opener is not None and self.opened.is_set():
            self._opener.join()
        # Still opening (a scan after a crash): not waited for. The opener closes what it
        # opened, or the process ends under it; nothing it does then needs finishing.
        self._readers.shutdown(wait=True, cancel_futures=False)
        self._writers.shutdown(wait=True, cancel_futures=False)
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        with contextlib.suppress(ValueError):
            self.index.commit_listeners.remove(self._committed)

    @property
    def ready(self) -> bool:
        return self.tier is not None and not self._closing

    # -- write-behind (loop, then a writer thread) -----------------------------------------------

    def _committed(self, ns: Namespace, slot: int, key: bytes, session: int) -> None:
        tier = self.tier
        if tier is None or self._closing or session == PROMOTER_SESSION:
            return  # a promoted block came from the tier
        if tier.holds(ns.tenant, ns.name, key, ns.block_bytes):
            self.stats.write_skipped_present += 1
            return
        if self.writes_queued >= self.queue_blocks:
            self.stats.writes_dropped_queue_full += 1
            return
        generation = self.index.hold(ns, slot)
        self.writes_queued += 1
        self._writers.submit(self._write, tier, ns, slot, generation, key)

    def _write(self, tier: NvmeTier, ns: Namespace, slot: int, generation: int, key: bytes) -> None:
        started = time.perf_counter()
        ok = False
        try:
            with self._slot(ns, slot) as view:
                ok = tier.put(ns.tenant, ns.name, key, view)
        except Exception:
            log.exception("nvme tier: write failed")
        finally:
            self._on_loop(self._wrote, ns, slot, generation, key, ok, time.perf_counter() - started)

    def _wrote(self, ns: Namespace, slot: int, generation: int, key: bytes, ok: bool, seconds: float) -> None:
        self.writes_queued -= 1
        self.index.unhold(ns, slot, generation)
        if ok:
            for listener in self.disk_listeners:
                listener(ns.tenant, ns.name, key, True)
            self.stats.written_blocks += 1
            self.stats.written_bytes += ns.block_bytes
            self.observe("write", seconds)
        else:
            self.stats.writes_failed += 1

    def _left_disk(self, tenant: str, namespace: str, key: bytes) -> None:
        """From the tier's threads (under its lock): a block left the tier."""
        if self.disk_listeners:
            self._on_loop(self._announce_left, tenant, namespace, key)

    def _announce_left(self, tenant: str, namespace: str, key: bytes) -> None:
        for listener in self.disk_listeners:
            listener(tenant, namespace, key, False)

    # -- promotion (loop, then a reader thread) -------------------------------------------------

    def promote(self, spaces: list[Namespace], keys: list[bytes], parent: bytes | None) -> int:
        """Starts reading the tier's copies of the leading ``keys`` the pool lacks, in every
        namespace of ``spaces``; returns how many leading keys are on their way (0: none)."""
        tier = self.tier
        if tier is None or self._closing or not keys:
            return 0
        index = self.index
        started = time.monotonic()
        run = 0
        reading = False
        prev = normalize_key(parent) if parent is not None else None
        for raw in keys[:MAX_PROMOTE_PER_LOOKUP]:
            key = normalize_key(raw)
            todo: list[Namespace] = []
            ok = True
            for ns in spaces:
                if (scoped(ns.tenant, ns.name), key) in self._promoting:
                    reading = True
                elif index.committed_slot(ns, key) < 0:
                    if not tier.holds(ns.tenant, ns.name, key, ns.block_bytes):
                        ok = False
                        break
                    todo.append(ns)
            if not ok:
                self.stats.lookup_misses += len(keys) - run
                break
            if self.reads_queued + len(todo) > self.queue_blocks:
                self.stats.reads_skipped_queue_full += len(todo)
                break
            for ns in todo:
                slot = index.reserve(ns.name, [key], prev, PROMOTER_SESSION, ns.tenant)[0]
                if slot < 0:  # the pool is full of pinned blocks, or the key arrived meanwhile
                    ok = False
                    break
                self._promoting.add((scoped(ns.tenant, ns.name), key))
                self.reads_queued += 1
                self.reads_queued_bytes += ns.block_bytes
                reading = True
                self._readers.submit(self._read, tier, ns, slot, key, started)
            if not ok:
                break
            run += 1
            prev = key
        return run if reading else 0

    def _read(self, tier: NvmeTier, ns: Namespace, slot: int, key: bytes, asked_at: float) -> None:
        t0 = time.perf_counter()
        outcome = "failed"
        try:
            if self._closing or time.monotonic() - asked_at > self.read_deadline_s:
                outcome = "late"
            else:
                with self._slot(ns, slot) as view:
                    outcome = "ok" if tier.get(ns.tenant, ns.name, key, view) else "failed"
        except Exception:
            log.exception("nvme tier: read failed")
        finally:
            self._on_loop(self._read_done, ns, key, outcome, time.perf_counter() - t0)

    def _read_done(self, ns: Namespace, key: bytes, outcome: str, seconds: float) -> None:
        self.reads_queued -= 1
        self.reads_queued_bytes -= ns.block_bytes
        self._promoting.discard((scoped(ns.tenant, ns.name), key))
        if outcome == "ok":
            rate = ns.block_bytes / max(seconds, 1e-6)
            self.read_rate = rate if not self.read_rate else 0.8 * self.read_rate + 0.2 * rate
            self.index.commit(ns.name, [key], [], PROMOTER_SESSION, ns.tenant)
            self.stats.promoted_blocks += 1
            self.stats.promoted_bytes += ns.block_bytes
            self.observe("read", seconds)
            return
        self.index.commit(ns.name, [], [key], PROMOTER_SESSION, ns.tenant)  # frees the slot
        if outcome == "late":
            self.stats.reads_skipped_late += 1
        else:
            self.stats.promote_failed += 1

    def eta_s(self) -> float:
        """Seconds until every queued read should be done, at the measured rate (0: unknown)."""
        if not self.read_rate or not self.reads_queued:
            return 0.0
        return self.reads_queued_bytes / (self.read_rate * min(self.threads, self.reads_queued))

    # -- stats -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, int | float | str]:
        """The tier's numbers for ``Stats`` and the metrics (prefixed ``nvme_``)."""
        tier = self.tier
        out: dict[str, int | float | str] = {f"nvme_{k}": v for k, v in vars(self.stats).items()}
        if tier is not None:
            out.update({f"nvme_{k}": v for k, v in vars(tier.counters).items()})
        out.update(
            nvme_ready=int(self.ready),
            nvme_error=self.open_error,
            nvme_direct_io=int(tier.direct) if tier is not None else 0,
            nvme_capacity_bytes=self.capacity_bytes,
            nvme_used_bytes=tier.used_bytes if tier is not None else 0,
            nvme_blocks=len(tier) if tier is not None else 0,
            nvme_writes_queued=self.writes_queued,
            nvme_reads_queued=self.reads_queued,
            nvme_read_rate_bytes_per_s=round(self.read_rate * self.threads),
        )
        return out

    # -- helpers ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _slot(self, ns: Namespace, slot: int) -> Iterator[memoryview]:
        with memoryview(self.memory(ns)) as whole:
            part = whole[slot * ns.block_bytes : (slot + 1) * ns.block_bytes]
            try:
                yield part
            finally:
                part.release()

    def _on_loop(self, fn: Callable[..., None], *args: object) -> None:
        on_loop(self._loop, fn, *args)


def on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: object) -> None:
    """Runs ``fn(*args)`` on the agent's loop, which owns the index, from a tier's thread."""
    if loop is not None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
            loop.call_soon_threadsafe(fn, *args)
