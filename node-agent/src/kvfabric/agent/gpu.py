"""The agent's CUDA data path: a pinned pool, engines' KV tensors opened over CUDA IPC, and
block copies on the agent's own streams.

Only imported when a GPU engine registers (CuPy is an optional dependency: ``kvfabric-agent[gpu]``).

Runs of consecutive blocks and slots go to the copy engines as a few large ``cudaMemcpyAsync``
calls (they leave the SMs to the engine's decode). Fragmented batches go through a device
staging buffer: one kernel launch per staging chunk scatters (or gathers) every segment of its
blocks between it and the engine's tensors, computing every address from the block ids uploaded
once per copy and a segment table uploaded once per engine (no per-block Python loop, no
per-launch table), and the copy engines move slot runs across PCIe. Staging kernels run on at
most ``STAGED_CTAS`` CTAs: an HBM-to-HBM copy outruns PCIe on a few SMs, and the others stay
the engine's. The buffer's two halves alternate between a DMA stream and a kernel stream, so
PCIe copies into one half go on while the other half's kernel waits for SMs.

Fragmented *saves* skip the kernel where the driver batches copies (``dma_saves``) and the
segments are at least ``DMA_ONLY_MIN_BYTES``: one linear copy per block and segment, queued a
few thousand per ``cuMemcpyBatchAsync`` call. A save runs in the background while the engine
computes, and a kernel from the agent's CUDA context takes the whole GPU from the engine's
context for its time slices (two contexts time-slice the SMs); the copy engines do not (H200:
matmuls beside another process's staged saves 1.11-1.13x slower, beside its DMA-only saves
0.90-0.99x; a real engine's cold TTFT 1.015-1.021x of no connector against 1.034x with staged
saves; ``benchmarks/RESULTS.md``). The price is throughput (0.57-0.80x of the D2H ceiling, by
host, against 0.92-0.94x staged), paid in the background. Loads, on the critical path, stay
staged unless ``dma_loads`` (off by default) asks for the same: a trade for hosts where other
engines share the GPU while one loads.

KV layouts are described per layer as *segments* (``kvfabric.connector.kv_segments``, shared
with the engine's own saves): a block ``b`` of a layer is the byte ranges ``base + off_j + b *
stride_j`` of length ``len_j``. Covered:

- ``[2, num_blocks, block_size, kv_heads, head_size]`` (K and V planes): two segments;
- ``[num_blocks, 2, ...]``, MLA ``[num_blocks, block_size, head_size]`` and vLLM >= 0.26's
  K|V-packed ``[num_blocks, heads, block_size, 2 * head_size]``: one segment.

A pool slot holds every layer's segments back to back, in layer order.

Loads and saves have their own streams, so a load never queues behind a background save. A
*layered* load records, after each layer's copies, an interprocess CUDA event the engine shared
at registration, and returns once everything is queued: the engine's stream waits on layer
``i``'s event just before layer ``i``'s attention, so the copies overlap the forward pass.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvfabric.agent.pool import address_of, chunks_of, interleaved_chunks, populate
from kvfabric.connector.kv_segments import Segment

log = logging.getLogger(__name__)

_KERNEL = r"""
extern "C" __global__ void copy_segments(
    const unsigned long long* blocks, const unsigned long long* slots, int n, int nsegs,
    const unsigned long long* segs, unsigned long long sub,
    unsigned long long host_base, unsigned long long host_stride, int to_host) {
    // Work item w = j * n + i moves segment j of block i; CTA c takes items c, c + gridDim.x,
    // ... (a grid smaller than the work leaves SMs to the engine). segs[4*j..]: device offset,
    // device stride per block, bytes, offset in a pool slot. The block's device side is
    // segs[4j] + blocks[i] * segs[4j+1]; its host side (pool or staging) host_base + (slots ?
    // slots[i] : i) * host_stride + segs[4j+3] - sub.
    for (long long w = blockIdx.x; w < (long long)n * nsegs; w += gridDim.x) {
        int i = (int)(w % n);
        const unsigned long long* g = segs + 4 * (w / n);
        char* dev = (char*)(g[0] + blocks[i] * g[1]);
        unsigned long long slot = slots ? slots[i] : (unsigned long long)i;
        char* host = (char*)(host_base + slot * host_stride + g[3] - sub);
        unsigned long long nbytes = g[2];
        const char* src = to_host ? dev : host;
        char* dst = to_host ? host : dev;
        if ((((unsigned long long)src | (unsigned long long)dst | nbytes) & 15) == 0) {
            // four 16-byte loads in flight per thread before their stores: a few CTAs then
            // keep enough bytes in flight to outrun PCIe several times over
            const int4* s = (const int4*)src;
            int4* d = (int4*)dst;
            unsigned long long n16 = nbytes / 16, t = threadIdx.x, step = blockDim.x;
            unsigned long long k = t;
            for (; k + 3 * step < n16; k += 4 * step) {
                int4 a = s[k], b = s[k + step], c = s[k + 2 * step], e = s[k + 3 * step];
                d[k] = a; d[k + step] = b; d[k + 2 * step] = c; d[k + 3 * step] = e;
            }
            for (; k < n16; k += step) d[k] = s[k];
        } else {
            for (unsigned long long k = threadIdx.x; k < nbytes; k += blockDim.x) dst[k] = src[k];
        }
    }
}
"""

Ids = Sequence[int] | np.ndarray

#: Descriptors at least this large (after coalescing) are sent to the DMA engines.
DMA_MIN_BYTES = 1 << 20
#: ... as long as there are at most this many of them; otherwise one kernel launch is cheaper.
DMA_MAX_CALLS = 256
#: The pool is registered with CUDA in pieces of this size, and no DMA spans two of them. Seen
#: on an H200 with vLLM's cross-layer blocks: gap-free runs of 625 2 MiB blocks sent as one
#: pitched copy across pieces failed with "invalid argument"; split at pieces and sent as linear
#: copies they pass (tests/gpu).
REGISTER_CHUNK = 1 << 30
#: Most CTAs a staging kernel (HBM to HBM) runs on, so that it takes a few of the GPU's SMs from
#: the engine's kernels instead of all of them; a kernel on mapped pinned memory is not capped
#: (its CTAs mostly wait on PCIe, and it needs many in flight to fill it).
STAGED_CTAS = 16
#: DMA-only copies: segments at least this large; smaller ones cost the copy engines more per
#: byte than a staging kernel does (H200, 256 random blocks: 32 KiB segments 0.78x of the D2H
#: ceiling, MLA's 18 KiB ones 0.28x where staged they reach 0.77x) ...
DMA_ONLY_MIN_BYTES = 32 << 10
#: ... queued this many per batch call.
BATCH_MAX = 4096
#: cudaHostRegisterPortable | cudaHostRegisterMapped
_HOST_REGISTER_FLAGS = 1 | 2


def _cupy() -> Any:
    import cupy

    return cupy


@dataclass(frozen=True)
class LayerLayout:
    base: int  # device address of the layer's tensor
    num_blocks: int
    segments: tuple[Segment, ...]

    @property
    def block_bytes(self) -> int:
        return sum(s.length for s in self.segments)


class PinnedPool:
    """Registers a host mapping with CUDA (page-locked, device-mapped), in parallel chunks."""

    def __init__(self, address: int, size: int, threads: int = 16, chunk: int = REGISTER_CHUNK) -> None:
        self.address = address
        self.size = size
        self.threads = threads
        self.chunk = chunk
        self._chunks: list[tuple[int, int]] = []
        self.register_seconds = 0.0

    def populate(self) -> float:
        """Faults every page in, in parallel: registering populated pages is then fast."""
        return populate(self.address, self.size, self.threads, self.chunk)

    def register(self) -> float:
        cp = _cupy()
        chunks = chunks_of(self.size, self.chunk)
        started = time.perf_counter()

        def one(c: tuple[int, int]) -> None:
            cp.cuda.runtime.hostRegister(self.address + c[0], c[1], _HOST_REGISTER_FLAGS)

        with ThreadPoolExecutor(self.threads, "kvfabric-pin") as ex:
            list(ex.map(one, chunks))
        self._chunks = chunks
        self.register_seconds = time.perf_counter() - started
        return self.register_seconds

    def pin(
        self,
        stop: threading.Event | None = None,
        parts: list[int] | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> tuple[float, float, float]:
        """Populates and registers the pool chunk by chunk, each thread registering a chunk as
        soon as it has populated it, so registration overlaps the first touch of other chunks
        (one after the other they added up: 10.4 + 4.2 s for 64 GiB on an H200 host). Chunks go
        round-robin over ``parts`` (the pool's file sizes, default one file); ``on_chunk(offset,
        length)`` is called as each one is pinned, from the pinning thread. Returns (populate,
        register) seconds summed over threads, and the wall time. On failure the error is
        raised with the chunks pinned so far still registered (``unregister`` drops them): the
        caller may already serve from them."""
        cp = _cupy()
        cp.cuda.runtime.free(0)  # CUDA's context, once, before the threads race to create it
        chunks = interleaved_chunks(parts or [self.size], self.chunk)
        times = [0.0, 0.0]
        lock = threading.Lock()
        started = time.perf_counter()

        def one(c: tuple[int, int]) -> None:
            if stop is not None and stop.is_set():
                return  # the agent is stopping
            t0 = time.perf_counter()
            populate(self.address + c[0], c[1], 1, c[1])
            t1 = time.perf_counter()
            cp.cuda.runtime.hostRegister(self.address + c[0], c[1], _HOST_REGISTER_FLAGS)
            t2 = time.perf_counter()
            with lock:
                self._chunks.append(c)
                times[0] += t1 - t0
                times[1] += t2 - t1
                if on_chunk is not None:  # under the lock: the caller counts bytes without its own
                    on_chunk(*c)

        with ThreadPoolExecutor(self.threads, "kvfabric-pin") as ex:
            list(ex.map(one, chunks))
        return times[0], times[1], time.perf_counter() - started

    def unregister(self) -> None:
        if not self._chunks:
            return  # nothing pinned (also: no CuPy to ask)
        cp = _cupy()
        for off, _ in self._chunks:
            cp.cuda.runtime.hostUnregister(self.address + off)
        self._chunks = []


class _Ids:
    """One copy's checked block ids and slots, where their runs break (the same for every
    layer), and their upload to the device, once, at the first kernel that needs them (an
    upload from pageable memory waits for the stream: once, not per launch)."""

    def __init__(self, blocks: np.ndarray, slots: np.ndarray, breaks: np.ndarray, stream: Any) -> None:
        self.blocks, self.slots, self.breaks, self._stream = blocks, slots, breaks, stream
        self._dev: Any = None

    def device(self, first: int) -> tuple[int, int]:
        """Device addresses of ``blocks[first]`` and ``slots[first]``."""
        if self._dev is None:
            with self._stream:
                self._dev = _cupy().asarray(np.stack([self.blocks, self.slots]))
        base, row = int(self._dev.data.ptr), len(self.blocks) * 8
        return base + first * 8, base + row + first * 8


class _Lanes:
    """One direction's streams: DMA (copy engines) and kernels, and per staging half the events
    that hand it from one to the other."""

    def __init__(self, cp: Any) -> None:
        self.dma = cp.cuda.Stream(non_blocking=True)
        self.kern = cp.cuda.Stream(non_blocking=True)
        # [half]: the DMA into/out of that half ended; the kernel on that half ended.
        self.dma_done = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self.kern_done = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._join = cp.cuda.Event(disable_timing=True)
        self.half = 0  # the staging half the next chunk uses

    def join(self) -> None:
        """Everything queued on either stream so far comes before what is queued on ``kern``
        next (an event recorded on ``kern`` after this covers both)."""
        self._join.record(self.dma)
        self.kern.wait_event(self._join)

    def synchronize(self) -> None:
        self.dma.synchronize()
        self.kern.synchronize()


class CopyEngine:
    """Copies blocks between one engine's device KV layers and the pinned pool, on one GPU."""

    def __init__(
        self,
        device: int,
        pool_address: int,
        pool_bytes: int,
        layers: Sequence[LayerLayout],
        fragmented: str = "staged",
        staging_bytes: int = 64 << 20,
        register_chunk: int = REGISTER_CHUNK,
        staged_ctas: int = STAGED_CTAS,
        batched: bool = True,
        dma_saves: bool = True,
        dma_loads: bool = False,
    ) -> None:
        cp = _cupy()
        self.register_chunk = register_chunk
        if staged_ctas < 1:
            raise ValueError("staged_ctas must be at least 1")
        self.staged_ctas = staged_ctas
        self.batched = batched
        self.dma_saves = dma_saves
        self.dma_loads = dma_loads
        if fragmented not in ("staged", "kernel"):
            raise ValueError("fragmented must be 'staged' or 'kernel'")
        self.fragmented = fragmented
        self.staging_bytes = staging_bytes
        self._staging: dict[bool, Any] = {}  # per direction: device buffer, at its first staged copy
        self._in_flight: dict[bool, _Ids] = {}  # per direction: ids a layered load's kernels still read
        self.device = device
        self.pool_address = pool_address
        self.pool_bytes = pool_bytes
        self.layers = list(layers)
        self.block_bytes = sum(layer.block_bytes for layer in self.layers)
        # Column tables, one entry per (layer, segment): where it lives on the device and where
        # in a pool slot.
        dev_off: list[int] = []
        stride: list[int] = []
        length: list[int] = []
        slot_off: list[int] = []
        self._layer_cols: list[slice] = []  # each layer's rows of the tables below
        offset = 0
        for layer in self.layers:
            self._layer_cols.append(slice(len(dev_off), len(dev_off) + len(layer.segments)))
            for seg in layer.segments:
                dev_off.append(layer.base + seg.off)
                stride.append(seg.stride)
                length.append(seg.length)
                slot_off.append(offset)
                offset += seg.length
        self._dev_off = np.array(dev_off, dtype=np.uint64)
        self._stride = np.array(stride, dtype=np.uint64)
        self._len = np.array(length, dtype=np.uint64)
        self._slot_off = np.array(slot_off, dtype=np.uint64)
        self._num_blocks = min(layer.num_blocks for layer in self.layers)
        with cp.cuda.Device(device):
            # Keyed by ``to_pool``: loads never wait behind saves, and both directions overlap.
            # Each direction has a copy-engine stream and a kernel stream, so PCIe copies into
            # one half of the staging buffer go on while the other half's kernel waits for SMs
            # (or for the GPU to switch from the engine's process to ours).
            self._streams = {d: _Lanes(cp) for d in (False, True)}
            self._kernel = cp.RawKernel(_KERNEL, "copy_segments")
            # The segment table the kernel reads, [segments, 4]: uploaded once.
            table = np.stack([self._dev_off, self._stride, self._len, self._slot_off], axis=1)
            self._segs = cp.asarray(np.ascontiguousarray(table))
        self._locks = {d: threading.Lock() for d in (False, True)}
        self._closed = False

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _check(self, block_ids: Ids, slots: Ids) -> tuple[np.ndarray, np.ndarray]:
        b = np.asarray(block_ids, dtype=np.uint64)
        s = np.asarray(slots, dtype=np.uint64)
        if b.shape != s.shape:
            raise ValueError("block_ids and slots differ in length")
        if len(b) and (
            int(b.max()) >= self._num_blocks or (int(s.max()) + 1) * self.block_bytes > self.pool_bytes
        ):
            raise ValueError("block id or slot out of range")
        return b, s

    def _run_breaks(self, b: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Indexes where a run of consecutive (block, slot) pairs ends: the next pair does not
        follow on, or its slot starts in another registered piece of the pool."""
        piece = (s * np.uint64(self.block_bytes)) // np.uint64(self.register_chunk)
        return (
            np.flatnonzero(
                (np.diff(b.astype(np.int64)) != 1)
                | (np.diff(s.astype(np.int64)) != 1)
                | (np.diff(piece) != 0)
            )
            + 1
        )

    def dma_plan(
        self, block_ids: Ids, slots: Ids, to_pool: bool, cols: slice = slice(None)
    ) -> list[tuple[int, ...]]:
        """Pitched copies ``(dst, dpitch, src, spitch, width, height)``: one per run of consecutive
        (block, slot) pairs and per segment in ``cols``; a run's segment is strided on both sides."""
        b, s = self._check(block_ids, slots)
        if len(b) == 0:
            return []
        return self._dma_plan(b, s, self._run_breaks(b, s), to_pool, cols)

    def _dma_plan(
        self, b: np.ndarray, s: np.ndarray, brk: np.ndarray, to_pool: bool, cols: slice
    ) -> list[tuple[int, ...]]:
        """:meth:`dma_plan` for checked ids whose run breaks are known."""
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [len(b)]))
        plan: list[tuple[int, ...]] = []
        for st, en in zip(starts.tolist(), ends.tolist(), strict=True):
            for j in range(*cols.indices(len(self._len))):
                dev = int(self._dev_off[j] + b[st] * self._stride[j])
                host = self.pool_address + int(s[st]) * self.block_bytes + int(self._slot_off[j])
                width, height = int(self._len[j]), en - st
                if to_pool:
                    plan.append((host, self.block_bytes, dev, int(self._stride[j]), width, height))
                else:
                    plan.append((dev, int(self._stride[j]), host, self.block_bytes, width, height))
        return plan

    def copy(self, block_ids: Ids, slots: Ids, to_pool: bool, events: Sequence[int] | None = None) -> str:
        """Copies and waits for completion. Returns the method used:

        - ``dma``: runs of consecutive blocks and slots as a few large pitched copies;
        - ``staged`` (fragmented batches): kernels gather the blocks into a device staging
          buffer (HBM to HBM, brief), and the copy engines move slot runs across PCIe; the
          SMs are left to the engine and both directions can overlap;
        - ``kernel`` (``fragmented="kernel"``): one gather/scatter kernel per copy (or layer)
          reading and writing mapped pinned memory directly; they hold SMs for the whole PCIe
          transfer.

        ``events`` (loads only): one opened interprocess event per layer. Layer by layer, its
        copies are queued and its event recorded after them; returns once all are queued,
        without waiting (the engine's stream waits on the events).

        Kernels compute their addresses from the block ids, uploaded once per copy: an upload
        from pageable memory waits for the stream, and one per layer serialised fragmented
        layered loads back into whole ones (seen on an H200 as one warm request in eight at
        108 ms instead of 40).
        """
        if events is not None and (to_pool or len(events) != self.num_layers):
            raise ValueError(f"a layered load needs one event per layer ({self.num_layers})")
        b, s = self._check(block_ids, slots)
        if len(b) == 0:
            return "none"
        cp = _cupy()
        lanes = self._streams[to_pool]
        groups = [slice(None)] if events is None else self._layer_cols
        with self._locks[to_pool], cp.cuda.Device(self.device):
            if self._closed:
                raise ValueError("the engine's session has ended")
            ids = _Ids(b, s, self._run_breaks(b, s), lanes.kern)
            first = self._dma(ids, to_pool, groups[0])
            if events is None and first is None and self._dma_only(ids, to_pool, lanes, slice(None)):
                lanes.synchronize()
                return "dma"
            if first is None and not (events is not None and self._dma_only_fits(to_pool, groups[0])):
                ids.device(0)  # kernels ahead: upload now, while the kernel stream is idle
            method = "none"
            for i, cols in enumerate(groups):
                plan = first if i == 0 else self._dma(ids, to_pool, cols)
                if plan is None and events is not None and self._dma_only(ids, to_pool, lanes, cols):
                    method = "dma"
                else:
                    method = self._queue(ids, to_pool, cols, lanes, plan)
                if events is not None:  # after this layer's copies and kernels, both streams
                    lanes.join()
                    cp.cuda.runtime.eventRecord(events[i], lanes.kern.ptr)
            if events is None:
                lanes.synchronize()
            else:  # the uploaded ids must outlive the queued kernels: kept until the next copy
                self._in_flight[to_pool] = ids
        return method

    def close(self) -> None:
        """Waits for every queued copy (layered loads return before theirs end) and refuses
        later ones: the engine's tensors are about to be unmapped. A copy already waiting for
        a lock when its engine went away is refused, not run against closed mappings."""
        cp = _cupy()
        with self._locks[False], self._locks[True], cp.cuda.Device(self.device):
            self._closed = True
            for lanes in self._streams.values():
                lanes.synchronize()

    def _dma(self, ids: _Ids, to_pool: bool, cols: slice) -> list[tuple[int, ...]] | None:
        """The DMA calls that copy segments ``cols``, or None where runs are too many or too
        short for DMA to beat a kernel."""
        ncols = len(range(*cols.indices(len(self._len))))
        if (1 + len(ids.breaks)) * ncols > DMA_MAX_CALLS:
            return None
        plan = self._dma_plan(ids.blocks, ids.slots, ids.breaks, to_pool, cols)
        return plan if plan and min(p[4] * p[5] for p in plan) >= DMA_MIN_BYTES else None

    def _dma_only_fits(self, to_pool: bool, cols: slice) -> bool:
        """Whether segments ``cols`` of a batch without a pitched DMA plan go as DMA-only
        copies: on for this direction, batching on, staged (not direct-kernel) fragments, and
        segments large enough."""
        if not ((self.dma_saves if to_pool else self.dma_loads) and self.batched):
            return False
        return self.fragmented == "staged" and int(self._len[cols].min()) >= DMA_ONLY_MIN_BYTES

    def _dma_only(self, ids: _Ids, to_pool: bool, lanes: _Lanes, cols: slice) -> bool:
        """Queues segments ``cols`` of a fragmented batch (one :meth:`_dma` found no plan for)
        as one linear copy per block and segment, batched (no kernel: ours time-slice the GPU
        with the engine's); False where that is not the plan, or the driver refused a batch
        (then nothing is left half-done that the next plan does not redo)."""
        if not self._dma_only_fits(to_pool, cols):
            return False
        b, s = ids.blocks[:, None], ids.slots[:, None]  # [blocks, segments] below
        dev = (self._dev_off[None, cols] + b * self._stride[None, cols]).ravel()
        slot_base = np.uint64(self.pool_address) + s * np.uint64(self.block_bytes)
        host = (slot_base + self._slot_off[None, cols]).ravel()
        lengths = self._len[cols]
        sizes = np.broadcast_to(lengths, (len(b), len(lengths))).ravel()
        dst, src = (host, dev) if to_pool else (dev, host)
        return _BATCH.copy_arrays(dst, src, sizes, lanes.dma.ptr)

    def _queue(
        self, ids: _Ids, to_pool: bool, cols: slice, lanes: _Lanes, plan: list[tuple[int, ...]] | None
    ) -> str:
        """Queues the copies of segments ``cols`` (by ``plan`` where DMA is chosen); returns the
        method used."""
        cp = _cupy()
        kind = cp.cuda.runtime.memcpyDeviceToHost if to_pool else cp.cuda.runtime.memcpyHostToDevice
        b, s = ids.blocks, ids.slots
        if plan is not None:
            self._memcpys(plan, kind, lanes.dma)
            return "dma"
        if self.fragmented == "kernel":  # straight between the tensors and mapped pinned memory
            self._launch(ids, 0, len(b), cols, 0, self.pool_address, self.block_bytes, to_pool, lanes.kern)
            return "kernel"
        stage, half_bytes = self._staging_buffer(to_pool)
        per = int(self._len[cols].sum())  # one block's segments ``cols``, packed in staging
        slot_base = int(self._slot_off[cols][0])
        cap = max(1, half_bytes // per)
        for c0 in range(0, len(b), cap):
            h = lanes.half
            lanes.half ^= 1
            buf = stage + h * half_bytes
            sc = s[c0 : c0 + cap]
            brk = self._run_breaks(np.arange(len(sc), dtype=np.uint64), sc).tolist()
            copies = []
            for i0, i1 in zip([0, *brk], [*brk, len(sc)], strict=True):
                host = self.pool_address + int(sc[i0]) * self.block_bytes + slot_base
                dev = buf + i0 * per
                if to_pool:
                    copies.append((host, self.block_bytes, dev, per, per, i1 - i0))
                else:
                    copies.append((dev, per, host, self.block_bytes, per, i1 - i0))
            if to_pool:  # gather into the half once its last copy out ended, then copy out
                lanes.kern.wait_event(lanes.dma_done[h])
                self._launch(ids, c0, len(sc), cols, slot_base, buf, per, True, lanes.kern, slots=False)
                lanes.kern_done[h].record(lanes.kern)
                lanes.dma.wait_event(lanes.kern_done[h])
                self._memcpys(copies, kind, lanes.dma)
                lanes.dma_done[h].record(lanes.dma)
            else:  # copy in once the half's last scatter ended, then scatter
                lanes.dma.wait_event(lanes.kern_done[h])
                self._memcpys(copies, kind, lanes.dma)
                lanes.dma_done[h].record(lanes.dma)
                lanes.kern.wait_event(lanes.dma_done[h])
                self._launch(ids, c0, len(sc), cols, slot_base, buf, per, False, lanes.kern, slots=False)
                lanes.kern_done[h].record(lanes.kern)
        return "staged"

    def _launch(
        self,
        ids: _Ids,
        first: int,
        n: int,
        cols: slice,
        sub: int,
        host_base: int,
        host_stride: int,
        to_host: bool,
        stream: Any,
        slots: bool = True,
    ) -> None:
        """One kernel over blocks ``first:first+n`` and segments ``cols``; a segment's host
        side (pool or staging) at ``host_base + slot * host_stride + slot offset - sub``, the
        slot being the block's own slot (``slots``) or its index in the batch. Staging kernels
        (``slots=False``) run on at most ``staged_ctas`` CTAs."""
        j0, j1, _ = cols.indices(len(self._len))
        items = n * (j1 - j0)
        blocks, slot_ptr = ids.device(first)
        args = (
            np.uint64(blocks),
            np.uint64(slot_ptr if slots else 0),
            np.int32(n),
            np.int32(j1 - j0),
            np.uint64(int(self._segs.data.ptr) + j0 * 32),
            np.uint64(sub),
            np.uint64(host_base),
            np.uint64(host_stride),
            np.int32(to_host),
        )
        self._kernel((items if slots else min(items, self.staged_ctas),), (512,), args, stream=stream)

    def _staging_buffer(self, to_pool: bool) -> tuple[int, int]:
        """This direction's staging buffer (allocated at its first use): (address, bytes of one
        of its two halves; a half holds at least one whole block)."""
        cp = _cupy()
        staging = self._staging.get(to_pool)
        if staging is None:
            size = max(2 * self.block_bytes, self.staging_bytes)
            staging = self._staging[to_pool] = cp.cuda.alloc(size)
        return int(staging.ptr), staging.mem.size // 2

    def _memcpys(self, copies: Sequence[tuple[int, ...]], kind: int, stream: Any) -> None:
        """Queues ``copies`` (disjoint, in any order) on ``stream``: the linear ones as one
        ``cuMemcpyBatchAsync`` where the driver has it and ``batched`` is on (one call, not one
        per random slot), the pitched ones one by one."""
        linear = [c for c in copies if c[1] == c[3] == c[4]]
        if self.batched and len(linear) > 1 and _BATCH.copy(linear, stream.ptr):
            copies = [c for c in copies if not c[1] == c[3] == c[4]]
        for copy in copies:
            self._memcpy(copy, kind, stream)

    @staticmethod
    def _memcpy(copy: tuple[int, ...], kind: int, stream: Any) -> None:
        rt = _cupy().cuda.runtime
        dst, dpitch, src, spitch, width, height = copy
        if dpitch == spitch == width:  # gap-free on both sides: one linear copy
            rt.memcpyAsync(dst, src, width * height, kind, stream.ptr)
        else:
            rt.memcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream.ptr)


class _MemcpyAttributes(ctypes.Structure):
    """``CUmemcpyAttributes``: source access order, source and destination location hints
    (ignored for device and pinned memory), flags."""

    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_type", ctypes.c_int),
        ("src_loc_id", ctypes.c_int),
        ("dst_loc_type", ctypes.c_int),
        ("dst_loc_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    ]


class _BatchCopies:
    """Linear copies queued with one ``cuMemcpyBatchAsync`` call (CUDA 12.8+ drivers; the
    13.x signature, ``_v2``, without the failure index). Where the driver lacks it, or refuses
    a batch, the caller queues the copies itself (a warning, once per cause)."""

    _STREAM_ORDER = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM

    def __init__(self) -> None:
        self._fn: Any = None
        self._missing = False
        self._warned: set[int] = set()
        self._attrs = _MemcpyAttributes(self._STREAM_ORDER, 0, 0, 0, 0, 0)
        self._attr_idx = (ctypes.c_size_t * 1)(0)

    def copy(self, copies: Sequence[tuple[int, ...]], stream: int) -> bool:
        """Queues ``copies`` ``(dst, _, src, _, width, height)``, linear; False if not done."""
        table = np.array([(c[0], c[2], c[4] * c[5]) for c in copies], dtype=np.uint64).T
        return self.copy_arrays(table[0], table[1], table[2], stream)

    def copy_arrays(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, stream: int) -> bool:
        """Queues linear copies ``src[i] -> dst[i]`` of ``sizes[i]`` bytes, :data:`BATCH_MAX`
        per call; False if the driver lacks batching or refused a batch (those before it are
        queued: redoing them copies the same bytes)."""
        if self._missing or (self._fn is None and not self._load()):
            return False
        dst, src, sizes = (np.ascontiguousarray(a, dtype=np.uint64) for a in (dst, src, sizes))
        for i in range(0, len(dst), BATCH_MAX):
            n = min(BATCH_MAX, len(dst) - i)
            rc = self._fn(
                dst[i:].ctypes.data,
                src[i:].ctypes.data,
                sizes[i:].ctypes.data,
                n,
                ctypes.byref(self._attrs),
                self._attr_idx,
                1,
                stream,
            )
            if rc != 0:
                if rc not in self._warned:
                    self._warned.add(rc)
                    log.warning(
                        "cuMemcpyBatchAsync_v2 refused a batch of %d copies (CUDA error %d): such "
                        "batches are queued another way",
                        n,
                        rc,
                    )
                return False
        return True

    def _load(self) -> bool:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuMemcpyBatchAsync_v2
        except (OSError, AttributeError):
            log.warning("this CUDA driver has no cuMemcpyBatchAsync_v2: copies are queued one by one")
            self._missing = True
            return False
        fn.argtypes = [ctypes.c_void_p] * 3 + [
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]
        self._fn = fn
        return True


_BATCH = _BatchCopies()


def _uuid_bytes(index: int) -> bytes:
    """The 16-byte UUID of CUDA device ``index``, from the driver API (CuPy's properties turn
    the UUID into a C string, which cuts it at the first zero byte)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    buf = (ctypes.c_char * 16)()
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
        raise LookupError(f"CUDA device {index} is not available")
    if libcuda.cuDeviceGetUuid_v2(buf, dev) != 0:
        raise LookupError(f"cannot read the UUID of CUDA device {index}")
    return bytes(buf)


def device_index(uuid: str) -> int:
    """CUDA device index of the GPU with this UUID (immune to CUDA_VISIBLE_DEVICES remapping)."""
    cp = _cupy()
    want = uuid.lower().removeprefix("gpu-").replace("-", "")
    for i in range(cp.cuda.runtime.getDeviceCount()):
        if _uuid_bytes(i).hex() == want:
            return i
    raise LookupError(f"no visible GPU has UUID {uuid}")


_IPC_HANDLE_BYTES = 64


def allocation_size(address: int) -> int:
    """Size of the device allocation that contains ``address`` (``cuMemGetAddressRange``, in
    the current context), so an engine's claimed geometry can be checked against it."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address))
    if rc != 0:
        raise ValueError(f"cannot read the size of the engine's allocation (CUDA driver error {rc})")
    return int(size.value) - (address - int(base.value))


def ipc_handle(shared: bytes) -> bytes:
    """The ``cudaIpcMemHandle_t`` inside a handle from torch's ``storage._share_cuda_()``.

    torch writes ``[format version][kind][payload]``: kind ``c`` is a plain ``cudaMalloc`` block
    followed by the 64-byte handle (seen on torch 2.11: version 2). Kind ``e`` (expandable
    segments, ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) and vLLM's cumem allocator
    (sleep mode) cannot be opened with legacy CUDA IPC: refused with a clear message.
    """
    if len(shared) == _IPC_HANDLE_BYTES:
        return shared  # a raw cudaIpcMemHandle_t
    if len(shared) == _IPC_HANDLE_BYTES + 2 and shared[1:2] == b"c":
        return shared[2:]
    raise ValueError(
        f"unsupported CUDA IPC handle (prefix {shared[:2]!r}, {len(shared)} bytes): the engine's KV "
        "cache must come from plain cudaMalloc (no expandable segments, no cumem sleep mode)"
    )


class IpcMappings:
    """Device allocations of one engine opened through legacy CUDA IPC; closed as a group when
    the engine's session ends, so no engine HBM stays mapped after the engine is gone."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._bases: dict[bytes, int] = {}
        self._sizes: dict[int, int] = {}  # base -> the allocation's size, from the driver

    def open(self, handle: bytes) -> int:
        """Base address of the allocation behind ``handle`` (each handle opened once)."""
        cp = _cupy()
        handle = ipc_handle(handle)
        if handle not in self._bases:
            with cp.cuda.Device(self.device):
                base = cp.cuda.runtime.ipcOpenMemHandle(
                    handle,
                    1,  # cudaIpcMemLazyEnablePeerAccess
                )
                self._bases[handle] = base
                self._sizes[base] = allocation_size(base)
        return self._bases[handle]

    def size_of(self, base: int) -> int:
        """Bytes of the opened allocation at ``base`` (the driver's answer, not the engine's)."""
        return self._sizes[base]

    def close(self) -> None:
        cp = _cupy()
        with cp.cuda.Device(self.device):
            for base in self._bases.values():
                cp.cuda.runtime.ipcCloseMemHandle(base)
        self._bases.clear()
        self._sizes.clear()

    def __len__(self) -> int:
        return len(self._bases)


class IpcEvents:
    """Interprocess CUDA events an engine created and shared (one per KV layer): the agent
    records them after a layered load's copies; destroyed when the engine's session ends."""

    def __init__(self, device: int, handles: Sequence[bytes]) -> None:
        cp = _cupy()
        self.device = device
        self.handles = {bytes(h) for h in handles}
        self.events: list[int] = []
        with cp.cuda.Device(device):
            try:
                for h in handles:
                    self.events.append(cp.cuda.runtime.ipcOpenEventHandle(bytes(h)))
            except Exception:
                self.close()
                raise

    def close(self) -> None:
        cp = _cupy()
        with cp.cuda.Device(self.device):
            for event in self.events:
                cp.cuda.runtime.eventDestroy(event)
        self.events = []


host_address = address_of  # the address of a writable mapping (e.g. the pool's)
