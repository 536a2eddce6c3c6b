"""An NVMe hit served to a GPU engine: blocks saved by one engine through a ``--cuda`` agent,
the agent restarted (its pinned pool is new and empty, its tier is not), and a second engine
loads them back over CUDA IPC after the agent promoted them from disk; bytes compared."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu()

from e2e.agent import AgentProcess  # noqa: E402
from tests.gpu.test_gpu_agent import _spawn_engine  # noqa: E402

NB, LAYERS, N = 64, 4, 8
SAVED = [0, 1, 2, 3, 10, 20, 30, 40]
TARGETS = [50, 51, 52, 53, 60, 61, 62, 63]


def _kv() -> dict[str, Any]:
    import torch

    torch.manual_seed(7)  # both engines hold the same bytes: the second checks what it loads
    shape = (2, NB, 16, 8, 128)
    return {f"l{i}": torch.randn(shape, device="cuda", dtype=torch.bfloat16) for i in range(LAYERS)}


def _keys() -> list[bytes]:
    from kvfabric.connector.keys import chain_keys, request_seed

    return chain_keys(list(range(N * 16)), 16, request_seed())


def _saver(socket_path: str, conn: Any) -> None:
    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe

    kv = _kv()
    c = AgentClient(socket_path, "gpu-saver", timeout_s=30)
    reg = c.call(describe(kv).request("gpu-ns"), p.GpuKVReply)
    keys = _keys()
    slots = c.reserve("gpu-ns", keys, None).slots
    c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=True, block_ids=SAVED, slots=slots), p.GpuCopyReply)
    conn.send(c.commit("gpu-ns", keys, [], 0.0).committed)
    c.close()


def _loader(socket_path: str, conn: Any) -> None:
    import torch

    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe

    kv = _kv()
    for t in kv.values():
        t[:, TARGETS] = float("nan")  # poison: only a load of the right bytes restores them
    c = AgentClient(socket_path, "gpu-loader", timeout_s=30)
    reg = c.call(describe(kv).request("gpu-ns"), p.GpuKVReply)
    keys = _keys()
    first = c.lookup(["gpu-ns"], keys, 16, promote=True)
    deadline = time.monotonic() + 30
    while c.lookup(["gpu-ns"], keys, 16).hits < N and time.monotonic() < deadline:
        time.sleep(0.01)
    hit = c.lookup(["gpu-ns"], keys, 16, lease_id="L")
    c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=TARGETS, slots=hit.slots[0]), p.GpuCopyReply)
    c.release(hit.leases, N)
    torch.cuda.synchronize()
    same = all(torch.equal(t[:, SAVED], t[:, TARGETS]) for t in kv.values())
    conn.send((first.hits, first.promoting, hit.hits, same))
    c.close()


def _run(agent: AgentProcess, body: Any) -> Any:
    parent, proc = _spawn_engine(agent, body)
    try:
        assert parent.poll(180), "engine did not finish"
        out = parent.recv()
        assert not (isinstance(out, tuple) and out[0] == "error"), out
        return out
    finally:
        proc.join(30)
        proc.kill()


def test_an_nvme_hit_is_served_to_a_gpu_engine_after_an_agent_restart(tmp_path: Path) -> None:
    args = ["--cuda", "--pin-threads", "8", "--nvme-path", str(tmp_path / "nvme"), "--nvme-size", "1GiB"]
    with AgentProcess(tmp_path / "agent1", "2GiB", extra_args=args) as agent:
        agent.wait_nvme()
        assert _run(agent, _saver) == N
        agent.wait_nvme_written()
    with AgentProcess(tmp_path / "agent2", "2GiB", extra_args=args) as agent:
        agent.wait_nvme()
        assert agent.stats()["nvme_blocks"] == N
        first_hits, promoting, hits, same = _run(agent, _loader)
        assert (first_hits, promoting, hits) == (0, N, N)  # the pool was empty: all from disk
        assert same, "a block loaded from the NVMe tier differs from the one saved"
        s = agent.stats()
        assert s["nvme_promoted_blocks"] == N and s["nvme_damaged_blocks"] == 0
        print(f"direct I/O: {s['nvme_direct_io']}, read p50 see kvfabric_nvme_io_seconds")
