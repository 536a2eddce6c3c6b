"""Benchmarks of the agent's trust model: index cost at scale, and loop stalls under abuse.

    python -m benchmarks.run index      # in-process BlockIndex at 256k and 8M blocks
    python -m benchmarks.run stall      # a live agent: /healthz and a probe's lookups while
                                        # another model fills a full pool

Each prints its ratio against a baseline measured in the same run (the idle agent's latency;
a reserve into free space).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from e2e.agent import AgentProcess
from kvfabric.agent.index import BlockIndex
from kvfabric.agent.pool import SlotAllocator
from kvfabric.connector.client import AgentClient

CHAIN = 625  # a 10k-token prompt in blocks of 16


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _keys(prefix: int, n: int) -> list[bytes]:
    return [prefix.to_bytes(4, "little") + i.to_bytes(12, "little") for i in range(n)]


def _index_case(results: dict[str, Any], report: Any, label: str, n_blocks: int, block_bytes: int) -> None:
    pool = n_blocks * block_bytes
    gc.collect()
    rss0 = _rss_anon()
    idx = BlockIndex(SlotAllocator(pool, 64 << 20), max_session_bytes=pool)
    idx.register("A", block_bytes, 16)
    t0 = time.perf_counter()
    chains = n_blocks // CHAIN
    for c in range(chains):
        keys = _keys(c, CHAIN)
        idx.reserve("A", keys, None, 1)
        idx.commit("A", keys, [], 1)
    fill_s = time.perf_counter() - t0
    n = chains * CHAIN
    gc.collect()
    per_block = (_rss_anon() - rss0) / n
    report(results, f"index_{label}_bytes_per_block", per_block, "B", "target <= 100")
    report(results, f"index_{label}_reserve_commit_us_per_block", fill_s / n * 1e6, "us")
    t = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - t
    report(results, f"index_{label}_full_gc_ms_unfrozen", full_gc * 1e3, "ms")
    gc.freeze()  # what the agent does every 30 s
    t = time.perf_counter()
    gc.collect()
    frozen_gc = time.perf_counter() - t
    report(results, f"index_{label}_full_gc_ms_frozen", frozen_gc * 1e3, "ms", "target <= 50")
    gc.unfreeze()

    lookups = []
    for i in range(50):
        keys = _keys(i * (chains // 50), CHAIN)
        t = time.perf_counter()
        assert idx.lookup(["A"], keys, 16, 2, f"L{i}").hits == CHAIN
        lookups.append(time.perf_counter() - t)
    report(results, f"index_{label}_lookup_lease_625_ms_p50", statistics.median(lookups) * 1e3, "ms")
    t = time.perf_counter()
    idx.drop_session(2)  # 50 leases of 625 blocks
    report(results, f"index_{label}_drop_session_50_leases_ms", (time.perf_counter() - t) * 1e3, "ms")

    # A second model into the full pool: one 625-key save, reclaim succeeding (arenas of A).
    idx.register("B", block_bytes, 16)
    t = time.perf_counter()
    got = idx.reserve("B", _keys(1 << 30, CHAIN), None, 3)
    reclaim_s = time.perf_counter() - t
    assert sum(s >= 0 for s in got) == CHAIN
    idx.commit("B", _keys(1 << 30, CHAIN), [], 3)
    # Baseline, same run: a 625-key reserve into free slots (released by aborting a save).
    idx.register("C", block_bytes, 16)
    free_keys = _keys(1 << 29, CHAIN)
    idx.reserve("C", free_keys, None, 4)
    idx.commit("C", [], free_keys, 4)
    t = time.perf_counter()
    idx.reserve("C", free_keys, None, 4)
    free_s = time.perf_counter() - t
    report(results, f"index_{label}_second_model_save_625_ms", reclaim_s * 1e3, "ms", "target < 50")
    report(results, f"index_{label}_second_model_vs_free_space", reclaim_s / free_s, "x")
    # Blocked: one block leased in every arena of every other namespace (so none can be
    # emptied); 2,000 keys of a fourth model.
    idx.commit("C", free_keys, [], 4)
    pins = 0
    for ns in ("A", "B", "C"):
        space = idx.namespaces[ns]
        for arena in list(space.slots.arenas.values()):
            c = arena.cols
            slot = next(c.first + i for i, st in enumerate(c.states()) if st)
            assert idx.lookup([ns], [space.key_at(slot)], 16, 5, f"pin-{ns}-{slot}").hits == 1
            pins += 1
    idx.register("D", block_bytes, 16)
    t = time.perf_counter()
    blocked = idx.reserve("D", _keys(1 << 28, 2000), None, 6)
    blocked_s = time.perf_counter() - t
    report(results, f"index_{label}_blocked_save_2000_ms", blocked_s * 1e3, "ms", "target < 50")
    assert sum(s >= 0 for s in blocked) == 0
    del idx
    gc.collect()


def bench_index(results: dict[str, Any], tmp: Path, report: Any) -> None:
    print("Index at scale, in process (array columns per arena, a key table of slots), chains of 625 blocks")
    _index_case(results, report, "256k_2MiB", 262_144, 2 << 20)
    _index_case(results, report, "8M_64KiB", 8_388_608, 64 << 10)


def _probe_latencies(
    agent: AgentProcess, probe: AgentClient, keys: list[bytes], stop: threading.Event
) -> tuple[list[float], list[float]]:
    health: list[float] = []
    lookups: list[float] = []
    while not stop.is_set():
        t = time.perf_counter()
        with urllib.request.urlopen(agent.url + "/healthz", timeout=60) as r:
            r.read()
        health.append(time.perf_counter() - t)
        t = time.perf_counter()
        probe.lookup(["probe"], keys, 16)
        lookups.append(time.perf_counter() - t)
        time.sleep(0.005)
    return health, lookups


def bench_stall(results: dict[str, Any], tmp: Path, report: Any) -> None:
    print(
        "Loop stalls: a live agent (256 MiB pool, 4 KiB blocks, 64 MiB arenas); /healthz and a probe "
        "session's 8-key lookup while model B saves into a pool full of model A"
    )

    def pct(v: list[float], q: float) -> float:
        s = sorted(v)
        return s[min(len(s) - 1, int(q * len(s)))]

    with AgentProcess(tmp / "stall-agent", "256MiB", extra_args=["--session-share", "1"]) as agent:
        probe = AgentClient(str(agent.socket_path), "probe", timeout_s=60)
        probe.register_namespace("probe", 4096, 16)
        pkeys = _keys(7, 8)
        probe.reserve("probe", pkeys, None)
        probe.commit("probe", pkeys, [], 0.0)

        def measured(work: Any) -> tuple[list[float], list[float], float]:
            stop = threading.Event()
            out: list[Any] = []
            th = threading.Thread(target=lambda: out.append(_probe_latencies(agent, probe, pkeys, stop)))
            th.start()
            time.sleep(0.3)
            t = time.perf_counter()
            work()
            took = time.perf_counter() - t
            time.sleep(0.3)
            stop.set()
            th.join()
            return out[0][0], out[0][1], took

        idle_h, idle_l, _ = measured(lambda: time.sleep(2))
        filler = AgentClient(str(agent.socket_path), "filler", timeout_s=60)
        filler.register_namespace("A", 4096, 16)
        chains = [_keys(c, 8192) for c in range((256 << 20) // 4096 // 8192)]
        for keys in chains:  # the rest of the pool reserved by A: every block pinned
            filler.reserve("A", keys, None)
        saver = AgentClient(str(agent.socket_path), "model-b", timeout_s=60)
        saver.register_namespace("B", 4096, 16)
        blk_h, blk_l, blk_s = measured(lambda: saver.reserve("B", _keys(5000, 2000), None))
        for keys in chains:  # A's saves complete: 8,192-block chains (the quadratic case)
            filler.commit("A", keys, [], 0.0)

        def second_model() -> None:
            for c in range(4):
                keys = _keys(1000 + c, 8192)
                slots = saver.reserve("B", keys, None).slots
                saver.commit("B", [k for k, s in zip(keys, slots, strict=True) if s >= 0], [], 0.0)

        rec_h, rec_l, rec_s = measured(second_model)
        report(results, "stall_reclaim_arenas", float(agent.stats()["arenas_reclaimed"]), "")
        for name, h, lk, took in (
            ("idle", idle_h, idle_l, 0.0),
            ("reclaim", rec_h, rec_l, rec_s),
            ("blocked", blk_h, blk_l, blk_s),
        ):
            target = "" if name == "idle" else "target < 50"
            for what, values in (("healthz", h), ("probe_lookup", lk)):
                report(results, f"stall_{name}_{what}_p99_ms", pct(values, 0.99) * 1e3, "ms", target)
            if took:
                report(results, f"stall_{name}_work_s", took, "s")
        report(results, "stall_reclaim_healthz_p99_vs_idle", pct(rec_h, 0.99) / pct(idle_h, 0.99), "x")
        report(results, "stall_blocked_healthz_p99_vs_idle", pct(blk_h, 0.99) / pct(idle_h, 0.99), "x")
        for c in (probe, filler, saver):
            c.close()


def bench_sched(results: dict[str, Any], tmp: Path, report: Any) -> None:
    """The connector's per-step scheduler cost while 256 requests of 10k tokens decode (block
    16), against the same steps with saving off (the scheduler role's floor), same run. Every
    16th step all 256 requests fill a block at once: the worst step."""
    from types import SimpleNamespace

    from kvfabric.connector.config import ConnectorConfig
    from kvfabric.connector.scheduler import SchedulerSide

    n_req, ctx, bs, steps = 256, 10_000, 16, 64
    print(f"Scheduler per-step cost: {n_req} requests of {ctx} tokens decoding, block {bs}, {steps} steps")
    with AgentProcess(tmp / "sched-agent", "64MiB", extra_args=["--arena-size", "4MiB"]) as agent:

        def run(save: bool) -> list[float]:
            cfg = ConnectorConfig(socket_path=str(agent.socket_path), save=save, load=False)
            s = SchedulerSide(cfg, ["ns"], bs, "bench")
            reqs = []
            for r in range(n_req):
                tokens = [(r * 7 + i) % 4000 for i in range(ctx)]
                req = SimpleNamespace(
                    request_id=f"r{r}",
                    prompt_token_ids=list(tokens),
                    all_token_ids=tokens,
                    cache_salt=None,
                    lora_request=None,
                )
                s.get_num_new_matched_tokens(req, 0)
                reqs.append(req)
            # All requests already computed their prompts (their saves planned once, untimed).
            first = SimpleNamespace(
                scheduled_new_reqs=[
                    SimpleNamespace(
                        req_id=q.request_id, block_ids=(list(range(ctx // bs + 1)),), num_computed_tokens=0
                    )
                    for q in reqs
                ],
                num_scheduled_tokens={q.request_id: ctx for q in reqs},
                scheduled_cached_reqs=SimpleNamespace(
                    req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
                ),
                preempted_req_ids=set(),
            )
            s.build_connector_meta(first)
            times = []
            for step in range(steps):
                computed = ctx + step
                for q in reqs:
                    q.all_token_ids.append(step % 4000)
                fills = (computed + 1) % bs == 0
                out = SimpleNamespace(
                    scheduled_new_reqs=[],
                    num_scheduled_tokens={q.request_id: 1 for q in reqs},
                    scheduled_cached_reqs=SimpleNamespace(
                        req_ids=[q.request_id for q in reqs],
                        new_block_ids=[([computed // bs + 1],) if fills else None for _ in reqs],
                        resumed_req_ids=set(),
                        num_computed_tokens=[computed] * n_req,
                    ),
                    preempted_req_ids=set(),
                )
                t = time.perf_counter()
                s.build_connector_meta(out)
                times.append(time.perf_counter() - t)
            s.shutdown()
            return times

        base, ours = run(save=False), run(save=True)
    added = [o - b for o, b in zip(ours, base, strict=True)]
    report(results, "sched_step_ms_saving_off_mean", statistics.mean(base) * 1e3, "ms")
    report(results, "sched_step_ms_mean", statistics.mean(ours) * 1e3, "ms")
    report(results, "sched_step_added_ms_mean", statistics.mean(added) * 1e3, "ms", "target < 1")
    report(
        results, "sched_step_added_ms_max", max(added) * 1e3, "ms", "(the step where all 256 fill a block)"
    )
