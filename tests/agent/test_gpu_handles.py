"""Pure logic of the GPU data path that needs no GPU (the rest is in tests/gpu)."""

import pytest

from kvfabric.agent.gpu import Segment, ipc_handle, segments_for


def test_torch_ipc_handles_are_unwrapped_and_unsupported_kinds_refused() -> None:
    assert ipc_handle(b"x" * 64) == b"x" * 64
    assert ipc_handle(b"\x02c" + b"x" * 64) == b"x" * 64  # torch 2.11: version 2, cudaMalloc
    with pytest.raises(ValueError, match="expandable"):
        ipc_handle(b"\x02e" + b"x" * 80)


def test_layout_segments() -> None:
    assert segments_for("kv_planes", 100, 10) == (Segment(0, 100, 100), Segment(1000, 100, 100))
    assert segments_for("blocks_first", 100, 10) == (Segment(0, 200, 200),)
    assert segments_for("mla", 100, 10) == (Segment(0, 100, 100),)
    with pytest.raises(ValueError):
        segments_for("nhd-someday", 1, 1)
