"""Pure logic of the GPU data path that needs no GPU (the rest is in tests/gpu)."""

import pytest

from kvfabric.agent.gpu import ipc_handle
from kvfabric.connector.kv_segments import Segment, segments_for


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


def test_registered_geometry_must_fit_the_drivers_allocation() -> None:
    from kvfabric.agent.gpu_service import GpuError, check_layers_fit

    segs = segments_for("kv_planes", 100, 10)  # K plane then V plane: 2000 bytes
    check_layers_fit([(1000, 1000, 2000)], 10, segs)
    check_layers_fit([(1500, 1000, 2500)], 10, segs)  # a tensor inside a larger allocation
    for layer, blocks in (
        ((1000, 1000, 1999), 10),  # one byte short
        ((1000, 1000, 2000), 11),  # one block more than there is
        ((1000, 1000, 2000), 2**64 - 1),  # the review's wrapping count
        ((999, 1000, 2000), 10),  # starts before its allocation
    ):
        with pytest.raises(GpuError):
            check_layers_fit([layer], blocks, segments_for("kv_planes", 100, blocks))


class _StickyEngine:
    def copy(self, *args: object) -> str:
        err = RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
        err.status = 700  # type: ignore[attr-defined]  # what CuPy's CUDARuntimeError carries
        raise err


class _TransientEngine:
    def copy(self, *args: object) -> str:
        err = RuntimeError("cudaErrorInvalidValue")
        err.status = 1  # type: ignore[attr-defined]
        raise err


def test_a_sticky_cuda_error_is_fatal_and_a_transient_one_is_not() -> None:
    from kvfabric.agent.gpu_service import GpuError, GpuService, _SessionKV
    from kvfabric.connector import protocol as p

    fatal: list[str] = []
    svc = GpuService(segment=None, pin_threads=1, on_fatal=fatal.append)  # type: ignore[arg-type]
    req = p.GpuCopy(kv_id=1, to_pool=True, block_ids=[0], slots=[0])
    for engine, expect in ((_TransientEngine(), 0), (_StickyEngine(), 1)):
        svc._sessions[7] = _SessionKV(engines={1: engine})  # type: ignore[dict-item]
        with pytest.raises(GpuError):
            svc.copy(7, req)
        assert len(fatal) == expect
    assert "IllegalAddress" in fatal[0]
