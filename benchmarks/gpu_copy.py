"""GPU transfer benchmarks (run on a GPU host): ``python -m benchmarks.gpu_copy [--pin-gib 64]``.

Llama-3.1-8B-shaped paged KV (32 layers, ``[2, blocks, 16, 8, 128]`` bf16, 2 MiB per block over
all layers), 256 randomly placed blocks, plus an MLA case (``[blocks, 16, 576]`` bf16). Every
figure is printed beside a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

import cupy as cp
import numpy as np
import torch

import kvfabric.agent.gpu as gpu
from kvfabric.agent.gpu import STAGED_CTAS, CopyEngine, LayerLayout, PinnedPool, host_address
from kvfabric.connector.kv_segments import segments_for


def timed(fn, reps: int = 10) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def shm(size: int, name: str) -> tuple[mmap.mmap, str]:
    path = f"/dev/shm/kvfabric-bench-{name}-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    return m, path


def pin_bench(gib: int) -> None:
    print(f"pinning: single-threaded registration (1 GiB chunks) vs parallel, {gib} GiB pool")
    m, path = shm(8 << 30, "pin1")
    single = PinnedPool(host_address(m), 8 << 30, threads=1)
    t1 = (single.populate() + single.register()) / 8
    single.unregister()
    print(
        f"  single thread (populate + register): {1 / t1:.2f} GiB/s -> {gib * t1:.1f} s for {gib} GiB (extrapolated)"
    )
    m.close()
    os.unlink(path)
    # The agent's way first: the one that runs second finds guest memory the host already backs
    # (freed by the first), which favours the baseline.
    m, path = shm(gib << 30, "pin")
    pinned = PinnedPool(host_address(m), gib << 30, threads=16)
    t_pop, t_reg, piped = pinned.pin()
    print(
        f"  agent (16 threads, each registering a chunk once it populated it): {piped:.1f} s "
        f"({gib / piped:.2f} GiB/s; thread-seconds populate {t_pop:.1f}, register {t_reg:.1f}); "
        f"target <= 20 s for 64 GiB; speedup vs single {gib * t1 / piped:.2f}x"
    )
    pinned.unregister()
    m.close()
    os.unlink(path)
    m, path = shm(gib << 30, "pin")
    t0 = time.perf_counter()
    pinned = PinnedPool(host_address(m), gib << 30, threads=16)
    t_pop = pinned.populate()  # parallel: tmpfs zeroes pages at first touch
    t_reg = pinned.register()
    total = time.perf_counter() - t0
    print(
        f"  baseline, populate then register (16 threads each): {t_pop:.1f} s + {t_reg:.1f} s = {total:.1f} s; "
        f"agent's way {piped / total:.2f}x of it"
    )
    pinned.unregister()
    m.close()
    os.unlink(path)


def transfer_bench() -> None:
    nb, n = 4096, 256
    layers = [torch.randn(2, nb, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    per_plane = layers[0][0, 0].nbytes
    block_bytes = 32 * 2 * per_plane
    pool_bytes = 4 << 30
    m, path = shm(pool_bytes, "xfer")
    addr = host_address(m)
    pinned = PinnedPool(addr, pool_bytes, threads=16)
    pinned.register()

    def engine_for(tensors: list[torch.Tensor], layout: str, per: int, **kw: Any) -> CopyEngine:
        """The agent's copy engine over ``tensors`` (one per layer) and this pool."""
        return CopyEngine(
            0,
            addr,
            pool_bytes,
            [LayerLayout(t.data_ptr(), nb, segments_for(layout, per, nb)) for t in tensors],
            **kw,
        )

    def rates(engine: CopyEngine, b: list[int], sl: list[int], nbytes: int) -> tuple[float, float]:
        """(save, load) GB/s of ``engine`` moving blocks ``b`` to and from slots ``sl``."""
        save = nbytes / timed(lambda: engine.copy(b, sl, True)) / 1e9
        return save, nbytes / timed(lambda: engine.copy(b, sl, False)) / 1e9

    eng = engine_for(layers, "kv_planes", per_plane, dma_saves=False)  # saves staged, as loads
    rng = np.random.default_rng(0)
    blocks = rng.permutation(nb)[:n].tolist()
    slots = rng.permutation(pool_bytes // block_bytes)[:n].tolist()
    nbytes = n * block_bytes
    # ceilings: pinned 1 GiB memcpy each way, and both ways at once on two streams
    host = cp.cuda.alloc_pinned_memory(1 << 30)
    dev = cp.cuda.alloc(1 << 30)
    rt = cp.cuda.runtime
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)

    def ceiling(dst: int, src: int, kind: int) -> float:
        """GB/s of one 1 GiB memcpy on its own stream."""

        def one() -> None:
            rt.memcpyAsync(dst, src, 1 << 30, kind, s1.ptr)
            s1.synchronize()

        return (1 << 30) / timed(one) / 1e9

    d2h = ceiling(host.ptr, dev.ptr, rt.memcpyDeviceToHost)
    h2d = ceiling(dev.ptr, host.ptr, rt.memcpyHostToDevice)
    host2 = cp.cuda.alloc_pinned_memory(1 << 30)
    dev2 = cp.cuda.alloc(1 << 30)

    def both() -> None:
        rt.memcpyAsync(host.ptr, dev.ptr, 1 << 30, rt.memcpyDeviceToHost, s1.ptr)
        rt.memcpyAsync(dev2.ptr, host2.ptr, 1 << 30, rt.memcpyHostToDevice, s2.ptr)
        s1.synchronize()
        s2.synchronize()

    bidir = (2 << 30) / timed(both) / 1e9
    print(
        f"ceilings: pinned 1 GiB memcpy D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s, both at once {bidir:.1f} GB/s"
    )

    direct = engine_for(layers, "kv_planes", per_plane, fragmented="kernel")
    ksave, kload = rates(direct, blocks, slots, nbytes)
    print(
        f"KVFabric, 256 random blocks, direct kernel on mapped memory: save {ksave:.1f} GB/s ({ksave / d2h:.2f}x), load {kload:.1f} GB/s ({kload / h2d:.2f}x)"
    )
    save, load = rates(eng, blocks, slots, nbytes)
    print(
        f"KVFabric, 256 random blocks ({eng.copy(blocks, slots, True)}): save {save:.1f} GB/s ({save / d2h:.2f}x of D2H), "
        f"load {load:.1f} GB/s ({load / h2d:.2f}x of H2D); target >= 0.90x"
    )
    # the agent's default for fragmented saves: one batched copy per block and segment, no kernel
    dma_eng = engine_for(layers, "kv_planes", per_plane)
    dsave = nbytes / timed(lambda: dma_eng.copy(blocks, slots, True)) / 1e9
    many = rng.permutation(nb)[:625].tolist(), rng.permutation(pool_bytes // block_bytes)[:625].tolist()
    t_dma = timed(lambda: dma_eng.copy(*many, True))
    t_staged = timed(lambda: eng.copy(*many, True))
    print(
        f"  saves as copy-engine DMA only ({dma_eng.copy(blocks, slots, True)}, one copy per block and "
        f"{per_plane // 1024} KiB segment, batched): {dsave / d2h:.2f}x (staged: {save / d2h:.2f}x); 625 random "
        f"blocks: {t_dma * 1e3:.1f} ms (staged {t_staged * 1e3:.1f} ms)"
    )
    # loads the same way (``dma_loads``, off by default: a load is on the critical path)
    dma_loader = engine_for(layers, "kv_planes", per_plane, dma_loads=True)
    dload = nbytes / timed(lambda: dma_loader.copy(blocks, slots, False)) / 1e9
    tl_dma = timed(lambda: dma_loader.copy(*many, False))
    tl_staged = timed(lambda: eng.copy(*many, False))
    print(
        f"  loads as copy-engine DMA only ({dma_loader.copy(blocks, slots, False)}): {dload / h2d:.2f}x "
        f"(staged: {load / h2d:.2f}x); 625 random blocks: {tl_dma * 1e3:.1f} ms (staged {tl_staged * 1e3:.1f} ms)"
    )
    # the staging kernels on every SM they can get, as before STAGED_CTAS (the decode
    # interference row below runs both)
    uncapped = engine_for(layers, "kv_planes", per_plane, staged_ctas=1 << 20, dma_saves=False)
    usave, uload = rates(uncapped, blocks, slots, nbytes)
    print(
        f"  the same, staging kernels uncapped (a CTA per block and segment): save {usave / d2h:.2f}x, "
        f"load {uload / h2d:.2f}x; capped at {STAGED_CTAS} CTAs: save {save / d2h:.2f}x, load {load / h2d:.2f}x"
    )
    sweep = []
    for ctas in (8, 32, 64):
        staged = engine_for(layers, "kv_planes", per_plane, staged_ctas=ctas, dma_saves=False)
        csv, clv = rates(staged, blocks, slots, nbytes)
        sweep.append(f"{ctas}: {csv / d2h:.2f}x / {clv / h2d:.2f}x")
    print(f"  staging kernels on at most N CTAs, save / load: {'; '.join(sweep)}")
    cblocks, cslots = list(range(100, 100 + n)), list(range(7, 7 + n))
    csave, cload = rates(eng, cblocks, cslots, nbytes)
    print(
        f"KVFabric, 256 contiguous blocks ({eng.copy(cblocks, cslots, True)}): save {csave:.1f} GB/s, load {cload:.1f} GB/s"
    )

    eng2 = engine_for(layers, "kv_planes", per_plane)
    other = rng.permutation(pool_bytes // block_bytes)[:n].tolist()

    def both_ways(saver: CopyEngine, loader: CopyEngine) -> float:
        """GB/s of a save of ``blocks`` and a load of other slots running at once."""

        def concurrent() -> None:
            t = threading.Thread(target=loader.copy, args=(blocks, other, False))
            t.start()
            saver.copy(blocks, slots, True)
            t.join()

        return 2 * nbytes / timed(concurrent) / 1e9

    def load_latencies(engine: CopyEngine, label: str) -> None:
        for k in (1, 625):
            bk = rng.permutation(nb)[:k].tolist()
            sk = rng.permutation(pool_bytes // block_bytes)[:k].tolist()
            lat = timed(lambda bk=bk, sk=sk: engine.copy(bk, sk, False), reps=20)
            print(f"{label}load of {k} block(s), random: p50 {lat * 1e3:.3f} ms")

    both_ours = both_ways(eng, eng2)
    print(
        f"KVFabric save + load at once: {both_ours:.1f} GB/s ({both_ours / bidir:.2f}x of the bidirectional ceiling); target >= 0.85x"
    )

    # baselines: one copy_ per block per layer; per-layer gather + one DMA
    pool_t = torch.frombuffer(m, dtype=torch.uint8)[: n * block_bytes].view(n, 32, 2, per_plane)
    bt = torch.tensor(blocks, device="cuda")

    def per_block() -> None:
        for li, t in enumerate(layers):
            for i, b in enumerate(blocks):
                pool_t[i, li, 0].copy_(t[0, b].view(-1).view(torch.uint8), non_blocking=True)
                pool_t[i, li, 1].copy_(t[1, b].view(-1).view(torch.uint8), non_blocking=True)

    staging = torch.empty(2, n, per_plane, dtype=torch.uint8, device="cuda")
    pinned_stage = torch.empty(32, 2, n, per_plane, dtype=torch.uint8).pin_memory()

    def gather_dma() -> None:
        for li, t in enumerate(layers):
            torch.index_select(t.view(2, nb, -1).view(torch.uint8), 1, bt, out=staging)
            pinned_stage[li].copy_(staging, non_blocking=True)

    pb = nbytes / timed(per_block, reps=3) / 1e9
    gd = nbytes / timed(gather_dma) / 1e9
    print(
        f"baselines (save): one copy_ per block per layer {pb:.1f} GB/s; per-layer gather + DMA {gd:.1f} GB/s; "
        f"KVFabric {save:.1f} GB/s = {save / pb:.1f}x and {save / gd:.2f}x of them"
    )

    # MLA: 32 layers of [NB, 16, 576] bf16
    mla = [torch.randn(nb, 16, 576, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    per = mla[0][0].nbytes
    eng3 = engine_for(mla, "mla", per, dma_saves=False)
    mslots = rng.permutation(pool_bytes // eng3.block_bytes)[:n].tolist()
    msave, mload = rates(eng3, blocks, mslots, n * eng3.block_bytes)
    # MLA's 18 KiB segments are under DMA_ONLY_MIN_BYTES, so its saves stay staged; this row
    # shows why (the threshold lifted for it)
    eng3d = engine_for(mla, "mla", per)
    default_method = eng3d.copy(blocks, mslots, True)
    threshold, gpu.DMA_ONLY_MIN_BYTES = gpu.DMA_ONLY_MIN_BYTES, 0
    try:
        forced_method = eng3d.copy(blocks, mslots, True)
        mdsave = n * eng3.block_bytes / timed(lambda: eng3d.copy(blocks, mslots, True)) / 1e9
    finally:
        gpu.DMA_ONLY_MIN_BYTES = threshold
    print(
        f"MLA (32 x [blocks, 16, 576] bf16, {eng3.block_bytes // 1024} KiB/block), 256 random blocks: "
        f"save {msave:.1f} GB/s ({msave / d2h:.2f}x), load {mload:.1f} GB/s ({mload / h2d:.2f}x) "
        f"(saves by default: {default_method}); saves as DMA only ({forced_method}): {mdsave / d2h:.2f}x"
    )
    # The same blocks into consecutive slots (a request's blocks saved together get an arena's
    # next slots), and by the direct kernel: is the random case bound by one DMA call per slot?
    mrun = list(range(3, 3 + n))
    rsave, rload = rates(eng3, blocks, mrun, n * eng3.block_bytes)
    eng3k = engine_for(mla, "mla", per, fragmented="kernel")
    ksave, kload = rates(eng3k, blocks, mslots, n * eng3.block_bytes)
    print(
        f"  MLA, consecutive slots: save {rsave / d2h:.2f}x, load {rload / h2d:.2f}x; "
        f"random slots, direct kernel on mapped memory: save {ksave / d2h:.2f}x, load {kload / h2d:.2f}x"
    )
    del eng3k
    eng3l = engine_for(mla, "mla", per, batched=False, dma_saves=False)
    lsave, lload = rates(eng3l, blocks, mslots, n * eng3.block_bytes)
    print(
        f"  MLA, random slots, one cudaMemcpyAsync per slot instead of one batch per staging half: "
        f"save {lsave / d2h:.2f}x, load {lload / h2d:.2f}x (batched: {msave / d2h:.2f}x, {mload / h2d:.2f}x)"
    )
    del eng3l
    big = engine_for(mla, "mla", per, staging_bytes=256 << 20, dma_saves=False)
    bsave, bload = rates(big, blocks, mslots, n * eng3.block_bytes)
    print(
        f"  MLA, random slots, 256 MiB of staging (64 MiB default): save {bsave / d2h:.2f}x, load {bload / h2d:.2f}x"
    )
    del big

    # vLLM >= 0.26 cross-layer blocks (the connector asks for them): one [blocks, 32, 16, 8, 256]
    # tensor, each block one 2 MiB chunk over all layers; the agent sees a single "layer".
    del mla
    cross = torch.randn(nb, 32, 16, 8, 256, device="cuda", dtype=torch.bfloat16)
    chunk = cross[0].nbytes
    xeng, xeng2 = engine_for([cross], "block_chunk", chunk), engine_for([cross], "block_chunk", chunk)
    xsave, xload = rates(xeng, blocks, slots, nbytes)
    xboth = both_ways(xeng, xeng2)
    print(
        f"cross-layer blocks (2 MiB chunks), 256 random blocks ({xeng.copy(blocks, slots, True)}): save {xsave:.1f} GB/s "
        f"({xsave / d2h:.2f}x), load {xload:.1f} GB/s ({xload / h2d:.2f}x); both at once {xboth:.1f} GB/s ({xboth / bidir:.2f}x)"
    )
    load_latencies(xeng, "cross-layer ")
    del cross

    # latency to load 1 block and 625 blocks (10k tokens) into the engine's tensors, p50
    load_latencies(eng, "")

    # decode-step interference: 20 large matmuls, replayed as one CUDA graph and timed with
    # events on their stream (GPU time only: no launch gaps from this process's other threads),
    # alone and while copies run nonstop
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(mm):
        a @ a  # cuBLAS's workspace, before capture
        with torch.cuda.graph(graph, stream=mm):
            for _ in range(20):
                a @ a
    mm.synchronize()

    def matmuls() -> float:
        """Median GPU seconds of one replay of the 20 matmuls."""
        ts = []
        for _ in range(5):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(mm):
                t0.record()
                graph.replay()
                t1.record()
            t1.synchronize()
            ts.append(t0.elapsed_time(t1) / 1e3)
        return statistics.median(ts)

    matmuls()
    alone = matmuls()

    def under_traffic(engine: CopyEngine, b: list[int], sl: list[int]) -> float:
        """Seconds of the matmuls while ``engine`` saves and loads blocks ``b`` nonstop."""
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                engine.copy(b, sl, True)
                engine.copy(b, sl, False)

        th = threading.Thread(target=traffic)
        th.start()
        try:
            time.sleep(0.2)  # traffic under way
            return matmuls()
        finally:
            stop.set()
            th.join()

    rows = {
        f"staged, {STAGED_CTAS} CTAs": under_traffic(eng, blocks, slots),
        "staged, uncapped": under_traffic(uncapped, blocks, slots),
        "contiguous (copy engines only)": under_traffic(eng, cblocks, cslots),
    }
    # the agent is another process: its copies from its own CUDA context (as an engine's
    # background saves run while its next prefill computes)
    ctx = mp.get_context("spawn")
    copies = {}
    for label, kw, loads in (
        ("save+load, staged, from another process", {"dma_saves": False}, True),
        ("saves only, staged, from another process", {"dma_saves": False}, False),
        (
            "saves only, staged uncapped, from another process",
            {"dma_saves": False, "staged_ctas": 1 << 20},
            False,
        ),
        ("saves only, DMA only (the default), from another process", {}, False),
        ("save+load, both DMA only (dma_loads), from another process", {"dma_loads": True}, True),
    ):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_traffic_process, args=(child, kw, loads), daemon=True)
        proc.start()
        try:
            assert parent.poll(300) and parent.recv() == "running", "the traffic process did not start"
            rows[label] = matmuls()
            parent.send("stop")
            copies[label] = parent.recv()
        finally:
            proc.join(60)
    print(
        f"decode interference: 20 bf16 8192^3 matmuls (one CUDA graph) {alone * 1e3:.1f} ms alone; target <= 1.10x"
    )
    for label, busy in rows.items():
        done = f"; {copies[label]} copies of 256 blocks meanwhile" if label in copies else ""
        print(
            f"  with {label if 'process' in label else 'save+load, ' + label}: {busy * 1e3:.1f} ms ({busy / alone:.2f}x){done}"
        )
    pinned.unregister()
    m.close()
    os.unlink(path)


def _traffic_process(conn: Any, engine_kw: dict[str, Any], loads: bool) -> None:
    """In its own process (its own CUDA context, as the agent): saves (and with ``loads``
    loads) 256 random blocks of its own 8B-shaped layers, nonstop, until told to stop, with a
    copy engine of ``engine_kw``; answers its copy count."""
    nb, n = 4096, 256
    layers = [torch.randn(2, nb, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    per_plane = layers[0][0, 0].nbytes
    pool_bytes = 1 << 30
    m, path = shm(pool_bytes, "traffic")
    pinned = PinnedPool(host_address(m), pool_bytes, threads=16)
    pinned.register()
    try:
        eng = CopyEngine(
            0,
            host_address(m),
            pool_bytes,
            [LayerLayout(t.data_ptr(), nb, segments_for("kv_planes", per_plane, nb)) for t in layers],
            **engine_kw,
        )
        rng = np.random.default_rng(1)
        blocks = rng.permutation(nb)[:n].tolist()
        slots = rng.permutation(pool_bytes // eng.block_bytes)[:n].tolist()
        eng.copy(blocks, slots, True)
        conn.send("running")
        copies = 0
        while not conn.poll():
            eng.copy(blocks, slots, True)
            copies += 1
            if loads:
                eng.copy(blocks, slots, False)
                copies += 1
        conn.recv()
        conn.send(copies)
    finally:
        pinned.unregister()
        m.close()
        os.unlink(path)


def attach_bench(gib: int) -> None:
    """Engine attach to a running agent that holds a pinned pool vs pinning it in the engine."""
    import tempfile
    from pathlib import Path

    from e2e.agent import AgentProcess
    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe

    kv = {f"l{i}": torch.empty(2, 2048, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for i in range(32)}
    with (
        tempfile.TemporaryDirectory() as d,
        AgentProcess(Path(d), f"{gib}GiB", extra_args=["--cuda", "--cuda-ready-bytes", "0"]) as agent,
    ):
        print(
            f"attach: agent with a {gib} GiB pool pinned itself in {agent.stats()['cuda_pin_seconds']:.1f} s"
        )
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            c = AgentClient(str(agent.socket_path), f"engine{i}", timeout_s=30)
            c.call(describe(kv).request(f"attach-{i}"), p.GpuKVReply)
            times.append(time.perf_counter() - t0)
            c.close()
        attach = statistics.median(times)
    m, path = shm(gib << 30, "engine-pin")
    single = PinnedPool(host_address(m), gib << 30, threads=1)
    own = single.populate() + single.register()
    single.unregister()
    m.close()
    os.unlink(path)
    print(
        f"  engine attach (connect + export {len(kv)} IPC handles + agent opens them): median {attach * 1e3:.1f} ms; "
        f"pinning {gib} GiB in the engine process (one thread, as engines do): {own:.1f} s -> {own / attach:.0f}x; "
        f"target attach <= 0.1 s and >= 100x"
    )


def agent_ready_bench(gib: int) -> None:
    """A real agent process started with a pool of ``gib`` GiB: seconds until /readyz says the
    pool is reserved, populated and registered with CUDA; with 4 KiB pages, then with
    transparent huge pages asked for (``--huge-pages``; tmpfs grants them only where
    ``shmem_enabled`` allows)."""
    import tempfile
    from pathlib import Path

    from e2e.agent import AgentProcess

    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    print(f"transparent huge pages for shmem: {thp}")
    for label, extra in (("4 KiB pages", []), ("huge pages asked", ["--huge-pages"])):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            whole = ["--cuda", "--cuda-ready-bytes", "0"]  # ready once every byte is pinned
            with AgentProcess(Path(d), f"{gib}GiB", extra_args=[*whole, *extra]) as agent:
                ready = time.perf_counter() - t0
                pin = agent.stats()["cuda_pin_seconds"]
                huge = _shmem_huge_kib(agent)
        print(
            f"agent ready with a {gib} GiB pinned pool, {label}: {ready:.1f} s (pinning "
            f"{pin:.1f} s, {huge} KiB in huge pages); target <= 20 s"
        )


def _shmem_huge_kib(agent: Any) -> str:
    """ShmemPmdMapped of the agent process: how much of its pool mapping huge pages back."""
    try:
        pid = agent.proc.pid
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("ShmemPmdMapped:"):
                return line.split()[1]
    except (OSError, AttributeError):
        pass
    return "?"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pin-gib", type=int, default=64)
    ap.add_argument("--only", choices=["transfer", "pin", "attach", "agent"], nargs="*")
    args = ap.parse_args()
    only = set(args.only or ["transfer", "pin", "attach", "agent"])
    print(f"GPU: {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}")
    if "transfer" in only:
        transfer_bench()
    if "pin" in only:
        pin_bench(args.pin_gib)
    if "attach" in only:
        attach_bench(args.pin_gib)
    if "agent" in only:
        agent_ready_bench(args.pin_gib)
