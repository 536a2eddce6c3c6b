"""Kernel-block splitting on the GPU path: vLLM block ``b`` stored as rows ``2b`` and ``2b+1``
(an attention kernel whose block is half of vLLM's, e.g. FlashInfer's 64 for ``--block-size
128``). Saved and loaded through a real ``--cuda`` agent over CUDA IPC: every row of a block
travels, and no row of another block is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu()

from e2e.agent import AgentProcess  # noqa: E402
from tests.gpu.test_gpu_agent import _spawn_engine  # noqa: E402

NB, SPLIT, LAYERS = 32, 2, 4  # vLLM blocks, kernel blocks per vLLM block


def _engine(socket_path: str, conn: Any) -> None:
    import torch

    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe, kernel_blocks_per_block
    from kvfabric.connector.keys import chain_keys, request_seed

    out: dict[str, Any] = {}
    for name, shape in (
        ("kv_planes", (2, NB * SPLIT, 64, 8, 128)),  # FlashInfer's [2, rows, 64 tokens, H, D]
        ("blocks_first", (NB * SPLIT, 2, 64, 8, 128)),  # [rows, 2, 64 tokens, H, D]
    ):
        kv = {f"l{i}": torch.randn(shape, device="cuda", dtype=torch.bfloat16) for i in range(LAYERS)}
        split = kernel_blocks_per_block(kv["l0"], NB)
        c = AgentClient(socket_path, f"split-{name}", timeout_s=30)
        reg = c.call(describe(kv, kernel_blocks=split).request(f"split-{name}"), p.GpuKVReply)
        keys = chain_keys(list(range(4 * 128)), 128, request_seed())
        saved, targets = [1, 2, 5, 9], [20, 21, 22, 30]
        slots = c.reserve(f"split-{name}", keys, None).slots
        c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=True, block_ids=saved, slots=slots), p.GpuCopyReply)
        c.commit(f"split-{name}", keys, [], 0.0)
        before = {k: t.clone() for k, t in kv.items()}
        hit = c.lookup([f"split-{name}"], keys, 128, lease_id="L")
        load = p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=targets, slots=hit.slots[0])
        c.call(load, p.GpuCopyReply)
        c.release(hit.leases, len(targets))
        torch.cuda.synchronize()
        dim = 1 if name == "kv_planes" else 0

        def rows(t: torch.Tensor, blocks: list[int], dim: int = dim) -> torch.Tensor:
            idx = torch.tensor([b * SPLIT + j for b in blocks for j in range(SPLIT)], device="cuda")
            return t.index_select(dim, idx)

        loaded = all(torch.equal(rows(kv[k], targets), rows(before[k], saved)) for k in kv)
        others = [b for b in range(NB) if b not in targets]
        untouched = all(torch.equal(rows(kv[k], others), rows(before[k], others)) for k in kv)
        out[name] = (split, reg.block_bytes, loaded, untouched)
        c.close()
    conn.send(out)


def test_split_blocks_travel_whole_and_touch_no_other_rows(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=["--cuda", "--pin-threads", "8"]) as agent:
        parent, proc = _spawn_engine(agent, _engine)
        try:
            assert parent.poll(180), "engine did not finish"
            out = parent.recv()
            assert not (isinstance(out, tuple) and out[0] == "error"), out
            for name, (split, block_bytes, loaded, untouched) in out.items():
                assert split == SPLIT and block_bytes == LAYERS * 2 * SPLIT * 64 * 8 * 128 * 2, name
                assert loaded, f"{name}: a loaded block is not the saved one"
                assert untouched, f"{name}: a load wrote rows of another block"
        finally:
            proc.join(30)
            proc.kill()
