"""The connector's worker role against a real agent, driven directly (no engine).

Covers the load-error path deterministically: a lease that is lost between the scheduler's
lookup and the worker's copy must be reported to vLLM, never trusted.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

with warnings.catch_warnings():  # vLLM's own import-time deprecations are not ours to fix
    warnings.simplefilter("ignore")
    import vllm.distributed.kv_transfer.kv_connector.v1.base  # noqa: F401

from e2e.agent import AgentProcess
from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.cuda_kv import CudaKV
from kvfabric.connector.errors import AgentRejected
from kvfabric.connector.keys import LayoutSpec, chain_keys, request_seed
from kvfabric.connector.metadata import KVFabricMetadata, LoadIntent, SaveIntent
from kvfabric.connector.scheduler import SchedulerSide
from kvfabric.connector.worker import WorkerSide

pytestmark = pytest.mark.vllm

SPEC = LayoutSpec(
    model="roles",
    dtype="float32",
    kv_cache_dtype="auto",
    num_layers=2,
    num_kv_heads=2,
    head_size=8,
    block_size=16,
    tp_size=1,
    tp_rank=0,
    layout="cpu",
)


_WORKERS: list[WorkerSide] = []


@pytest.fixture(autouse=True)
def _shutdown_workers() -> Iterator[None]:
    yield
    while _WORKERS:
        _WORKERS.pop().shutdown()


def make_worker(agent: AgentProcess, num_blocks: int = 16) -> tuple[WorkerSide, list[torch.Tensor]]:
    cfg = ConnectorConfig(socket_path=str(agent.socket_path), backoff_initial_ms=1, backoff_max_ms=1)
    w = WorkerSide(cfg, SPEC, "t")
    _WORKERS.append(w)
    kv = [torch.randn(num_blocks, 2, 16, 16) for _ in range(2)]
    w.register_kv_caches({f"layer.{i}": t for i, t in enumerate(kv)})
    return w, kv


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB"]) as a:
        yield a


def test_save_then_load_through_the_pool_and_lost_lease_is_a_load_error(agent: AgentProcess) -> None:
    keys = chain_keys(list(range(64)), 16, request_seed())
    w, kv = make_worker(agent)
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (1, 2, 3, 4), tuple(keys), None)]))
    assert w.stats.saved_blocks == 4

    sched = AgentClient(str(agent.socket_path), "sched")
    try:
        reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id="L")
        assert reply.hits == 4
        w2, kv2 = make_worker(agent)
        intent = LoadIntent("r", "L", reply.pool_id, (9, 10, 11, 12), tuple(tuple(s) for s in reply.slots))
        w2.start_load_kv(KVFabricMetadata(loads=[intent]))
        assert w2.get_block_ids_with_load_errors() == set()
        for a, b in zip(kv, kv2, strict=True):
            assert torch.equal(a[1:5], b[9:13])

        # The lease is gone (already released by the load above): a second copy under it
        # must be reported as failed, not trusted.
        w2.start_load_kv(KVFabricMetadata(loads=[intent]))
        assert w2.get_block_ids_with_load_errors() == {9, 10, 11, 12}
        assert w2.stats.load_errors == 4

        # A lease from a previous agent (another pool) is never copied at all.
        stale = LoadIntent("r", "L", "another-pool", (5,), ((0,),))
        w2.start_load_kv(KVFabricMetadata(loads=[stale]))
        assert w2.get_block_ids_with_load_errors() == {5}
    finally:
        sched.close()


def test_a_pool_kept_in_several_files_is_one_range_to_the_agent_and_the_worker(tmp_path: Path) -> None:
    """``--pool-files 4``: blocks past the first file's 16 MiB land in the others, and a
    worker maps all four back to back: what it saved, it loads back byte for byte."""
    n = 9000  # 4 KiB blocks: slots in the first three of four 16 MiB files
    args = ["--arena-size", "4MiB", "--pool-files", "4", "--no-prefault", "--session-share", "1"]
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=args) as agent:
        keys = chain_keys(list(range(16 * n)), 16, request_seed(["files"]))
        w, kv = make_worker(agent, num_blocks=n + 1)
        w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", tuple(range(1, n + 1)), tuple(keys), None)]))
        assert w.stats.saved_blocks == n
        parts = sorted(agent.pool_path.parent.glob(agent.pool_path.name + "*"))
        assert [p.stat().st_size for p in parts] == [16 << 20] * 4
        with open(parts[2], "rb") as f:  # the third file holds blocks: the range spans files
            assert any(f.read(1 << 20))
        sched = AgentClient(str(agent.socket_path), "sched")
        try:
            reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id="L")
            assert w.copier is not None and w.copier.block_bytes == 4096
            assert reply.hits == n and max(reply.slots[0]) * 4096 > 32 << 20
            w2, kv2 = make_worker(agent, num_blocks=n + 1)
            intent = LoadIntent(
                "r", "L", reply.pool_id, tuple(range(1, n + 1)), tuple(tuple(s) for s in reply.slots)
            )
            w2.start_load_kv(KVFabricMetadata(loads=[intent]))
            assert w2.get_block_ids_with_load_errors() == set()
            for a, b in zip(kv, kv2, strict=True):
                assert torch.equal(a[1:], b[1:])
        finally:
            sched.close()
    assert not list(agent.pool_path.parent.glob(agent.pool_path.name + "*"))  # every file removed


def test_worker_with_agent_gone_reports_every_load_as_failed(agent: AgentProcess) -> None:
    keys = chain_keys(list(range(32)), 16, request_seed())
    w, _ = make_worker(agent)
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (1, 2), tuple(keys), None)]))
    sched = AgentClient(str(agent.socket_path), "sched")
    reply = sched.lookup([SPEC.namespace()], keys, 16, lease_id="L")
    agent.kill()  # leases die with the agent
    try:
        intent = LoadIntent("r", "L", reply.pool_id, (3, 4), tuple(tuple(s) for s in reply.slots))
        w.start_load_kv(KVFabricMetadata(loads=[intent]))
        assert w.get_block_ids_with_load_errors() == {3, 4}
        # saves are skipped quietly
        w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r2", (5,), (b"k" * 16,), None)]))
        assert w.stats.save_failures == 1
    finally:
        sched.close()


def test_unsupported_layout_disables_the_worker(agent: AgentProcess) -> None:
    w = WorkerSide(ConnectorConfig(socket_path=str(agent.socket_path)), SPEC, "t")
    _WORKERS.append(w)
    w.register_kv_caches({"layer.0": torch.zeros(4, 3, 3)})
    assert w.copier is None
    intent = LoadIntent("r", "L", "p", (1,), ((0,),))
    w.start_load_kv(KVFabricMetadata(loads=[intent]))
    assert w.get_block_ids_with_load_errors() == {1}


def _request(req_id: str, prompt_len: int) -> SimpleNamespace:
    tokens = list(range(prompt_len))
    return SimpleNamespace(
        request_id=req_id, prompt_token_ids=tokens, all_token_ids=tokens, cache_salt=None, lora_request=None
    )


def _step(new: list[tuple[str, int]], preempted: set[str]) -> SimpleNamespace:
    """The fields of vLLM's SchedulerOutput the scheduler role reads."""
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(list(range(1, n // 16 + 2)),), num_computed_tokens=0)
            for r, n in new
        ],
        num_scheduled_tokens=dict(new),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
        ),
        preempted_req_ids=preempted,
    )


@pytest.mark.parametrize("background", [True, False])
def test_scheduler_delays_freeing_exactly_the_requests_with_background_saves(
    agent: AgentProcess, background: bool
) -> None:
    cfg = ConnectorConfig(socket_path=str(agent.socket_path))
    s = SchedulerSide(cfg, [SPEC.namespace()], 16, "t", background_saves=background)
    try:
        saving, short = _request("saving", 64), _request("short", 10)  # 4 full blocks / none
        for r in (saving, short):
            assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # empty pool: a miss
        meta = s.build_connector_meta(_step([("saving", 64), ("short", 10)], set()))
        assert [(i.req_id, len(i.block_ids)) for i in meta.saves] == [("saving", 4)]
        # Both preempted in the next step: only the one with saves in flight must be waited for.
        meta = s.build_connector_meta(_step([], {"saving", "short"}))
        assert meta.preempted == (("saving",) if background else ())
        assert s.request_finished(saving)[0] is background
        assert s.request_finished(short)[0] is False
    finally:
        s.shutdown()


def test_worker_stats_reach_vllm_as_increments_that_add_up(agent: AgentProcess) -> None:
    from kvfabric.connector.stats import KVFabricStats

    keys = chain_keys(list(range(64)), 16, request_seed())
    w, _kv = make_worker(agent)
    assert not any(w.take_stats().values())
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (1, 2, 3, 4), tuple(keys), None)]))
    first = KVFabricStats(data=w.take_stats())
    assert first.data["saved_blocks"] == 4 and not any(w.take_stats().values())  # taken once
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r2", (1, 2, 3, 4), tuple(keys), None)]))
    second = KVFabricStats(data=w.take_stats())
    assert second.data["save_skipped_blocks"] == 4  # already in the pool
    total = first.aggregate(second)
    assert total.reduce() == {"saved_blocks": 4, "save_skipped_blocks": 4}
    assert KVFabricStats().is_empty() and not total.is_empty()


def test_layered_loads_ask_vllm_for_piecewise_cuda_graphs() -> None:
    """A per-layer wait inside a full CUDA graph would be skipped at replay: while layered loads
    are on (the default) the connector asks vLLM for piecewise graphs only."""
    from kvfabric.connector.vllm_connector import KVFabricConnector

    assert KVFabricConnector.requires_piecewise_for_cudagraph({}) is True
    assert KVFabricConnector.requires_piecewise_for_cudagraph({"layered_loads": False}) is False


# -- GPU worker logic, without a GPU (a stand-in client) -----------------------------------------


class _Client:
    def __init__(self, opened: bool) -> None:
        self.sent: list[Any] = []
        self.opened = opened

    def _roundtrip(self, request: Any, reply_type: type) -> Any:
        self.sent.append(request)
        assert reply_type is p.GpuKVReply
        return p.GpuKVReply(kv_id=7, block_bytes=1024, layered=self.opened and bool(request.layer_events))


def _cuda_kv() -> CudaKV:
    """A GPU engine's registration as the worker keeps it (no GPU needed: nothing is opened)."""
    return CudaKV(
        device_uuid="GPU-1",
        layout="block_chunk",
        num_blocks=4,
        plane_bytes=512,
        handles=(b"h" * 64, b"h" * 64),
        offsets=(0, 0),
        events=(object(), object()),  # type: ignore[arg-type]
        event_handles=(b"e" * 64, b"f" * 64),
    )


def _hello(features: list[str]) -> p.HelloReply:
    return p.HelloReply(
        session_id=1,
        agent_id="a",
        pool_id="pool",
        pool_path="/dev/shm/none",
        pool_bytes=1 << 30,
        protocol_version=p.PROTOCOL_VERSION,
        features=features,
    )


@pytest.mark.parametrize(
    ("features", "opened", "sends_events", "layered"),
    [
        ([], True, False, False),  # older agent: no events sent, whole loads
        (["layered_loads"], True, True, True),
        (["layered_loads"], False, True, False),  # the agent could not open them (no shared /dev/shm)
    ],
)
def test_layer_events_go_only_to_an_agent_that_understands_them(
    tmp_path: Path, features: list[str], opened: bool, sends_events: bool, layered: bool
) -> None:
    """A GPU worker sends its layer events only to an agent that lists ``layered_loads``, so an
    agent older than layered loads serves it (whole loads) instead of refusing the registration.
    Pure logic of ``_on_connect``: a stand-in client records the registration (the GPU path end
    to end is in tests/gpu)."""
    w = WorkerSide(ConnectorConfig(socket_path=str(tmp_path / "none.sock")), SPEC, "t")
    w.cuda = _cuda_kv()
    client = _Client(opened)
    w._on_connect(client, _hello(features))  # type: ignore[arg-type]
    (registration,) = client.sent
    assert bool(registration.layer_events) is sends_events
    assert w._layered_ok is layered
    assert w.kv_id == 7


def _stand_in_gpu_worker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: list[str],
    layered: bool = True,
    token: bytes = b"",
) -> WorkerSide:
    """A GPU worker whose engine stream and agent client are stand-ins that log, in ``order``,
    waits for the stream and requests sent; ``token``: its registration takes prefetches."""

    class Stream:
        def synchronize(self) -> None:
            order.append("synchronize")

    class Client(_Client):
        def connect(self) -> bool:
            return True

        def call(self, request: Any, reply_type: type) -> Any:
            order.append(type(request).__name__)
            return p.GpuCopyReply(method="dma", seconds=0.0)

        def release(self, lease_ids: list[str], blocks: int, seconds: float) -> list[bool]:
            return [True] * len(lease_ids)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    w = WorkerSide(ConnectorConfig(socket_path=str(tmp_path / "none.sock")), SPEC, "t")
    w.cuda = _cuda_kv()
    w.pool_id = "pool"
    w._layered_ok = layered
    w.prefetch_token = token
    w.client = Client(opened=True)  # type: ignore[assignment]
    return w


def test_gpu_loads_wait_for_the_engine_stream_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With async scheduling a step's loads are sent while the previous step may still write
    into blocks freed meanwhile: the worker lets the engine's stream catch up before the agent
    writes, for layered and whole loads alike. Pure logic (a stand-in stream and client)."""
    order: list[str] = []
    load = LoadIntent("r", "lease", "pool", (1, 2), ((5, 6),))
    for layered in (True, False):
        order.clear()
        w = _stand_in_gpu_worker(tmp_path, monkeypatch, order, layered)
        w._finish_layered = lambda: None  # type: ignore[method-assign]
        w.start_load_kv(KVFabricMetadata(loads=[load]))
        assert order == ["synchronize", "GpuCopy"], order
        order.clear()
        w.start_load_kv(KVFabricMetadata())
        assert order == []  # steps without loads (every decode step) never wait


def test_a_prefetched_gpu_load_is_only_waited_for_and_a_stale_one_is_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pure logic of the worker's side of prefetches: a load the scheduler had the agent queue
    into this registration needs neither the wait for the engine's stream nor a copy call (the
    forward waits on its layer events); one queued into a registration this worker no longer
    holds (it reconnected: another token) is recomputed, and the rest of the step still loads
    after the engine's stream."""
    order: list[str] = []
    mine, old = b"m" * 16, b"o" * 16
    w = _stand_in_gpu_worker(tmp_path, monkeypatch, order, token=mine)
    pre = LoadIntent("a", "la", "pool", (1, 2), ((5, 6),), prefetched=(mine,))
    w.start_load_kv(KVFabricMetadata(loads=[pre], step=3))
    assert order == [], "a prefetched load must not wait for the engine's stream or copy again"
    assert w._layered is not None and w._layered.intents == [pre]
    w._layered = None
    stale = LoadIntent("b", "lb", "pool", (3,), ((7,),), prefetched=(old,))
    plain = LoadIntent("c", "lc", "pool", (4,), ((8,),))
    w._drain = lambda events: order.append("drain")  # type: ignore[method-assign]
    w.start_load_kv(KVFabricMetadata(loads=[stale, plain], step=4))
    assert order == ["drain", "synchronize", "GpuCopy"], order
    assert w._layered is not None and w._layered.intents == [plain]
    assert w._load_errors == {3}


def test_the_scheduler_prefetches_only_into_blocks_no_running_step_touches(
    agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's side: once a worker named its registration, a step's load is sent to the
    agent as a GpuPrefetch when vLLM allocated it, unless a block of it was freed by a request
    whose last step may still run (async scheduling); the workers are told per rank. A CPU agent
    refuses GpuPrefetch (no --cuda): the loads then go to the workers as before."""
    keys = chain_keys(list(range(96)), 16, request_seed(["", ""]))
    w1, _ = make_worker(agent)
    w1.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    s = SchedulerSide(
        ConnectorConfig(socket_path=str(agent.socket_path)), [SPEC.namespace()], 16, "t", prefetch=True
    )
    sent: list[p.GpuPrefetch] = []
    real_call = s.client.call

    def call(request: Any, reply_type: type) -> Any:
        if isinstance(request, p.GpuPrefetch):
            sent.append(request)
        return real_call(request, reply_type)

    monkeypatch.setattr(s.client, "call", call)
    token = b"k" * 16
    try:
        _, step = _hit_four_blocks_and_plan_the_step(s)
        assert step.loads[0].prefetched == () and not sent, "no worker named a registration yet"
        s.build_connector_meta(_step([], set()))  # step 2, scheduled while step 1 runs
        # step 1's output: a request finishes (its blocks 20-23 are also in step 2, running)
        s.request_finished(_request("gone", 16), [20, 21, 22, 23])
        s.update_connector_output(0, 0, (), (), [(0, token)], completed_step=1)
        req = _request("r2", 96)
        assert s.get_num_new_matched_tokens(req, 0) == (64, False)
        s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([20, 21, 22, 23, 24],)), 64)
        step = s.build_connector_meta(_new_step("r2", [20, 21, 22, 23, 24], computed=64, scheduled=31))
        assert not sent and s.stats.prefetch_unsafe == 1, "blocks step 2 may still touch"
        assert step.loads[0].prefetched == ()
        s.update_connector_output(0, 0, completed_step=2)  # step 2's output: it has ended
        req3 = _request("r3", 96)
        assert s.get_num_new_matched_tokens(req3, 0) == (64, False)
        s.update_state_after_alloc(req3, SimpleNamespace(get_block_ids=lambda: ([20, 21, 22, 23, 24],)), 64)
        step = s.build_connector_meta(_new_step("r3", [20, 21, 22, 23, 24], computed=64, scheduled=31))
        (prefetch,) = sent
        assert [(ld.token, ld.block_ids) for ld in prefetch.loads] == [(token, [20, 21, 22, 23])]
        assert prefetch.event_set == step.step % p.EVENT_SETS
        # the CPU agent cannot queue GPU copies: the load goes to the workers unchanged
        assert step.loads[0].prefetched == () and s.stats.loads_prefetched == 0
    finally:
        s.shutdown()


def test_an_abort_mid_load_keeps_the_lease_until_the_workers_copy(agent: AgentProcess) -> None:
    """The review's pool-poisoning trigger: the request is aborted after its load was planned
    but before the worker copied. The scheduler must leave the lease to the worker (which
    releases it after its copy), so the copy is trusted and correct."""
    keys = chain_keys(list(range(80)), 16, request_seed(["", ""]))  # the scheduler's seed: no salt, no LoRA
    w1, kv1 = make_worker(agent)
    w1.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    cfg = ConnectorConfig(socket_path=str(agent.socket_path))
    s = SchedulerSide(cfg, [SPEC.namespace()], 16, "t")
    try:
        req = _request("r", 80)
        assert s.get_num_new_matched_tokens(req, 0) == (64, False)
        s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([9, 10, 11, 12, 13],)), 64)
        meta = s.build_connector_meta(_step([], set()))
        assert [len(i.block_ids) for i in meta.loads] == [4]
        s.request_finished(req)  # aborted: the intent is already on its way to the workers
        assert agent.stats()["leases_active"] == 1  # still held for the worker
        w2, kv2 = make_worker(agent)
        w2.start_load_kv(meta)
        assert w2.get_block_ids_with_load_errors() == set()
        for a, b in zip(kv1, kv2, strict=True):
            assert torch.equal(a[1:5], b[9:13])
        assert agent.stats()["leases_active"] == 0  # the worker released it
        for _ in range(3):  # the scheduler's deferred release finds it already gone: harmless
            s.build_connector_meta(_step([], set()))
    finally:
        s.shutdown()


def test_blocks_computed_on_a_failed_load_are_not_saved(agent: AgentProcess) -> None:
    """A step whose load failed (here: its lease is gone) computes the rest of the prompt
    attending to suspect blocks; those blocks must not reach the pool, where every engine would
    load them. A later correct save of them is then accepted."""
    keys = chain_keys(list(range(96)), 16, request_seed())
    w1, _ = make_worker(agent)
    w1.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    sched = AgentClient(str(agent.socket_path), "sched")
    try:
        reply = sched.lookup([SPEC.namespace()], keys[:4], 16, lease_id="L")
        sched.release(reply.leases)  # lost before the worker's copy
        w2, _ = make_worker(agent)
        load = LoadIntent(
            "r",
            "L",
            reply.pool_id,
            (9, 10, 11, 12),
            tuple(tuple(x) for x in reply.slots),
            tuple(reply.leases),
        )
        save = SaveIntent("r", (13, 14), tuple(keys[4:6]), keys[3])
        step = KVFabricMetadata(loads=[load], saves=[save])
        w2.start_load_kv(step)
        w2.wait_for_save(step)
        assert w2.get_block_ids_with_load_errors() == {9, 10, 11, 12}
        assert sched.lookup([SPEC.namespace()], keys[:6], 16).hits == 4  # blocks 4, 5 not committed
        # Another request saving them (correctly computed) is not refused as "present".
        w1.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r1", (5, 6), tuple(keys[4:6]), keys[3])]))
        assert sched.lookup([SPEC.namespace()], keys[:6], 16).hits == 6
        # Saves of the failed load's epoch (a step planned before vLLM saw the failure) are
        # dropped; once the scheduler has seen it (a later epoch: recomputed blocks), they land.
        w2.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (15,), (b"n" * 16,), None)]))
        assert w2.stats.saved_blocks == 0
        w2.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (15,), (b"n" * 16,), None, epoch=1)]))
        assert w2.stats.saved_blocks == 1
        w2.get_finished({"r"})  # forgotten when it finishes
        w2.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (15,), (b"m" * 16,), None)]))
        assert w2.stats.saved_blocks == 2
    finally:
        sched.close()


def test_a_cpu_worker_lets_go_of_a_dead_agents_pool_and_maps_the_next_one(agent: AgentProcess) -> None:
    """After an agent crash the old pool's pages stay allocated while engines map it: a
    restarted agent could not reserve its own. The worker drops the mapping when its session
    fails, and maps the new agent's pool when it is back."""
    keys = chain_keys(list(range(32)), 16, request_seed())
    w, _ = make_worker(agent)
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (1, 2), tuple(keys), None)]))
    old_pool = w.pool_id
    assert w.copier is not None and w.copier.attached and old_pool is not None
    agent.kill()
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r2", (3,), (b"k" * 16,), None)]))
    assert not w.copier.attached and w.pool_id is None  # let go
    agent.start()
    deadline = time.monotonic() + 5
    while not w.client.connect():  # the breaker's backoff is 1 ms here
        assert time.monotonic() < deadline
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r3", (4,), (b"m" * 16,), None)]))
    assert w.copier.attached and w.pool_id not in (None, old_pool) and w.stats.saved_blocks == 3


def test_a_layered_load_whose_copies_never_end_is_given_up_at_its_deadline(tmp_path: Path) -> None:
    """The agent is alive (its session open) but the layer's event never fires (a hung CUDA
    context on the agent side): the forward must not wait forever. Stand-in events and client."""
    from kvfabric.connector.worker import _LayeredLoad

    class Never:
        def query(self) -> bool:
            return False

    class Client:
        closed = False

        def peer_closed(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    w = WorkerSide(ConnectorConfig(socket_path=str(tmp_path / "none.sock")), SPEC, "t")
    kv = _cuda_kv()
    w.cuda = CudaKV(**{**kv.__dict__, "events": (Never(), Never())})  # type: ignore[arg-type]
    w._layer_index = {"layer.0": 0, "layer.1": 1}
    client = Client()
    w.client = client  # type: ignore[assignment]
    load = LoadIntent("r", "lease", "pool", (1, 2), ((5, 6),))
    started = time.perf_counter()
    w._layered = _LayeredLoad([load], started, set(), w.cuda.events, deadline=started + 0.2)
    w.wait_for_layer_load("layer.0")
    took = time.perf_counter() - started
    assert client.closed and w._layered is None
    assert w.get_block_ids_with_load_errors() == {1, 2}
    assert took < 5, took  # the deadline (0.2 s) plus the bounded grace for late copies (1 s)


def test_a_request_asked_again_before_allocation_is_not_leased_again(agent: AgentProcess) -> None:
    """vLLM asks for a waiting request's external hits every step while it cannot allocate
    blocks: the lease already held answers (the review saw 2,964 blocks leased for 68 loaded)."""
    keys = chain_keys(list(range(80)), 16, request_seed(["", ""]))
    w, _ = make_worker(agent)
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    s = SchedulerSide(ConnectorConfig(socket_path=str(agent.socket_path)), [SPEC.namespace()], 16, "t")
    try:
        req = _request("r", 80)
        for _ in range(5):
            assert s.get_num_new_matched_tokens(req, 0) == (64, False)
        stats = agent.stats()
        assert stats["leases_granted"] == 1 and stats["lookups"] == 1
        s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([9, 10, 11, 12, 13],)), 64)
        assert [len(i.block_ids) for i in s.build_connector_meta(_step([], set())).loads] == [4]
    finally:
        s.shutdown()


def test_the_scheduler_stops_offering_hits_its_workers_cannot_load(
    agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that cannot load (disabled, unmapped) reports only failed loads: after a few
    such reports the scheduler offers no hits for a while instead of turning each into a wasted
    forward plus a recompute; a report with a working load resets it."""
    from kvfabric.connector import scheduler as sched_mod

    keys = chain_keys(list(range(80)), 16, request_seed(["", ""]))
    w, _ = make_worker(agent)
    w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    s = SchedulerSide(ConnectorConfig(socket_path=str(agent.socket_path)), [SPEC.namespace()], 16, "t")
    try:
        for _ in range(sched_mod._FAILED_LOAD_REPORTS):
            s.update_connector_output(loaded_blocks=0, load_errors=4)
        lookups = agent.stats()["lookups"]
        assert s.get_num_new_matched_tokens(_request("later", 80), 0) == (0, False)
        assert agent.stats()["lookups"] == lookups  # not even asked
        monkeypatch.setattr(sched_mod.time, "monotonic", lambda: 1e12)  # the pause is over
        assert s.get_num_new_matched_tokens(_request("after", 80), 0) == (64, False)
        s.update_connector_output(loaded_blocks=4, load_errors=0)  # the streak and backoff reset
        assert s._failed_reports == 0 and s._load_backoff_s == 0.0
    finally:
        s.shutdown()


def test_worker_stats_of_a_disabled_worker_show_only_failed_loads(agent: AgentProcess) -> None:
    """What feeds the scheduler's pause: a worker that could not set itself up counts every
    planned load as failed, and its stats say so."""
    w = WorkerSide(ConnectorConfig(socket_path=str(agent.socket_path)), SPEC, "t")
    _WORKERS.append(w)
    w.register_kv_caches({"layer.0": torch.zeros(4, 3, 3)})  # a layout it refuses: disabled
    w.start_load_kv(KVFabricMetadata(loads=[LoadIntent("r", "L", "p", (1, 2), ((0, 1),))]))
    delta = w.take_stats()
    assert delta["load_errors"] == 2 and delta["loaded_blocks"] == 0


def test_the_scheduler_waits_for_blocks_promoted_from_nvme_then_they_load_like_any_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an agent restart the pool is empty and the NVMe tier is not: the scheduler answers
    "ask again" (None) while the agent reads the blocks into the pool, then the hit, which the
    worker loads byte for byte; once a request's wait is over it goes on without them."""
    from kvfabric.connector import scheduler as sched_mod

    args = ["--arena-size", "4MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme-size", "64MiB"]
    salted = SimpleNamespace(**{**vars(_request("b", 80)), "cache_salt": "b"})  # other keys
    keys_a = chain_keys(list(range(80)), 16, request_seed(["", ""]))
    keys_b = chain_keys(list(range(80)), 16, request_seed(["b", ""]))
    with AgentProcess(tmp_path / "agent1", "64MiB", extra_args=args) as a1:
        a1.wait_nvme()
        w, kv = make_worker(a1)
        w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("a", (1, 2, 3, 4), tuple(keys_a[:4]), None)]))
        w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("b", (5, 6, 7, 8), tuple(keys_b[:4]), None)]))
        a1.wait_nvme_written()
    with AgentProcess(tmp_path / "agent2", "64MiB", extra_args=args) as a2:
        a2.wait_nvme()
        w2, kv2 = make_worker(a2)  # registers the layout, as the engine's worker does at start
        cfg = ConnectorConfig(socket_path=str(a2.socket_path), promote_wait_ms=30_000)
        s = SchedulerSide(cfg, [SPEC.namespace()], 16, "t")
        try:
            req = _request("a", 80)
            assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # on its way from disk
            deadline = time.monotonic() + 20
            while (got := s.get_num_new_matched_tokens(req, 0)) == (None, False):
                assert time.monotonic() < deadline, "the promoted blocks never became hits"
                time.sleep(0.005)
            assert got == (64, False) and a2.stats()["nvme_promoted_blocks"] == 4
            s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([9, 10, 11, 12, 13],)), 64)
            w2.start_load_kv(s.build_connector_meta(_step([], set())))
            assert w2.get_block_ids_with_load_errors() == set()
            for before, after in zip(kv, kv2, strict=True):
                assert torch.equal(before[1:5], after[9:13])  # saved to agent 1, loaded from agent 2
            # B: asked once (its blocks start moving), then its wait is over: no more "ask again"
            assert s.get_num_new_matched_tokens(salted, 0) == (None, False)
            monkeypatch.setattr(sched_mod.time, "monotonic", lambda: 1e12)
            tokens, _ = s.get_num_new_matched_tokens(salted, 0)
            assert tokens is not None and s.stats.promote_waits >= 2
        finally:
            s.shutdown()


def test_after_a_failed_load_the_recomputed_blocks_end_up_in_the_pool(agent: AgentProcess) -> None:
    """The review's poisoning scenario end to end at the role level: the load of a request's hit
    fails (its lease is lost before the copy), the step's derived blocks are dropped, vLLM reports
    the failed blocks and recomputes from the first; the scheduler plans the saves again in a new
    epoch and the recomputed, correct blocks reach the pool (not a miss forever, not poison)."""
    keys = chain_keys(list(range(96)), 16, request_seed(["", ""]))
    w1, _ = make_worker(agent)
    w1.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)]))
    s = SchedulerSide(ConnectorConfig(socket_path=str(agent.socket_path)), [SPEC.namespace()], 16, "t")
    w2, _ = make_worker(agent)
    try:
        blocks, step1 = _hit_four_blocks_and_plan_the_step(s)
        (load,) = step1.loads
        s.client.release(list(load.leases))  # the lease is lost before the worker copies
        w2.start_load_kv(step1)
        w2.wait_for_save(step1)  # blocks 4 and 5 were computed on top of the failed load
        failed = w2.get_block_ids_with_load_errors()
        assert failed == {9, 10, 11, 12}
        probe = AgentClient(str(agent.socket_path), "probe")
        try:
            assert probe.lookup([SPEC.namespace()], keys[:6], 16).hits == 4  # no poison committed
            # vLLM: the failed blocks are reported, the request recomputes from block 0
            s.update_connector_output(0, len(failed), failed)
            step2 = s.build_connector_meta(_cached_step("r", computed=0, scheduled=95))
            assert [(i.block_ids, i.epoch) for i in step2.saves] == [(tuple(blocks[:5]), 1)]
            w2.wait_for_save(step2)
            assert probe.lookup([SPEC.namespace()], keys[:6], 16).hits == 5  # the recomputed block 4
            assert w2.stats.saved_blocks == 1  # blocks 0-3 were in the pool already
        finally:
            probe.close()
    finally:
        s.shutdown()


def _hit_four_blocks_and_plan_the_step(s: SchedulerSide) -> tuple[list[int], KVFabricMetadata]:
    """Request ``r`` (96 tokens) hits 4 blocks; vLLM allocates blocks 9-15 and schedules the rest
    of the prompt but its last token (blocks 4, 5 computed; 4 full)."""
    req = _request("r", 96)
    assert s.get_num_new_matched_tokens(req, 0) == (64, False)
    blocks = [9, 10, 11, 12, 13, 14, 15]
    s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (blocks,)), 64)
    return blocks, s.build_connector_meta(_new_step("r", blocks, computed=64, scheduled=31))


def _new_step(req: str, blocks: list[int], computed: int, scheduled: int) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=req, block_ids=(blocks,), num_computed_tokens=computed)],
        num_scheduled_tokens={req: scheduled},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
        ),
        preempted_req_ids=set(),
    )


def _cached_step(req: str, computed: int, scheduled: int) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[],
        num_scheduled_tokens={req: scheduled},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[req], new_block_ids=[None], resumed_req_ids=set(), num_computed_tokens=[computed]
        ),
        preempted_req_ids=set(),
    )


# -- tensor parallelism: the scheduler commits what the ranks wrote (two-phase saves) ----------------


def _tp_specs(layout: str) -> list[LayoutSpec]:
    """Two ranks; MLA: one latent of 32 per token (the agent's blocks are at least 4 KiB)."""
    from dataclasses import replace

    mla = {"num_kv_heads": 1, "head_size": 32} if "+mla" in layout else {}
    return [replace(SPEC, tp_size=2, tp_rank=r, layout=layout, **mla) for r in (0, 1)]  # type: ignore[arg-type]


def _tp_workers(agent: AgentProcess, specs: list[LayoutSpec]) -> list[WorkerSide]:
    cfg = ConnectorConfig(socket_path=str(agent.socket_path), backoff_initial_ms=1, backoff_max_ms=1)
    workers = []
    for spec in specs:
        w = WorkerSide(cfg, spec, "t")
        _WORKERS.append(w)
        width = spec.head_size if spec.mla else 2 * spec.head_size
        w.register_kv_caches({f"layer.{i}": torch.randn(16, spec.num_kv_heads, 16, width) for i in range(2)})
        workers.append(w)
    return workers


def _step_outputs(workers: list[WorkerSide]) -> tuple[set[int], list[Any]]:
    """What vLLM aggregates from the workers after a step: failed blocks and staged saves."""
    failed: set[int] = set()
    staged: list[Any] = []
    for w in workers:
        failed |= w.get_block_ids_with_load_errors()
        meta = w.build_connector_worker_meta()
        staged += meta.staged if meta is not None else []
    return failed, staged


@pytest.mark.parametrize("layout", ["cpu", "cpu+mla"])
def test_tp_a_load_failing_on_one_rank_voids_what_every_rank_computed_on_top_of_it(
    agent: AgentProcess, layout: str
) -> None:
    """The README's former TP gap: rank 1's lease is lost before its copy, rank 0 loads fine and
    writes the block computed after the hit (whose KV the all-reduce spoiled with rank 1's bad
    attention output). Nothing of that step becomes visible; the recomputed blocks do. A worker
    that committed its own saves (as before two-phase saves) fails the first lookup below.
    With MLA (``cpu+mla``) the ranks share one copy: rank 0 saves it, both ranks load it."""
    specs = _tp_specs(layout)
    namespaces = [s.namespace() for s in specs]
    assert (len(set(namespaces)) == 1) == ("+mla" in layout)
    keys = chain_keys(list(range(96)), 16, request_seed(["", ""]))
    workers = _tp_workers(agent, specs)
    s = SchedulerSide(ConnectorConfig(socket_path=str(agent.socket_path)), namespaces, 16, "t")
    probe = AgentClient(str(agent.socket_path), "probe")
    try:
        # a first request fills blocks 0-3 on every rank: invisible until the scheduler commits
        first = KVFabricMetadata(saves=[SaveIntent("r0", (1, 2, 3, 4), tuple(keys[:4]), None)])
        for w in workers:
            w.wait_for_save(first)
        failed, staged = _step_outputs(workers)
        assert not failed and len(staged) == (1 if "+mla" in layout else 2)
        assert probe.lookup(namespaces[:1], keys[:4], 16).hits == 0
        s.update_connector_output(0, 0, failed, staged)
        assert probe.lookup(namespaces, keys[:4], 16).hits == 4
        assert s.stats.staged_committed == 4 * len(staged)
        committed_bytes = probe.stats()["committed_bytes"]

        blocks, step1 = _hit_four_blocks_and_plan_the_step(s)
        (load,) = step1.loads
        assert len(load.leases) == 2  # one per rank, also when they read one shared copy
        s.client.release([load.leases[1]])  # rank 1's lease is lost before its copy
        for w in workers:
            w.start_load_kv(step1)
            w.wait_for_save(step1)  # block 4, computed on top of rank 1's failed load
        failed, staged = _step_outputs(workers)
        assert failed == {9, 10, 11, 12}
        assert workers[0].stats.loaded_blocks == 4 and workers[1].stats.load_errors == 4
        assert [i.keys for i in staged] == [tuple(keys[4:5])]  # rank 0's; rank 1 dropped its own
        s.update_connector_output(0, len(failed), failed, staged)
        assert probe.lookup(namespaces[:1], keys[:6], 16).hits == 4  # rank 0's block 4 voided
        assert s.stats.staged_voided == 1

        step2 = s.build_connector_meta(_cached_step("r", computed=0, scheduled=95))
        assert [(i.block_ids, i.epoch) for i in step2.saves] == [(tuple(blocks[:5]), 1)]
        for w in workers:
            w.wait_for_save(step2)
        s.update_connector_output(0, 0, *_step_outputs(workers))
        assert probe.lookup(namespaces, keys[:6], 16).hits == 5  # the recomputed block 4
        # one copy per TP group with MLA: the pool grew by one block, not one per rank
        grown = probe.stats()["committed_bytes"] - committed_bytes
        assert grown == workers[0].copier.block_bytes * (1 if "+mla" in layout else 2)  # type: ignore[union-attr]
    finally:
        probe.close()
        s.shutdown()


def test_tp_delegated_commit_needs_the_owners_token(agent: AgentProcess) -> None:
    """Only a session that knows a worker's token (its engine's scheduler, told through vLLM)
    can make that worker's reservations visible."""
    (w0, _) = _tp_workers(agent, _tp_specs("cpu"))
    keys = chain_keys(list(range(32)), 16, request_seed())
    w0.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", (1, 2), tuple(keys), None)]))
    meta = w0.build_connector_worker_meta()
    assert meta is not None
    (item,) = meta.staged
    other = AgentClient(str(agent.socket_path), "other")
    try:
        with pytest.raises(AgentRejected):
            other.commit(item.namespace, list(item.keys), [], 0.0, owner=item.owner, owner_token="0" * 32)
        assert other.lookup([item.namespace], list(item.keys), 16).hits == 0
        assert (
            other.commit(
                item.namespace, list(item.keys), [], 0.0, owner=item.owner, owner_token=item.owner_token
            ).committed
            == 2
        )
        assert other.lookup([item.namespace], list(item.keys), 16).hits == 2
    finally:
        other.close()


def test_pd_the_prefill_side_promises_its_blocks_and_the_decode_side_waits_for_them_then_gives_up(
    agent: AgentProcess,
) -> None:
    """P/D through one agent, driven by hand: the prefill scheduler's promise names the blocks it
    planned to save; the decode scheduler waits (None) while they are missing, takes them once
    committed, and with a promise that never arrives it recomputes after ``handoff_wait_ms``."""
    cfg = ConnectorConfig(socket_path=str(agent.socket_path), handoff_wait_ms=300)
    prefill = SchedulerSide(cfg, [SPEC.namespace()], 16, "p")
    decode = SchedulerSide(cfg, [SPEC.namespace()], 16, "d")
    try:
        req = _request("r", 80)
        req.kv_transfer_params = {"do_remote_decode": True}
        assert prefill.get_num_new_matched_tokens(req, 0) == (0, False)
        meta = prefill.build_connector_meta(_step([("r", 80)], set()))
        (save,) = meta.saves
        assert len(save.keys) == 5
        delay, promise = prefill.request_finished(req)
        assert promise == {"kvfabric": {"blocks": 5, "last_key": save.keys[-1].hex()}}
        assert delay is False  # not waited for: the decode side waits instead
        # without do_remote_decode no promise is made
        plain = _request("plain", 80)
        prefill.get_num_new_matched_tokens(plain, 0)
        assert prefill.request_finished(plain) == (False, None)

        # the decode side, before the prefill's save committed: it waits
        dreq = _request("d1", 81)  # one more token: all 5 promised blocks are usable
        dreq.kv_transfer_params = promise
        assert decode.get_num_new_matched_tokens(dreq, 0) == (None, False)
        assert decode.stats.handoff_waits == 1
        w, _ = make_worker(agent)
        w.wait_for_save(meta)  # the prefill engine's worker saves and commits
        assert decode.get_num_new_matched_tokens(dreq, 0) == (80, False)
        decode.request_finished(dreq)

        # a promise whose blocks never come: waited for until the deadline, then recomputed
        other = _request("d2", 161)
        other.all_token_ids = other.prompt_token_ids = [t + 1000 for t in other.prompt_token_ids]
        keys = chain_keys(other.prompt_token_ids, 16, request_seed(["", ""]))
        other.kv_transfer_params = {"kvfabric": {"blocks": 10, "last_key": keys[9].hex()}}
        started = time.monotonic()
        while decode.get_num_new_matched_tokens(other, 0) == (None, False):
            assert time.monotonic() - started < 5
            time.sleep(0.02)
        assert time.monotonic() - started >= 0.3
        assert decode.get_num_new_matched_tokens(other, 0) == (0, False)
        assert decode.stats.handoffs_short == 1
        # a promise of other keys (another model or layout) is not waited for at all
        third = _request("d3", 81)
        third.kv_transfer_params = {"kvfabric": {"blocks": 5, "last_key": "00" * 16}}
        assert decode.get_num_new_matched_tokens(third, 0) == (80, False)
    finally:
        prefill.shutdown()
        decode.shutdown()
