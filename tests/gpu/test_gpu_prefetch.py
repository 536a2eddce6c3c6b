"""Loads started when vLLM allocates the blocks (``GpuPrefetch``), on a GPU with a real
``kvfabric-agent --cuda``: the scheduler has the agent queue a step's layered load into the
worker's registration, the worker only waits per layer; and the ordering against the engine's
stream: a block a still-running step writes (a finished request's, with async scheduling) is
not prefetched, so its load lands after that write. The control shows the race the rule avoids.

Needs vLLM importable (the connector's metadata types come from it), no engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu(vllm=True)

import torch  # noqa: E402

from e2e.agent import AgentProcess  # noqa: E402
from e2e.gpu_worker import NB, cuda_agent, layout, registered_worker  # noqa: E402
from kvfabric.connector import protocol as p  # noqa: E402
from kvfabric.connector.client import AgentClient  # noqa: E402
from kvfabric.connector.config import ConnectorConfig  # noqa: E402
from kvfabric.connector.keys import chain_keys, request_seed  # noqa: E402
from kvfabric.connector.metadata import KVFabricMetadata, LoadIntent, SaveIntent  # noqa: E402
from kvfabric.connector.scheduler import SchedulerSide  # noqa: E402
from kvfabric.connector.worker import WorkerSide  # noqa: E402

N = 64
SPEC = layout("gpu-prefetch")
PROMPT = list(range(1000, 1000 + N * 16 + 1))  # N full blocks and one token vLLM computes


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with cuda_agent(tmp_path / "agent") as a:
        yield a


def _worker(agent: AgentProcess) -> tuple[WorkerSide, list[torch.Tensor]]:
    w, kv = registered_worker(agent, SPEC)
    assert w.prefetch_token, "the agent took no prefetches for this registration"
    return w, kv


def _saved(agent: AgentProcess) -> tuple[WorkerSide, list[torch.Tensor]]:
    keys = chain_keys(PROMPT, 16, request_seed(["", ""]))[:N]  # the scheduler's keys (no salt, no LoRA)
    saver, src = _worker(agent)
    saver.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", tuple(range(N)), tuple(keys), None)]))
    assert saver.stats.saved_blocks == N
    return saver, src


def _forward(w: WorkerSide, kv: list[torch.Tensor], blocks: list[int]) -> list[torch.Tensor]:
    """What the forward pass does with the loaded blocks, layer by layer."""
    reads = []
    for i, t in enumerate(kv):
        w.wait_for_layer_load(f"model.layers.{i}.attn")
        reads.append(t[blocks].clone())
    assert w.get_block_ids_with_load_errors() == set()
    torch.cuda.synchronize()
    return reads


def test_a_prefetched_load_lands_layer_by_layer_without_the_worker_copying(agent: AgentProcess) -> None:
    saver, src = _saved(agent)
    loader, dst = _worker(agent)
    targets = [int(x) for x in torch.randperm(NB - N)[:N].add(N)]
    for t in dst:
        t.view(torch.uint8)[targets] = 0xA5
    torch.cuda.synchronize()  # the scheduler prefetches only into blocks no GPU work touches
    sched = AgentClient(str(agent.socket_path), "sched")
    try:
        keys = chain_keys(PROMPT, 16, request_seed(["", ""]))[:N]
        hit = sched.lookup([SPEC.namespace()], keys, 16, lease_id="L")
        assert hit.hits == N
        copies = agent.metric('kvfabric_rpc_seconds_count{op="gpu_copy"}')
        reply = sched.call(
            p.GpuPrefetch(
                loads=[
                    p.PrefetchLoad(token=loader.prefetch_token, block_ids=targets, slots=hit.slots[0]),
                    p.PrefetchLoad(token=b"x" * 16, block_ids=targets, slots=hit.slots[0]),  # nobody's
                ],
                event_set=1,
            ),
            p.GpuPrefetchReply,
        )
        assert reply.queued == [True, False]
        intent = LoadIntent(
            "r",
            "L",
            hit.pool_id,
            tuple(targets),
            (tuple(hit.slots[0]),),
            tuple(hit.leases),
            0,
            (loader.prefetch_token,),
        )
        loader.start_load_kv(KVFabricMetadata(loads=[intent], step=1))
        reads = _forward(loader, dst, targets)
        for a, r in zip(src, reads, strict=True):
            assert torch.equal(a[:N], r)
        assert loader.stats.loaded_blocks == N
        assert agent.metric('kvfabric_rpc_seconds_count{op="gpu_copy"}') == copies, "the worker copied again"
        assert agent.metric('kvfabric_gpu_prefetched_blocks_total{result="queued"}') == N
        assert agent.metric('kvfabric_gpu_prefetched_blocks_total{result="refused"}') == N
        assert agent.stats()["leases_active"] == 0
    finally:
        sched.close()
        saver.shutdown()
        loader.shutdown()


def _request(req_id: str, tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=req_id, prompt_token_ids=tokens, all_token_ids=tokens, cache_salt=None, lora_request=None
    )


def _step(new: list[tuple[str, list[int]]]) -> SimpleNamespace:
    """The fields of vLLM's SchedulerOutput the scheduler role reads."""
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=N * 16) for r, b in new
        ],
        num_scheduled_tokens={r: 1 for r, _ in new},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
        ),
        preempted_req_ids=set(),
    )


@pytest.mark.parametrize("rule", [True, False], ids=["freed-blocks-rule", "control-without-it"])
def test_a_block_a_running_step_still_writes_is_loaded_only_after_that_write(
    agent: AgentProcess, rule: bool
) -> None:
    """Async scheduling: step 1 still runs on the engine's stream, and writes into the blocks of
    a request that finished at the previous output, when step 2 allocates those blocks to a
    request with a hit. The scheduler must not prefetch into them: the worker then loads after
    the engine's stream and the forward reads the pool's bytes. Without the rule (the control:
    prefetched all the same) the agent's copy can land first, and step 1's late write wins: the
    control makes that interleaving certain by queuing the write once the copies ended."""
    saver, src = _saved(agent)
    loader, dst = _worker(agent)
    cfg = ConnectorConfig(socket_path=str(agent.socket_path), timeout_ms=30_000)
    s = SchedulerSide(cfg, [SPEC.namespace()], 16, "t", prefetch=True)
    blocks = list(range(100, 100 + N + 1))
    try:
        s.update_connector_output(0, 0, (), (), [(0, loader.prefetch_token)])  # the worker's metadata
        s.build_connector_meta(_step([]))  # step 1, still running on the engine's stream
        s.request_finished(_request("gone", PROMPT), blocks)  # step 0's output: it finished
        req = _request("r", PROMPT)
        assert s.get_num_new_matched_tokens(req, 0) == (N * 16, False)
        s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (blocks,)), N * 16)
        if not rule:
            s.freed = type(s.freed)()  # forgets the freed blocks: every block looks safe
        meta = s.build_connector_meta(_step([("r", blocks)]))
        (intent,) = meta.loads
        assert bool(intent.prefetched) is not rule
        assert s.stats.prefetch_unsafe == (1 if rule else 0)
        if not rule:  # the prefetch's copies end while step 1 runs on
            assert loader.cuda is not None
            loader.cuda.event_set(meta.step % p.EVENT_SETS)[-1].synchronize()
        for t in dst:  # step 1's last kernels write the finished request's blocks
            t.view(torch.uint8)[blocks[:N]] = 0x5A
        loader.start_load_kv(meta)
        reads = _forward(loader, dst, blocks[:N])
        same = all(torch.equal(a[:N], r) for a, r in zip(src, reads, strict=True))
        assert same is rule, "with the rule the load must land after the step's write; without, before"
    finally:
        s.shutdown()
        saver.shutdown()
        loader.shutdown()
