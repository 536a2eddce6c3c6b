"""What bounds populating a large /dev/shm pool (the CUDA agent's start, before registration):
one file faulted in by 16 threads (the agent today) against the same bytes reserved with
parallel ``fallocate`` first, and against the bytes split over several files (a tmpfs file's page
cache is one xarray, whose lock every new page takes). Prints each method's seconds and its
ratio to the agent's way, measured in the same run.

    python benchmarks/shm_populate.py --size 64GiB --threads 16
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node-agent" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "connector" / "src"))

from kvfabric.agent.pool import chunks_of, populate
from kvfabric.agent.settings import parse_bytes

GiB = 1 << 30


def _mapped(path: Path, size: int) -> tuple[int, mmap.mmap]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _address(m: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def one_file(size: int, threads: int, fallocate_first: bool) -> float:
    path = Path(f"/dev/shm/kvf-populate-{os.getpid()}")
    fd, m = _mapped(path, size)
    try:
        t0 = time.perf_counter()
        if fallocate_first:
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(lambda c: os.posix_fallocate(fd, c[0], c[1]), chunks_of(size, GiB)))
        populate(_address(m), size, threads, GiB)
        return time.perf_counter() - t0
    finally:
        m.close()
        os.close(fd)
        path.unlink()


def many_files(size: int, threads: int, files: int) -> float:
    part = size // files
    opened = [_mapped(Path(f"/dev/shm/kvf-populate-{os.getpid()}-{i}"), part) for i in range(files)]
    try:
        t0 = time.perf_counter()
        jobs = [(_address(m), off, n) for _, m in opened for off, n in chunks_of(part, GiB)]
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda j: populate(j[0] + j[1], j[2], 1, j[2]), jobs))
        return time.perf_counter() - t0
    finally:
        for i, (fd, m) in enumerate(opened):
            m.close()
            os.close(fd)
            Path(f"/dev/shm/kvf-populate-{os.getpid()}-{i}").unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="64GiB")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    size = parse_bytes(args.size)
    results = {
        "one_file_populate": one_file(size, args.threads, False),
        "one_file_fallocate_then_populate": one_file(size, args.threads, True),
        "4_files_populate": many_files(size, args.threads, 4),
        "16_files_populate": many_files(size, args.threads, 16),
    }
    base = results["one_file_populate"]
    report = {k: {"s": round(v, 2), "ratio": round(v / base, 3)} for k, v in results.items()}
    print(json.dumps({"size": args.size, "threads": args.threads, **report}, indent=1))
    Path(args.out, "shm_populate.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
