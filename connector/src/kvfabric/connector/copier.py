"""Moves KV blocks between vLLM's paged KV tensors and pool slots (CPU engines).

A pool slot holds one block of every layer back to back: ``[layer 0 block][layer 1 block]...``.
Copies are batched per layer. Where both block ids and slots form long consecutive runs (the
common case: the agent hands out ascending slots and vLLM allocates fresh blocks in order) each
run is one memcpy; a fragmented batch goes through one vectorised gather + scatter instead, so
the Python work is per run or per layer, never per block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Use per-run copies while runs average at least this many blocks; else one fancy-index copy.
_MIN_BLOCKS_PER_RUN = 4


def find_runs(dst: np.ndarray, src: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(dst_start, src_start, length, step)`` of maximal runs where ``src`` advances by one and
    ``dst`` by ``step`` (+1 or -1: vLLM's free list often hands out blocks in descending order).
    """
    n = len(dst)
    if n == 0:
        return []
    ddst = np.diff(dst)
    ok = (np.diff(src) == 1) & (np.abs(ddst) == 1)
    turn = np.zeros_like(ok)
    turn[1:] = ok[1:] & ok[:-1] & (ddst[1:] != ddst[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~ok | turn) + 1))
    ends = np.concatenate((starts[1:], [n]))
    return [
        (int(dst[s]), int(src[s]), int(e - s), int(ddst[s]) if e - s > 1 else 1)
        for s, e in zip(starts, ends, strict=True)
    ]


class BlockCopier:
    """Copies between per-layer KV tensors (block dimension first) and a byte pool.

    Copies run in NumPy over views of the same memory: its slice assignment is a row-wise
    memcpy, also for the descending (negative-stride) runs torch cannot view.
    """

    def __init__(self, layers: Sequence[torch.Tensor], copy_threads: int | None = None) -> None:
        if not layers:
            raise ValueError("no KV cache layers")
        num_blocks = layers[0].shape[0]
        self.layers: list[np.ndarray] = []
        self.offsets: list[int] = []
        offset = 0
        for t in layers:
            if t.shape[0] != num_blocks or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("every KV layer must be a contiguous CPU tensor, block dimension first")
            view = t.view(torch.uint8).reshape(num_blocks, -1).numpy()
            self.layers.append(view)
            self.offsets.append(offset)
            offset += view.shape[1]
        self._keep = list(layers)  # the arrays above borrow these tensors' memory
        self.num_blocks = num_blocks
        self.block_bytes = offset
        self._pool: np.ndarray | None = None
        workers = min(copy_threads if copy_threads is not None else (os.cpu_count() or 1), len(layers))
        self._threads = ThreadPoolExecutor(workers, "kvfabric-copy") if workers > 1 else None

    def attach(self, pool: np.ndarray) -> None:
        """Uses ``pool`` (a 1-D uint8 array over the whole segment) from now on."""
        usable = (pool.shape[0] // self.block_bytes) * self.block_bytes
        self._pool = pool[:usable].reshape(-1, self.block_bytes)

    def detach(self) -> None:
        self._pool = None

    @property
    def attached(self) -> bool:
        return self._pool is not None

    def _check(self, block_ids: Sequence[int], slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        if self._pool is None:
            raise RuntimeError("pool not attached")
        dst = np.asarray(block_ids, dtype=np.int64)
        src = np.asarray(slots, dtype=np.int64)
        if dst.shape != src.shape:
            raise ValueError("block_ids and slots differ in length")
        if len(dst) and (
            dst.min() < 0 or dst.max() >= self.num_blocks or src.min() < 0 or src.max() >= self._pool.shape[0]
        ):
            raise ValueError("block id or slot out of range")
        return dst, src

    def load(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        """Pool slots -> KV blocks. Returns bytes copied."""
        dst, src = self._check(block_ids, slots)
        self._copy(dst, src, to_pool=False)
        return len(dst) * self.block_bytes

    def save(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        """KV blocks -> pool slots. Returns bytes copied."""
        src_blocks, dst_slots = self._check(block_ids, slots)
        self._copy(src_blocks, dst_slots, to_pool=True)
        return len(src_blocks) * self.block_bytes

    def _copy(self, blocks: np.ndarray, slots: np.ndarray, to_pool: bool) -> None:
        pool = self._pool
        assert pool is not None
        if len(blocks) == 0:
            return
        runs = find_runs(blocks, slots)
        use_runs = len(runs) * _MIN_BLOCKS_PER_RUN <= len(blocks)

        def copy_layer(i: int) -> None:
            layer, off = self.layers[i], self.offsets[i]
            width = layer.shape[1]
            if not use_runs:
                if to_pool:
                    pool[slots, off : off + width] = layer[blocks]
                else:
                    layer[blocks] = pool[slots, off : off + width]
                return
            for b, s, n, step in runs:
                kv = layer[b : b + n] if step == 1 else layer[b - n + 1 : b + 1][::-1]
                pv = pool[s : s + n, off : off + width]
                if to_pool:
                    pv[...] = kv
                else:
                    kv[...] = pv

        # NumPy releases the GIL while copying, so layers copy in parallel on the pool's threads.
        if self._threads is None or len(self.layers) == 1:
            for i in range(len(self.layers)):
                copy_layer(i)
        else:
            for _ in self._threads.map(copy_layer, range(len(self.layers))):
                pass

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None
