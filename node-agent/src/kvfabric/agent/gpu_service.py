"""GPU engines' side of the agent: pins the pool once, opens engines' KV tensors per session,
and runs their copies. CuPy is imported only when ``--cuda`` is on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvfabric.connector import protocol as p

if TYPE_CHECKING:
    from kvfabric.agent.gpu import CopyEngine, IpcEvents, IpcMappings, PinnedPool
    from kvfabric.agent.pool import Segment

log = logging.getLogger(__name__)


class GpuError(RuntimeError):
    """A GPU request could not be served (no CUDA, unknown GPU, unsupported handle...)."""


#: CUDA errors after which the context is unusable for every later call (cudaErrorIllegalAddress
#: and its kin, and an uncorrectable ECC error): the agent must stop, not go on reporting ready.
STICKY_CUDA_ERRORS = frozenset({214, 700, 714, 715, 716, 717, 718, 719})


def cuda_status(exc: BaseException) -> int | None:
    """The CUDA error code of a CuPy runtime or driver error, else None."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def check_layers_fit(
    layers: list[tuple[int, int, int]], num_blocks: int, segments: tuple[object, ...]
) -> None:
    """Every byte a registration names lies inside the allocation behind its handle.

    ``layers``: per layer ``(tensor address, allocation base, allocation size)`` as the driver
    reports them. Python integers throughout: nothing wraps (the engine's ``num_blocks``, offsets
    and plane sizes are its claims, the allocation's size is the driver's)."""
    for ptr, base, size in layers:
        if ptr < base:
            raise GpuError("a KV tensor starts before its allocation")
        for seg in segments:
            off, stride, length = seg.off, seg.stride, seg.length  # type: ignore[attr-defined]
            end = ptr + off + (num_blocks - 1) * stride + length
            if end > base + size:
                raise GpuError(
                    f"the registered geometry ({num_blocks} blocks) reaches {end - base} bytes into an "
                    f"allocation of {size} bytes; refused"
                )


@dataclass
class _SessionKV:
    mappings: dict[int, IpcMappings] = field(default_factory=dict)  # device index -> mappings
    engines: dict[int, CopyEngine] = field(default_factory=dict)  # kv_id -> engine
    events: dict[int, IpcEvents] = field(default_factory=dict)  # kv_id -> its layers' events


class GpuService:
    def __init__(
        self,
        segment: Segment,
        pin_threads: int,
        on_fatal: Callable[[str], None] | None = None,
        ready_bytes: int = 0,
        on_pinned: Callable[[int, int], None] | None = None,
        dma_saves: bool = True,
        dma_loads: bool = False,
    ) -> None:
        """``ready_bytes``: pinned bytes after which GPU engines are served (0: the whole
        pool); ``on_pinned(offset, length)``: a piece of the pool is pinned (or, with length
        covering the whole pool, every byte may be used: pinning failed before any use)."""
        self.segment = segment
        self.on_fatal = on_fatal
        self.on_pinned = on_pinned
        self.pin_threads = pin_threads
        self.dma_saves = dma_saves
        self.dma_loads = dma_loads
        self.ready_bytes = ready_bytes
        self.pinned: PinnedPool | None = None
        self.pinned_bytes = 0
        self.pin_seconds = 0.0
        self.ready = threading.Event()
        self.error: str | None = None
        self._sessions: dict[int, _SessionKV] = {}
        self._ids = 0
        self._lock = threading.Lock()

    def pin(self) -> None:
        """Populates and registers the whole pool (run once, in a thread, at agent start); GPU
        engines are served from ``ready_bytes`` pinned on, from the arenas pinned so far."""
        pinned: PinnedPool | None = None
        started = time.perf_counter()
        try:
            from kvfabric.agent.gpu import PinnedPool, host_address

            size = self.segment.size
            ready_at = min(self.ready_bytes or size, size)
            pinned = PinnedPool(host_address(self.segment.map), size, threads=self.pin_threads)

            def chunk_pinned(offset: int, length: int) -> None:  # pinning threads, one at a time
                self.pinned_bytes += length
                if self.on_pinned is not None:
                    self.on_pinned(offset, length)
                if self.pinned is None and self.pinned_bytes >= ready_at:
                    self.pinned = pinned
                    self.ready.set()
                    log.info(
                        "pool ready for GPU engines",
                        extra={
                            "pinned_bytes": self.pinned_bytes,
                            "seconds": round(time.perf_counter() - started, 2),
                        },
                    )

            populate, register, wall = pinned.pin(
                stop=self.segment.stopping, parts=self.segment.sizes, on_chunk=chunk_pinned
            )
            if self.segment.stopping.is_set():
                if self.pinned is None:  # else close() unregisters it, after the copies end
                    pinned.unregister()
                return
            self.segment.prefaulted_bytes = self.segment.size
            self.pin_seconds = wall
            log.info(
                "pool pinned for CUDA",
                extra={
                    "seconds": round(wall, 2),
                    # summed over the pinning threads, which overlap them
                    "populate_thread_s": round(populate, 2),
                    "register_thread_s": round(register, 2),
                },
            )
        except Exception as exc:  # no CUDA, no CuPy: the agent still serves CPU engines
            self.error = repr(exc)
            if self.pinned is not None:
                # GPU engines may already copy into the pinned part: it stays, and only it is lent
                log.error(
                    "pinning the pool for CUDA stopped part way; the pinned part serves",
                    extra={"error": self.error, "pinned_bytes": self.pinned_bytes},
                )
            else:
                if pinned is not None:
                    pinned.unregister()
                log.error(
                    "pinning the pool for CUDA failed; GPU engines will recompute",
                    extra={"error": self.error},
                )
                if self.on_pinned is not None:  # CPU engines may use every byte
                    self.on_pinned(0, self.segment.size)
        finally:
            self.ready.set()

    def register(self, session: int, req: p.RegisterGpuKV) -> tuple[int, int, bool]:
        """Opens an engine worker's KV tensors; returns (kv_id, block_bytes, whether its layer
        events could be opened too: without them its loads are whole, not layered)."""
        if not self.ready.wait(timeout=0) or self.pinned is None:
            raise GpuError(self.error or "the pool is still being pinned; retry shortly")
        from kvfabric.agent.gpu import (
            CopyEngine,
            IpcEvents,
            IpcMappings,
            LayerLayout,
            device_index,
        )
        from kvfabric.connector.kv_segments import segments_for

        if len(req.handles) != len(req.offsets):
            raise GpuError("handles and offsets differ in length")
        if len(req.layer_events) not in [len(req.handles) * k for k in range(p.EVENT_SETS + 1)]:
            raise GpuError(f"layer_events must be up to {p.EVENT_SETS} sets of one event per layer")
        try:
            device = device_index(req.device_uuid)
            segments = segments_for(req.layout, req.plane_bytes, req.num_blocks)
        except (LookupError, ValueError) as exc:
            raise GpuError(str(exc)) from exc
        with self._lock:
            state = self._sessions.setdefault(session, _SessionKV())
            maps = state.mappings.setdefault(device, IpcMappings(device))
            try:
                opened = [(maps.open(h), off) for h, off in zip(req.handles, req.offsets, strict=True)]
                check_layers_fit(
                    [(base + off, base, maps.size_of(base)) for base, off in opened], req.num_blocks, segments
                )
            except ValueError as exc:
                raise GpuError(str(exc)) from exc
            layers = [LayerLayout(base + off, req.num_blocks, segments) for base, off in opened]
            engine = CopyEngine(
                device,
                self.pinned.address,
                self.pinned.size,
                layers,
                dma_saves=self.dma_saves,
                dma_loads=self.dma_loads,
            )
            self._ids += 1
            state.engines[self._ids] = engine
            if req.layer_events:
                clash = self._open_event_handles() & {bytes(h) for h in req.layer_events}
                if clash:
                    # CUDA IPC event handles name the creating process by PID: two pods whose
                    # engines have the same PID (1, in containers) can hand over identical
                    # handles. Recording one engine's event would then never signal the other's
                    # stream, which would read KV before it arrived: no layered loads here.
                    log.warning(
                        "this engine's layer events are indistinguishable from another engine's "
                        "(same PID in another PID namespace?); its loads will not be layered",
                        extra={"session": session},
                    )
                else:
                    try:
                        state.events[self._ids] = IpcEvents(device, req.layer_events)
                    except Exception as exc:  # CuPy's CUDARuntimeError and the like
                        log.warning(
                            "cannot open the engine's layer events (CUDA IPC events need a /dev/shm "
                            "shared with the engine, e.g. hostIPC); its loads will not be layered",
                            extra={"session": session, "error": str(exc)},
                        )
            return self._ids, engine.block_bytes, self._ids in state.events

    def _open_event_handles(self) -> set[bytes]:
        return {h for st in self._sessions.values() for ev in st.events.values() for h in ev.handles}

    def unregister(self, session: int, kv_id: int) -> None:
        """Forgets one registration (its namespace was refused after the tensors were opened)."""
        with self._lock:
            state = self._sessions.get(session)
            engine = state.engines.pop(kv_id, None) if state else None
            events = state.events.pop(kv_id, None) if state else None
        if engine is not None:
            engine.close()
        if events is not None:
            events.close()

    def copy(self, session: int, req: p.GpuCopy) -> str:
        """Runs on an executor thread; the event loop keeps serving other sessions."""
        state = self._sessions.get(session)
        engine = state.engines.get(req.kv_id) if state else None
        if engine is None:
            raise GpuError(f"unknown kv_id {req.kv_id} for this session")
        events = None
        if req.layered:
            opened = state.events.get(req.kv_id) if state else None
            if opened is None:
                raise GpuError("a layered load needs layer events, registered with the KV tensors")
            layers = engine.num_layers
            events = opened.events[req.event_set * layers : (req.event_set + 1) * layers]
            if len(events) != layers:
                raise GpuError(f"event set {req.event_set} was not registered")
        try:
            return engine.copy(req.block_ids, req.slots, req.to_pool, events)
        except ValueError as exc:
            raise GpuError(str(exc)) from exc
        except Exception as exc:
            if cuda_status(exc) in STICKY_CUDA_ERRORS and self.on_fatal is not None:
                self.on_fatal(repr(exc))
            raise GpuError(f"copy failed: {exc}") from exc

    def drop_session(self, session: int) -> int:
        """Closes a gone engine's IPC mappings (after its copies finished); returns how many."""
        with self._lock:
            state = self._sessions.pop(session, None)
        if state is None:
            return 0
        for engine in state.engines.values():
            engine.close()  # copies may still be running into the engine's tensors
        for events in state.events.values():
            events.close()
        closed = 0
        for maps in state.mappings.values():
            closed += len(maps)
            maps.close()
        return closed

    def mapped(self) -> int:
        with self._lock:  # executor threads change the sessions
            return sum(len(m) for s in self._sessions.values() for m in s.mappings.values())

    def close(self) -> None:
        for session in list(self._sessions):
            self.drop_session(session)
        if self.pinned is not None:
            self.pinned.unregister()
            self.pinned = None
