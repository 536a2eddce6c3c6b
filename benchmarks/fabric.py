"""The fabric between two "nodes" (network namespaces on a bridge, as the multihost tests).

    python -m benchmarks.run fabric         # remote pull GB/s vs a plain 2-stream socket copy
    python -m benchmarks.run fabric_index   # Valkey publish / lookup latency, memory per block
    python -m benchmarks.run fabric_ttft    # TTFT: remote hit vs recompute vs local hit

Baselines are measured in the same run over the same veth links: the pull against a plain
two-stream TCP copy of the same bytes (``sendall`` from memory into ``recv_into`` a buffer,
target >= 0.8x); a remote hit's TTFT against recomputing and against a local hit. Needs root
(network namespaces); run by hand, not in ``make test``.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = Callable[..., None]

BLOCK = 2 << 20  # 2 MiB: an 8B model's 16-token block over all layers
BLOCKS = 256  # 512 MiB per pull round
NS = "bench-fabric"

_SOCKET_COPY = r"""
import socket, sys, threading, time
mode, host, port, total, streams = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
part = total // streams
if mode == "recv":
    srv = socket.create_server((host, port), backlog=streams)
    print("ready", flush=True)
    conns = [srv.accept()[0] for _ in range(streams)]
    bufs = [bytearray(part) for _ in conns]
    def drain(c, b):
        view, got = memoryview(b), 0
        while got < part:
            got += c.recv_into(view[got:], min(4 << 20, part - got))
    t = time.perf_counter()
    ts = [threading.Thread(target=drain, args=(c, b)) for c, b in zip(conns, bufs)]
    [x.start() for x in ts]; [x.join() for x in ts]
    print(time.perf_counter() - t, flush=True)
else:
    data = bytes(part)
    def push():
        with socket.create_connection((host, port)) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            c.sendall(data)
    ts = [threading.Thread(target=push) for _ in range(streams)]
    [x.start() for x in ts]; [x.join() for x in ts]
"""


def _socket_copy_gbps(fabric: Any, total: int, port: int = 7460) -> float:
    """A plain two-stream TCP copy of ``total`` bytes from node 0 to node 1."""
    a, b = fabric.nodes
    recv = subprocess.Popen(
        [
            *fabric.prefix(b.name),
            sys.executable,
            "-c",
            _SOCKET_COPY,
            "recv",
            b.address,
            str(port),
            str(total),
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "ready"
    subprocess.run(
        [
            *fabric.prefix(a.name),
            sys.executable,
            "-c",
            _SOCKET_COPY,
            "send",
            b.address,
            str(port),
            str(total),
            "2",
        ],
        check=True,
    )
    seconds = float(recv.stdout.readline())
    recv.wait()
    return total / seconds / 1e9


def _agents(fabric: Any, tmp: Path, valkey_port: int, pool: str, transport: str = "auto") -> list[Any]:
    extra = ["--fabric-pull-deadline-ms", "20000", "--fabric-transport", transport]
    return [fabric.agent(i, tmp, valkey_port, pool, extra) for i in range(len(fabric.nodes))]


def bench_pull(results: dict[str, Any], tmp: Path, report: Report, rounds: int = 5) -> None:
    for transport in ("stream", "nixl"):
        _bench_pull(results, tmp / transport, report, transport, rounds)


def _bench_pull(results: dict[str, Any], tmp: Path, report: Report, transport: str, rounds: int) -> None:
    from e2e.agent import wait_until
    from e2e.netns import Fabric
    from e2e.valkey import ValkeyProcess
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.keys import chain_keys, request_seed

    print(
        f"fabric pull ({transport}): {BLOCKS} x {BLOCK >> 20} MiB blocks from node A's agent into node B's (veth)"
    )
    total = BLOCKS * BLOCK
    with Fabric(2) as fabric, ValkeyProcess(tmp / "valkey", "0.0.0.0", 6391, fabric.prefix(fabric.hub)):
        a, b = _agents(
            fabric, tmp, 6391, "2GiB", transport
        )  # a pull may take half the pool (--session-share)
        with a, b:
            writer = AgentClient(str(a.socket_path), "bench-a")
            reader = AgentClient(str(b.socket_path), "bench-b")
            writer.register_namespace(NS, BLOCK, 16)
            reader.register_namespace(NS, BLOCK, 16)
            pulls, copies = [], []
            for r in range(rounds + 1):  # round 0 warms the peers' transport up
                keys = chain_keys(list(range(16 * BLOCKS)), 16, request_seed([f"round{r}"]))
                slots = writer.reserve(NS, keys, None).slots
                with open(a.pool_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
                    for s in slots:
                        m[s * BLOCK : s * BLOCK + 16] = os.urandom(16)
                writer.commit(NS, keys, [], 0.0)
                wait_until("published", lambda n=(r + 1) * BLOCKS: a.stats()["valkey_published"] >= n, 30)
                started = time.perf_counter()
                while (reply := reader.lookup([NS], keys, 16, promote=True)).hits < BLOCKS:
                    if not reply.promoting:
                        stats = {
                            k: v
                            for k, v in b.stats().items()
                            if k.startswith(
                                ("remote", "valkey", "evict", "blocks_", "committed", "reserve", "aborted")
                            )
                        }
                        raise RuntimeError(f"pull round {r} brought {reply.hits} of {BLOCKS} blocks: {stats}")
                    time.sleep(0.001)
                if r:
                    pulls.append(total / (time.perf_counter() - started) / 1e9)
                    copies.append(_socket_copy_gbps(fabric, total))
            writer.close()
            reader.close()
    pulls.sort()
    copies.sort()
    pull, copy = pulls[len(pulls) // 2], copies[len(copies) // 2]
    t = transport
    report(
        results, f"fabric_pull_{t}_gbps_median", pull, "GB/s", f"(min {pulls[0]:.2f}, max {pulls[-1]:.2f})"
    )
    spread = f"(min {copies[0]:.2f}, max {copies[-1]:.2f})"
    report(results, f"fabric_socket_copy_2streams_{t}_run_gbps", copy, "GB/s", spread)
    report(results, f"fabric_pull_{t}_vs_socket_copy", pull / copy, "x", "target >= 0.8")


_INDEX_CLIENT = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
from kvfabric.agent.remote_index import ValkeyIndex
import valkey
url, n = sys.argv[1], int(sys.argv[2])
c = valkey.Valkey.from_url(url)
before = c.info("memory")["used_memory"]
idx = ValkeyIndex(url, "bench", "10.231.0.2:7450", batch=10000)
keys = [os.urandom(16) for _ in range(n)]
t = time.perf_counter()
for start in range(0, n, 10000):
    idx._write([("ns", k) for k in keys[start:start + 10000]], [])
publish = (time.perf_counter() - t) / (n / 10000)
after = c.info("memory")["used_memory"]
lat = []
other = ValkeyIndex(url, "bench", "10.231.0.3:7450")
for i in range(200):
    chain = keys[i * 625:(i + 1) * 625]
    t = time.perf_counter()
    found = other.locate(["ns"], chain)
    lat.append(time.perf_counter() - t)
    assert all(h == "10.231.0.2:7450" for h in found), found[:3]
lat.sort()
print(json.dumps({"publish_10k_ms": publish * 1e3, "bytes_per_block": (after - before) / n,
                  "lookup_625_p50_ms": lat[100] * 1e3, "lookup_625_p99_ms": lat[198] * 1e3}))
"""


def bench_index(results: dict[str, Any], tmp: Path, report: Report, blocks: int = 1_000_000) -> None:
    from e2e.netns import Fabric
    from e2e.valkey import ValkeyProcess

    print(f"fabric index: {blocks:,} blocks published to Valkey (in the hub) from node A's namespace")
    src = str(Path(__file__).resolve().parents[1] / "node-agent" / "src")
    with Fabric(1) as fabric, ValkeyProcess(tmp / "valkey-index", "0.0.0.0", 6392, fabric.prefix(fabric.hub)):
        out = subprocess.run(
            [*fabric.prefix(fabric.nodes[0].name), sys.executable, "-c", _INDEX_CLIENT,
             f"valkey://{fabric.hub_address}:6392/0", str(blocks), src],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    m = json.loads(out.strip().splitlines()[-1])
    report(results, "valkey_publish_10k_blocks_ms", m["publish_10k_ms"], "ms", "one pipelined batch")
    report(results, "valkey_bytes_per_block", m["bytes_per_block"], "B", f"at {blocks:,} blocks")
    report(results, "valkey_lookup_625_blocks_p50_ms", m["lookup_625_p50_ms"], "ms", "one MGET (10k tokens)")
    report(results, "valkey_lookup_625_blocks_p99_ms", m["lookup_625_p99_ms"], "ms")


def bench_ttft(results: dict[str, Any], tmp: Path, report: Report, prompts: int = 4) -> None:
    import random

    from e2e import tiny_model
    from e2e.engine import EngineProcess
    from e2e.netns import Fabric
    from e2e.valkey import ValkeyProcess

    print(
        f"fabric TTFT: {prompts} prompts of 4096 tokens, tiny Llama fp32 on the CPU; node A served them, node B asks"
    )
    model = tiny_model.build(tmp / "model")
    rng = random.Random(5)
    vocab = tiny_model.CONFIG["vocab_size"]
    batch = [[rng.randrange(3, vocab) for _ in range(4096)] for _ in range(prompts)]
    warm = [[rng.randrange(3, vocab) for _ in range(300)]]
    first_contact = [[rng.randrange(3, vocab) for _ in range(1024)]]  # A serves it, B pulls it first
    cfg = lambda agent: {"socket_path": str(agent.socket_path), "promote_wait_ms": 5000}  # noqa: E731
    ttft: dict[str, float] = {}
    with Fabric(2) as fabric, ValkeyProcess(tmp / "valkey-ttft", "0.0.0.0", 6393, fabric.prefix(fabric.hub)):
        a, b = _agents(fabric, tmp / "ttft", 6393, "2GiB")
        with a, b:
            with EngineProcess(model, tmp, None, log_name="fabric-none") as e:
                e.generate(warm, 1)
                ttft["recompute"] = sum(e.generate([p], 1)[0].seconds for p in batch) / prompts
            with EngineProcess(model, tmp, cfg(a), log_name="fabric-a") as e:
                e.generate(warm, 1)
                e.generate(batch + first_contact, 1)  # A holds them
            with EngineProcess(model, tmp, cfg(a), log_name="fabric-a2") as e:
                e.generate(warm, 1)
                ttft["local_hit"] = sum(e.generate([p], 1)[0].seconds for p in batch) / prompts
            with EngineProcess(model, tmp, cfg(b), log_name="fabric-b") as e:
                e.generate(warm, 1)
                assert e.generate(first_contact, 1)[0].cached_tokens > 0  # the peers' transport set up
                outs = [e.generate([p], 1)[0] for p in batch]
                assert all(o.cached_tokens > 0 for o in outs), [o.cached_tokens for o in outs]
                ttft["remote_hit"] = sum(o.seconds for o in outs) / prompts
    for k, v in ttft.items():
        report(results, f"fabric_ttft_{k}_ms", v * 1000, "ms")
    report(results, "fabric_ttft_remote_vs_recompute", ttft["remote_hit"] / ttft["recompute"], "x")
    report(results, "fabric_ttft_remote_vs_local_hit", ttft["remote_hit"] / ttft["local_hit"], "x")
