"""How long a CUDA agent takes to be ready with a large pinned pool, and what it spends it on.

Starts ``kvfabric-agent --cuda`` with a pool of ``--pool`` (default 64 GiB) once per variant
(ready only once the whole pool is pinned first: the baseline), waits for ``/readyz``, and
reports the ready time, how much was pinned then, when the whole pool was, the pinning wall time
and its populate/register split (summed over threads), with each variant's ratio to the
baseline measured in the same run. Also reports what the host grants: transparent
huge pages for shared memory (``shmem_enabled``), hugetlbfs pages, ``/dev/shm``'s size.

    python benchmarks/gpu_agent_start.py --pool 64GiB [--variants whole,default,one-file,files32,huge]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.agent import AgentProcess, wait_until  # noqa: E402

VARIANTS = {
    "whole": ["--cuda-ready-bytes", "0"],  # ready once the whole pool is pinned: the baseline
    "default": [],  # ready at 4 GiB pinned (cuda_ready_bytes); 16 files for 16 GiB or more
    "one-file": ["--pool-files", "1", "--cuda-ready-bytes", "0"],  # one tmpfs file, whole pool
    "files32": ["--pool-files", "32", "--pin-threads", "32"],
    "huge": ["--huge-pages"],
}


def host_facts() -> dict[str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            return f"unreadable: {exc.strerror}"

    shm = shutil.disk_usage("/dev/shm")
    meminfo = read("/proc/meminfo")
    huge = {k: v for k, v in re.findall(r"^(\w*Huge\w*):\s+(.*)$", meminfo, re.M)}
    return {
        "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "thp_defrag": read("/sys/kernel/mm/transparent_hugepage/defrag"),
        "nr_hugepages": read("/proc/sys/vm/nr_hugepages"),
        "dev_shm_total_gib": f"{shm.total / 2**30:.1f}",
        "cpus": str(os.cpu_count()),
        "kernel": os.uname().release,
        **{f"meminfo_{k}": v for k, v in huge.items()},
    }


def pin_log(agent: AgentProcess) -> dict[str, float]:
    """The agent's "pool pinned for CUDA" log line's numbers."""
    for line in agent.log_tail(200_000).splitlines():
        if "pool pinned for CUDA" in line:
            return {
                k: float(v)
                for k, v in re.findall(r"(seconds|populate_thread_s|register_thread_s)=([\d.]+)", line)
            }
    return {}


def run(variant: str, pool: str, tmp: Path) -> dict[str, object]:
    t0 = time.perf_counter()
    agent = AgentProcess(tmp / variant, pool, extra_args=["--cuda", *VARIANTS[variant]]).start(timeout=600)
    try:
        while agent.http_status("/readyz") != 200:
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        at_ready = agent.stats()
        # cuda_pin_seconds is set once the whole pool is pinned (never if pinning fails)
        wait_until("the whole pool pinned", lambda: agent.stats()["cuda_pin_seconds"], 600)
        pinned = time.perf_counter() - t0
        shm_huge = re.search(r"ShmemHugePages:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return {
            "ready_s": round(ready, 2),
            "pinned_gib_at_ready": round(int(at_ready["cuda_pinned_bytes"]) / 2**30, 1),
            "whole_pool_pinned_s": round(pinned, 2),
            **pin_log(agent),
            "shmem_huge_gib": round(int(shm_huge.group(1)) / 2**20, 1) if shm_huge else None,
        }
    finally:
        agent.stop()
        agent.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", default="64GiB")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    facts = host_facts()
    print(json.dumps({"host": facts}, indent=1), flush=True)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="kvf-start-") as tmp:
        names = args.variants.split(",")
        for variant in names:
            results[variant] = run(variant, args.pool, Path(tmp))
            base = results[names[0]].get("ready_s")  # the first variant is the baseline
            if isinstance(base, float) and base:
                ratio = round(float(results[variant]["ready_s"]) / base, 3)  # type: ignore[arg-type]
                results[variant][f"ratio_to_{names[0]}"] = ratio
            print(json.dumps({variant: results[variant]}), flush=True)
    report = {"pool": args.pool, "host": facts, "results": results}
    Path(args.out, "gpu_agent_start.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
