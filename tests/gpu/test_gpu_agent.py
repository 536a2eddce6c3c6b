"""A real ``kvfabric-agent --cuda`` process serving a GPU "engine" process over CUDA IPC.

The engine side uses the connector's own pieces (``cuda_kv.describe``, the agent client and
the protocol) exactly as the connector's worker does; no vLLM is needed on the GPU host.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

try:
    import cupy
    import torch

    HAVE_GPU = torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
except Exception:
    HAVE_GPU = False
if not HAVE_GPU:
    pytest.skip("no CUDA GPU with torch and CuPy on this machine", allow_module_level=True)

from e2e.agent import AgentProcess  # noqa: E402

NB, LAYERS = 64, 4


def _engine(socket_path: str, conn: Any) -> None:
    try:
        _engine_body(socket_path, conn)
    except Exception as exc:  # tell the parent at once instead of letting it time out
        conn.send(("error", repr(exc)))


def _engine_body(socket_path: str, conn: Any) -> None:
    import torch

    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe
    from kvfabric.connector.keys import chain_keys, request_seed

    kv = {f"l{i}": torch.randn(2, NB, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for i in range(LAYERS)}
    spec = describe(kv)
    c = AgentClient(socket_path, "gpu-engine", timeout_s=30)
    reg = c.call(spec.request("gpu-ns"), p.GpuKVReply)
    keys = chain_keys(list(range(8 * 16)), 16, request_seed())
    slots = c.reserve("gpu-ns", keys, None).slots
    saved = [0, 1, 2, 3, 10, 20, 30, 40]
    c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=True, block_ids=saved, slots=slots), p.GpuCopyReply)
    c.commit("gpu-ns", keys, [], 0.0)
    hit = c.lookup(["gpu-ns"], keys, 16, lease_id="L")
    targets = [50, 51, 52, 53, 60, 61, 62, 63]
    for t in kv.values():
        t[:, targets] = float("nan")  # poison
    c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=targets, slots=hit.slots[0]), p.GpuCopyReply)
    c.release(["L#0"], len(targets))
    torch.cuda.synchronize()
    same = all(torch.equal(t[:, saved], t[:, targets]) for t in kv.values())
    conn.send((same, hit.hits, reg.block_bytes))
    c.lookup(["gpu-ns"], keys, 16, lease_id="held-until-death")
    conn.send("copying")
    while True:  # mid-transfer when the parent kills us
        c.call(
            p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=targets, slots=hit.slots[0]), p.GpuCopyReply
        )


def test_agent_copies_over_ipc_and_releases_a_killed_engine(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=["--cuda", "--pin-threads", "8"]) as agent:
        assert agent.stats()["cuda_pinned"] == 1
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_engine, args=(str(agent.socket_path), child), daemon=True)
        proc.start()
        try:
            assert parent.poll(120), "engine did not finish its round trip"
            first = parent.recv()
            assert first[0] != "error", first
            same, hits, block_bytes = first
            assert hits == 8 and same
            assert block_bytes == LAYERS * 2 * 16 * 8 * 128 * 2
            assert parent.poll(60) and parent.recv() == "copying"
            stats = agent.stats()
            assert stats["cuda_ipc_mappings"] >= 1 and stats["leases_active"] == 1
            time.sleep(0.2)
            proc.kill()
            killed = time.monotonic()
            while time.monotonic() - killed < 5:
                stats = agent.stats()
                if stats["cuda_ipc_mappings"] == 0 and stats["leases_active"] == 0 and stats["sessions"] == 0:
                    break
                time.sleep(0.05)
            assert stats["cuda_ipc_mappings"] == 0, stats
            assert stats["leases_active"] == 0 and stats["sessions"] == 0
            print(f"released {time.monotonic() - killed:.3f} s after SIGKILL")
        finally:
            proc.kill()
            proc.join(10)
