"""Where a KV block's bytes lie in a GPU engine's layer tensor, and where they go in a pool slot.

Shared by the agent's copies (over CUDA IPC) and the engine's own saves (``engine_saves``), so
both write the same slot layout: a pool slot holds every layer's segments back to back, in
layer order. A block ``b`` of a layer is the byte ranges ``base + off_j + b * stride_j`` of
length ``length_j``. No torch here: the agent imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One byte range of a block within a layer: ``off + b * stride`` for ``length`` bytes."""

    off: int
    stride: int
    length: int


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
