"""The NVMe tier's storage against the disk it sits on.

    python -m benchmarks.run nvme      # write/read GB/s vs dd with direct I/O; open time at scale

Baselines measured in the same run on the same filesystem: ``dd`` with ``oflag=direct`` /
``iflag=direct`` for throughput (target >= 0.8x), and reading every slot header with ``dd``
(the least an index rebuild by scan can read) for the time to open a full tier, after a clean
shutdown (from the index checkpoint) and after a crash (every header read).
``KVFABRIC_BENCH_TIER_BLOCKS`` sets the open-time tier's size (default 1,000,000 blocks).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvfabric.agent.nvme import CHECKPOINT, HEADER_BYTES, NvmeTier

Report = Callable[..., None]


def _timed(args: list[str]) -> float:
    """Seconds a ``dd`` run took, start to exit."""
    start = time.perf_counter()
    subprocess.run(["dd", *args], capture_output=True, check=True)
    return time.perf_counter() - start


THREADS = 4  # the agent's --nvme-threads default


def _parallel_reads(tier: NvmeTier, count: int, block: int, threads: int) -> float:
    """Seconds to read every block with ``threads`` readers, as the agent's promotion does."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()  # one page-aligned buffer per reader (freed with its thread)

    def read(i: int) -> None:
        if not hasattr(local, "out"):
            local.out = memoryview(mmap.mmap(-1, block))
        assert tier.get("", "bench", i.to_bytes(16, "little"), local.out)

    with ThreadPoolExecutor(threads) as ex:
        start = time.perf_counter()
        list(ex.map(read, range(count)))
        return time.perf_counter() - start


def _agent_start(tmp: Path, tier_dir: Path, capacity: int) -> tuple[float, float]:
    """A real agent started on a full tier: (seconds until it serves, until its tier is open).
    The tier opens in the background: the agent serves from its pool meanwhile."""
    from e2e.agent import AgentProcess

    flags = ["--nvme-path", str(tier_dir), "--nvme-size", str(capacity), "--log-level", "WARNING"]
    a = AgentProcess(tmp / "agent-start", "64MiB", extra_args=flags)
    try:
        start = time.perf_counter()
        a.start(timeout=120)
        ready = time.perf_counter() - start
        a.wait_nvme(timeout=600)
        return ready, time.perf_counter() - start
    finally:
        a.cleanup()


def bench_tier(results: dict[str, Any], tmp: Path, report: Report) -> None:
    block, count = 2 << 20, 512  # 1 GiB in 2 MiB blocks (a 16-token block of an 8B model is 2 MiB)
    total = block * count
    print(f"NVMe tier: {count} blocks of {block >> 20} MiB ({total >> 30} GiB), direct I/O, on {tmp}")
    dd_file = tmp / "dd.bin"
    dd_write = _timed(["if=/dev/zero", f"of={dd_file}", f"bs={block}", f"count={count}", "oflag=direct"])
    dd_read = _timed([f"if={dd_file}", "of=/dev/null", f"bs={block}", "iflag=direct"])
    dd_file.unlink()
    tier = NvmeTier(tmp / "tier", 2 * total)
    pool = mmap.mmap(-1, block)  # the agent's pool is page-aligned shared memory
    pool[:] = os.urandom(block)
    data = memoryview(pool)
    start = time.perf_counter()
    for i in range(count):
        assert tier.put("", "bench", i.to_bytes(16, "little"), data)
    ours_write = time.perf_counter() - start
    into = mmap.mmap(-1, block)
    out = memoryview(into)
    start = time.perf_counter()
    for i in range(count):
        assert tier.get("", "bench", i.to_bytes(16, "little"), out)
    ours_read = time.perf_counter() - start
    ours_read_par = _parallel_reads(tier, count, block, THREADS)
    assert tier.direct, "the benchmark's filesystem refused direct I/O"
    tier.close()
    data.release()
    out.release()
    pool.close()
    into.close()

    def gbs(seconds: float) -> float:
        return total / seconds / 1e9

    report(results, "nvme_dd_write_gbs", gbs(dd_write), "GB/s")
    report(results, "nvme_tier_write_gbs", gbs(ours_write), "GB/s")
    report(results, "ratio_nvme_write_vs_dd", dd_write / ours_write, "x", "target >= 0.8")
    report(results, "nvme_dd_read_gbs", gbs(dd_read), "GB/s")
    report(results, "nvme_tier_read_gbs", gbs(ours_read), "GB/s", "checksum verified")
    report(results, "ratio_nvme_read_vs_dd", dd_read / ours_read, "x", "target >= 0.8")
    report(
        results, f"nvme_tier_read_{THREADS}_threads_gbs", gbs(ours_read_par), "GB/s", "the agent's readers"
    )
    report(results, "ratio_nvme_parallel_read_vs_dd", dd_read / ours_read_par, "x", "target >= 0.8")

    n = int(os.environ.get("KVFABRIC_BENCH_TIER_BLOCKS", "1000000"))
    small = 4096
    print(f"NVMe tier open: {n} blocks of {small} bytes (slots of {HEADER_BYTES + small} bytes)")
    capacity = n * (HEADER_BYTES + small)
    tier = NvmeTier(tmp / "full", capacity)
    one = memoryview(os.urandom(small))
    start = time.perf_counter()
    for i in range(n):
        tier.put("", "full", i.to_bytes(16, "little"), one)
    filled = time.perf_counter() - start
    tier.close()  # a clean shutdown: writes the index checkpoint
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    tier = NvmeTier(tmp / "full", capacity)  # a restart after a clean shutdown
    clean = time.perf_counter() - start
    assert len(tier) == n, (len(tier), n)
    tier.close()
    (tmp / "full" / CHECKPOINT).unlink()  # what a crash leaves: every slab is scanned
    start = time.perf_counter()
    tier = NvmeTier(tmp / "full", capacity)
    crashed = time.perf_counter() - start
    assert len(tier) == n, (len(tier), n)
    tier.close()
    agent_ready, agent_tier = _agent_start(tmp, tmp / "full", capacity)
    headers = tmp / "headers.bin"
    _timed(["if=/dev/zero", f"of={headers}", f"bs={HEADER_BYTES}", f"count={n}", "oflag=direct"])
    dd_scan = _timed([f"if={headers}", "of=/dev/null", f"bs={HEADER_BYTES}", "iflag=direct"])
    headers.unlink()
    report(results, "nvme_fill_blocks_per_s", n / filled, "blk/s", f"{n} puts of {small} bytes")
    report(results, "nvme_open_after_clean_shutdown_s", clean, "s", f"{n} blocks, from the checkpoint")
    report(results, "nvme_open_after_crash_s", crashed, "s", f"{n} blocks, every header read")
    report(results, "nvme_header_read_dd_s", dd_scan, "s", f"dd: {n} direct reads of {HEADER_BYTES} bytes")
    report(results, "ratio_nvme_crash_open_vs_dd_header_read", dd_scan / crashed, "x")
    report(
        results, "nvme_agent_ready_s", agent_ready, "s", f"kvfabric-agent with the {n}-block tier: serving"
    )
    report(results, "nvme_agent_tier_ready_s", agent_tier, "s", "... and its tier open (from the checkpoint)")
    report(results, "ratio_nvme_clean_open_vs_dd_header_read", dd_scan / clean, "x")


def bench_ttft(
    results: dict[str, Any], tmp: Path, report: Report, rounds: int = 2, per_round: int = 3
) -> None:
    """TTFT of a prompt served from the NVMe tier (the agent restarted: its pool is new, the
    tier is not) against the same prompt recomputed (no connector) and served from the pool.
    Tiny Llama fp32 on the CPU, 4096-token prompts (32 blocks of 512 KiB, 16 MiB each)."""
    import random
    import statistics

    from e2e import tiny_model
    from e2e.agent import AgentProcess
    from e2e.engine import EngineProcess

    print(
        "NVMe TTFT: 4096-token prompts, tiny Llama fp32 on the CPU; warm from the pool, warm from the "
        f"NVMe tier after an agent restart, recomputed; {rounds} rounds x {per_round} prompts"
    )
    model = tiny_model.build(tmp / "model-nvme")
    rng = random.Random(13)
    vocab = tiny_model.CONFIG["vocab_size"]
    warmup = [rng.randrange(3, vocab) for _ in range(300)]
    samples: dict[str, list[float]] = {}
    nvme_dir = tmp / "nvme-ttft"

    def agent(name: str) -> AgentProcess:
        a = AgentProcess(
            tmp / name,
            "2GiB",
            extra_args=["--nvme-path", str(nvme_dir), "--nvme-size", "4GiB", "--log-level", "WARNING"],
        )
        a.start()
        a.wait_prefaulted()
        a.wait_nvme()
        return a

    def serve(key: str, prompts: list[list[int]], a: AgentProcess | None) -> None:
        cfg = {"socket_path": str(a.socket_path)} if a is not None else None
        with EngineProcess(model, tmp, cfg, log_name=f"nvme-{key}") as e:
            e.generate([[t + 1 for t in warmup]], 1)  # first-request warm-up, not measured
            outs = [e.generate([p], 1)[0] for p in prompts]  # one at a time: TTFT, not batch time
            samples.setdefault(key, []).extend(o.seconds for o in outs)
            if key not in ("none", "cold"):
                assert all(o.cached_tokens > 0 for o in outs), f"{key}: a prompt was not a hit"

    for r in range(rounds):
        prompts = [[rng.randrange(3, vocab) for _ in range(4096)] for _ in range(per_round)]
        serve("none", prompts, None)
        a = agent(f"agent-{r}-1")
        try:
            serve("cold", prompts, a)
            a.wait_nvme_written()  # every block on disk before the pool is lost
            serve("pool", prompts, a)
        finally:
            a.cleanup()
        a = agent(f"agent-{r}-2")  # pool lost, tier kept
        try:
            serve("nvme", prompts, a)
            promoted = a.stats()["nvme_promoted_blocks"]
            assert promoted >= per_round * 31, promoted
        finally:
            a.cleanup()
    med = {k: statistics.median(v) for k, v in samples.items()}
    report(results, "nvme_ttft_recompute_ms", med["none"] * 1e3, "ms")
    report(results, "nvme_ttft_from_pool_ms", med["pool"] * 1e3, "ms")
    report(results, "nvme_ttft_from_nvme_ms", med["nvme"] * 1e3, "ms")
    report(results, "ratio_nvme_over_recompute", med["nvme"] / med["none"], "x", "target < 1")
    report(results, "ratio_nvme_over_pool", med["nvme"] / med["pool"], "x")
    spread = {k: (min(v) * 1e3, max(v) * 1e3) for k, v in samples.items()}
    print("  min-max ms: " + ", ".join(f"{k} {a:.0f}-{b:.0f}" for k, (a, b) in spread.items()))
