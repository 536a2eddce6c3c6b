"""The agent's CUDA data path: a pinned pool, engines' KV tensors opened over CUDA IPC, and
block copies on the agent's own streams.

Only imported when a GPU engine registers (CuPy is an optional dependency: ``kvfabric-agent[gpu]``).

Copies are described as a table of ``(src, dst, nbytes)`` descriptors built with NumPy (no
per-block Python loop), coalesced where consecutive blocks are contiguous on both sides. Few
large descriptors go to the copy engines as ``cudaMemcpyAsync`` calls (they leave the SMs to
the engine's decode); many small ones go to one gather/scatter kernel that reads and writes
mapped pinned memory directly.

KV layouts are described per layer as *segments*: a block ``b`` of a layer is the byte ranges
``base + off_j + b * stride_j`` of length ``len_j``. Covered:

- ``[2, num_blocks, block_size, kv_heads, head_size]`` (K and V planes): two segments;
- ``[num_blocks, 2, ...]``, MLA ``[num_blocks, block_size, head_size]`` and vLLM >= 0.26's
  K|V-packed ``[num_blocks, heads, block_size, 2 * head_size]``: one segment.

A pool slot holds every layer's segments back to back, in layer order.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvfabric.agent.pool import address_of, populate

log = logging.getLogger(__name__)

_KERNEL = r"""
extern "C" __global__ void copy_descriptors(const unsigned long long* desc, int n) {
    // desc[3*i] = src, desc[3*i+1] = dst, desc[3*i+2] = nbytes; one CTA per descriptor.
    int i = blockIdx.x;
    if (i >= n) return;
    const char* src = (const char*)desc[3 * i];
    char* dst = (char*)desc[3 * i + 1];
    unsigned long long nbytes = desc[3 * i + 2];
    unsigned long long n16 = nbytes / 16;
    if ((((unsigned long long)src | (unsigned long long)dst) & 15) == 0) {
        const int4* s = (const int4*)src;
        int4* d = (int4*)dst;
        for (unsigned long long k = threadIdx.x; k < n16; k += blockDim.x) d[k] = s[k];
        for (unsigned long long k = n16 * 16 + threadIdx.x; k < nbytes; k += blockDim.x) dst[k] = src[k];
    } else {
        for (unsigned long long k = threadIdx.x; k < nbytes; k += blockDim.x) dst[k] = src[k];
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


def _cupy() -> Any:
    import cupy

    return cupy


@dataclass(frozen=True)
class Segment:
    """One byte range of a block within a layer: ``off + b * stride`` for ``length`` bytes."""

    off: int
    stride: int
    length: int


@dataclass(frozen=True)
class LayerLayout:
    base: int  # device address of the layer's tensor
    num_blocks: int
    segments: tuple[Segment, ...]

    @property
    def block_bytes(self) -> int:
        return sum(s.length for s in self.segments)


def segments_for(layout: str, block_bytes_per_plane: int, num_blocks: int) -> tuple[Segment, ...]:
    """Segments of one layer for a named layout (``block_bytes_per_plane``: K or V of one block)."""
    if layout == "kv_planes":  # [2, NB, ...]
        return (
            Segment(0, block_bytes_per_plane, block_bytes_per_plane),
            Segment(num_blocks * block_bytes_per_plane, block_bytes_per_plane, block_bytes_per_plane),
        )
    if layout == "blocks_first":  # [NB, 2, ...]: K then V of a block are adjacent
        return (Segment(0, 2 * block_bytes_per_plane, 2 * block_bytes_per_plane),)
    if layout in ("block_chunk", "mla"):  # each block one gap-free chunk (MLA, packed K|V)
        return (Segment(0, block_bytes_per_plane, block_bytes_per_plane),)
    raise ValueError(f"unsupported KV layout {layout!r}")


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
        flags = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
        chunks = [(a, min(self.chunk, self.size - a)) for a in range(0, self.size, self.chunk)]
        started = time.perf_counter()

        def one(c: tuple[int, int]) -> None:
            cp.cuda.runtime.hostRegister(self.address + c[0], c[1], flags)

        with ThreadPoolExecutor(self.threads, "kvfabric-pin") as ex:
            list(ex.map(one, chunks))
        self._chunks = chunks
        self.register_seconds = time.perf_counter() - started
        return self.register_seconds

    def unregister(self) -> None:
        cp = _cupy()
        for off, _ in self._chunks:
            cp.cuda.runtime.hostUnregister(self.address + off)
        self._chunks = []


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
    ) -> None:
        cp = _cupy()
        self.register_chunk = register_chunk
        if fragmented not in ("staged", "kernel"):
            raise ValueError("fragmented must be 'staged' or 'kernel'")
        self.fragmented = fragmented
        self.staging_bytes = staging_bytes
        self._staging: Any = None  # device buffer, allocated at the first staged copy
        self.device = device
        self.pool_address = pool_address
        self.pool_bytes = pool_bytes
        self.layers = list(layers)
        self.block_bytes = sum(layer.block_bytes for layer in self.layers)
        # Column tables, one entry per (layer, segment): where it lives on the device and where
        # in a pool slot.
        dev_off, stride, length, slot_off = [], [], [], []
        offset = 0
        for layer in self.layers:
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
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._kernel = cp.RawKernel(_KERNEL, "copy_descriptors")
        self._lock = threading.Lock()

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

    def descriptors(self, block_ids: Ids, slots: Ids, to_pool: bool, base: int | None = None) -> np.ndarray:
        """``[n, 3]`` uint64 (src, dst, nbytes) for the kernel: one per block and segment,
        merged where both ends follow on directly. ``base``: address of slot 0 (default: the
        pool; the staging buffer for staged copies, whose "slots" are checked by the caller)."""
        if base is None:
            b, s = self._check(block_ids, slots)
        else:
            b, s = np.asarray(block_ids, dtype=np.uint64), np.asarray(slots, dtype=np.uint64)
        origin = np.uint64(self.pool_address if base is None else base)
        dev = self._dev_off[:, None] + b[None, :] * self._stride[:, None]  # [segments, blocks]
        host = origin + s[None, :] * np.uint64(self.block_bytes) + self._slot_off[:, None]
        length = np.ascontiguousarray(np.broadcast_to(self._len[:, None], dev.shape))
        src, dst = (dev, host) if to_pool else (host, dev)
        cont = np.zeros(src.shape, dtype=bool)
        if len(b) > 1:
            cont[:, 1:] = (src[:, 1:] == src[:, :-1] + length[:, :-1]) & (
                dst[:, 1:] == dst[:, :-1] + length[:, :-1]
            )
        starts = np.flatnonzero(~cont.reshape(-1))
        sums = np.add.reduceat(length.reshape(-1), starts) if len(starts) else length.reshape(-1)
        return np.stack([src.reshape(-1)[starts], dst.reshape(-1)[starts], sums], axis=1)

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

    def dma_plan(self, block_ids: Ids, slots: Ids, to_pool: bool) -> list[tuple[int, ...]]:
        """Pitched copies ``(dst, dpitch, src, spitch, width, height)``: one per run of consecutive
        (block, slot) pairs and per segment; a run's segment is strided on both sides."""
        b, s = self._check(block_ids, slots)
        if len(b) == 0:
            return []
        brk = self._run_breaks(b, s)
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [len(b)]))
        plan: list[tuple[int, ...]] = []
        for st, en in zip(starts.tolist(), ends.tolist(), strict=True):
            for j in range(len(self._len)):
                dev = int(self._dev_off[j] + b[st] * self._stride[j])
                host = self.pool_address + int(s[st]) * self.block_bytes + int(self._slot_off[j])
                width, height = int(self._len[j]), en - st
                if to_pool:
                    plan.append((host, self.block_bytes, dev, int(self._stride[j]), width, height))
                else:
                    plan.append((dev, int(self._stride[j]), host, self.block_bytes, width, height))
        return plan

    def copy(self, block_ids: Ids, slots: Ids, to_pool: bool) -> str:
        """Copies and waits for completion. Returns the method used:

        - ``dma``: runs of consecutive blocks and slots as a few large pitched copies;
        - ``staged`` (fragmented batches): a kernel gathers the blocks into a device staging
          buffer laid out like pool slots (HBM to HBM, brief), and the copy engines move slot
          runs across PCIe; the SMs are left to the engine and both directions can overlap;
        - ``kernel`` (``fragmented="kernel"``): one gather/scatter kernel reading and writing
          mapped pinned memory directly; it holds SMs for the whole PCIe transfer.
        """
        cp = _cupy()
        if len(block_ids) == 0:
            return "none"
        b, s = self._check(block_ids, slots)
        runs = 1 + len(self._run_breaks(b, s))
        plan = self.dma_plan(block_ids, slots, to_pool) if runs * len(self._len) <= DMA_MAX_CALLS else []
        use_dma = bool(plan) and min(p[4] * p[5] for p in plan) >= DMA_MIN_BYTES
        rt = cp.cuda.runtime
        with self._lock, cp.cuda.Device(self.device):
            if use_dma:
                kind = rt.memcpyDeviceToHost if to_pool else rt.memcpyHostToDevice
                for dst, dpitch, src, spitch, width, height in plan:
                    if dpitch == spitch == width:  # gap-free on both sides: one linear copy
                        rt.memcpyAsync(dst, src, width * height, kind, self._stream.ptr)
                    else:
                        rt.memcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, self._stream.ptr)
                method = "dma"
            elif self.fragmented == "staged":
                self._staged(b, s, to_pool)
                method = "staged"
            else:
                self._launch(self.descriptors(block_ids, slots, to_pool))
                method = "kernel"
            self._stream.synchronize()
        return method

    def _launch(self, desc: np.ndarray) -> None:
        cp = _cupy()
        with self._stream:  # the table upload is ordered before the kernel
            table = cp.asarray(np.ascontiguousarray(desc))
        self._kernel((len(desc),), (512,), (table, np.int32(len(desc))), stream=self._stream)

    def _staged(self, b: np.ndarray, s: np.ndarray, to_pool: bool) -> None:
        cp = _cupy()
        rt = cp.cuda.runtime
        per = self.block_bytes
        if self._staging is None:
            self._staging = cp.cuda.alloc(max(per, self.staging_bytes))
        stage = int(self._staging.ptr)
        cap = max(1, self._staging.mem.size // per)
        for c0 in range(0, len(b), cap):
            bc, sc = b[c0 : c0 + cap], s[c0 : c0 + cap]
            local = np.arange(len(bc), dtype=np.uint64)
            desc = self.descriptors(bc, local, to_pool, base=stage)
            brk = self._run_breaks(local, sc)
            starts = np.concatenate(([0], brk)).tolist()
            ends = [*brk.tolist(), len(sc)]
            if to_pool:
                self._launch(desc)
                for i0, i1 in zip(starts, ends, strict=True):
                    rt.memcpyAsync(
                        self.pool_address + int(sc[i0]) * per,
                        stage + i0 * per,
                        (i1 - i0) * per,
                        rt.memcpyDeviceToHost,
                        self._stream.ptr,
                    )
            else:
                for i0, i1 in zip(starts, ends, strict=True):
                    rt.memcpyAsync(
                        stage + i0 * per,
                        self.pool_address + int(sc[i0]) * per,
                        (i1 - i0) * per,
                        rt.memcpyHostToDevice,
                        self._stream.ptr,
                    )
                self._launch(desc)


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

    def open(self, handle: bytes) -> int:
        """Base address of the allocation behind ``handle`` (each handle opened once)."""
        cp = _cupy()
        handle = ipc_handle(handle)
        if handle not in self._bases:
            with cp.cuda.Device(self.device):
                self._bases[handle] = cp.cuda.runtime.ipcOpenMemHandle(
                    handle,
                    1,  # cudaIpcMemLazyEnablePeerAccess
                )
        return self._bases[handle]

    def close(self) -> None:
        cp = _cupy()
        with cp.cuda.Device(self.device):
            for base in self._bases.values():
                cp.cuda.runtime.ipcCloseMemHandle(base)
        self._bases.clear()

    def __len__(self) -> int:
        return len(self._bases)


host_address = address_of  # the address of a writable mapping (e.g. the pool's)
