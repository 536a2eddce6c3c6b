"""The connector's worker (``WorkerSide``) on a GPU with a real ``kvfabric-agent --cuda``:
layered loads end to end, and the guard against a forward pass that skipped a layer's wait.

Needs vLLM importable (the connector's metadata types come from it), no engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu(vllm=True)

import torch  # noqa: E402

from e2e.agent import AgentProcess  # noqa: E402
from e2e.gpu_worker import LAYERS, NB, cuda_agent, layout, registered_worker  # noqa: E402
from kvfabric.connector.client import AgentClient  # noqa: E402
from kvfabric.connector.keys import chain_keys, request_seed  # noqa: E402
from kvfabric.connector.metadata import KVFabricMetadata, LoadIntent, SaveIntent  # noqa: E402
from kvfabric.connector.worker import WorkerSide  # noqa: E402

N = 200
SPEC = layout("gpu-worker")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with cuda_agent(tmp_path / "agent") as a:
        yield a


def worker(agent: AgentProcess) -> tuple[WorkerSide, list[torch.Tensor]]:
    return registered_worker(agent, SPEC)


def test_layered_loads_through_the_worker_and_a_skipped_wait_is_a_load_error(agent: AgentProcess) -> None:
    keys = chain_keys(list(range(N * 16)), 16, request_seed())
    saver, src = worker(agent)
    saver.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", tuple(range(N)), tuple(keys), None)]))
    assert saver.stats.saved_blocks == N
    assert saver.stats.engine_copied_blocks == N  # the engine's own copies, read by the agent's loads
    loader, dst = worker(agent)
    targets = tuple(int(x) for x in torch.randperm(NB - N)[:N].add(N))
    sched = AgentClient(str(agent.socket_path), "sched")
    try:
        for skip in (None, LAYERS - 1):
            for t in dst:
                t.view(torch.uint8)[list(targets)] = 0xA5
            reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id=f"L{skip}")
            assert reply.hits == N
            intent = LoadIntent("r", f"L{skip}", reply.pool_id, targets, tuple(tuple(s) for s in reply.slots))
            loaded = loader.stats.loaded_blocks
            loader.start_load_kv(KVFabricMetadata(loads=[intent]))
            reads = []
            for i, t in enumerate(dst):  # what the forward pass does, layer by layer
                if i != skip:
                    loader.wait_for_layer_load(f"model.layers.{i}.attn")
                reads.append(t[list(targets)].clone())
            errors = loader.get_block_ids_with_load_errors()
            torch.cuda.synchronize()
            if skip is None:
                assert errors == set()
                assert loader.stats.loaded_blocks == loaded + N
                for a, r in zip(src, reads, strict=True):
                    assert torch.equal(a[:N], r)
            else:
                assert errors == set(targets)
                assert loader.stats.loaded_blocks == loaded
        assert agent.stats()["leases_active"] == 0
    finally:
        sched.close()
        saver.shutdown()
        loader.shutdown()


@pytest.mark.parametrize("engine_saves", [True, False], ids=["engine-copies", "agent-copies"])
def test_a_background_save_copies_what_the_step_wrote_once_its_kernels_ended(
    agent: AgentProcess, engine_saves: bool
) -> None:
    """``wait_for_save`` returns while the step's kernels still run (a long sleep on the
    engine's stream, then the writes): the save, from whichever context, must copy what they
    wrote, not what the blocks held before; the agent loads it back into other blocks."""
    keys = chain_keys(list(range(N * 16, 2 * N * 16)), 16, request_seed())
    saver, kv = registered_worker(agent, SPEC, engine_saves=engine_saves, background_saves=True)
    loader, dst = registered_worker(agent, SPEC, engine_saves=False)
    sched = AgentClient(str(agent.socket_path), "sched")
    try:
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time before the writes
        for i, t in enumerate(kv):
            t[:N].fill_(i + 1)
        saver.wait_for_save(KVFabricMetadata(saves=[SaveIntent("w", tuple(range(N)), tuple(keys), None)]))
        assert saver.saves is not None and saver.saves.flush(timeout=60)
        assert saver.stats.saved_blocks == N
        assert saver.stats.engine_copied_blocks == (N if engine_saves else 0)
        reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id="W")
        assert reply.hits == N
        targets = tuple(range(N, 2 * N))
        intent = LoadIntent("w", "W", reply.pool_id, targets, tuple(tuple(s) for s in reply.slots))
        loader.start_load_kv(KVFabricMetadata(loads=[intent]))
        for i in range(LAYERS):
            loader.wait_for_layer_load(f"model.layers.{i}.attn")
        assert loader.get_block_ids_with_load_errors() == set()
        torch.cuda.synchronize()
        for i, t in enumerate(dst):
            assert bool((t[list(targets)] == i + 1).all()), f"layer {i}: the bytes before the writes"
    finally:
        sched.close()
        saver.shutdown()
        loader.shutdown()


def test_agent_killed_during_a_layered_load_does_not_hang_the_engine(tmp_path: Path) -> None:
    """SIGKILL the agent right after it queued a large layered load: the engine must notice,
    report the blocks for recompute and keep a usable CUDA stream (no wait on an event whose
    recorder died), within seconds."""
    import threading
    import time

    agent = cuda_agent(tmp_path / "agent", "2GiB").start()
    try:
        n = 1000  # 1000 blocks x 6 layers x 64 KiB: long enough to be killed mid-copy
        keys = chain_keys(list(range(n * 16)), 16, request_seed())
        w, kv = registered_worker(agent, SPEC, blocks=2 * n)
        w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", tuple(range(n)), tuple(keys), None)]))
        assert w.stats.saved_blocks == n
        sched = AgentClient(str(agent.socket_path), "sched")
        reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id="L")
        targets = tuple(range(n, 2 * n))
        intent = LoadIntent("r", "L", reply.pool_id, targets, tuple(tuple(s) for s in reply.slots))
        w.start_load_kv(KVFabricMetadata(loads=[intent]))
        agent.kill()
        done: dict[str, object] = {}

        def forward() -> None:
            for i in range(LAYERS):
                w.wait_for_layer_load(f"model.layers.{i}.attn")
                kv[i][list(targets)].add_(0)  # reads the layer, as attention would
            done["errors"] = w.get_block_ids_with_load_errors()
            torch.cuda.synchronize()
            done["ok"] = True

        t0 = time.monotonic()
        th = threading.Thread(target=forward, daemon=True)
        th.start()
        th.join(10)
        assert done.get("ok"), "the engine hung after the agent died mid-load"
        print(f"engine went on {time.monotonic() - t0:.3f} s after the agent was killed")
        # Whether or not the copies ended before the kill, the leases could not be released:
        # every block is recomputed.
        assert done["errors"] == set(targets)
        sched.close()
        w.shutdown()
    finally:
        agent.cleanup()
