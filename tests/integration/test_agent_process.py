"""A real agent process: protocol robustness, sessions, lifecycle and metrics."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from e2e.agent import AgentProcess, read_reply
from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient
from kvfabric.connector.errors import AgentRejected, AgentUnavailable

pytestmark = pytest.mark.integration
KEYS = [bytes([i]) * 16 for i in range(8)]


_OPEN: list[socket.socket | AgentClient] = []


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def raw(agent: AgentProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    _OPEN.append(s)
    s.settimeout(5)
    s.connect(str(agent.socket_path))
    return s


def hello(s: socket.socket) -> None:
    s.sendall(p.encode(p.Hello(protocol_version=p.PROTOCOL_VERSION, client="raw")))
    reply = read_reply(s)
    assert isinstance(reply, p.HelloReply)
    assert "layered_loads" in reply.features  # what connectors check before sending layer events


def client(agent: AgentProcess, **kw: float) -> AgentClient:
    c = AgentClient(str(agent.socket_path), "test", **kw)
    _OPEN.append(c)
    return c


def test_save_lookup_lease_release_through_a_real_agent(agent: AgentProcess) -> None:
    c = client(agent)
    c.register_namespace("ns", 4096, 16)
    assert c.reserve("ns", KEYS[:4], None).slots == [0, 1, 2, 3]
    assert c.lookup(["ns"], KEYS[:4], 16).hits == 0  # reserved, not committed
    assert c.commit("ns", KEYS[:3], [KEYS[3]], 0.001).committed == 3
    reply = c.lookup(["ns"], KEYS[:4], 16, lease_id="L")
    assert reply.hits == 3 and reply.slots == [[0, 1, 2]] and reply.pool_id == c.hello.pool_id  # type: ignore[union-attr]
    assert c.release(["L#0", "nope"], loaded_blocks=3) == [True, False]
    s = agent.stats()
    assert s["hit_blocks"] == 3 and s["loaded_bytes"] == 3 * 4096 and s["leases_active"] == 0


@pytest.mark.parametrize(
    ("payload", "closes"),
    [
        (b"\xc1\xc1", False),  # not msgpack
        (msgspec.msgpack.encode({"op": "teleport"}), False),  # unknown op
        (msgspec.msgpack.encode({"op": "lookup", "namespaces": [], "keys": [], "block_tokens": 1}), False),
        (msgspec.msgpack.encode({"op": "reserve", "namespace": "unregistered", "keys": [b"k" * 16]}), False),
        (
            msgspec.msgpack.encode(
                {"op": "register_namespace", "namespace": "n", "block_bytes": 1 << 40, "block_tokens": 1}
            ),
            False,
        ),  # bigger than an arena
    ],
)
def test_bad_requests_get_an_error_and_the_session_survives(
    agent: AgentProcess, payload: bytes, closes: bool
) -> None:
    s = raw(agent)
    hello(s)
    s.sendall(p.frame(payload))
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply), reply
    s.sendall(p.encode(p.Stats()))
    assert isinstance(read_reply(s), p.StatsReply)


def test_oversized_frame_and_missing_hello_close_the_connection(agent: AgentProcess) -> None:
    s = raw(agent)
    hello(s)
    s.sendall(p.HEADER.pack(1 << 31))
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BAD_FRAME
    assert read_reply(s) is None  # closed
    s = raw(agent)
    s.sendall(p.encode(p.Stats()))
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply) and reply.code == p.E_NO_SESSION
    assert read_reply(s) is None


def test_client_vanishing_mid_frame_costs_only_its_session(agent: AgentProcess) -> None:
    c = client(agent)
    c.register_namespace("ns", 4096, 16)
    c.reserve("ns", KEYS[:2], None)
    c.commit("ns", KEYS[:2], [], 0.0)
    doomed = raw(agent)
    hello(doomed)
    doomed.sendall(p.encode(p.Lookup(namespaces=["ns"], keys=KEYS[:2], block_tokens=16, lease_id="D")))
    assert isinstance(read_reply(doomed), p.LookupReply)
    doomed.sendall(p.HEADER.pack(1000) + b"\x00" * 10)  # half a frame, then gone
    doomed.close()
    deadline = time.monotonic() + 5
    while agent.stats()["leases_active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = agent.stats()
    assert stats["leases_active"] == 0 and stats["leases_lost"] == 1
    assert c.lookup(["ns"], KEYS[:2], 16).hits == 2
    assert 'kvfabric_errors_total{kind="truncated_frame"} 1.0' in agent.metrics_text()


def test_protocol_version_mismatch_is_refused(agent: AgentProcess) -> None:
    s = raw(agent)
    s.sendall(p.encode(p.Hello(protocol_version=999, client="future")))
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply) and reply.code == p.E_VERSION


def test_rejections_surface_as_agent_rejected(agent: AgentProcess) -> None:
    c = client(agent)
    with pytest.raises(AgentRejected) as err:
        c.reserve("never-registered", KEYS[:1], None)
    assert err.value.code == p.E_NAMESPACE
    assert c.connected  # a rejection is not a connection failure


def test_gpu_requests_to_an_agent_without_cuda_are_refused_and_the_session_survives(
    agent: AgentProcess,
) -> None:
    c = client(agent)
    register = p.RegisterGpuKV(
        namespace="gpu-ns",
        device_uuid="GPU-x",
        layout="block_chunk",
        num_blocks=4,
        plane_bytes=4096,
        handles=[b"h"],
        offsets=[0],
    )
    for request, reply_type in (
        (register, p.GpuKVReply),
        (p.GpuCopy(kv_id=1, to_pool=True, block_ids=[0], slots=[0]), p.GpuCopyReply),
    ):
        with pytest.raises(AgentRejected) as err:
            c.call(request, reply_type)
        assert err.value.code == p.E_GPU and "--cuda" in str(err.value)
    assert c.connected and c.stats()["namespaces"] == 0


def test_a_cuda_agent_that_cannot_pin_lends_every_arena_to_cpu_engines(tmp_path: Path) -> None:
    """A ``--cuda`` pool lends an arena only once it is pinned; where pinning fails (here: no
    CuPy, no GPU) before any GPU engine could use it, CPU engines get the whole pool."""
    pytest.importorskip("kvfabric.agent.gpu")  # the module itself imports without CuPy
    if shutil.which("nvidia-smi"):
        pytest.skip("this host may pin; tests/gpu covers that side")
    extra = ["--cuda", "--arena-size", "2MiB", "--session-share", "1"]
    with AgentProcess(tmp_path / "agent", "16MiB", extra_args=extra) as agent:
        stats = agent.stats()
        assert stats["cuda_pinned"] == 0 and stats["cuda_pinned_bytes"] == 0
        assert stats["usable_arenas"] == 8 and stats["free_arenas"] == 8
        c = client(agent)
        c.register_namespace("ns", 2 << 20, 16)
        keys = [bytes([9, i]) * 8 for i in range(8)]
        assert sorted(c.reserve("ns", keys, None).slots) == list(range(8))  # the whole pool


def test_refuses_to_start_beside_a_live_agent(agent: AgentProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvfabric.agent.main",
            "--socket",
            str(agent.socket_path),
            "--pool-size",
            "16MiB",
            "--pool-path",
            str(tmp_path / "other-pool"),
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "another agent holds" in proc.stderr
    assert agent.stats()["sessions"] == 0  # the live one is untouched
    assert client(agent).stats()["pool_bytes"] == 64 << 20


def test_invalid_settings_and_oversized_pool_fail_clearly(tmp_path: Path) -> None:
    base = [
        sys.executable,
        "-m",
        "kvfabric.agent.main",
        "--socket",
        str(tmp_path / "s.sock"),
        "--http-port",
        "0",
    ]
    bad = subprocess.run([*base, "--pool-size", "lots"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pool_size" in bad.stderr
    huge = subprocess.run(
        [*base, "--pool-size", "100TiB", "--pool-path", str(tmp_path / "pool"), "--start-wait-s", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert huge.returncode == 1 and "does not fit" in huge.stderr
    assert not (tmp_path / "pool").exists() and not (tmp_path / "s.sock").exists()


def test_clean_exit_removes_segment_and_socket_and_a_crash_is_recovered(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", "32MiB").start()
    assert a.pool_path.exists()
    assert a.stop() == 0
    assert not a.pool_path.exists() and not a.socket_path.exists()
    a.start()
    a.kill()  # crash: socket file and segment stay behind
    assert a.pool_path.exists() and a.socket_path.exists()
    a.start()  # a new agent replaces both
    try:
        assert client(a).stats()["sessions"] == 1
    finally:
        a.cleanup()


def test_client_fails_fast_while_down_and_reconnects_with_backoff(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", "32MiB").start()
    try:
        c = client(a, backoff_initial_s=0.3, backoff_max_s=0.3)
        first_pool = c.stats()["pool_id"]
        a.kill()
        with pytest.raises(AgentUnavailable):
            c.stats()
        t0 = time.perf_counter()
        with pytest.raises(AgentUnavailable, match="breaker"):
            c.stats()
        assert time.perf_counter() - t0 < 0.05
        a.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                stats = c.stats()
                break
            except AgentUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert stats["pool_id"] != first_pool and c.connects == 2
    finally:
        a.cleanup()


def test_peer_closed_tells_a_live_agent_from_a_dead_one(tmp_path: Path) -> None:
    """What a layered load's wait checks while copies are late: a killed agent shows at once."""
    a = AgentProcess(tmp_path / "a", "32MiB").start()
    try:
        c = client(a)
        c.stats()
        assert c.peer_closed() is False
        c.stats()  # the peek consumed nothing: the session still works
        a.kill()
        deadline = time.monotonic() + 5
        while not c.peer_closed():
            assert time.monotonic() < deadline, "the agent's death did not show"
            time.sleep(0.01)
    finally:
        a.cleanup()


def test_admin_endpoints(agent: AgentProcess) -> None:
    import urllib.request

    for path, body in [("/healthz", b"ok"), ("/readyz", b"ready")]:
        with urllib.request.urlopen(agent.url + path) as r:
            assert r.status == 200 and r.read() == body
    text = agent.metrics_text()
    for name in [
        "kvfabric_pool_capacity_bytes",
        "kvfabric_pool_used_bytes",
        "kvfabric_lookup_blocks_total",
        "kvfabric_evictions_total",
        "kvfabric_sessions",
        "kvfabric_rpc_seconds_bucket",
        "kvfabric_save_copy_seconds_bucket",
        "kvfabric_load_copy_seconds_bucket",
    ]:
        assert name in text, name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make install-tools)")
def test_metrics_pass_promtool(agent: AgentProcess) -> None:
    c = client(agent)
    c.register_namespace("ns", 4096, 16)
    c.reserve("ns", KEYS, None)
    c.commit("ns", KEYS, [], 0.002)
    c.lookup(["ns"], KEYS, 16, lease_id="x")
    c.release(["x#0"], 8, 0.001)
    text = agent.metrics_text()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_stopped_agent_costs_one_deadline_per_backoff_period_not_one_per_call(agent: AgentProcess) -> None:
    """SIGSTOP: the agent's socket still accepts, nothing answers. A scheduler asking every few
    milliseconds (each engine step) pays the call deadline once, then once per backoff period
    while it tries again; every other call fails at once (the engine recomputes)."""
    import signal

    c = client(agent, timeout_s=0.2, backoff_initial_s=1.0, backoff_max_s=1.0)
    c.register_namespace("ns", 4096, 16)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        blocked, calls, start = 0.0, 0, time.monotonic()
        while time.monotonic() - start < 3.5:
            t0 = time.monotonic()
            with pytest.raises(AgentUnavailable):
                c.lookup(["ns"], KEYS[:2], 16)
            blocked += time.monotonic() - t0
            calls += 1
            time.sleep(0.005)  # an engine step
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    # 3.5 s: the first deadline, then one reconnect per 1 s period (each its 0.2 s deadline)
    assert calls > 100 and c.failures <= 5
    assert blocked <= 5 * 0.2 + 0.3, (blocked, c.failures, calls)
    deadline = time.monotonic() + 5
    while not c.connect():  # back once the agent runs again and the breaker lets it try
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.lookup(["ns"], KEYS[:2], 16).hits == 0
