"""The agent's CUDA data path on a real GPU (marker ``gpu``; skipped where there is none).

Run on a GPU host:  ``python -m pytest -m gpu tests/gpu -q``  (needs torch with CUDA and CuPy).
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu()

import cupy  # noqa: E402
import torch  # noqa: E402

import kvfabric.agent.gpu as gpu  # noqa: E402
from kvfabric.agent.gpu import (  # noqa: E402
    CopyEngine,
    IpcMappings,
    LayerLayout,
    PinnedPool,
    device_index,
    host_address,
)
from kvfabric.connector.kv_segments import segments_for  # noqa: E402

POOL_BYTES = 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def pool() -> Iterator[tuple[mmap.mmap, int]]:
    path = f"/dev/shm/kvfabric-gpu-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, POOL_BYTES)
    m = mmap.mmap(fd, POOL_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    addr = host_address(m)
    pinned = PinnedPool(addr, POOL_BYTES, threads=8, chunk=256 << 20)
    pinned.pin()  # as the agent does: each chunk populated, then registered
    yield m, addr
    pinned.unregister()
    os.unlink(path)


def make_layers(layout: str, dtype: torch.dtype, num_layers: int = 4, nb: int = 300) -> list[torch.Tensor]:
    bs, heads, d = 16, 8, 128
    shape = {
        "kv_planes": (2, nb, bs, heads, d),
        "blocks_first": (nb, 2, bs, heads, d),
        "mla": (nb, bs, 576),
    }[layout]
    return [
        torch.randint(-100, 100, shape, device="cuda", dtype=torch.int16).to(torch.float16).to(dtype)
        for _ in range(num_layers)
    ]


def layouts_of(tensors: list[torch.Tensor], layout: str, bases: list[int] | None = None) -> list[LayerLayout]:
    out = []
    for i, t in enumerate(tensors):
        nb = t.shape[1] if layout == "kv_planes" else t.shape[0]
        per_block = (
            t[0, 0].nbytes
            if layout == "kv_planes"
            else (t[0, 0].nbytes if layout == "blocks_first" else t[0].nbytes)
        )
        out.append(LayerLayout(bases[i] if bases else t.data_ptr(), nb, segments_for(layout, per_block, nb)))
    return out


def block_bytes_of(t: torch.Tensor, layout: str, b: int) -> bytes:
    if layout == "kv_planes":
        return (
            t[0, b].view(torch.uint8).cpu().numpy().tobytes()
            + t[1, b].view(torch.uint8).cpu().numpy().tobytes()
        )
    return t[b].view(torch.uint8).cpu().numpy().tobytes()


@pytest.mark.parametrize("load", ["whole", "layered"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["kv_planes", "blocks_first", "mla"])
@pytest.mark.parametrize("placement", ["contiguous", "fragmented"])
def test_save_load_round_trip(
    pool: tuple[mmap.mmap, int], layout: str, dtype: str, placement: str, load: str
) -> None:
    """``layered``: the load queued layer by layer, an event recorded after each layer."""
    _, addr = pool
    src = make_layers(layout, DTYPES[dtype])
    eng = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, layout))
    rng = np.random.default_rng(0)
    n = 256
    if placement == "contiguous":
        blocks, slots = np.arange(10, 10 + n), np.arange(5, 5 + n)
    else:
        blocks = rng.permutation(300)[:n]
        slots = rng.permutation(POOL_BYTES // eng.block_bytes)[:n]
    eng.copy(blocks.tolist(), slots.tolist(), to_pool=True)
    dst = [torch.full_like(t, float("nan")) if dtype != "fp8" else torch.zeros_like(t) for t in src]
    for t in dst:  # poison every byte
        t.view(torch.uint8).fill_(0xA5)
    eng2 = CopyEngine(0, addr, POOL_BYTES, layouts_of(dst, layout))
    targets = rng.permutation(300)[:n]
    if load == "layered":
        events = [cupy.cuda.Event(disable_timing=True) for _ in dst]
        eng2.copy(targets.tolist(), slots.tolist(), to_pool=False, events=[e.ptr for e in events])
        events[-1].synchronize()  # one stream, layers in order: the last event covers all
    else:
        eng2.copy(targets.tolist(), slots.tolist(), to_pool=False)
    torch.cuda.synchronize()
    for a, b in zip(src, dst, strict=True):
        for i in range(n):
            assert block_bytes_of(a, layout, int(blocks[i])) == block_bytes_of(b, layout, int(targets[i]))
        untouched = sorted(set(range(300)) - set(targets.tolist()))[:3]
        for u in untouched:
            assert set(block_bytes_of(b, layout, u)) == {0xA5}


@pytest.mark.parametrize("layout", ["kv_planes", "blocks_first", "mla"])
def test_direct_kernel_round_trip(pool: tuple[mmap.mmap, int], layout: str) -> None:
    """The ``fragmented="kernel"`` path (mapped pinned memory, no staging) is correct too."""
    _, addr = pool
    src = make_layers(layout, torch.bfloat16)
    dst = [torch.zeros_like(t) for t in src]
    save = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, layout), fragmented="kernel")
    load = CopyEngine(0, addr, POOL_BYTES, layouts_of(dst, layout), fragmented="kernel")
    blocks, slots, targets = [7, 3, 250, 11], [900, 2, 40, 41], [1, 299, 5, 6]
    assert save.copy(blocks, slots, True) == "kernel"
    assert load.copy(targets, slots, False) == "kernel"
    torch.cuda.synchronize()
    for a, b in zip(src, dst, strict=True):
        for i, j in zip(blocks, targets, strict=True):
            assert block_bytes_of(a, layout, i) == block_bytes_of(b, layout, j)


@pytest.mark.parametrize(("batched", "ctas"), [(True, 1), (False, 16)])
def test_random_slot_copies_are_batched_and_a_capped_kernel_moves_every_block(
    pool: tuple[mmap.mmap, int], monkeypatch: pytest.MonkeyPatch, batched: bool, ctas: int
) -> None:
    """Random slots: each staging half's slot copies go to the driver as one batch (no
    one-by-one copy is left), or one by one where batching is off; a staging kernel on fewer
    CTAs than blocks x segments (one here) still moves every byte."""
    _, addr = pool
    src = make_layers("mla", torch.bfloat16)
    singles: list[tuple[int, ...]] = []
    one_by_one = CopyEngine._memcpy

    def counted(copy: tuple[int, ...], kind: int, stream: Any) -> None:
        singles.append(copy)
        one_by_one(copy, kind, stream)

    monkeypatch.setattr(CopyEngine, "_memcpy", staticmethod(counted))
    kw: dict[str, Any] = {"staged_ctas": ctas, "batched": batched, "dma_saves": False}
    save = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, "mla"), **kw)
    rng = np.random.default_rng(3)
    n = 64
    blocks = rng.permutation(300)[:n].tolist()
    slots = (rng.permutation(POOL_BYTES // save.block_bytes // 2)[:n] * 2).tolist()  # never adjacent
    assert save.copy(blocks, slots, True) == "staged"
    assert len(singles) == (0 if batched else n)
    dst = [torch.zeros_like(t) for t in src]
    targets = rng.permutation(300)[:n].tolist()
    assert (
        CopyEngine(0, addr, POOL_BYTES, layouts_of(dst, "mla"), **kw).copy(targets, slots, False) == "staged"
    )
    assert len(singles) == (0 if batched else 2 * n)
    torch.cuda.synchronize()
    for a, b in zip(src, dst, strict=True):
        for i, j in zip(blocks, targets, strict=True):
            assert block_bytes_of(a, "mla", i) == block_bytes_of(b, "mla", j)


def count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an entry per kernel launch of any copy engine from now on."""
    launches: list[int] = []
    launch = CopyEngine._launch

    def counted(self: CopyEngine, *args: Any, **kw: Any) -> None:
        launches.append(1)
        launch(self, *args, **kw)

    monkeypatch.setattr(CopyEngine, "_launch", counted)
    return launches


@pytest.mark.parametrize(
    ("layout", "dtype", "method"),
    [
        ("kv_planes", torch.bfloat16, "dma"),  # 32 KiB segments
        ("blocks_first", torch.bfloat16, "dma"),  # 64 KiB
        ("mla", torch.bfloat16, "staged"),  # 18 KiB: under DMA_ONLY_MIN_BYTES
        ("mla", torch.float8_e4m3fn, "staged"),  # 9 KiB
    ],
)
def test_fragmented_saves_are_dma_only_and_write_exactly_their_slots(
    pool: tuple[mmap.mmap, int], monkeypatch: pytest.MonkeyPatch, layout: str, dtype: torch.dtype, method: str
) -> None:
    """A fragmented save goes out as batched copies per block and segment, with no kernel
    (the agent's kernels time-slice the GPU with the engine's); every byte of its slots is
    the block's, the slots between them keep theirs; a batch the driver refuses, or
    ``dma_saves`` off, falls back to the staging kernel with the same bytes."""
    m, addr = pool
    src = make_layers(layout, dtype)
    launches = count_launches(monkeypatch)
    save = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, layout))
    per = save.block_bytes
    rng = np.random.default_rng(5)
    n = 64
    blocks = rng.permutation(300)[:n].tolist()
    slots = (rng.permutation(POOL_BYTES // per // 2 - 1)[:n] * 2 + 1).tolist()  # odd: never adjacent
    for sl in slots:  # the even neighbours must stay as they are
        m[(sl - 1) * per : sl * per] = b"\x5a" * per
        m[(sl + 1) * per : (sl + 2) * per] = b"\x5a" * per
    assert save.copy(blocks, slots, True) == method
    assert (len(launches) == 0) == (method == "dma")
    for sl, b in zip(slots, blocks, strict=True):
        slot = m[sl * per : (sl + 1) * per]
        assert slot == b"".join(block_bytes_of(t, layout, b) for t in src)
        assert set(m[(sl - 1) * per : sl * per]) == {0x5A} and set(m[(sl + 1) * per : (sl + 2) * per]) == {
            0x5A
        }
    if method != "dma":
        return
    for t in src:  # new contents, so that the fallback's bytes are its own
        t.add_(1)
    expected = [b"".join(block_bytes_of(t, layout, b) for t in src) for b in blocks]
    monkeypatch.setattr(gpu._BATCH, "copy_arrays", lambda *a: False)  # the driver refuses
    assert save.copy(blocks, slots, True) == "staged"
    assert [m[sl * per : (sl + 1) * per] for sl in slots] == expected
    off = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, layout), dma_saves=False)
    monkeypatch.undo()
    assert off.copy(blocks, slots, True) == "staged"


@pytest.mark.parametrize("load", ["whole", "layered"])
def test_dma_only_loads_scatter_exactly_their_blocks(
    pool: tuple[mmap.mmap, int], monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    """``dma_loads``: a fragmented load, whole or layer by layer with its events, goes as
    batched copies per block and segment with no kernel; every target block gets its slot's
    bytes and the blocks around them keep theirs; a batch the driver refuses falls back to
    the staging kernel with the same bytes."""
    _, addr = pool
    src = make_layers("kv_planes", torch.bfloat16)
    save = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, "kv_planes"))
    rng = np.random.default_rng(7)
    n = 64
    blocks = rng.permutation(300)[:n].tolist()
    slots = (rng.permutation(POOL_BYTES // save.block_bytes // 2)[:n] * 2).tolist()  # never adjacent
    save.copy(blocks, slots, True)
    launches = count_launches(monkeypatch)
    dst = [torch.zeros_like(t) for t in src]
    eng = CopyEngine(0, addr, POOL_BYTES, layouts_of(dst, "kv_planes"), dma_loads=True)
    targets = rng.permutation(300)[:n].tolist()
    untouched = sorted(set(range(300)) - set(targets))

    def load_and_check() -> str:
        for t in dst:  # poison every byte
            t.view(torch.uint8).fill_(0xA5)
        if load == "layered":
            events = [cupy.cuda.Event(disable_timing=True) for _ in dst]
            method = eng.copy(targets, slots, False, events=[e.ptr for e in events])
            events[-1].synchronize()  # layers in order on one stream: the last event covers all
        else:
            method = eng.copy(targets, slots, False)
        torch.cuda.synchronize()
        for a, b in zip(src, dst, strict=True):
            for i, j in zip(blocks, targets, strict=True):
                assert block_bytes_of(a, "kv_planes", i) == block_bytes_of(b, "kv_planes", j)
            for u in untouched:
                assert set(block_bytes_of(b, "kv_planes", u)) == {0xA5}
        return method

    assert load_and_check() == "dma" and not launches
    monkeypatch.setattr(gpu._BATCH, "copy_arrays", lambda *a: False)  # the driver refuses
    assert load_and_check() == "staged" and launches


def test_contiguous_runs_use_dma_and_fragments_are_staged(pool: tuple[mmap.mmap, int]) -> None:
    _, addr = pool
    # 2 layers x [NB, 2, 16, 8, 128] bf16: 64 KiB per layer-block
    src = [torch.zeros(64, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    eng = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, "blocks_first"), dma_saves=False)
    # one run of 32 blocks: one pitched copy per layer, 2 MiB each
    assert len(eng.dma_plan(list(range(32)), list(range(32)), True)) == 2
    assert eng.copy(list(range(32)), list(range(32)), True) == "dma"
    assert eng.copy([5, 1, 9], [7, 3, 0], True) == "staged"
    # a staging buffer smaller than the batch is used in chunks
    small = CopyEngine(0, addr, POOL_BYTES, layouts_of(src, "blocks_first"), staging_bytes=1, dma_saves=False)
    assert small.copy([5, 1, 9], [7, 3, 0], True) == "staged"


def test_device_uuid_lookup() -> None:
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    assert device_index(uuid) == 0
    assert device_index("GPU-" + uuid) == 0
    with pytest.raises(LookupError):
        device_index("00000000-0000-0000-0000-000000000000")


def _engine(conn: Any, layout: str) -> None:
    import torch

    src = make_layers(layout, torch.bfloat16, num_layers=3, nb=64)
    exported = []
    for t in src:
        _dev, handle, _size, storage_off, *_ = t.untyped_storage()._share_cuda_()
        exported.append((bytes(handle), storage_off + t.storage_offset() * t.element_size()))
    conn.send((exported, [block_bytes_of(t, layout, b) for t in src for b in range(8)]))
    conn.recv()  # agent done: saved blocks 0..7, loaded them into blocks 20..27
    conn.send([block_bytes_of(t, layout, 20 + b) for t in src for b in range(8)])
    conn.recv()


def test_engine_and_agent_in_different_processes(pool: tuple[mmap.mmap, int]) -> None:
    _, addr = pool
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(child, "kv_planes"), daemon=True)
    proc.start()
    maps = IpcMappings(0)
    try:
        assert parent.poll(120), "engine process did not export its tensors"
        exported, original = parent.recv()
        bases = [maps.open(h) + off for h, off in exported]
        like = make_layers("kv_planes", torch.bfloat16, num_layers=3, nb=64)  # shapes only
        eng = CopyEngine(0, addr, POOL_BYTES, layouts_of(like, "kv_planes", bases))
        eng.copy(list(range(8)), list(range(100, 108)), to_pool=True)
        eng.copy(list(range(20, 28)), list(range(100, 108)), to_pool=False)
        parent.send("done")
        assert parent.poll(60)
        assert parent.recv() == original
        assert len(maps) >= 1
    finally:
        maps.close()
        proc.kill()
        proc.join(10)


def test_cross_layer_runs_split_at_registered_pieces(pool: tuple[mmap.mmap, int]) -> None:
    """vLLM's cross-layer blocks: one 2 MiB chunk per block. A run of 300 consecutive blocks and
    slots spans three boundaries of the pool's 256 MiB registered pieces; it must still go as
    DMA and land byte for byte (one copy across pieces failed with "invalid argument")."""
    _m, addr = pool
    nb = 400
    src = torch.randn(nb, 4, 16, 8, 256, device="cuda", dtype=torch.bfloat16)
    dst = torch.full_like(src, float("nan"))
    chunk = src[0].nbytes

    def engine(t: torch.Tensor) -> CopyEngine:
        layer = LayerLayout(t.data_ptr(), nb, segments_for("block_chunk", chunk, nb))
        return CopyEngine(0, addr, POOL_BYTES, [layer], register_chunk=256 << 20)

    blocks, slots = list(range(50, 350)), list(range(100, 400))
    assert engine(src).copy(blocks, slots, True) == "dma"
    assert engine(dst).copy(list(range(0, 300)), slots, False) == "dma"
    torch.cuda.synchronize()
    assert torch.equal(src[50:350].view(torch.int16), dst[0:300].view(torch.int16))
    assert torch.isnan(dst[300:]).all()
