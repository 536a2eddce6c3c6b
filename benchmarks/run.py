"""``make bench``: every benchmark prints a ratio against a baseline measured in the same run.

    python -m benchmarks.run [ttft] [rpc] [copy] [index] [stall] [sched] [nvme] [nvme_ttft]
                             [tier_policy] [fabric] [fabric_index] [fabric_ttft]   (default: all)

Results go to stdout and ``benchmarks/out/results.json``; record them in RESULTS.md with the
machine and date.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import fabric, nvme, tier_policy, trust  # noqa: E402
from e2e import tiny_model  # noqa: E402
from e2e.agent import AgentProcess  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

OUT = REPO / "benchmarks" / "out"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def report(results: dict[str, Any], name: str, value: float, unit: str, target: str = "") -> None:
    results[name] = value
    print(f"  {name:<52} {value:>12.4f} {unit:<6} {target}", flush=True)


# -- TTFT ----------------------------------------------------------------------------------------------


def bench_ttft(results: dict[str, Any], tmp: Path, rounds: int = 2, per_round: int = 4) -> None:
    print(
        f"TTFT: 4096-token prompts, tiny Llama fp32 on the CPU, engine restarted between cold and warm; "
        f"{rounds} interleaved rounds x {per_round} prompts per configuration (this machine is noisy)"
    )
    model = tiny_model.build(tmp / "model")
    rng = random.Random(11)
    vocab = tiny_model.CONFIG["vocab_size"]
    warmup = [rng.randrange(3, vocab) for _ in range(300)]
    samples: dict[str, list[float]] = {}

    def serve(key: str, prompts: list[list[int]], cfg: dict[str, Any] | None, ex: Path | None = None) -> None:
        with EngineProcess(model, tmp, cfg, example_connector_dir=ex, log_name=key) as e:
            e.generate([[t + 1 for t in warmup]], 1)  # first-request warm-up, not measured
            samples.setdefault(key, []).extend(o.seconds for o in e.generate(prompts, 1))

    with AgentProcess(tmp / "agent", "2GiB") as agent:
        agent.wait_prefaulted()
        cfg = {"socket_path": str(agent.socket_path)}
        for r in range(rounds):
            prompts = [[rng.randrange(3, vocab) for _ in range(4096)] for _ in range(per_round)]
            ex_dir = tmp / f"example-connector-{r}"
            serve("none", prompts, None)
            serve("kvf_cold", prompts, cfg)
            serve("kvf_warm", prompts, cfg)
            serve("ex_cold", prompts, None, ex_dir)
            serve("ex_warm", prompts, None, ex_dir)

    med = {k: statistics.median(v) for k, v in samples.items()}
    report(results, "ttft_no_connector_ms", med["none"] * 1e3, "ms")
    report(results, "ttft_kvfabric_cold_ms", med["kvf_cold"] * 1e3, "ms")
    report(results, "ttft_kvfabric_warm_ms", med["kvf_warm"] * 1e3, "ms")
    report(results, "ttft_example_cold_ms", med["ex_cold"] * 1e3, "ms")
    report(results, "ttft_example_warm_ms", med["ex_warm"] * 1e3, "ms")
    report(results, "ratio_warm_over_cold", med["kvf_warm"] / med["kvf_cold"], "x", "target <= 0.10")
    report(results, "ratio_miss_overhead", med["kvf_cold"] / med["none"], "x", "target <= 1.05")
    report(results, "ratio_warm_vs_example_warm", med["kvf_warm"] / med["ex_warm"], "x", "target < 1")
    report(results, "ratio_cold_vs_example_cold", med["kvf_cold"] / med["ex_cold"], "x", "target <= 1")
    spread = {k: (min(v) * 1e3, max(v) * 1e3) for k, v in samples.items()}
    print(
        "  min-max ms per configuration: " + ", ".join(f"{k} {a:.0f}-{b:.0f}" for k, (a, b) in spread.items())
    )


# -- agent round trips -------------------------------------------------------------------------------


def bench_rpc(results: dict[str, Any], tmp: Path) -> None:
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.keys import chain_keys, request_seed

    print("Agent RPC: lookup + lease of a 10k-token prompt (78 blocks of 128 tokens), Unix socket")
    with AgentProcess(tmp / "agent-rpc", "1GiB", extra_args=["--log-level", "WARNING"]) as agent:
        c = AgentClient(str(agent.socket_path), "bench", timeout_s=5)
        c.register_namespace("ns", 64 * 1024, 128)
        keys = chain_keys(list(range(10_000)), 128, request_seed())
        c.reserve("ns", keys, None)
        c.commit("ns", keys, [], 0.0)
        lat: list[float] = []
        rel: list[float] = []
        for i in range(3000):
            t0 = time.perf_counter()
            reply = c.lookup(["ns"], keys, 128, lease_id=f"l{i}")
            t1 = time.perf_counter()
            c.release([f"l{i}#0"])
            t2 = time.perf_counter()
            assert reply.hits == len(keys)
            if i >= 200:
                lat.append(t1 - t0)
                rel.append(t2 - t1)
        report(results, "rpc_lookup_lease_p50_ms", pct(lat, 0.5) * 1e3, "ms", "target < 1 ms")
        report(results, "rpc_lookup_lease_p99_ms", pct(lat, 0.99) * 1e3, "ms")
        report(results, "rpc_release_p50_ms", pct(rel, 0.5) * 1e3, "ms")
        # block operations: reserve + commit of fresh 78-block chains, evicting as the pool fills
        n_batches = 400
        t0 = time.perf_counter()
        for b in range(n_batches):
            ks = chain_keys(list(range(10_000)), 128, request_seed([str(b)]))
            c.reserve("ns", ks, None)
            c.commit("ns", ks, [], 0.0)
        dt = time.perf_counter() - t0
        report(results, "block_saves_per_s (reserve+commit)", n_batches * len(keys) / dt, "blk/s")
        report(results, "block_lookups_per_s (lookup+lease)", len(keys) / pct(lat, 0.5), "blk/s")
        # A GPU engine's shape: vLLM's 16-token blocks, 624 keys for a 10k-token prompt; the
        # baseline is the same round trip for one key (the fixed cost of an RPC)
        c.register_namespace("ns16", 16 * 1024, 16)
        keys16 = chain_keys(list(range(10_000)), 16, request_seed(["16"]))
        c.reserve("ns16", keys16, None)
        c.commit("ns16", keys16, [], 0.0)
        timed: dict[int, list[float]] = {1: [], len(keys16): []}
        for i in range(1200):
            for n, lats in timed.items():
                t0 = time.perf_counter()
                reply = c.lookup(["ns16"], keys16[:n], 16, lease_id=f"g{i}-{n}")
                lats.append(time.perf_counter() - t0)
                assert reply.hits == n
                c.release([f"g{i}-{n}#0"])
        one, many = pct(timed[1][200:], 0.5), pct(timed[len(keys16)][200:], 0.5)
        report(results, "rpc_lookup_lease_624_keys_p50_ms", many * 1e3, "ms")
        report(results, "rpc_lookup_lease_1_key_p50_ms", one * 1e3, "ms")
        report(results, "rpc_lookup_lease 624 keys / 1 key", many / one, "x")
        c.close()


# -- copies -----------------------------------------------------------------------------------------------


def bench_copy(results: dict[str, Any], tmp: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from kvfabric.connector.config import ConnectorConfig
        from kvfabric.connector.keys import LayoutSpec, chain_keys, request_seed
        from kvfabric.connector.metadata import KVFabricMetadata, LoadIntent, SaveIntent
        from kvfabric.connector.worker import WorkerSide

    from kvfabric.connector.client import AgentClient

    layers, heads, bs, hs, nblocks, n = 4, 2, 128, 64, 256, 64
    print(
        f"Copies through the connector (save: reserve+copy+commit; load: copy+release), {n} blocks of "
        f"{layers * heads * bs * 2 * hs * 4 // 1024} KiB, vs torch copy_ of the same bytes"
    )
    spec = LayoutSpec("bench", "float32", "auto", layers, heads, hs, bs, 1, 0, "cpu")
    with AgentProcess(tmp / "agent-copy", "1GiB", extra_args=["--log-level", "WARNING"]) as agent:
        agent.wait_prefaulted()
        w = WorkerSide(ConnectorConfig(socket_path=str(agent.socket_path)), spec, "bench")
        kv = [torch.randn(nblocks, heads, bs, 2 * hs) for _ in range(layers)]
        w.register_kv_caches({f"l{i}": t for i, t in enumerate(kv)})
        assert w.copier is not None
        for t in threading.enumerate():  # let the background prefault finish: measure copies only
            if t.name == "kvfabric-prefault":
                t.join()
        nbytes = n * w.copier.block_bytes
        sched = AgentClient(str(agent.socket_path), "sched")
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        rng = random.Random(3)
        for placement in ("contiguous", "fragmented"):
            save_t, load_t, base_t = [], [], []
            for rep in range(12):
                if placement == "contiguous":
                    blocks = list(range(1, 1 + n))
                else:
                    blocks = rng.sample(range(1, nblocks), n)
                keys = chain_keys(list(range(n * bs)), bs, request_seed([placement, str(rep)]))
                t0 = time.perf_counter()
                w.wait_for_save(KVFabricMetadata(saves=[SaveIntent("r", tuple(blocks), tuple(keys), None)]))
                t1 = time.perf_counter()
                reply = sched.lookup([spec.namespace()], keys, bs, lease_id=f"b{rep}")
                slots = reply.slots[0]
                if placement == "fragmented":
                    order = rng.sample(range(n), n)
                    targets = tuple(blocks[i] for i in order)
                    slot_t = (tuple(slots[i] for i in order),)
                else:
                    targets, slot_t = tuple(blocks), (tuple(slots),)
                t2 = time.perf_counter()
                w.start_load_kv(
                    KVFabricMetadata(loads=[LoadIntent("r", f"b{rep}", reply.pool_id, targets, slot_t)])
                )
                t3 = time.perf_counter()
                assert not w.get_block_ids_with_load_errors()
                t4 = time.perf_counter()
                dst.copy_(src)
                t5 = time.perf_counter()
                if rep >= 2:
                    save_t.append(t1 - t0)
                    load_t.append(t3 - t2)
                    base_t.append(t5 - t4)
            gbs = lambda t: nbytes / statistics.median(t) / 1e9  # noqa: E731
            report(results, f"copy_{placement}_memcpy_GBps", gbs(base_t), "GB/s")
            report(results, f"copy_{placement}_save_GBps", gbs(save_t), "GB/s")
            report(results, f"copy_{placement}_load_GBps", gbs(load_t), "GB/s")
            report(
                results, f"ratio_{placement}_save_vs_memcpy", gbs(save_t) / gbs(base_t), "x", "target >= 0.7"
            )
            report(
                results, f"ratio_{placement}_load_vs_memcpy", gbs(load_t) / gbs(base_t), "x", "target >= 0.7"
            )
        sched.close()
        w.shutdown()


def bench_index(results: dict[str, Any], tmp: Path) -> None:
    trust.bench_index(results, tmp, report)


def bench_stall(results: dict[str, Any], tmp: Path) -> None:
    trust.bench_stall(results, tmp, report)


def bench_sched(results: dict[str, Any], tmp: Path) -> None:
    trust.bench_sched(results, tmp, report)


def bench_nvme(results: dict[str, Any], tmp: Path) -> None:
    nvme.bench_tier(results, tmp, report)


def bench_nvme_ttft(results: dict[str, Any], tmp: Path) -> None:
    nvme.bench_ttft(results, tmp, report)


def bench_fabric(results: dict[str, Any], tmp: Path) -> None:
    fabric.bench_pull(results, tmp, report)


def bench_fabric_index(results: dict[str, Any], tmp: Path) -> None:
    fabric.bench_index(results, tmp, report)


def bench_fabric_ttft(results: dict[str, Any], tmp: Path) -> None:
    fabric.bench_ttft(results, tmp, report)


def bench_tier_policy(results: dict[str, Any], tmp: Path) -> None:
    tier_policy.bench_policy(results, report)


BENCHES = {
    "ttft": bench_ttft,
    "rpc": bench_rpc,
    "copy": bench_copy,
    "index": bench_index,
    "stall": bench_stall,
    "sched": bench_sched,
    "nvme": bench_nvme,
    "nvme_ttft": bench_nvme_ttft,
    "tier_policy": bench_tier_policy,
    "fabric": bench_fabric,
    "fabric_index": bench_fabric_index,
    "fabric_ttft": bench_fabric_ttft,
}


def main(argv: list[str]) -> None:
    chosen = argv or list(BENCHES)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(f"KVFabric benchmarks, {results['date']}, {results['machine']}")
    with tempfile.TemporaryDirectory(prefix="kvfabric-bench-") as d:
        for name in chosen:
            BENCHES[name](results, Path(d))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
