"""Worker role: maps the agent's pool and copies blocks between it and vLLM's KV tensors."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvfabric.connector import protocol as p
from kvfabric.connector.background_saves import BackgroundSaves
from kvfabric.connector.client import AgentClient
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.copier import BlockCopier
from kvfabric.connector.errors import AgentError, AgentRejected
from kvfabric.connector.keys import LayoutSpec
from kvfabric.connector.layout import Route
from kvfabric.connector.metadata import (
    KVFabricMetadata,
    KVFabricWorkerMeta,
    LoadIntent,
    SaveIntent,
    StagedSave,
)
from kvfabric.connector.pool_files import PoolBuffer, advise, map_pool, pool_sizes
from kvfabric.connector.trace import mark

if TYPE_CHECKING:
    from kvfabric.connector.cuda_kv import CudaKV
    from kvfabric.connector.engine_saves import EngineSaves

log = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_PREFAULT_CHUNK = 64 << 20


def _prefault(m: PoolBuffer) -> None:
    """Maps the pool's pages into this process in the background, so the first copies into a
    fresh engine do not take a page fault per 4 KiB. Chunked: the GIL is free between chunks.
    Best effort: a kernel without MADV_POPULATE_WRITE just faults lazily.
    """
    try:
        for start in range(0, len(m), _PREFAULT_CHUNK):
            advise(m, start, min(_PREFAULT_CHUNK, len(m) - start), _MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        pass  # unsupported, or the mapping was replaced meanwhile


#: While a layer's copies are late, how often to check that the agent is still there.
_LIVENESS_CHECK_S = 0.05
#: After giving up on a layered load, how long to still let copies the agent may have queued end
#: (if it is alive after all) before vLLM can reuse the blocks.
_ABANDON_GRACE_S = 1.0
#: Steps whose worker metadata names this worker's registration to the scheduler, after each
#: (re)registration (vLLM delivers every step's: more than one only guards a lost output).
_ANNOUNCE_STEPS = 3


@dataclass
class _LayeredLoad:
    """A step's load whose copies run while the forward pass goes on (``layered_loads``)."""

    intents: list[LoadIntent]
    started: float
    waited: set[int]  # layers whose event the forward's stream waits on
    events: tuple[torch.cuda.Event, ...]  # the step's set of layer events
    #: past this (perf_counter) the copies are given up even if the agent looks alive: a hung
    #: agent-side copy must not hang the engine
    deadline: float = float("inf")


@dataclass
class WorkerStats:
    loaded_blocks: int = 0
    load_errors: int = 0
    saved_blocks: int = 0
    save_skipped_blocks: int = 0
    save_failures: int = 0
    #: of the blocks written for saves, those this engine copied itself (``engine_saves``)
    engine_copied_blocks: int = 0


class WorkerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        spec: LayoutSpec,
        engine_tag: str,
        background_saves: bool = False,
        route: Route | None = None,
    ) -> None:
        self.config = config
        self.spec = spec
        self.route = route  # told to agents that answer routers (``routing``)
        self.namespace = spec.namespace()
        self.rank = spec.tp_rank
        #: With one copy per TP group (MLA) rank 0 saves it for all; the others only load.
        self.saves_here = not (spec.one_copy_per_tp_group and self.rank > 0)
        #: Written blocks the scheduler commits for us (TP: see :class:`StagedSave`).
        self._staged: list[StagedSave] = []
        self._staged_lock = threading.Lock()
        self.copier: BlockCopier | None = None
        self.cuda: CudaKV | None = None  # set for GPU engines: the agent does the copies
        self._cuda_layers: list[torch.Tensor] = []
        #: GPU engines: saves this engine copies itself (``engine_saves``), once it mapped the pool
        self._engine_saves: EngineSaves | None = None
        self.kv_id = 0
        self.pool_id: str | None = None
        self._map: PoolBuffer | None = None
        self._load_errors: set[int] = set()
        #: Requests a load of which failed: what the forward computed for them on top of the
        #: suspect blocks is never saved (that would poison the pool for every engine).
        self._tainted: dict[str, int] = {}  # request -> the latest epoch a load of which failed
        self._layer_index: dict[str, int] = {}  # layer name -> its event, for layered loads
        self._layered_ok = False  # the agent opened our layer events (see GpuKVReply.layered)
        self._event_sets = 1  # sets of layer events the agent opened
        #: names our registration in the scheduler's prefetches (b"": the agent takes none)
        self.prefetch_token = b""
        self._announce = 0  # steps left to name it in our worker metadata
        self._step = 0  # the step being run (``KVFabricMetadata.step``), reported to the scheduler
        self._layered: _LayeredLoad | None = None
        self._gpu_block_bytes = 0
        self.stats = WorkerStats()
        self._reported = asdict(self.stats)
        self.client = AgentClient.from_config(
            config, f"worker{self.rank}:{engine_tag}", self._on_connect, self._on_disconnect
        )
        self.saves = BackgroundSaves[SaveIntent](self._save_logged) if background_saves else None

    # -- setup -------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int | None = None) -> None:
        """``num_blocks``: vLLM's block count (``kv_cache_config.num_blocks``), from which the
        attention kernel's split of each block into rows is found (None: no split)."""
        if not (self.config.load or self.config.save):
            return  # disabled (e.g. an unsupported setup): never touches the agent
        layers = list(kv_caches.values())
        if layers and layers[0].is_cuda:
            self._register_cuda(kv_caches, num_blocks)
            return
        s = self.spec
        latent = s.head_size if s.mla else 2 * s.head_size  # MLA: one latent vector, not K and V
        expected = (s.num_kv_heads, s.block_size, latent)
        bad = [name for name, t in kv_caches.items() if tuple(t.shape[1:]) != expected]
        if len(layers) != s.num_layers or bad:
            log.error(
                "KV cache layout is not the one this connector supports (per block %s, got %s in %d "
                "layers, expected %d); KVFabric disabled",
                expected,
                tuple(layers[0].shape[1:]) if layers else None,
                len(layers),
                s.num_layers,
                extra={"expected": expected, "layers": len(layers), "mismatched": bad[:4]},
            )
            return
        self.copier = BlockCopier(layers)
        if not self.client.connect():  # connecting registers the layout and maps the pool
            log.warning("agent not reachable yet; will retry", extra={"socket": self.config.socket_path})

    def _register_cuda(self, kv_caches: dict[str, torch.Tensor], num_blocks: int | None) -> None:
        """GPU engine: the agent copies blocks itself over CUDA IPC; nothing is pinned here."""
        from kvfabric.connector.cuda_kv import describe, kernel_blocks_per_block

        try:
            first = next(iter(kv_caches.values()))
            split = kernel_blocks_per_block(first, num_blocks) if num_blocks else 1
            if split > 1:
                log.info("vLLM splits each KV block for its attention kernel", extra={"kernel_blocks": split})
            self.cuda = describe(kv_caches, layer_events=self.config.layered_loads, kernel_blocks=split)
            self._layer_index = {name: i for i, name in enumerate(kv_caches)}
            self._cuda_layers = list(kv_caches.values())
        except (ValueError, RuntimeError) as exc:
            log.error(
                "KV tensors cannot be shared with the agent; KVFabric disabled", extra={"error": str(exc)}
            )
            return
        if not self.client.connect():
            log.warning("agent not reachable yet; will retry", extra={"socket": self.config.socket_path})

    def _on_connect(self, client: AgentClient, hello: p.HelloReply) -> None:
        """(Re)connected: declare our layout and map the agent's pool if it is a new one."""
        if self.cuda is not None:
            events = bool(self.cuda.events) and "layered_loads" in hello.features
            if self.cuda.events and not events:
                log.warning("the agent is older than layered loads; loads will not be layered (upgrade it)")
            route = self.route if "routing" in hello.features else None
            prefetch = events and self.config.prefetch_loads and "prefetch" in hello.features
            sets = p.EVENT_SETS if prefetch else 1
            token = os.urandom(16) if sets > 1 else b""
            reply = client._roundtrip(
                self.cuda.request(self.namespace, events, route, event_sets=sets, prefetch_token=token),
                p.GpuKVReply,
            )
            self.kv_id = reply.kv_id
            self._gpu_block_bytes = reply.block_bytes
            self._layered_ok = reply.layered and events
            self._event_sets = sets if self._layered_ok else 1
            self.prefetch_token = token if reply.prefetch and self._layered_ok else b""
            self._announce = _ANNOUNCE_STEPS if self.prefetch_token else 0
            if events and not reply.layered:
                log.warning("the agent cannot use our layer events; loads will not be layered")
            self.pool_id = hello.pool_id
            self._start_engine_saves(hello, reply.block_bytes)
            return
        assert self.copier is not None
        route = self.route if "routing" in hello.features else None
        client._roundtrip(
            p.RegisterNamespace(
                namespace=self.namespace,
                block_bytes=self.copier.block_bytes,
                block_tokens=self.spec.block_size,
                description=repr(self.spec.stored()),
                model=route.model if route else "",
                group=route.group if route else "",
            ),
            p.NamespaceReply,
        )
        if hello.pool_id != self.pool_id:
            self._map_pool(hello)

    def _on_disconnect(self) -> None:
        """The session is gone: so are its agent's leases, and maybe the agent. A worker lets go
        of its pool mapping (remapped at the next connect; a GPU worker maps it for its own
        saves only): a restarted agent needs that memory back to reserve its own pool, and no
        copy from it could be trusted anyway. Copies in flight keep their view of the mapping
        until they end."""
        self._stop_engine_saves()
        if self.copier is not None and self.copier.attached:
            self.copier.detach()
            self._map = None
            self.pool_id = None
            log.info("pool mapping dropped until the agent is back")

    def _map_pool(self, hello: p.HelloReply) -> None:
        assert self.copier is not None
        self.copier.detach()
        self._map = None  # the old mapping goes when the last view of it does
        by_fd = not hello.pool_path and "pool_fd" in hello.features
        writable = self.config.save  # a worker that never saves maps the pool read-only
        m = self._pool_mapping(hello, writable, by_fd)
        self._map = m
        self.copier.attach(np.frombuffer(m, dtype=np.uint8))
        if not by_fd and writable:  # a tenant's file is sparse: pages exist only in its arenas
            threading.Thread(target=_prefault, args=(m,), name="kvfabric-prefault", daemon=True).start()
        self.pool_id = hello.pool_id
        log.info("pool mapped", extra={"pool_id": hello.pool_id, "pool_bytes": hello.pool_bytes})

    def _pool_mapping(self, hello: p.HelloReply, writable: bool, by_fd: bool = False) -> PoolBuffer:
        """The agent's pool mapped here: its files by path, or (``by_fd``: isolated tenancy)
        our tenant's own file, which has no path."""
        if not by_fd and not hello.pool_path:
            raise AgentRejected("pool", "the agent offers no pool this connector can map")
        if not by_fd:
            try:
                return map_pool(Path(hello.pool_path), hello.pool_bytes, hello.pool_files, writable)
            except ValueError as exc:
                raise AgentRejected("pool", str(exc)) from None
        _, fd = self.client.open_pool(writable)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(fd, hello.pool_bytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)

    def _start_engine_saves(self, hello: p.HelloReply, slot_bytes: int) -> None:
        """GPU engines: maps the agent's pool to copy saves from this engine's own CUDA context
        (see :mod:`~kvfabric.connector.engine_saves`), unless this worker saves nothing or the
        agent offers no shared pool to map (isolated tenancy): the agent copies those saves."""
        old = self._engine_saves
        if old is not None and old.pool_id == hello.pool_id:
            return
        self._stop_engine_saves()
        if not (self.config.engine_saves and self.config.save and self.saves_here and hello.pool_path):
            return
        assert self.cuda is not None
        from kvfabric.connector.engine_saves import EngineSaves

        try:
            sizes = pool_sizes(hello.pool_bytes, hello.pool_files)
            mapping = self._pool_mapping(hello, writable=True)
            self._engine_saves = EngineSaves(
                self._cuda_layers,
                self.cuda.layout,
                self.cuda.plane_bytes,
                self.cuda.num_blocks,
                mapping,
                sizes,
                slot_bytes,
                hello.pool_id,
            )
        except (OSError, RuntimeError, ValueError, AgentError) as exc:
            log.warning("the agent copies the saves: no pool mapping here", extra={"error": str(exc)})
            return
        log.info("this engine copies its own saves", extra={"pool_id": hello.pool_id})

    def _stop_engine_saves(self) -> None:
        """Lets the pool go in the background (unregistering 64 GiB takes a while; copies in
        flight end first): a restarted agent needs its memory back."""
        saves, self._engine_saves = self._engine_saves, None
        if saves is not None:
            threading.Thread(target=saves.close, name="kvfabric-unregister", daemon=True).start()

    # -- loads ---------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.copier is not None or self.cuda is not None

    def _ready(self, pool_id: str) -> bool:
        """Whether blocks of pool ``pool_id`` can be copied now."""
        if pool_id != self.pool_id:
            return False
        return self.cuda is not None or (self.copier is not None and self.copier.attached)

    def _copy(self, block_ids: Sequence[int], slots: Sequence[int], to_pool: bool) -> None:
        """CPU engines copy through their own mapping; GPU engines copy their saves themselves
        where they can (``engine_saves``) and ask the agent for the rest (one round trip per
        batch; the agent runs it on its own CUDA stream)."""
        saves = self._engine_saves if to_pool else None
        if self.cuda is not None and saves is not None and saves.pool_id == self.pool_id:
            try:
                done = saves.save(block_ids, slots)
            except RuntimeError as exc:  # ours, not the agent's: the agent copies from now on
                log.error("this engine's save copies failed: the agent takes them", extra={"error": str(exc)})
                self._stop_engine_saves()
            else:
                self.stats.engine_copied_blocks += int(done.sum())
                if done.all():
                    return
                block_ids = [b for b, d in zip(block_ids, done, strict=True) if not d]
                slots = [s for s, d in zip(slots, done, strict=True) if not d]
        if self.cuda is not None:
            self.client.call(
                p.GpuCopy(kv_id=self.kv_id, to_pool=to_pool, block_ids=list(block_ids), slots=list(slots)),
                p.GpuCopyReply,
            )
        elif self.copier is not None:
            (self.copier.save if to_pool else self.copier.load)(block_ids, slots)
        else:
            raise RuntimeError("KVFabric is disabled on this worker")

    def start_load_kv(self, meta: KVFabricMetadata) -> None:
        self._finish_layered()  # a step that never reached post_forward (defensive)
        self._step = meta.step
        if not meta.loads:
            return
        mark("start_load", step=meta.step)
        if not self.enabled:
            self._fail_loads(meta.loads)
            return
        # Maps the pool if this worker has not reached the agent yet; a CPU worker that cannot
        # connect may still serve from its mapping (the scheduler's session holds the leases).
        self.client.connect()
        ready = [i for i in meta.loads if self._ready(i.pool_id)]
        self._fail_loads([i for i in meta.loads if not self._ready(i.pool_id)])
        if self.cuda is not None and self._layered_ok:
            self._start_layered(ready, meta)
            return
        if not ready:
            return
        if self.cuda is not None:
            self._after_engine_stream()
        copied: list[LoadIntent] = []
        started = time.perf_counter()
        for intent in ready:
            try:
                self._copy(intent.block_ids, intent.slots[self.rank], to_pool=False)
            except (ValueError, RuntimeError, AgentError) as exc:
                log.warning("load failed", extra={"req": intent.req_id, "error": str(exc)})
                self._fail_loads([intent])
                continue
            copied.append(intent)
        self._release_loads(copied, time.perf_counter() - started)

    def _release_loads(self, copied: list[LoadIntent], elapsed: float) -> None:
        """Trust the bytes only if our leases still held after the copy: otherwise a slot may
        have been evicted and rewritten under us."""
        if not copied:
            return
        blocks = sum(len(i.block_ids) for i in copied)
        try:
            held = self.client.release([i.lease_of(self.rank) for i in copied], blocks, elapsed)
        except AgentError:
            held = [False] * len(copied)
        for intent, ok in zip(copied, held, strict=True):
            if ok:
                self.stats.loaded_blocks += len(intent.block_ids)
            else:
                self._fail_loads([intent])

    # -- layered loads -------------------------------------------------------------------------------

    @staticmethod
    def _after_engine_stream() -> None:
        """The agent writes into the engine's blocks from its own streams, which know nothing
        of the engine's. With vLLM's async scheduling (the default) this step is prepared while
        the previous one still runs on the GPU, and a block allocated now may have been freed by
        a request that the running step still writes into (one that finished or was preempted
        meanwhile). vLLM's own offloading orders its loads after the compute stream likewise.
        Costs nothing when the GPU has caught up. (Prefetched loads need no wait: the scheduler
        prefetches only into blocks no running step touches.)"""
        torch.cuda.current_stream().synchronize()

    def _start_layered(self, ready: list[LoadIntent], meta: KVFabricMetadata) -> None:
        """The step's loads, layer by layer into the step's set of layer events: those the
        scheduler had the agent queue already (into our registration: the token says so), and
        one call for the rest, which the agent queues behind them, recording each layer's event
        and replying at once; ``wait_for_layer_load`` makes the forward wait."""
        assert self.cuda is not None
        started = time.perf_counter()
        events = self.cuda.event_set(meta.step % self._event_sets)
        mine = self.prefetch_token
        pre = [i for i in ready if (t := i.prefetched_for(self.rank)) and t == mine]
        stale = [i for i in ready if (t := i.prefetched_for(self.rank)) and t != mine]
        rest = [i for i in ready if not i.prefetched_for(self.rank)]
        # Queued by the scheduler into a registration we no longer hold (we reconnected), or
        # for a pool we cannot read (failed above): recomputed, once those copies ended.
        self._fail_loads(stale)
        if stale or any(i.prefetched_for(self.rank) for i in meta.loads if i not in ready):
            self._drain(self.cuda.event_set(meta.step % p.EVENT_SETS))
        if rest:
            self._after_engine_stream()
            try:
                self.client.call(
                    p.GpuCopy(
                        kv_id=self.kv_id,
                        to_pool=False,
                        block_ids=[b for i in rest for b in i.block_ids],
                        slots=[s for i in rest for s in i.slots[self.rank]],
                        layered=True,
                        event_set=meta.step % self._event_sets,
                    ),
                    p.GpuCopyReply,
                )
            except (ValueError, RuntimeError, AgentError) as exc:
                log.warning("load failed", extra={"reqs": [i.req_id for i in rest], "error": str(exc)})
                self._fail_loads(rest)
                rest = []
        intents = pre + rest
        mark("load_queued", prefetched=len(pre), rest=len(rest))
        if not intents:
            return
        blocks = sum(len(i.block_ids) for i in intents)
        # The agent's deadline plus the copy at a pessimistic 1 GB/s (50 GB/s is usual).
        budget = self.config.timeout_ms / 1000 + blocks * self._gpu_block_bytes / 1e9
        self._layered = _LayeredLoad(intents, started, set(), events, deadline=started + budget)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before a layer's attention: waits until that layer's copies ended, then orders the
        forward's stream after them.

        The host waits first, checking that the agent is alive: an event whose recorder died
        may never fire, and a stream made to wait on it would hang the engine. The forward's
        kernels for earlier layers run meanwhile, so the overlap stays."""
        load = self._layered
        if load is None or self.cuda is None:
            return
        events = load.events
        index = 0 if len(events) == 1 else self._layer_index.get(layer_name)
        if index is None or index in load.waited:
            return
        if not self._copies_ended(events[index], load.deadline):
            self._abandon_layered(load)
            return
        torch.cuda.current_stream().wait_event(events[index])
        load.waited.add(index)
        if len(load.waited) in (1, len(events)):
            mark("layer_ready", layers=len(load.waited))

    def _copies_ended(self, event: torch.cuda.Event, deadline: float = float("inf")) -> bool:
        """Waits for ``event``; False if the agent's session closed first (the agent died: its
        copies stopped with it, and the event may never fire) or the deadline passed (the agent
        is alive but its copies do not end: a hung CUDA context)."""
        next_check = time.perf_counter() + _LIVENESS_CHECK_S
        try:
            while not event.query():
                now = time.perf_counter()
                if now >= next_check:
                    if self.client.peer_closed():
                        return False
                    if now >= deadline:
                        log.error("a layered load passed its deadline; giving it up")
                        self.client.close()  # the agent drops our session and stops copying for it
                        return False
                    next_check = now + _LIVENESS_CHECK_S
                time.sleep(0)
        except RuntimeError:  # a CUDA error on the event: treat as the agent gone
            return False
        return True

    def _abandon_layered(self, load: _LayeredLoad) -> None:
        """The agent went away during a layered load: its blocks are recomputed, and no later
        layer waits on an event that may never fire. Only our session may have closed (a call
        of the save thread failed) while the agent still copies: a bounded wait for the last
        event lets such copies end before vLLM reuses the blocks."""
        log.error("the agent went away during a layered load; its blocks are recomputed")
        self._layered = None
        self._fail_loads(load.intents)
        self._drain(load.events)

    @staticmethod
    def _drain(events: Sequence[torch.cuda.Event]) -> None:
        """A bounded wait for copies queued into our blocks (recorded in layer order on one
        stream: the last event covers all) that we no longer wait on layer by layer."""
        deadline = time.perf_counter() + _ABANDON_GRACE_S
        with contextlib.suppress(RuntimeError):
            while events and not events[-1].query() and time.perf_counter() < deadline:
                time.sleep(0.001)

    def _finish_layered(self) -> None:
        """After the forward pass: waits for the copies (recorded in layer order on one
        stream: the last event covers all), releases the leases and reports what failed. A
        forward that did not wait on every layer (vLLM skipped the hook, e.g. in a full CUDA
        graph) may have read blocks before they arrived: they are reported for recompute."""
        load = self._layered
        if load is None or self.cuda is None:
            return
        if not self._copies_ended(load.events[-1], load.deadline):
            self._abandon_layered(load)
            return
        self._layered = None
        mark("load_done")
        elapsed = time.perf_counter() - load.started
        missed = len(load.events) - len(load.waited)
        if not missed:
            self._release_loads(load.intents, elapsed)
            return
        log.error("the forward pass did not wait for %d layers' loads; their blocks are recomputed", missed)
        self._fail_loads(load.intents)
        with contextlib.suppress(AgentError):  # else the leases end with the session or time out
            self.client.release([i.lease_of(self.rank) for i in load.intents], 0, elapsed)

    def _fail_loads(self, intents: list[LoadIntent]) -> None:
        for intent in intents:
            self._load_errors.update(intent.block_ids)
            self._tainted[intent.req_id] = max(intent.epoch, self._tainted.get(intent.req_id, -1))
            self.stats.load_errors += len(intent.block_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_layered()
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ---------------------------------------------------------------------------------------------

    def wait_for_save(self, meta: KVFabricMetadata) -> None:
        self._finish_layered()
        if self.saves is not None:
            self.saves.note(meta.saves)  # delayed by the scheduler even if we cannot save them
        if self._tainted and meta.saves:
            # Blocks computed attending to a failed load's blocks: when in doubt, miss. (With
            # async scheduling the next step, planned before vLLM saw the failure, builds on
            # them too: same epoch.) Once vLLM recomputed them the scheduler plans them again
            # in a later epoch, and those are saved.
            dropped = [i for i in meta.saves if i.epoch <= self._tainted.get(i.req_id, -1)]
            if dropped:
                self.stats.save_skipped_blocks += sum(len(i.keys) for i in dropped)
                log.warning(
                    "not saving blocks computed on top of a failed load",
                    extra={"reqs": sorted({i.req_id for i in dropped})},
                )
                meta = KVFabricMetadata(
                    loads=meta.loads,
                    saves=[i for i in meta.saves if i.epoch > self._tainted.get(i.req_id, -1)],
                    preempted=meta.preempted,
                )
        if not meta.saves or not self.enabled or not self.saves_here:
            return
        if self.saves is not None:
            self.saves.submit(self._forward_done(), list(meta.saves))
            return
        self._forward_done()()
        for intent in meta.saves:
            self._save_logged(intent)

    def _forward_done(self) -> Callable[[], None]:
        """A wait for the kernels that wrote this step's blocks: the agent copies on its own
        streams, which know nothing of the engine's. CPU engines have finished already."""
        if self.cuda is None:
            return lambda: None
        event = torch.cuda.Event()
        event.record()

        def wait() -> None:
            event.synchronize()
            mark("forward_ended")

        return wait

    def handle_preemptions(self, meta: KVFabricMetadata) -> None:
        """A preempted request's blocks are freed now: its saves must end before they are reused."""
        if self.saves is not None and meta.preempted and not self.saves.flush(meta.preempted):
            log.error("saves of preempted requests still running", extra={"reqs": list(meta.preempted)})

    def take_stats(self) -> dict[str, int]:
        """What the counters gained since the last call (saves may add to them meanwhile: what
        this call misses, the next one reports)."""
        now = asdict(self.stats)
        delta = {name: value - self._reported[name] for name, value in now.items()}
        self._reported = now
        return delta

    def get_finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Finished requests whose blocks vLLM kept for our background saves, now free to go."""
        for req_id in finished_req_ids:
            self._tainted.pop(req_id, None)
        return self.saves.finished(finished_req_ids) if self.saves is not None else None

    def _save_logged(self, intent: SaveIntent) -> None:
        try:
            self._save(intent)
        except AgentError as exc:
            self.stats.save_failures += 1
            log.debug("save skipped", extra={"req": intent.req_id, "error": str(exc)})

    def _save(self, intent: SaveIntent) -> None:
        mark("save_reserve", blocks=len(intent.keys))
        reply = self.client.reserve(self.namespace, list(intent.keys), intent.parent)
        hello = self.client.hello  # the session that holds the reservations
        granted = [
            (b, s, k) for b, s, k in zip(intent.block_ids, reply.slots, intent.keys, strict=True) if s >= 0
        ]
        self.stats.save_skipped_blocks += len(intent.keys) - len(granted)
        if not granted:
            return
        keys = [k for _, _, k in granted]
        # Under TP another rank's failed load may have spoiled what this rank computed: the
        # scheduler, which hears from every rank, commits. One shared copy (MLA) is never saved
        # without that check (an agent older than delegated commits).
        delegate = self.spec.tp_size > 1 and hello is not None and "delegated_commit" in hello.features
        if not self._ready(reply.pool_id) or (self.spec.one_copy_per_tp_group and not delegate):
            self.client.commit(self.namespace, [], keys, 0.0)
            self.stats.save_skipped_blocks += len(keys)
            return
        started = time.perf_counter()
        mark("save_copy", blocks=len(keys))
        try:
            self._copy([b for b, _, _ in granted], [s for _, s, _ in granted], to_pool=True)
        except (ValueError, RuntimeError, AgentError) as exc:
            log.warning("save copy failed", extra={"req": intent.req_id, "error": str(exc)})
            self.client.commit(self.namespace, [], keys, 0.0)  # frees the reserved slots
            return
        mark("save_copied")
        if delegate:
            assert hello is not None
            staged = StagedSave(
                req_id=intent.req_id,
                epoch=intent.epoch,
                namespace=self.namespace,
                keys=tuple(keys),
                owner=hello.session_id,
                owner_token=hello.session_token,
                pool_id=reply.pool_id,
            )
            with self._staged_lock:
                self._staged.append(staged)
            self.stats.saved_blocks += len(keys)  # written; visible once the scheduler commits
            return
        done = self.client.commit(self.namespace, keys, [], time.perf_counter() - started)
        mark("save_committed")
        self.stats.saved_blocks += done.committed

    def build_connector_worker_meta(self) -> KVFabricWorkerMeta | None:
        """The blocks written since the last step for the scheduler to commit (TP only); with
        prefetches, the step this output is of, and (after a registration) its token."""
        with self._staged_lock:
            staged, self._staged = self._staged, []
        targets: tuple[tuple[int, bytes], ...] = ()
        if self._announce > 0 and self.prefetch_token:
            self._announce -= 1
            targets = ((self.rank, self.prefetch_token),)
        step = self._step if self.prefetch_token else 0  # only a prefetching scheduler needs it
        if not (staged or targets or step):
            return None
        return KVFabricWorkerMeta(staged=tuple(staged), prefetch_targets=targets, step=step)

    def shutdown(self) -> None:
        self._finish_layered()
        if self.saves is not None:
            self.saves.close()
        if self._engine_saves is not None:
            self._engine_saves.close()
            self._engine_saves = None
        self.client.close()
        if self.copier is not None:
            self.copier.detach()
            self.copier.close()
