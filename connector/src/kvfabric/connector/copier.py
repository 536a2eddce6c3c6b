"""Moves KV blocks between vLLM's paged KV tensors and pool slots (CPU engines).

A pool slot holds one block of every layer back to back: ``[layer 0 block][layer 1 block]...``.
Copies are batched per layer. Where both block ids and slots form long consecutive runs (the
common case: the agent hands out ascending slots and vLLM allocates fresh blocks in order) each
run is one memcpy; a fragmented batch goes through one vectorised gather + scatter instead, so
the Python work is per run or per layer, never per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Use per-run copies while the batch has at most this many blocks per run on average...
_MIN_BLOCKS_PER_RUN = 4


def find_runs(dst: np.ndarray, src: np.ndarray) -> list[tuple[int, int, int]]:
    """``(dst_start, src_start, length)`` of maximal runs where both sides advance by one."""
    if len(dst) == 0:
        return []
    breaks = np.flatnonzero((np.diff(dst) != 1) | (np.diff(src) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(dst)]))
    return [(int(dst[s]), int(src[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class BlockCopier:
    """Copies between per-layer KV tensors (block dimension first) and a byte pool."""

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        if not layers:
            raise ValueError("no KV cache layers")
        num_blocks = layers[0].shape[0]
        self.layers: list[torch.Tensor] = []
        self.offsets: list[int] = []
        offset = 0
        for t in layers:
            if t.shape[0] != num_blocks or not t.is_contiguous():
                raise ValueError("every KV layer must be contiguous with the block dimension first")
            view = t.view(torch.uint8).reshape(num_blocks, -1)
            self.layers.append(view)
            self.offsets.append(offset)
            offset += view.shape[1]
        self.num_blocks = num_blocks
        self.block_bytes = offset
        self._pool: torch.Tensor | None = None

    def attach(self, pool: torch.Tensor) -> None:
        """Uses ``pool`` (a 1-D uint8 tensor over the whole segment) from now on."""
        usable = (pool.numel() // self.block_bytes) * self.block_bytes
        self._pool = pool[:usable].view(-1, self.block_bytes)

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
        if len(runs) * _MIN_BLOCKS_PER_RUN <= len(blocks):
            for layer, off in zip(self.layers, self.offsets, strict=True):
                width = layer.shape[1]
                for b, s, n in runs:
                    kv = layer[b : b + n]
                    pv = pool[s : s + n, off : off + width]
                    if to_pool:
                        pv.copy_(kv)
                    else:
                        kv.copy_(pv)
            return
        bt = torch.from_numpy(blocks)
        st = torch.from_numpy(slots)
        for layer, off in zip(self.layers, self.offsets, strict=True):
            width = layer.shape[1]
            if to_pool:
                pool[st, off : off + width] = layer.index_select(0, bt)
            else:
                layer.index_copy_(0, bt, pool[st, off : off + width])
