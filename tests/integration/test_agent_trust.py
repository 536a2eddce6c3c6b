"""The agent's trust model against a real agent process: each test is one of the agent review's
reproducers (``shared/reviews/agent.md``), and would fail on the agent it reviewed."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from e2e.agent import AgentProcess, read_reply
from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient
from kvfabric.connector.errors import AgentRejected

pytestmark = pytest.mark.integration
KEYS = [bytes([i]) * 16 for i in range(8)]
BB = 4096

_OPEN: list[socket.socket | AgentClient] = []


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def raw(path: Path | str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    _OPEN.append(s)
    s.settimeout(5)
    s.connect(str(path))
    return s


def send_raw(s: socket.socket, obj: object) -> p._Reply | None:
    s.sendall(p.frame(msgspec.msgpack.encode(obj)))
    return read_reply(s)


def hello(s: socket.socket) -> p.HelloReply:
    s.sendall(p.encode(p.Hello(protocol_version=p.PROTOCOL_VERSION, client="raw")))
    reply = read_reply(s)
    assert isinstance(reply, p.HelloReply)
    return reply


def client(path: Path | str, name: str = "test") -> AgentClient:
    c = AgentClient(str(path), name, timeout_s=5)
    _OPEN.append(c)
    return c


def save(c: AgentClient, ns: str, keys: list[bytes]) -> list[int]:
    slots = c.reserve(ns, keys, None).slots
    c.commit(ns, keys, [], 0.0)
    return slots


def wait_for(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# -- H2: memory amplification, M1: poisoned stats, L1/L2: logs and metrics ---------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"op": "register_namespace", "namespace": "n", "block_bytes": 1, "block_tokens": 16},  # tiny block
        {
            "op": "lookup",
            "namespaces": ["n"],
            "keys": [b"k" * 16],
            "block_tokens": 16,
            "lease_id": "x" * 4096,
        },
        {"op": "lookup", "namespaces": ["n"], "keys": [b"k" * 16], "block_tokens": 2**64 - 1},  # overflow
        {"op": "commit", "namespace": "n", "keys": [], "owner": 1, "owner_token": "x" * 65},  # long token
        {"op": "commit", "namespace": "n", "keys": [], "copy_seconds": float("inf")},  # metric poisoning
        {"op": "release", "lease_ids": ["a"], "loaded_blocks": 2**64 - 1},
        {"op": "reserve", "namespace": "n", "keys": [b"k" * 16] * (p.MAX_KEYS + 1)},  # too many keys
    ],
    ids=[
        "block_bytes_1",
        "lease_id_4k",
        "block_tokens_overflow",
        "owner_token_65",
        "inf_seconds",
        "huge_load",
        "too_many_keys",
    ],
)
def test_out_of_bounds_values_are_refused_and_stats_keep_working(agent: AgentProcess, payload: dict) -> None:
    s = raw(agent.socket_path)
    hello(s)
    reply = send_raw(s, payload)
    assert isinstance(reply, p.ErrorReply) and reply.code in (p.E_BAD_REQUEST, p.E_NAMESPACE), reply
    assert "internal" not in reply.code
    # The session and every later one still get stats (M1 broke them for good).
    s.sendall(p.encode(p.Stats()))
    assert isinstance(read_reply(s), p.StatsReply)
    assert isinstance(client(agent.socket_path).stats(), dict)
    assert "inf" not in agent.metrics_text().lower().replace("+inf", "")  # no infinite sums


def test_deep_nesting_is_a_bad_request_not_an_internal_error(agent: AgentProcess) -> None:
    s = raw(agent.socket_path)
    hello(s)
    depth = 200_000
    s.sendall(p.frame(b"\x91" * depth + b"\xc0"))  # [[[...[nil]...]]]
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BAD_REQUEST, reply
    assert "Traceback" not in agent.log_tail(20000)


def test_loaded_blocks_count_only_up_to_the_lease(agent: AgentProcess) -> None:
    c = client(agent.socket_path)
    c.register_namespace("ns", BB, 16)
    save(c, "ns", KEYS[:2])
    lease = c.lookup(["ns"], KEYS[:2], 16, lease_id="L").leases[0]
    assert c.release([lease], loaded_blocks=1_000_000) == [True]
    assert agent.stats()["loaded_blocks"] == 2


def test_a_large_frame_before_hello_is_refused_at_its_header(agent: AgentProcess) -> None:
    s = raw(agent.socket_path)
    s.sendall(p.HEADER.pack(60 << 20) + b"\x00" * 1024)  # a partial 60 MiB frame, no hello
    reply = read_reply(s)
    assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BAD_FRAME and "before hello" in reply.message
    assert read_reply(s) is None  # closed: nothing buffered


# -- M2: connections without hello, sessions that stop reading ----------------------------------------


def test_connections_that_never_say_hello_are_closed_and_do_not_lock_engines_out(tmp_path: Path) -> None:
    args = ["--max-sessions", "4", "--hello-timeout-s", "0.5"]
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB", *args]) as agent:
        idle = [raw(agent.socket_path) for _ in range(4)]
        assert wait_for(lambda: agent.stats()["connections"] == 4)
        # While they are held, a fifth connection is refused (they count against the cap).
        busy = raw(agent.socket_path)
        reply = read_reply(busy)
        assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BUSY
        for s in idle:  # each is closed by the agent after the hello timeout
            assert read_reply(s) is None
        c = client(agent.socket_path)
        assert c.connect() and c.stats()["sessions"] == 1
        assert 'kvfabric_errors_total{kind="hello_timeout"} 4.0' in agent.metrics_text()


def test_a_session_that_stops_reading_is_closed_and_its_leases_dropped(tmp_path: Path) -> None:
    with AgentProcess(
        tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB", "--write-timeout-s", "1"]
    ) as agent:
        c = client(agent.socket_path)
        c.register_namespace("ns", BB, 16)
        save(c, "ns", KEYS[:4])
        s = raw(agent.socket_path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hello(s)
        s.sendall(p.encode(p.Lookup(namespaces=["ns"], keys=KEYS[:4], block_tokens=16, lease_id="S")))
        assert isinstance(read_reply(s), p.LookupReply)
        assert agent.stats()["leases_active"] == 1
        stats = p.encode(p.Stats())
        s.settimeout(0.2)
        for _ in range(4000):  # pipelined requests, replies never read
            try:
                s.sendall(stats)
            except (TimeoutError, BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        assert wait_for(lambda: agent.stats()["leases_active"] == 0, 10)
        assert agent.stats()["sessions"] == 1  # only c
        assert c.lookup(["ns"], KEYS[:4], 16).hits == 4  # others were served throughout


def test_session_reservations_are_capped(tmp_path: Path) -> None:
    with AgentProcess(
        tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB", "--session-share", "0.25"]
    ) as agent:
        c = client(agent.socket_path)
        c.register_namespace("ns", 1 << 20, 16)  # 64 slots of 1 MiB
        keys = [i.to_bytes(16, "little") for i in range(40)]
        slots = c.reserve("ns", keys, None).slots
        assert sum(s >= 0 for s in slots) == 16  # a quarter of the pool
        assert agent.stats()["reserve_refused_quota"] == 24
        other = client(agent.socket_path, "other")  # another session still finds room
        assert all(s >= 0 for s in other.reserve("ns", [b"o" * 16], None).slots)


# -- M3: lease ownership --------------------------------------------------------------------------------


def test_a_lease_id_held_by_another_session_cannot_be_replaced(agent: AgentProcess) -> None:
    a, b = client(agent.socket_path, "a"), client(agent.socket_path, "b")
    a.register_namespace("ns", BB, 16)
    save(a, "ns", KEYS[:4])
    lease = a.lookup(["ns"], KEYS[:4], 16, lease_id="req-2")
    with pytest.raises(AgentRejected) as err:
        b.lookup(["ns"], KEYS[:1], 16, lease_id="req-2")
    assert err.value.code == p.E_LEASE
    assert a.release(lease.leases) == [True]
    assert agent.stats()["leases_active"] == 0


def test_a_replaced_lease_is_not_reported_held_to_its_old_generation(agent: AgentProcess) -> None:
    """The worker copied under the first lookup's lease; the scheduler looked up again meanwhile
    (fewer hits): releasing the old generation must say 'not held', not vouch for the new one."""
    c = client(agent.socket_path)
    c.register_namespace("ns", BB, 16)
    save(c, "ns", KEYS[:4])
    first = c.lookup(["ns"], KEYS[:4], 16, lease_id="r")
    second = c.lookup(["ns"], KEYS[:1], 16, lease_id="r")
    assert first.leases != second.leases
    assert c.release(first.leases) == [False]
    assert c.release(second.leases) == [True]


# -- M5: one agent per socket ----------------------------------------------------------------------------


def run_agent(socket_path: Path, pool_path: Path) -> subprocess.CompletedProcess[str]:
    """Starts another agent in the foreground (it is expected to refuse and exit)."""
    args = [
        "--socket",
        str(socket_path),
        "--pool-size",
        "16MiB",
        "--pool-path",
        str(pool_path),
        "--http-port",
        "0",
    ]
    return subprocess.run(
        [sys.executable, "-m", "kvfabric.agent.main", *args], capture_output=True, text=True, timeout=60
    )


def test_a_second_agent_exits_without_touching_the_first(agent: AgentProcess, tmp_path: Path) -> None:
    before = os.stat(agent.socket_path).st_ino
    proc = run_agent(agent.socket_path, agent.pool_path)  # the live agent's socket and pool
    assert proc.returncode == 1 and "another agent holds" in proc.stderr
    assert os.stat(agent.socket_path).st_ino == before and agent.pool_path.exists()
    c = client(agent.socket_path)
    assert c.connect() and c.hello is not None and c.hello.pool_id == agent.stats()["pool_id"]


def test_the_pool_file_of_a_live_agent_is_never_replaced(agent: AgentProcess, tmp_path: Path) -> None:
    other = Path(tempfile.mkdtemp(prefix="kvf-", dir="/tmp")) / "agent.sock"
    try:
        proc = run_agent(other, agent.pool_path)  # another socket, the live agent's pool
        assert proc.returncode == 1 and "held by another running agent" in proc.stderr
        assert agent.pool_path.exists() and os.stat(agent.pool_path).st_mode & 0o777 == 0o660
    finally:
        shutil.rmtree(other.parent, ignore_errors=True)


# -- H1: tenants isolated by the agent ---------------------------------------------------------------


@contextlib.contextmanager
def tenant_agent_at(tmp_path: Path, pool_size: str) -> Iterator[tuple[AgentProcess, Path]]:
    """An isolated agent serving tenant sockets for team-a and team-b."""
    root = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))
    for t in ("team-a", "team-b"):
        (root / t).mkdir()
    args = ["--arena-size", "4MiB", "--tenancy", "isolated", "--tenant-socket-dir", str(root)]
    try:
        with AgentProcess(tmp_path / "agent", pool_size, extra_args=args) as agent:
            assert wait_for(lambda: all((root / t / "agent.sock").exists() for t in ("team-a", "team-b")))
            yield agent, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tenant_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    with tenant_agent_at(tmp_path, "64MiB") as pair:
        yield pair


def _mapped(c: AgentClient) -> mmap.mmap:
    reply, fd = c.open_pool()
    try:
        return mmap.mmap(fd, reply.pool_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def test_tenants_neither_see_lease_nor_map_each_others_blocks(
    tenant_agent: tuple[AgentProcess, Path],
) -> None:
    agent, root = tenant_agent
    a = client(root / "team-a" / "agent.sock", "a")
    b = client(root / "team-b" / "agent.sock", "b")
    for c in (a, b):
        c.register_namespace("same-digest", BB, 16)  # the same model in both tenants
    assert a.connect() and a.hello is not None and a.hello.tenant == "team-a" and a.hello.pool_path == ""
    pool_a = _mapped(a)
    slot = a.reserve("same-digest", KEYS[:1], None).slots[0]
    pool_a[slot * BB : (slot + 1) * BB] = b"\xab" * BB  # tenant A's KV
    a.commit("same-digest", KEYS[:1], [], 0.0)
    a_lease = a.lookup(["same-digest"], KEYS[:1], 16, lease_id="req")
    assert a_lease.hits == 1
    # B: no hit on the same key, no lease under A's id, no release of A's lease.
    assert b.lookup(["same-digest"], KEYS[:1], 16, lease_id="req").hits == 0
    assert b.release(a_lease.leases) == [False]
    # B's pool file is its own: A's bytes are not in it, and B's writes do not reach A.
    pool_b = _mapped(b)
    assert pool_b[slot * BB : (slot + 1) * BB] == b"\x00" * BB
    pool_b[slot * BB : (slot + 1) * BB] = b"\xcd" * BB
    assert pool_a[slot * BB : (slot + 1) * BB] == b"\xab" * BB
    assert a.release(a_lease.leases) == [True]
    # The main socket: tenant from the peer's uid, another tenant again.
    main = client(agent.socket_path, "by-uid")
    main.register_namespace("same-digest", BB, 16)
    assert main.hello is not None and main.hello.tenant == f"uid-{os.getuid()}"
    assert main.lookup(["same-digest"], KEYS[:1], 16).hits == 0
    stats = agent.stats()
    assert stats["tenancy"] == "isolated" and stats["tenants"] == 3


def test_a_delegated_commit_never_crosses_tenants(tenant_agent: tuple[AgentProcess, Path]) -> None:
    """Even with the owner's id and token, a session of another tenant cannot make that owner's
    reservations visible (a TP scheduler commits only for workers of its own tenant)."""
    _, root = tenant_agent
    a = client(root / "team-a" / "agent.sock", "a-worker")
    b = client(root / "team-b" / "agent.sock", "b")
    a.register_namespace("same-digest", BB, 16)
    a.reserve("same-digest", KEYS[:2], None)
    assert a.hello is not None
    owner, token = a.hello.session_id, a.hello.session_token
    b.register_namespace("same-digest", BB, 16)
    with pytest.raises(AgentRejected):
        b.commit("same-digest", KEYS[:2], [], 0.0, owner=owner, owner_token=token)
    a_sched = client(root / "team-a" / "agent.sock", "a-scheduler")
    assert a_sched.lookup(["same-digest"], KEYS[:2], 16).hits == 0
    assert a_sched.commit("same-digest", KEYS[:2], [], 0.0, owner=owner, owner_token=token).committed == 2
    assert a_sched.lookup(["same-digest"], KEYS[:2], 16).hits == 2


def test_an_arena_leaving_a_tenant_is_wiped_before_another_gets_it(tmp_path: Path) -> None:
    with tenant_agent_at(tmp_path, "16MiB") as (agent, root):
        a = client(root / "team-a" / "agent.sock", "a")
        a.register_namespace("ns", 1 << 20, 16)
        pool_a = _mapped(a)
        keys = [i.to_bytes(16, "little") for i in range(8)]
        slots = a.reserve("ns", keys, None).slots
        for s in slots:
            pool_a[s << 20 : (s + 1) << 20] = b"\xab" * (1 << 20)
        a.commit("ns", [], keys, 0.0)  # aborted: both arenas go back to the pool
        b = client(root / "team-b" / "agent.sock", "b")
        b.register_namespace("ns", 1 << 20, 16)
        b_slots = b.reserve("ns", keys, None).slots
        assert sorted(b_slots) == sorted(slots)  # B got A's former arenas...
        assert pool_a[slots[0] << 20 : (slots[0] << 20) + 4096] == b"\x00" * 4096  # ...wiped
        assert agent.stats()["pool_used_bytes"] == 8 << 20


def test_a_read_only_pool_descriptor_cannot_be_mapped_writable(
    tenant_agent: tuple[AgentProcess, Path],
) -> None:
    _, root = tenant_agent
    c = client(root / "team-a" / "agent.sock")
    reply, fd = c.open_pool(writable=False)
    try:
        assert not reply.writable
        with pytest.raises(PermissionError):
            mmap.mmap(fd, reply.pool_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mmap.mmap(fd, reply.pool_bytes, mmap.MAP_SHARED, mmap.PROT_READ).close()
    finally:
        os.close(fd)


# -- M4: a restart while engines still map the old pool ------------------------------------------------


def test_an_agent_whose_pool_does_not_fit_yet_waits_answering_busy(tmp_path: Path) -> None:
    """The new agent waits for space (the old pool's pages return when engines unmap it), bound
    and answering 'busy' so engines learn the old agent is gone; it gives up after the wait."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kvf-", dir="/tmp"))
    args = [
        "--socket",
        str(sock_dir / "agent.sock"),
        "--pool-size",
        "100TiB",
        "--pool-path",
        str(tmp_path / "pool"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfabric.agent.main", *args, "--http-port", "0", "--start-wait-s", "3"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: (sock_dir / "agent.sock").exists(), 10)
        s = raw(sock_dir / "agent.sock")
        s.sendall(p.encode(p.Hello(protocol_version=p.PROTOCOL_VERSION, client="engine")))
        reply = read_reply(s)
        assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BUSY
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "waiting for space" in err and "does not fit" in err
        assert not (sock_dir / "agent.sock").exists()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_partial_large_frames_of_many_sessions_are_bounded_together(tmp_path: Path) -> None:
    """H2: sessions (past their hello) each sending most of a large frame held the agent's
    memory, 2.4 GiB for 40 of them. Bodies in flight are capped for all connections together,
    and a body that does not arrive in time closes its connection."""
    args = ["--arena-size", "4MiB", "--max-buffered-bytes", "48MiB", "--write-timeout-s", "2"]
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=args) as agent:
        first, second = raw(agent.socket_path), raw(agent.socket_path)
        for s in (first, second):
            hello(s)
        first.sendall(p.HEADER.pack(40 << 20) + b"\0" * (1 << 20))  # 40 MiB announced, 1 sent
        assert wait_for(lambda: agent.stats()["frames_buffered_bytes"] == 40 << 20)
        second.sendall(p.HEADER.pack(40 << 20) + b"\0" * 1024)
        reply = read_reply(second)
        assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BUSY
        first.settimeout(10)
        reply = read_reply(first)  # closed once its body is late
        assert isinstance(reply, p.ErrorReply) and reply.code == p.E_BAD_FRAME and "in time" in reply.message
        assert client(agent.socket_path).stats()["sessions"] == 1  # the agent serves on


def test_one_peer_cannot_take_every_session(tmp_path: Path) -> None:
    """Sessions per peer (its uid in a shared pool, its tenant when isolated) are capped below
    --max-sessions, so one engine's runaway reconnects leave room for the others."""
    args = ["--arena-size", "4MiB", "--max-sessions-per-tenant", "3"]
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=args) as agent:
        held = [raw(agent.socket_path) for _ in range(3)]
        for s in held:
            hello(s)
        extra = raw(agent.socket_path)
        extra.sendall(p.encode(p.Hello(protocol_version=p.PROTOCOL_VERSION, client="one-too-many")))
        reply = read_reply(extra)
        assert (
            isinstance(reply, p.ErrorReply)
            and reply.code == p.E_QUOTA
            and f"uid {os.getuid()}" in reply.message
        )
        held.pop().close()
        assert wait_for(lambda: agent.stats()["sessions"] == 2)
        assert client(agent.socket_path).connect()  # room again
