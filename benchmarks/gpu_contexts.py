"""What copies from another process cost the engine's kernels (run on a GPU host):
``python benchmarks/gpu_contexts.py``.

The agent copies KV blocks from its own CUDA context (over IPC), so while a background save
runs the GPU holds work of two processes. This measures a stream of bf16 8192^3 matmuls (the
engine) alone, while the same process copies 1.3 GB device-to-host on a side stream (DMA only,
no kernels: what a save of a 10k-token prompt of an 8B model moves), and while another process
copies the same bytes from the engine's memory (opened over IPC), as the agent does. The
baseline (alone) is measured in the same run, before and after.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.multiprocessing as mp

COPY_BYTES = 1_310_720_000  # 625 blocks x 2 MiB
COPIES = 8  # ~0.2 s of PCIe traffic at 55 GB/s
MATMULS = 40


def matmuls(a: torch.Tensor, stream: torch.cuda.Stream) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(MATMULS):
            a @ a
    stream.synchronize()
    return time.perf_counter() - t0


def copier(src: torch.Tensor, go: mp.Event, started: mp.Event, done: mp.Event) -> None:
    """The other process: device-to-host copies of ``src`` (shared over CUDA IPC)."""
    host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream()
    host.copy_(src, non_blocking=True)  # warm
    torch.cuda.synchronize()
    started.set()
    while go.wait(timeout=60):
        go.clear()
        with torch.cuda.stream(stream):
            for _ in range(COPIES):
                host.copy_(src, non_blocking=True)
        stream.synchronize()
        done.set()


def main() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    mm, side = torch.cuda.Stream(), torch.cuda.Stream()
    matmuls(a, mm)  # warm
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        host.copy_(src, non_blocking=True)
    side.synchronize()
    copy_s = time.perf_counter() - t0
    rows: dict[str, list[float]] = {"alone": [], "same_process_copies": [], "other_process_copies": []}
    ctx = mp.get_context("spawn")
    go, started, done = ctx.Event(), ctx.Event(), ctx.Event()
    child = ctx.Process(target=copier, args=(src, go, started, done), daemon=True)
    child.start()
    assert started.wait(120), "the copying process did not start"
    for _ in range(5):
        rows["alone"].append(matmuls(a, mm))
        with torch.cuda.stream(side):  # queued first: the matmuls run under the copies
            for _ in range(COPIES):
                host.copy_(src, non_blocking=True)
        rows["same_process_copies"].append(matmuls(a, mm))
        side.synchronize()
        done.clear()
        go.set()
        time.sleep(0.005)  # the other process's copies are queued (they last ~0.2 s)
        rows["other_process_copies"].append(matmuls(a, mm))
        assert done.wait(60)
    child.terminate()
    alone = statistics.median(rows["alone"])
    print(f"one 1.3 GB device-to-host copy: {copy_s * 1e3:.1f} ms ({COPY_BYTES / copy_s / 1e9:.1f} GB/s)")
    for name, ts in rows.items():
        med = statistics.median(ts)
        print(f"{MATMULS} matmuls, {name}: {med * 1e3:.1f} ms (x{med / alone:.3f} of alone)")


if __name__ == "__main__":
    main()
