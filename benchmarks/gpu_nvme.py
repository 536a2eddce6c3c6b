"""An 8B-shaped prompt (10k tokens: 78 blocks of 16 MiB, 1.31 GB) served to a GPU engine from
the NVMe tier, against the same prompt served from the pool, on a GPU host.

    python3 benchmarks/gpu_nvme.py [--dir /tmp/kvfabric-nvme-bench]

An engine process (torch on the GPU, the connector's own client and ``cuda_kv``, no vLLM)
saves the blocks through a ``--cuda`` agent, then loads them back from the pool (the pool-hit
time). The agent is restarted (pinned pool new and empty, tier kept) and a second engine asks for
the prompt with promotion: time until every block is in the pool (disk -> pinned pool), then
the load (pool -> GPU). Baseline in the same run: ``dd`` reading the tier's slab with direct
I/O (the disk's own rate). Recomputing the prompt on an H200 takes about 265-270 ms
(KNOWN-FACTS, vLLM 0.26); it is not re-measured here (no model is loaded).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.agent import AgentProcess  # noqa: E402

LAYERS, NB, TOKENS, N = 32, 100, 128, 78


def _kv() -> dict[str, Any]:
    import torch

    torch.manual_seed(3)
    return {
        f"l{i}": torch.randn(2, NB, TOKENS, 8, 128, device="cuda", dtype=torch.bfloat16)
        for i in range(LAYERS)
    }


def _engine(phase: str, socket_path: str, conn: Any) -> None:
    try:
        import torch

        from kvfabric.connector import protocol as p
        from kvfabric.connector.client import AgentClient
        from kvfabric.connector.cuda_kv import describe
        from kvfabric.connector.keys import chain_keys, request_seed

        kv = _kv()
        c = AgentClient(socket_path, f"bench-{phase}", timeout_s=60)
        reg = c.call(describe(kv).request("gpu-8b"), p.GpuKVReply)
        keys = chain_keys(list(range(N * TOKENS)), TOKENS, request_seed())
        src, dst = list(range(N)), list(range(NB - N, NB))[::-1]  # load into other blocks
        out: dict[str, Any] = {"block_bytes": reg.block_bytes}
        if phase == "save":
            slots = c.reserve("gpu-8b", keys, None).slots
            c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=True, block_ids=src, slots=slots), p.GpuCopyReply)
            c.commit("gpu-8b", keys, [], 0.0)
        t0 = time.perf_counter()
        if phase == "nvme":
            first = c.lookup(["gpu-8b"], keys, TOKENS, promote=True)
            out["first_hits"], out["promoting"] = first.hits, first.promoting
            while c.lookup(["gpu-8b"], keys, TOKENS).hits < N:
                time.sleep(0.001)
        t1 = time.perf_counter()
        hit = c.lookup(["gpu-8b"], keys, TOKENS, lease_id="L")
        torch.cuda.synchronize()
        c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=dst, slots=hit.slots[0]), p.GpuCopyReply)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        c.release(hit.leases, N)
        ref = _kv()
        out["same"] = all(torch.equal(kv[k][:, dst], ref[k][:, src]) for k in kv)
        out.update(hits=hit.hits, promote_s=t1 - t0, load_s=t2 - t1)
        c.close()
        conn.send(out)
    except Exception as exc:
        conn.send({"error": repr(exc)})


def _run(agent: AgentProcess, phase: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(phase, str(agent.socket_path), child))
    proc.start()
    try:
        if not parent.poll(300):
            raise TimeoutError(f"{phase}: the engine did not answer")
        out: dict[str, Any] = parent.recv()
    finally:
        proc.join(60)
        proc.kill()
    if "error" in out:
        raise RuntimeError(f"{phase}: {out['error']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="where the tier lives (default: a temporary directory)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="kvfabric-nvme-bench-"))
    nvme = base / "nvme"
    flags = ["--cuda", "--pin-threads", "16", "--nvme-path", str(nvme), "--nvme-size", "8GiB"]
    flags += ["--nvme-read-deadline-ms", "20000", "--log-level", "WARNING"]  # time every read
    results: dict[str, Any] = {}
    with AgentProcess(base / "a1", "8GiB", extra_args=flags) as agent:
        agent.wait_nvme()
        pool = _run(agent, "save")
        agent.wait_nvme_written()
    with AgentProcess(base / "a2", "8GiB", extra_args=flags) as agent:
        agent.wait_nvme()
        disk = _run(agent, "nvme")
        stats = agent.stats()
    (slab,) = nvme.glob("*/*.slab")
    start = time.perf_counter()
    subprocess.run(
        ["dd", f"if={slab}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True, capture_output=True
    )
    dd_s = time.perf_counter() - start
    nbytes = N * pool["block_bytes"]
    results.update(
        prompt_bytes=nbytes,
        pool_hit_load_ms=pool["load_s"] * 1e3,
        nvme_promote_ms=disk["promote_s"] * 1e3,
        nvme_load_ms=disk["load_s"] * 1e3,
        nvme_total_ms=(disk["promote_s"] + disk["load_s"]) * 1e3,
        nvme_promote_GBps=nbytes / disk["promote_s"] / 1e9,
        dd_direct_read_GBps=slab.stat().st_size / dd_s / 1e9,
        ratio_promote_vs_dd=(nbytes / disk["promote_s"]) / (slab.stat().st_size / dd_s),
        first_lookup=(disk["first_hits"], disk["promoting"]),
        bytes_equal=disk["same"] and pool["same"],
        direct_io=stats["nvme_direct_io"],
        damaged=stats["nvme_damaged_blocks"],
        skipped_late=stats["nvme_reads_skipped_late"],
    )
    for k, v in results.items():
        print(f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
