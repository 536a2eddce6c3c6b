"""The engine's own saves (``engine_saves``) against a real ``kvfabric-agent --cuda``: this
process is the engine; it maps the agent's pool, registers it with CUDA and copies blocks into
slots its session reserved. What it writes must be byte for byte what the agent's own copies
write (the agent loads it back), only into registered pieces, and nothing when it declines.

No vLLM needed (the connector's pieces only, as ``test_gpu_agent``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu()

import torch  # noqa: E402

from e2e.agent import AgentProcess, wait_until  # noqa: E402
from kvfabric.connector import engine_saves  # noqa: E402
from kvfabric.connector import protocol as p  # noqa: E402
from kvfabric.connector.client import AgentClient  # noqa: E402
from kvfabric.connector.cuda_kv import CudaKV, describe  # noqa: E402
from kvfabric.connector.engine_saves import EngineSaves  # noqa: E402
from kvfabric.connector.keys import chain_keys, request_seed  # noqa: E402
from kvfabric.connector.pool_files import map_pool, pool_sizes  # noqa: E402

NB, LAYERS = 128, 4
BLOCKS = [3, 4, 5, 6, 7, 40, 41, 90, 17, 18]  # runs of 5, 2, 1 (gathered first) and 2
ORDERS = {
    "runs": BLOCKS,
    "descending": list(range(39, 29, -1)),  # how vLLM hands out a freed request's blocks again
    "shuffled": [77, 12, 99, 64, 5, 31, 58, 2, 120, 43],
}


def _kv(layout: str) -> dict[str, torch.Tensor]:
    shape = (2, NB, 16, 8, 128) if layout == "kv_planes" else (NB, 8, 16, 256)  # vLLM < / >= 0.26
    return {f"l{i}": torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for i in range(LAYERS)}


def _blocks(t: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return t[:, ids] if t.shape[0] == 2 else t[ids]


class _Engine:
    """A registered engine with its own saves, and the agent session it reserves through."""

    def __init__(self, agent: AgentProcess, layout: str) -> None:
        self.kv = _kv(layout)
        self.spec: CudaKV = describe(self.kv)
        self.client = AgentClient(str(agent.socket_path), "engine", timeout_s=30)
        self.reg = self.client.call(self.spec.request("ns"), p.GpuKVReply)
        hello = self.client.hello
        assert hello is not None and hello.pool_path
        self.mapping = map_pool(Path(hello.pool_path), hello.pool_bytes, hello.pool_files, writable=True)
        self.saves = EngineSaves(
            list(self.kv.values()),
            self.spec.layout,
            self.spec.plane_bytes,
            self.spec.num_blocks,
            self.mapping,
            pool_sizes(hello.pool_bytes, hello.pool_files),
            self.reg.block_bytes,
            hello.pool_id,
        )
        bb = self.reg.block_bytes
        self.slots = np.frombuffer(self.mapping, dtype=np.uint8)[: hello.pool_bytes // bb * bb].reshape(
            -1, bb
        )
        wait_until("the pool registered here", lambda: self.saves.fully_registered, 120)

    def reserve(self, tag: int) -> tuple[list[bytes], list[int]]:
        keys = chain_keys([tag * 100_000 + t for t in range(len(BLOCKS) * 16)], 16, request_seed())
        return keys, list(self.client.reserve("ns", keys, None).slots)

    def agent_save(self, blocks: list[int], keys: list[bytes], slots: list[int]) -> None:
        copy = p.GpuCopy(kv_id=self.reg.kv_id, to_pool=True, block_ids=blocks, slots=slots)
        self.client.call(copy, p.GpuCopyReply)
        self.client.commit("ns", keys, [], 0.0)

    def close(self) -> None:
        self.saves.close()
        self.client.close()


@pytest.fixture(params=[1, 4], ids=["one-file", "four-files"])
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentProcess]:
    args = ["--cuda", "--pin-threads", "8", "--pool-files", str(request.param)]
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=args) as a:
        yield a


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("layout", ["block_chunk", "kv_planes"])
def test_the_engines_saves_write_what_the_agents_would_and_load_back_exactly(
    agent: AgentProcess, layout: str, order: str
) -> None:
    blocks = ORDERS[order]
    e = _Engine(agent, layout)
    try:
        keys, slots = e.reserve(1)
        torch.cuda.synchronize()  # the "forward" that wrote the blocks has ended
        done = e.saves.save(blocks, slots)
        assert done.all()
        assert e.client.commit("ns", keys, [], 0.0).committed == len(blocks)
        agent_keys, agent_slots = e.reserve(2)
        e.agent_save(blocks, agent_keys, agent_slots)
        # The same blocks through the agent's copies: the very same slot bytes (one layout).
        assert np.array_equal(e.slots[slots], e.slots[agent_slots])
        hit = e.client.lookup(["ns"], keys, 16, lease_id="L")
        assert hit.hits == len(blocks)
        targets = [b + 1 for b in range(100, 100 + len(blocks))]  # 101..110: none of the sources
        for t in e.kv.values():
            if t.shape[0] == 2:
                t[:, targets] = float("nan")
            else:
                t[targets] = float("nan")
        load = p.GpuCopy(kv_id=e.reg.kv_id, to_pool=False, block_ids=targets, slots=hit.slots[0])
        e.client.call(load, p.GpuCopyReply)
        e.client.release(["L#0"], len(targets))
        torch.cuda.synchronize()
        for t in e.kv.values():
            assert torch.equal(_blocks(t, blocks), _blocks(t, targets))
    finally:
        e.close()
    assert not e.saves.registered.any()  # unregistered: the agent's memory is not held past close


def test_slots_of_an_unregistered_piece_and_too_fragmented_batches_are_left_to_the_agent(
    agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = _Engine(agent, "block_chunk")
    try:
        keys, slots = e.reserve(3)
        torch.cuda.synchronize()
        e.slots[slots] = 0x5A
        piece = int(np.searchsorted(e.saves._bounds, slots[0] * e.reg.block_bytes, side="right")) - 1
        e.saves.registered[piece] = False  # as if its registration were still to come (or failed)
        done = e.saves.save(BLOCKS, slots)
        in_piece = np.searchsorted(e.saves._bounds, np.asarray(slots) * e.reg.block_bytes, side="right") - 1
        assert np.array_equal(done, in_piece != piece) and not done[0]
        assert np.all(e.slots[np.asarray(slots)[~done]] == 0x5A)  # declined: not written
        e.saves.registered[piece] = True
        assert e.saves.save(BLOCKS, slots).all()
        assert not np.any(np.all(e.slots[slots] == 0x5A, axis=1))  # taken: every slot written
        # 3 runs out, 1 gather and 1 run out of it, x 4 layers: 20 calls
        monkeypatch.setattr(engine_saves, "MAX_CALLS", 19)
        e.slots[slots] = 0x5A
        assert not e.saves.save(BLOCKS, slots).any()
        assert np.all(e.slots[slots] == 0x5A)
        e.client.commit("ns", [], keys, 0.0)
        with pytest.raises(ValueError, match="out of range"):
            e.saves.save([NB], [slots[0]])
    finally:
        e.close()
