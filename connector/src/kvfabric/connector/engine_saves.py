"""Saves copied by a GPU engine itself, from its own CUDA context (``engine_saves``).

Without this the agent copies every save, as it copies loads: from its own CUDA context, over
CUDA IPC. Two contexts with work on one GPU time-slice: on an H200 another context's copies
slowed a stream of matmuls by 7-15% while they ran, the same copies from the matmuls' own
context 0-5% (``benchmarks/gpu_contexts.py``). With this option the engine writes its saves
itself (measured on real vLLM engines, it did not change cold TTFT: ``benchmarks/RESULTS.md``,
which is why it is off by default): it maps the agent's pool (as
CPU engines do), registers the mapping with CUDA piece by piece on background threads after it
connected (the pages exist and are the agent's: no new memory, and no wait at start), and sends
each run of consecutive blocks to consecutive slots as one pitched ``cudaMemcpy2DAsync`` per
layer segment, on a stream of its own: DMA only, no kernel. Blocks not in such runs (vLLM hands
a freed request's blocks out again in descending order) are gathered first, per layer segment,
into a staging buffer on the GPU (``index_select``, in the engine's context too), from which
runs of consecutive slots go out the same way.

What it leaves to the agent: slots in a piece not registered yet (or whose registration failed),
and batches so fragmented that the calls would cost more than the agent's gather kernel. The
agent's checks lose nothing: the engine writes only slots it reserved, as a CPU engine does; and
an engine under isolated tenancy, which may not map the shared pool, never gets here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import threading
from collections.abc import Sequence

import numpy as np
import torch

from kvfabric.connector.kv_segments import segments_for
from kvfabric.connector.pool_files import PoolBuffer

log = logging.getLogger(__name__)

#: Registration pieces are at most this large: one ``cudaHostRegister`` call holds the driver
#: for a while (~50 ms per 256 MiB measured on the agent), and the engine's own calls wait.
PIECE_BYTES = 256 << 20
#: Threads registering the pool's pieces (the agent pins with more: it has nothing else to do).
REGISTER_THREADS = 4
#: Past this many copy and gather calls a batch is left to the agent's gather kernel (a 10k-token
#: prompt of an 8B model in descending blocks takes ~2,500).
MAX_CALLS = 4096
#: The GPU staging buffer for blocks not in runs (taken from the engine's memory headroom, once).
STAGE_BYTES = 128 << 20
_HOST_REGISTER_PORTABLE = 1
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the (unified) addresses


def _loaded_cudart() -> str:
    """The CUDA runtime library torch loaded: calls through another copy would have their own
    per-thread state (current device, last error)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "libcudart.so" in parts[5].rsplit("/", 1)[-1]:
                return parts[5].strip()
    found = ctypes.util.find_library("cudart")
    if found is None:
        raise RuntimeError("no CUDA runtime library is loaded or installed")
    return found


def _runs(joined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of the runs of a sequence whose neighbours ``i, i + 1`` belong
    together where ``joined[i]`` (``len(joined)`` is one less than the sequence's)."""
    starts = np.concatenate(([0], np.flatnonzero(~joined) + 1)).astype(np.int64)
    return starts, np.diff(np.append(starts, len(joined) + 1))


class CudaRuntime:
    """The few CUDA runtime calls torch does not expose, through ctypes (the GIL is free while
    they run)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_loaded_cudart())
        c = ctypes
        lib.cudaHostRegister.argtypes = (c.c_void_p, c.c_size_t, c.c_uint)
        lib.cudaHostUnregister.argtypes = (c.c_void_p,)
        lib.cudaMemcpy2DAsync.argtypes = (
            c.c_void_p,
            c.c_size_t,
            c.c_void_p,
            c.c_size_t,
            c.c_size_t,
            c.c_size_t,
            c.c_int,
            c.c_void_p,
        )
        lib.cudaGetErrorString.argtypes = (c.c_int,)
        lib.cudaGetErrorString.restype = c.c_char_p
        self.lib = lib

    def check(self, status: int, what: str) -> None:
        if status:
            self.lib.cudaGetLastError()  # a returned error is also this thread's "last error"
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(status).decode()} ({status})")


def piece_bounds(file_sizes: Sequence[int], slot_bytes: int, most: int = PIECE_BYTES) -> np.ndarray:
    """Byte offsets in the pool where registration pieces start, and the pool's end.

    Pieces are page-aligned, never span two pool files (two mappings), and, where a whole
    number of slots fits in ``most`` page-aligned, lie on a grid of slots, so that no slot but
    one crossing a file boundary has bytes in two pieces (a copy may not cross a registration)."""
    total = sum(file_sizes)
    grid = math.lcm(slot_bytes, mmap.PAGESIZE)
    step = most // grid * grid if grid <= most else most // mmap.PAGESIZE * mmap.PAGESIZE
    ends = np.cumsum(np.asarray(file_sizes, dtype=np.int64))
    bounds = np.union1d(np.arange(0, total, step, dtype=np.int64), ends[:-1])
    return np.append(bounds, total)


class EngineSaves:
    """Copies blocks of this engine's KV tensors into pool slots from this engine's context.

    ``layers``: the KV tensors in the order the agent was told (their layout ``layout`` with
    ``plane_bytes`` per block and plane, ``num_blocks`` of vLLM's blocks); ``pool``: a writable
    mapping of the agent's pool files of ``file_sizes``, ``pool_id`` the agent's name for it;
    ``slot_bytes``: one slot (every layer's block)."""

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        layout: str,
        plane_bytes: int,
        num_blocks: int,
        pool: PoolBuffer,
        file_sizes: Sequence[int],
        slot_bytes: int,
        pool_id: str,
    ) -> None:
        self.cudart = CudaRuntime()
        self.device = layers[0].device
        self.num_blocks = num_blocks
        self.slot_bytes = slot_bytes
        self.pool_id = pool_id
        self._pool: PoolBuffer | None = pool  # kept mapped while registered
        self.pool_address = ctypes.addressof(ctypes.c_char.from_buffer(pool))
        self.slots = sum(file_sizes) // slot_bytes
        # One (device base, device stride, bytes, offset in the slot) per layer segment, in the
        # slot's order: every layer's segments back to back, in layer order.
        segments = segments_for(layout, plane_bytes, num_blocks)
        self._segments: list[tuple[int, int, int, int]] = []
        self._sources: list[torch.Tensor] = []  # the same, as [num_blocks, bytes] views to gather from
        # Gathered in 8-byte words where every size and offset allows (a kernel thread per byte
        # would take the SMs 8x as long).
        starts = [t.storage_offset() * t.element_size() for t in layers]
        sizes = [x for seg in segments for x in (seg.off, seg.stride, seg.length)] + starts
        self._word = word = 8 if all(x % 8 == 0 for x in sizes) else 1
        dtype = torch.int64 if word == 8 else torch.uint8
        offset = 0
        for t, start in zip(layers, starts, strict=True):
            storage = torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage())
            for seg in segments:
                self._segments.append((t.data_ptr() + seg.off, seg.stride, seg.length, offset))
                shape, strides = (num_blocks, seg.length // word), (seg.stride // word, 1)
                self._sources.append(storage.as_strided(shape, strides, (start + seg.off) // word))
                offset += seg.length
        if offset != slot_bytes:
            raise ValueError(f"a slot of {slot_bytes} bytes cannot hold a block of {offset}")
        self._stage_blocks = max(1, STAGE_BYTES // slot_bytes)
        self._stage: torch.Tensor | None = None
        self._bounds = piece_bounds(file_sizes, slot_bytes)
        self.registered = np.zeros(len(self._bounds) - 1, dtype=bool)
        with torch.cuda.device(self.device):
            self._stream = torch.cuda.Stream()
        self._lock = threading.Lock()  # copies against unregistering
        self._closed = threading.Event()
        self._next_piece = 0
        self._pieces_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._register_pieces, name=f"kvfabric-register-{i}", daemon=True)
            for i in range(REGISTER_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    # -- registration ------------------------------------------------------------------------------

    def _register_pieces(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._closed.is_set():
            with self._pieces_lock:
                i = self._next_piece
                self._next_piece += 1
            if i >= len(self.registered):
                return
            start, end = int(self._bounds[i]), int(self._bounds[i + 1])
            try:
                status = self.cudart.lib.cudaHostRegister(
                    self.pool_address + start, end - start, _HOST_REGISTER_PORTABLE
                )
                self.cudart.check(status, "registering the pool")
            except RuntimeError as exc:
                why = {"error": str(exc)}
                log.warning("a pool piece is not registered: the agent copies its saves", extra=why)
                continue
            self.registered[i] = True

    @property
    def fully_registered(self) -> bool:
        return bool(self.registered.all())

    # -- copies ------------------------------------------------------------------------------------

    def _copyable(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which slots lie whole in one registered piece, and that piece."""
        start = slots * self.slot_bytes
        piece = np.searchsorted(self._bounds, start, side="right") - 1
        last = np.searchsorted(self._bounds, start + self.slot_bytes - 1, side="right") - 1
        ok = (slots >= 0) & (slots < self.slots) & (piece == last)
        ok &= self.registered[np.clip(piece, 0, len(self.registered) - 1)]
        return ok, piece

    def save(self, block_ids: Sequence[int], slots: Sequence[int]) -> np.ndarray:
        """Copies what it can of blocks ``block_ids`` into ``slots`` (the kernels that wrote
        them must have ended) and waits for the copies; returns which it copied (the rest is
        the agent's). Raises ValueError for a block id out of range, RuntimeError for CUDA."""
        b = np.asarray(block_ids, dtype=np.int64)
        s = np.asarray(slots, dtype=np.int64)
        if b.shape != s.shape:
            raise ValueError("block_ids and slots differ in length")
        if len(b) and (b.min() < 0 or b.max() >= self.num_blocks):
            raise ValueError("block id out of range")
        with self._lock:
            if self._closed.is_set():
                return np.zeros(len(b), dtype=bool)
            done, piece = self._copyable(s)
            idx = np.flatnonzero(done)
            if not len(idx):
                return done
            bb, ss, pp = b[idx], s[idx], piece[idx]
            # Runs of two or more consecutive blocks into consecutive slots of one piece go
            # straight out; every other block is gathered on the GPU first, a staging buffer
            # at a time, and goes out in runs of consecutive slots.
            first, n = _runs((np.diff(bb) == 1) & (np.diff(ss) == 1) & (np.diff(pp) == 0))
            direct = n > 1
            gathered = np.flatnonzero(~np.repeat(direct, n))
            step = self._stage_blocks
            chunks = [gathered[i : i + step] for i in range(0, len(gathered), step)]
            slot_runs = [_runs((np.diff(ss[c]) == 1) & (np.diff(pp[c]) == 0)) for c in chunks]
            outs = int(direct.sum()) + len(chunks) + sum(len(r[0]) for r in slot_runs)
            if outs * len(self._segments) > MAX_CALLS:
                return np.zeros(len(b), dtype=bool)
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                try:
                    for f, k in zip(first[direct].tolist(), n[direct].tolist(), strict=True):
                        dst = self.pool_address + int(ss[f]) * self.slot_bytes
                        for base, stride, width, offset in self._segments:
                            self._copy_out(dst + offset, base + int(bb[f]) * stride, stride, width, k)
                    for chunk, runs in zip(chunks, slot_runs, strict=True):
                        self._gather_and_copy(bb[chunk], ss[chunk], runs)
                finally:
                    self._stream.synchronize()  # what was queued ends before the caller goes on
            return done

    def _copy_out(self, dst: int, src: int, spitch: int, width: int, rows: int) -> None:
        """``rows`` rows of ``width`` bytes into as many consecutive slots, on our stream."""
        status = self.cudart.lib.cudaMemcpy2DAsync(
            dst, self.slot_bytes, src, spitch, width, rows, _MEMCPY_DEFAULT, self._stream.cuda_stream
        )
        self.cudart.check(status, "copying a save")

    def _gather_and_copy(
        self, blocks: np.ndarray, slots: np.ndarray, runs: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Blocks in any order: each layer segment of all of them gathered into the staging
        buffer (segment-major), then every run of consecutive slots copied out per segment.
        On our stream, after the previous chunk's copies out of the same buffer."""
        if self._stage is None:
            size = self._stage_blocks * self.slot_bytes
            self._stage = torch.empty(size // self._word, dtype=self._sources[0].dtype, device=self.device)
        n, (run_first, run_n) = len(blocks), runs
        ids = torch.from_numpy(blocks).to(self.device)
        at = 0  # in words
        for (_, _, width, offset), source in zip(self._segments, self._sources, strict=True):
            words = width // self._word
            piece = self._stage[at : at + n * words].view(n, words)
            torch.index_select(source, 0, ids, out=piece)
            base = piece.data_ptr()
            for f, k in zip(run_first.tolist(), run_n.tolist(), strict=True):
                dst = self.pool_address + int(slots[f]) * self.slot_bytes + offset
                self._copy_out(dst, base + f * width, width, width, k)
            at += n * words

    # -- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops registering, lets copies in flight end, unregisters and lets the mapping go
        (a restarted agent needs its memory back)."""
        self._closed.set()
        for thread in self._threads:
            thread.join()
        with self._lock, torch.cuda.device(self.device):
            for i in np.flatnonzero(self.registered).tolist():
                status = self.cudart.lib.cudaHostUnregister(self.pool_address + int(self._bounds[i]))
                if status:
                    self.cudart.lib.cudaGetLastError()
                self.registered[i] = False
            self._pool = None
