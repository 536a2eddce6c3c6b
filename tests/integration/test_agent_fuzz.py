"""A bounded fuzz tier against a live agent: random and mutated frames, overflowing values,
clients that vanish mid-frame or never read, while a well-behaved engine keeps a leased block
whose bytes and lookups it checks throughout. The agent must keep serving it correctly, never
answer ``internal``, and keep its memory bounded."""

from __future__ import annotations

import mmap
import os
import random
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest

from e2e.agent import AgentProcess
from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient

pytestmark = pytest.mark.integration
SECONDS = float(os.environ.get("KVFABRIC_FUZZ_SECONDS", "12"))
THREADS = 4
BB = 4096
EDGE = [0, 1, -1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 4095, 4096, float("nan"), float("inf"), 1e308]


def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon")


def valid_requests(rng: random.Random) -> list[dict]:
    keys = [bytes([rng.randrange(8)]) * 16 for _ in range(rng.randrange(1, 6))]
    ns = rng.choice(["fz", "fz2", "probe-ns"])
    return [
        {"op": "register_namespace", "namespace": ns, "block_bytes": BB, "block_tokens": 16},
        {
            "op": "lookup",
            "namespaces": [ns],
            "keys": keys,
            "block_tokens": 16,
            "lease_id": f"l{rng.randrange(4)}",
        },
        {"op": "reserve", "namespace": ns, "keys": keys},
        {"op": "commit", "namespace": ns, "keys": keys[: len(keys) // 2], "abort": keys[len(keys) // 2 :]},
        {
            "op": "release",
            "lease_ids": [f"l{rng.randrange(4)}#0", f"l{rng.randrange(4)}#0/{rng.randrange(9)}"],
        },
        {"op": "stats"},
        {"op": "open_pool", "writable": rng.random() < 0.5},
        {"op": "gpu_copy", "kv_id": 1, "to_pool": True, "block_ids": [0], "slots": [0]},
    ]


def mutate(rng: random.Random, obj: dict) -> object:
    obj = dict(obj)
    choice = rng.randrange(6)
    field = rng.choice(list(obj))
    if choice == 0:
        obj[field] = rng.choice(EDGE)
    elif choice == 1:
        obj[field] = "x" * rng.choice([0, 129, 5000])
    elif choice == 2:
        obj[field] = [rng.choice(EDGE)] * rng.choice([1, 1025, 70000])
    elif choice == 3:
        obj["unknown"] = 1
    elif choice == 4:
        del obj[field]
    else:
        return [obj] * 3
    return obj


def fuzz_connection(rng: random.Random, path: str, replies: dict[str, int], lock: threading.Lock) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        mode = rng.randrange(10)
        if mode == 0:  # garbage before hello
            s.sendall(rng.randbytes(rng.randrange(1, 64)))
        elif mode == 1:  # a huge header, then gone
            s.sendall(p.HEADER.pack(rng.choice([5000, 60 << 20, 2**32 - 1])) + b"\x00" * 100)
            return
        if mode != 0:
            s.sendall(p.encode(p.Hello(protocol_version=p.PROTOCOL_VERSION, client="fuzz")))
        for _ in range(rng.randrange(1, 40)):
            kind = rng.randrange(4)
            if kind == 0:
                body = msgspec.msgpack.encode(rng.choice(valid_requests(rng)))
            elif kind == 1:
                body = msgspec.msgpack.encode(mutate(rng, rng.choice(valid_requests(rng))))
            elif kind == 2:
                body = bytearray(msgspec.msgpack.encode(rng.choice(valid_requests(rng))))
                for _ in range(rng.randrange(1, 4)):
                    body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
                body = bytes(body)
            elif rng.random() < 0.1:  # deep nesting (was an internal error with a traceback)
                body = b"\x91" * rng.randrange(1000, 300_000) + b"\xc0"
            else:
                body = rng.randbytes(rng.randrange(0, 256))
            if rng.random() < 0.03:  # vanish mid-frame
                s.sendall(p.HEADER.pack(len(body) + 10) + body)
                return
            s.sendall(p.frame(body))
            if rng.random() < 0.05:  # vanish with the reply unread
                return
            header = s.recv(4, socket.MSG_WAITALL)
            if len(header) < 4:
                return  # the agent closed it (fatal errors do)
            (n,) = p.HEADER.unpack(header)
            reply = p.reply_decoder.decode(s.recv(n, socket.MSG_WAITALL))
            kind_name = reply.code if isinstance(reply, p.ErrorReply) else type(reply).__name__
            with lock:
                replies[kind_name] = replies.get(kind_name, 0) + 1
    except (OSError, msgspec.DecodeError):
        pass
    finally:
        s.close()


def test_fuzzed_frames_never_hurt_a_well_behaved_engine(tmp_path: Path) -> None:
    with AgentProcess(
        tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB", "--hello-timeout-s", "2"]
    ) as agent:
        assert agent.proc is not None
        probe = AgentClient(str(agent.socket_path), "probe", timeout_s=5)
        try:
            probe.register_namespace("probe-ns", BB, 16)
            key = b"\xee" * 16
            slot = probe.reserve("probe-ns", [key], None).slots[0]
            assert probe.hello is not None
            fd = os.open(probe.hello.pool_path, os.O_RDWR)
            pool = mmap.mmap(fd, probe.hello.pool_bytes)
            os.close(fd)
            pool[slot * BB : (slot + 1) * BB] = b"\x5a" * BB
            probe.commit("probe-ns", [key], [], 0.0)
            probe.lookup(["probe-ns"], [key], 16, lease_id="probe-lease")
            rss_before = rss_anon_kib(agent.proc.pid)

            replies: dict[str, int] = {}
            lock = threading.Lock()
            stop = time.monotonic() + SECONDS

            def worker(seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < stop:
                    fuzz_connection(rng, str(agent.socket_path), replies, lock)

            threads = [threading.Thread(target=worker, args=(20261201 + i,)) for i in range(THREADS)]
            for t in threads:
                t.start()
            probe_latency: list[float] = []
            while any(t.is_alive() for t in threads):
                started = time.perf_counter()
                assert probe.lookup(["probe-ns"], [key], 16).hits == 1
                probe_latency.append(time.perf_counter() - started)
                assert pool[slot * BB : (slot + 1) * BB] == b"\x5a" * BB  # never evicted or rewritten
                time.sleep(0.02)
            for t in threads:
                t.join()
            rss_after = rss_anon_kib(agent.proc.pid)
            frames = sum(replies.values())
            print(
                f"{frames} replies {dict(sorted(replies.items()))}; RSS anon {rss_before} -> {rss_after} KiB"
            )
            probe_latency.sort()
            p99 = probe_latency[int(0.99 * len(probe_latency))]
            print(f"probe lookups {len(probe_latency)}, p99 {p99 * 1e3:.1f} ms")
            assert frames > 1000 and "internal" not in replies, replies
            assert rss_after - rss_before < 64 * 1024, "the agent's memory grew by more than 64 MiB"
            assert agent.http_status("/healthz") == 200 and agent.http_status("/readyz") == 200

            def settled() -> bool:
                s = agent.stats()
                return s["sessions"] == 1 and s["blocks_reserved"] == 0 and s["leases_active"] == 1

            deadline = time.monotonic() + 5
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = agent.stats()
            assert settled(), stats  # every fuzz session's state went with it; the probe's stayed
            assert stats["pool_used_bytes"] == stats["blocks_committed"] * BB
            assert "Traceback" not in agent.log_tail(1 << 20)
            pool.close()
        finally:
            probe.close()
