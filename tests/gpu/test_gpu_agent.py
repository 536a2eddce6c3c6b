"""A real ``kvfabric-agent --cuda`` process serving a GPU "engine" process over CUDA IPC.

The engine side uses the connector's own pieces (``cuda_kv.describe``, the agent client and
the protocol) exactly as the connector's worker does; no vLLM is needed on the GPU host.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu()

from e2e.agent import AgentProcess, wait_until  # noqa: E402

NB, LAYERS = 64, 4


def _engine(body: Callable[[str, Any], None], socket_path: str, conn: Any) -> None:
    try:
        body(socket_path, conn)
    except Exception as exc:  # tell the parent at once instead of letting it time out
        conn.send(("error", repr(exc)))


def _spawn_engine(agent: AgentProcess, body: Callable[[str, Any], None]) -> tuple[Any, Any]:
    """``body(socket_path, conn)`` in an engine process of its own; (parent end of the pipe, process)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(body, str(agent.socket_path), child), daemon=True)
    proc.start()
    return parent, proc


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


def _round_trip(parent: Any) -> int:
    """Waits for ``_engine_body``'s round trip: 8 blocks hit and loaded back exactly; returns
    the block bytes the agent registered."""
    assert parent.poll(120), "engine did not finish its round trip"
    first = parent.recv()
    assert first[0] != "error", first
    same, hits, block_bytes = first
    assert hits == 8 and same
    return int(block_bytes)


def test_agent_copies_over_ipc_and_releases_a_killed_engine(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=["--cuda", "--pin-threads", "8"]) as agent:
        assert agent.stats()["cuda_pinned"] == 1
        parent, proc = _spawn_engine(agent, _engine_body)
        try:
            assert _round_trip(parent) == LAYERS * 2 * 16 * 8 * 128 * 2
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


def test_the_agent_serves_gpu_engines_while_the_rest_of_its_pool_is_pinned(tmp_path: Path) -> None:
    """Ready once ``--cuda-ready-bytes`` are pinned, not the whole pool: a GPU engine's round
    trip is exact while pinning goes on, and every arena becomes usable once it ends."""
    pool, arena = 16 << 30, 64 << 20
    extra = ["--cuda", "--pin-threads", "1", "--cuda-ready-bytes", "1GiB"]  # one thread: slow on purpose
    with AgentProcess(tmp_path / "agent", "16GiB", extra_args=extra) as agent:
        at_ready = agent.stats()
        assert at_ready["cuda_pinned"] == 1
        assert 1 << 30 <= int(at_ready["cuda_pinned_bytes"]) < pool, at_ready
        assert 0 < int(at_ready["usable_arenas"]) < pool // arena
        parent, proc = _spawn_engine(agent, _engine_body)
        try:
            _round_trip(parent)
            print(f"round trip done with {int(agent.stats()['cuda_pinned_bytes']) >> 30} GiB of 16 pinned")
        finally:
            proc.kill()
            proc.join(10)

        def whole_pool_usable() -> bool:
            stats = agent.stats()
            return int(stats["cuda_pinned_bytes"]) == pool and int(stats["usable_arenas"]) == pool // arena

        wait_until("the whole pool pinned and every arena usable", whole_pool_usable, 300, every=0.2)
        print(f"ready at {int(at_ready['cuda_pinned_bytes']) >> 20} MiB pinned; whole pool pinned later")


LAYERED_NB, LAYERED_LAYERS, LAYERED_N = 1024, 8, 512


def _layered_engine_body(socket_path: str, conn: Any) -> None:
    """vLLM 0.26-like per-layer tensors (64 KiB blocks); 512 blocks saved, then loaded back
    layered into poisoned blocks: with the engine's stream waiting on each layer's event, a
    clone right after the reply sees the loaded bytes; without the waits it races the copy."""
    import torch

    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.cuda_kv import describe
    from kvfabric.connector.keys import chain_keys, request_seed

    shape = (LAYERED_NB, 8, 16, 256)
    kv = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERED_LAYERS)]
    spec = describe({f"l{i}": t for i, t in enumerate(kv)}, layer_events=True)
    c = AgentClient(socket_path, "gpu-engine-layered", timeout_s=30)
    reg = c.call(spec.request("gpu-layered"), p.GpuKVReply)
    saved = list(range(LAYERED_N))
    keys = chain_keys(list(range(LAYERED_N * 16)), 16, request_seed())
    slots = c.reserve("gpu-layered", keys, None).slots
    c.call(p.GpuCopy(kv_id=reg.kv_id, to_pool=True, block_ids=saved, slots=slots), p.GpuCopyReply)
    c.commit("gpu-layered", keys, [], 0.0)
    hit = c.lookup(["gpu-layered"], keys, 16, lease_id="L")
    contiguous = list(range(LAYERED_N, 2 * LAYERED_N))
    fragmented = torch.randperm(LAYERED_N).add(LAYERED_N).tolist()
    stream = torch.cuda.current_stream()
    results: dict[str, Any] = {"hits": hit.hits, "events_opened": reg.layered}
    for case, targets, wait in (
        ("dma", contiguous, True),
        ("staged", fragmented, True),
        ("no_wait", contiguous, False),
    ):
        for t in kv:
            t.view(torch.uint8)[targets] = 0xA5  # poison
        torch.cuda.synchronize()
        reply = c.call(
            p.GpuCopy(kv_id=reg.kv_id, to_pool=False, block_ids=targets, slots=hit.slots[0], layered=True),
            p.GpuCopyReply,
        )
        clones = []
        for i, t in enumerate(kv):
            if wait:
                stream.wait_event(spec.event_set(0)[i])
            clones.append(t[targets].clone())
        spec.event_set(0)[-1].synchronize()
        torch.cuda.synchronize()
        same = all(torch.equal(cl, t[saved]) for cl, t in zip(clones, kv, strict=True))
        results[case] = (reply.method, same)
    c.release(["L#0"], 3 * LAYERED_N)
    conn.send(results)


@pytest.mark.parametrize("pool_files", [1, 16])  # 16: 128 MiB files, the 256 MiB saved span three
def test_layered_load_orders_the_engine_stream_after_each_layer(tmp_path: Path, pool_files: int) -> None:
    args = ["--cuda", "--pin-threads", "8", "--pool-files", str(pool_files)]
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=args) as agent:
        parent, proc = _spawn_engine(agent, _layered_engine_body)
        try:
            assert parent.poll(180), "engine did not finish"
            results = parent.recv()
            assert "error" not in results, results
            assert results["hits"] == LAYERED_N
            assert results["events_opened"] is True
            assert results["dma"] == ("dma", True), results
            assert results["staged"] == ("staged", True), results
            # The control: the same load read without waiting on the events is not yet there,
            # so the waits above are what ordered the reads (the reply comes before the copy ends).
            assert results["no_wait"][1] is False, results
            print(results)
        finally:
            proc.kill()
            proc.join(10)


TRUST_NB, TRUST_BB = 16, 2 << 20  # 32 MiB tensors: each its own allocation in torch's allocator


def _crafted_registration_body(socket_path: str, conn: Any) -> None:
    """Two sessions: a victim engine registers and saves honestly; an attacker tries the review's
    crafted geometries (wrapping num_blocks, one block past its allocation, an offset past it)
    and copies to slots it does not hold. Every attempt must be refused and the victim's bytes
    stay as they were."""
    import torch

    from kvfabric.connector import protocol as p
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.errors import AgentRejected

    def share(t: torch.Tensor) -> tuple[bytes, int]:
        _dev, handle, _size, storage_offset, *_ = t.untyped_storage()._share_cuda_()
        return bytes(handle), int(storage_offset) + t.storage_offset() * t.element_size()

    uuid = str(torch.cuda.get_device_properties(0).uuid)

    event = torch.cuda.Event(interprocess=True)
    event.record()
    event_handle = bytes(event.ipc_handle())

    def register(
        c: AgentClient, ns: str, t: torch.Tensor, num_blocks: int, extra_off: int = 0, events: bool = False
    ) -> p.GpuKVReply:
        h, off = share(t)
        return c.call(
            p.RegisterGpuKV(
                namespace=ns,
                device_uuid=uuid,
                layout="block_chunk",
                num_blocks=num_blocks,
                plane_bytes=TRUST_BB,
                handles=[h],
                offsets=[off + extra_off],
                layer_events=[event_handle] if events else [],
            ),
            p.GpuKVReply,
        )

    out: dict[str, Any] = {}
    victim_kv = torch.full((TRUST_NB, TRUST_BB), 0xAB, dtype=torch.uint8, device="cuda")
    evil_kv = torch.full((TRUST_NB, TRUST_BB), 0x11, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    victim = AgentClient(socket_path, "victim", timeout_s=30)
    v_reg = register(victim, "victim-ns", victim_kv, TRUST_NB, events=True)
    out["victim_layered"] = v_reg.layered
    v_slots = victim.reserve("victim-ns", [b"v" * 16], None).slots
    victim.call(p.GpuCopy(kv_id=v_reg.kv_id, to_pool=True, block_ids=[0], slots=v_slots), p.GpuCopyReply)
    victim.commit("victim-ns", [b"v" * 16], [], 0.0)

    evil = AgentClient(socket_path, "attacker", timeout_s=30)
    refused: dict[str, str] = {}
    for case, blocks, extra in (
        ("wrapping_num_blocks", 1 << 32, 0),
        ("one_block_past_the_allocation", TRUST_NB + 1, 0),
        ("offset_past_the_allocation", 1, TRUST_NB * TRUST_BB),
    ):
        try:
            register(evil, f"evil-{case}", evil_kv, blocks, extra)
            refused[case] = "ACCEPTED"
        except AgentRejected as exc:
            refused[case] = exc.code
    out["registrations"] = refused
    # Honest geometry: accepted; but presenting the victim's event handle (what two engines with
    # the same PID in two pods do unwittingly) gets no layered loads.
    e_reg = register(evil, "evil-ns", evil_kv, TRUST_NB, events=True)
    out["clashing_events_layered"] = e_reg.layered
    copies: dict[str, str] = {}
    for case, req in (
        # into the victim's committed slot, which the attacker never reserved
        (
            "save_into_a_slot_not_reserved",
            p.GpuCopy(kv_id=e_reg.kv_id, to_pool=True, block_ids=[0], slots=v_slots),
        ),
        # out of the victim's slot, under no lease
        (
            "load_from_a_slot_not_leased",
            p.GpuCopy(kv_id=e_reg.kv_id, to_pool=False, block_ids=[0], slots=v_slots),
        ),
        # with the victim's kv_id (another session's registration)
        ("another_sessions_kv_id", p.GpuCopy(kv_id=v_reg.kv_id, to_pool=False, block_ids=[0], slots=v_slots)),
    ):
        try:
            evil.call(req, p.GpuCopyReply)
            copies[case] = "ACCEPTED"
        except AgentRejected as exc:
            copies[case] = exc.code
    e_slot = evil.reserve("evil-ns", [b"e" * 16], None).slots
    try:  # a block id past the registered geometry, into its own reserved slot
        evil.call(
            p.GpuCopy(kv_id=e_reg.kv_id, to_pool=True, block_ids=[TRUST_NB], slots=e_slot), p.GpuCopyReply
        )
        copies["block_id_out_of_range"] = "ACCEPTED"
    except AgentRejected as exc:
        copies["block_id_out_of_range"] = exc.code
    out["copies"] = copies
    torch.cuda.synchronize()
    out["victim_intact"] = bool((victim_kv == 0xAB).all().item())
    # The victim's own round trip still works: load block 0's slot into block 5.
    hit = victim.lookup(["victim-ns"], [b"v" * 16], 16, lease_id="V")
    victim.call(
        p.GpuCopy(kv_id=v_reg.kv_id, to_pool=False, block_ids=[5], slots=hit.slots[0]), p.GpuCopyReply
    )
    torch.cuda.synchronize()
    out["victim_round_trip"] = bool(torch.equal(victim_kv[5], victim_kv[0]))
    conn.send(out)


def test_crafted_registrations_and_unowned_slots_are_refused_and_other_kv_is_untouched(
    tmp_path: Path,
) -> None:
    with AgentProcess(tmp_path / "agent", "1GiB", extra_args=["--cuda", "--pin-threads", "8"]) as agent:
        parent, proc = _spawn_engine(agent, _crafted_registration_body)
        try:
            assert parent.poll(180), "engine did not finish"
            out = parent.recv()
            assert not (isinstance(out, tuple) and out[0] == "error"), out
            print(out)
            assert out["registrations"] == dict.fromkeys(out["registrations"], "gpu"), out
            assert out["copies"] == dict.fromkeys(out["copies"], "gpu"), out
            assert out["victim_intact"] and out["victim_round_trip"], out
            assert out["victim_layered"] is True and out["clashing_events_layered"] is False, out
            assert agent.http_status("/readyz") == 200 and agent.http_status("/healthz") == 200
        finally:
            proc.kill()
            proc.join(10)


def test_sigterm_during_pinning_stops_cleanly(tmp_path: Path) -> None:
    """A SIGTERM while the pool is still being pinned: the pinning threads stop at their next
    chunk and are joined before the pool is unmapped (it used to be unmapped under
    cudaHostRegister). The agent exits 0, quickly, and leaves no pool file."""
    import signal
    import subprocess
    import sys
    import time

    agent = AgentProcess(tmp_path / "agent", "48GiB", extra_args=["--cuda", "--pin-threads", "4"])
    args = [sys.executable, "-m", "kvfabric.agent.main", "--pool-size", "48GiB", "--http-port", "0"]
    args += [
        "--pool-path",
        str(agent.pool_path),
        "--socket",
        str(agent.socket_path),
        "--cuda",
        "--pin-threads",
        "4",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not agent.socket_path.exists():  # bound: pinning has started
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # well inside a 48 GiB pin (about 1 GiB/s per thread here)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - stopped
        print(f"stopped {took:.2f} s after SIGTERM")
        assert proc.returncode == 0, out[-3000:]
        assert not agent.pool_path.exists()
        assert "pool pinned for CUDA" not in out  # it really was interrupted
    finally:
        proc.kill()
        agent.cleanup()
