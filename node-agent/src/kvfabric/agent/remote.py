"""The remote tier: blocks another agent of the pool holds, pulled into this agent's pool.

A lookup that misses the pool (and the NVMe tier) asks the block index
(:mod:`kvfabric.agent.remote_index`) who holds the next keys. For the leading run one peer
holds in every namespace of the lookup, slots are reserved here under the agent's own session
(as promotions from NVMe are), and a pull thread asks the peer over the agents' control
channel (TCP, mutual TLS when certificates are set) for those blocks. The peer leases them and
either sends their bytes on that connection (``stream``: two connections for larger pulls) or
writes them into the requester's slots through the :class:`~kvfabric.agent.transport.Transport`
(NIXL), and answers with each block's checksum (xxh3-64) computed from its own copy; this side checks every
landed block against it and commits the verified leading run, on the loop. The lookup's reply
says how many blocks are on their way (``promoting``) with an estimate from the measured pull
rate, exactly like an NVMe promotion: the connector asks again, or recomputes at once when the
estimate is past what it may wait.

Failure is a miss: a peer that is gone, refuses, times out or sends a block that does not verify
costs the blocks of that pull, never an error to the engine. A pull that timed out may still
land late (a partitioned link holds a transfer in progress), so its slots stay reserved for
``quarantine_s`` before they go back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, TypeVar

import msgspec
import xxhash

from kvfabric.agent.index import BlockIndex, Namespace, normalize_key, scoped
from kvfabric.agent.pool import address_of
from kvfabric.agent.tiering import PROMOTER_SESSION, on_loop
from kvfabric.agent.transport import TransferFailed, Transport
from kvfabric.connector import protocol as p
from kvfabric.connector.pool_files import PoolBuffer

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_PULL_BLOCKS = 8192
#: A streamed pull of at least twice this many blocks goes over two connections in parallel (one
#: TCP stream is bounded by one core's copies on each side).
SPLIT_BLOCKS = 8
#: After a failed pull a peer is not asked again for this long, doubling per failure in a row up
#: to the second value: a dead or partitioned peer must not cost every scheduling step a pull.
PEER_BACKOFF_S = (0.5, 30.0)
#: How long a rate learned from a late pull keeps pulls that could not meet their deadline from
#: starting; after it, one pull measures the link again (it may have recovered).
SLOW_LINK_S = 10.0
_MAX_FRAME = 4 << 20
#: A peer connection that sends no request this long is closed (its serving thread is freed).
IDLE_CONNECTION_S = 30.0


class PullRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Write ``keys`` of ``namespace`` (the tenant's) into the requester's addresses ``dst``
    (NIXL), or, with ``stream``, send their bytes on this connection."""

    requester: Annotated[str, msgspec.Meta(max_length=128)]
    requester_info: Annotated[bytes, msgspec.Meta(max_length=65536)]
    tenant: Annotated[str, msgspec.Meta(max_length=64)]
    namespace: Annotated[str, msgspec.Meta(max_length=64)]
    block_bytes: Annotated[int, msgspec.Meta(ge=1)]
    keys: Annotated[list[bytes], msgspec.Meta(max_length=MAX_PULL_BLOCKS)]
    dst: Annotated[list[int], msgspec.Meta(max_length=MAX_PULL_BLOCKS)]
    deadline_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)]
    stream: bool = False


class PullReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: the leading keys written, with the xxh3-64 of each as the holder has it
    checksums: list[int]
    error: str = ""
    #: (``stream``) this many blocks' bytes follow this reply, then a reply with their checksums
    streamed: int = 0


def _frame(message: msgspec.Struct) -> bytes:
    """A control-channel frame: the engines' framing (length header, msgpack body)."""
    return p.frame(msgspec.msgpack.encode(message))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fills ``view`` from ``sock``; TimeoutError past ``deadline`` (a whole, not per read)."""
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("stream past its deadline")
        sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed the connection")
        got += n


def _recv(sock: socket.socket, kind: type[msgspec.Struct]) -> object:
    (n,) = p.HEADER.unpack(_recv_exact(sock, p.HEADER.size))
    if n > _MAX_FRAME:
        raise ConnectionError("frame too large")
    return msgspec.msgpack.decode(_recv_exact(sock, n), type=kind)


@dataclass
class RemoteStats:
    pulled_blocks: int = 0
    pulled_bytes: int = 0
    pull_failures: int = 0  # pulls that brought nothing (peer gone, refused, late)
    pull_bad_blocks: int = 0  # landed blocks whose checksum did not match
    served_blocks: int = 0
    served_bytes: int = 0
    serve_failures: int = 0
    located_blocks: int = 0  # blocks the index said a peer holds
    peer_backoffs: int = 0  # lookups that skipped a peer backing off after a failure
    pulls_skipped_slow: int = 0  # pulls not started: the measured rate could not meet the deadline
    not_members: int = 0  # holders the index named that the pool's EndpointSlices do not list


@dataclass
class PeerStats:
    """One holder's pulls as this agent saw them (per-peer metrics, and the estimate of a pull)."""

    pulls: int = 0
    failures: int = 0
    pulled_bytes: int = 0
    #: bytes/s of its completed pulls and seconds to connect (moving averages; 0: none yet)
    rate: float = 0.0
    connect_s: float = 0.0
    #: bytes of pulls from it under way
    queued_bytes: int = 0


#: Peers tracked for metrics and estimates; past it the longest-known one is forgotten (a pool's
#: agents are far fewer; a flood of addresses from the index must not grow the agent).
MAX_PEERS = 1024


@dataclass(frozen=True)
class PeerTLS:
    """Mutual TLS between the agents of one pool: each presents its certificate, and accepts
    only peers whose certificate the pool's CA signed."""

    cert: str
    key: str
    ca: str

    def server(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = False  # peers are named by address; the pool's CA is the identity
        return ctx


class RemoteTier:
    """Pulls (requester side) and serves pulls (holder side) for one agent."""

    def __init__(
        self,
        index: BlockIndex,
        memory: Callable[[Namespace], PoolBuffer],
        transport: Transport | None,
        *,
        pull_deadline_s: float,
        tls: PeerTLS | None = None,
        quarantine_s: float = 10.0,
        threads: int = 4,
    ) -> None:
        self.index = index
        self.memory = memory
        #: NIXL (RDMA, or UCX's TCP); None: blocks come as a byte stream on the control channel
        self.transport = transport
        self.name = transport.name if transport is not None else "stream"
        self.pull_deadline_s = pull_deadline_s
        self.quarantine_s = quarantine_s
        self.tls = tls
        self._client_tls = tls.client() if tls is not None else None
        self.stats = RemoteStats()
        #: bytes/s of completed pulls (a moving average); 0: none measured yet
        self.rate = 0.0
        #: peer -> (a late pull's bound on its rate, until when it keeps slower pulls off)
        self._slow: dict[str, tuple[float, float]] = {}
        self._pulling: set[tuple[str, bytes]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pullers = ThreadPoolExecutor(threads, "kvfabric-pull")
        self._hashers = ThreadPoolExecutor(threads, "kvfabric-hash")  # xxhash frees the GIL
        self._hash_threads = threads
        self._streams = ThreadPoolExecutor(threads, "kvfabric-pull-stream")
        self._closing = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._server_tls: ssl.SSLContext | None = None
        #: one thread per peer connection being served (more wait for one to end)
        self._servers = ThreadPoolExecutor(max(4, 2 * threads), "kvfabric-serve-conn")
        self._connections: set[socket.socket] = set()
        self.peers: dict[str, PeerStats] = {}
        #: peer -> (failures in a row, not asked before this monotonic time)
        self._backoff: dict[str, tuple[int, float]] = {}
        #: pulls that ended (committed or not): a lookup that waited meanwhile looks again
        self.settled = 0
        #: seconds of each pull that ended, for the metrics (set by the agent)
        self.observe: Callable[[float], None] = lambda seconds: None
        #: whether a holder the index names may be asked (set by the agent from the pool's
        #: EndpointSlices when it has them; else every holder is)
        self.admits: Callable[[str], bool] = lambda peer: True

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Listens for the peers' pulls. Served by threads, not the loop: a stream sends from
        pool memory with blocking ``sendall`` (one core per connection; on the loop every
        connection's bytes went through one thread), and only the index's part (holding blocks)
        runs on the loop."""
        self._loop = asyncio.get_running_loop()
        self._server_tls = self.tls.server() if self.tls is not None else None
        self._listener = socket.create_server((host, port), backlog=64, reuse_port=False)
        self._acceptor = threading.Thread(target=self._accept, name="kvfabric-fabric-accept", daemon=True)
        self._acceptor.start()

    async def stop(self) -> None:
        self._closing = True
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for conn in list(self._connections):  # serving threads blocked in a read end now
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._acceptor is not None:
            await loop.run_in_executor(None, self._acceptor.join, 10)
        for pool in (self._pullers, self._hashers, self._streams, self._servers):
            await loop.run_in_executor(None, functools.partial(pool.shutdown, wait=True, cancel_futures=True))
        if self.transport is not None:
            self.transport.close()

    # -- requester (loop, then a pull thread) -----------------------------------------------

    def pull(
        self, spaces: list[Namespace], keys: list[bytes], parent: bytes | None, holders: list[str | None]
    ) -> int:
        """Starts pulling the leading ``keys`` that one peer holds (``holders[i]``: the holder of
        ``keys[i]`` in every namespace); returns how many are on their way (0: none)."""
        if self._closing or not keys or not holders or holders[0] is None:
            return 0
        peer = holders[0]
        if not self.admits(peer):
            self.stats.not_members += 1
            return 0
        failures, until = self._backoff.get(peer, (0, 0.0))
        if failures and time.monotonic() < until:
            self.stats.peer_backoffs += 1
            return 0
        limit = min(len(keys), len(holders), MAX_PULL_BLOCKS)
        run = next((i for i in range(limit) if holders[i] != peer), limit)
        size = run * sum(ns.block_bytes for ns in spaces)
        slow_rate, slow_until = self._slow.get(peer, (0.0, 0.0))
        if time.monotonic() < slow_until and size > slow_rate * self.pull_deadline_s:
            # at the rate measured so far it would not arrive by its deadline: recomputing wins
            self.stats.pulls_skipped_slow += 1
            return 0
        wanted = [normalize_key(k) for k in keys[:run]]
        coming = self.coming(spaces, wanted)
        if coming or any((scoped(ns.tenant, ns.name), k) in self._pulling for ns in spaces for k in wanted):
            return coming  # a pull of these is under way already: that many are on their way
        prev = normalize_key(parent) if parent is not None else None
        reserved: list[tuple[Namespace, list[int]]] = []
        for ns in spaces:  # the leading run every namespace has room for (and lacks)
            slots = self.index.reserve(ns.name, wanted[:run], prev, PROMOTER_SESSION, ns.tenant)
            reserved.append((ns, slots))
            run = min(run, next((i for i, slot in enumerate(slots) if slot < 0), len(slots)))
        jobs: list[tuple[Namespace, list[bytes], list[int]]] = []
        for ns, slots in reserved:
            self._abort(ns, [k for k, slot in zip(wanted[run:], slots[run:], strict=False) if slot >= 0])
            if run:
                jobs.append((ns, wanted[:run], slots[:run]))
                self._pulling.update((scoped(ns.tenant, ns.name), k) for k in wanted[:run])
        if run:
            self._peer(peer).queued_bytes += _jobs_bytes(jobs)
            self._pullers.submit(self._pull, peer, jobs, time.monotonic() + self.pull_deadline_s)
        return run

    def _peer(self, peer: str) -> PeerStats:
        st = self.peers.get(peer)
        if st is None:
            if len(self.peers) >= MAX_PEERS:
                idle = next((k for k, v in self.peers.items() if not v.queued_bytes), None)
                if idle is not None:
                    del self.peers[idle]
            st = self.peers[peer] = PeerStats()
        return st

    def coming(self, spaces: list[Namespace], keys: list[bytes]) -> int:
        """How many leading ``keys`` (normalized) pulls under way bring in every namespace."""
        return next(
            (
                i
                for i, k in enumerate(keys)
                if not all((scoped(ns.tenant, ns.name), k) in self._pulling for ns in spaces)
            ),
            len(keys),
        )

    def _abort(self, ns: Namespace, keys: list[bytes]) -> None:
        """Frees the slots reserved for ``keys`` (on the loop)."""
        if keys:
            self.index.commit(ns.name, [], keys, PROMOTER_SESSION, ns.tenant)

    def eta_s(self) -> float:
        """Seconds until the queued pulls should be in (0: unknown): per holder, its connect
        time plus its queued bytes at its measured rate (the pool's, before it has one); the
        holders send in parallel, so the slowest decides."""
        eta = 0.0
        for st in self.peers.values():
            rate = st.rate or self.rate
            if st.queued_bytes and rate:
                eta = max(eta, st.connect_s + st.queued_bytes / rate)
        return eta

    def _connect(self, peer: str, deadline: float) -> socket.socket:
        host, _, port = peer.rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=max(0.01, deadline - time.monotonic()))
        return self._client_tls.wrap_socket(raw) if self._client_tls is not None else raw

    def _pull(self, peer: str, jobs: list[tuple[Namespace, list[bytes], list[int]]], deadline: float) -> None:
        started = time.perf_counter()
        results: list[tuple[Namespace, list[bytes], list[int], int]] = []  # ..., verified run
        timed_out = False
        connect_s = 0.0
        try:
            with self._connect(peer, deadline) as sock:
                connect_s = time.perf_counter() - started
                for ns, keys, slots in jobs:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    if self.transport is None and len(keys) >= 2 * SPLIT_BLOCKS:
                        good = self._pull_split(sock, peer, ns, keys, slots, deadline)
                    else:
                        good = self._pull_one(sock, ns, keys, slots, deadline)
                    results.append((ns, keys, slots, good))
        except (OSError, ConnectionError, msgspec.DecodeError, ValueError) as exc:
            timed_out = isinstance(exc, TimeoutError | socket.timeout)
            log.info("pull from a peer failed; recomputing", extra={"peer": peer, "error": str(exc)})
        self._on_loop(self._pulled, peer, jobs, results, timed_out, time.perf_counter() - started, connect_s)

    def _pull_split(
        self,
        sock: socket.socket,
        peer: str,
        ns: Namespace,
        keys: list[bytes],
        slots: list[int],
        deadline: float,
    ) -> int:
        """The first half on ``sock``, the second on a connection of its own, at once."""
        half = len(keys) // 2

        def second() -> int:
            with self._connect(peer, deadline) as other:
                return self._pull_one(other, ns, keys[half:], slots[half:], deadline)

        later = self._streams.submit(second)
        try:
            first = self._pull_one(sock, ns, keys[:half], slots[:half], deadline)
        finally:
            try:
                rest = later.result(timeout=max(0.01, deadline - time.monotonic()) + 1.0)
            except Exception:
                rest = 0
        return first + rest if first == half else first

    def _pull_one(
        self, sock: socket.socket, ns: Namespace, keys: list[bytes], slots: list[int], deadline: float
    ) -> int:
        """One namespace's blocks into their reserved slots; returns the verified leading run."""
        bb = ns.block_bytes
        transport = self.transport
        mem = self.memory(ns)
        request = PullRequest(
            requester=self.name,
            requester_info=transport.local_info() if transport is not None else b"",
            tenant=ns.tenant,
            namespace=ns.name,
            block_bytes=bb,
            keys=keys,
            dst=[address_of(mem) + s * bb for s in slots] if transport is not None else [],
            deadline_ms=max(0.0, (deadline - time.monotonic()) * 1000),
            stream=transport is None,
        )
        sock.sendall(_frame(request))
        reply = _recv(sock, PullReply)
        assert isinstance(reply, PullReply)
        landed: list[int] | None = None
        if reply.streamed:  # the bytes follow, straight into the slots, then their checksums
            n = min(reply.streamed, len(slots))
            whole = memoryview(mem)
            landed = []
            for s in slots[:n]:
                block = whole[s * bb : (s + 1) * bb]
                _recv_into(sock, block, deadline)
                # hashed as it lands, while its bytes are still in the cache (a pass over the
                # whole pull afterwards read them all again from memory, after the last byte)
                landed.append(xxhash.xxh3_64_intdigest(block))
            reply = _recv(sock, PullReply)
            assert isinstance(reply, PullReply)
        if reply.error:
            log.info("a peer could not serve a pull", extra={"error": reply.error})
        if landed is not None:
            return self._matching(landed, reply.checksums)
        return self._verified(ns, slots, reply.checksums)

    def _verified(self, ns: Namespace, slots: list[int], checksums: list[int]) -> int:
        """How many leading landed blocks match the holder's checksums (hashed in parallel:
        xxhash frees the GIL)."""
        mem, bb = self.memory(ns), ns.block_bytes
        n = min(len(slots), len(checksums))
        step = max(1, -(-n // self._hash_threads))
        parts = [
            self._hashers.submit(self._checksums, mem, slots[i : i + step], bb) for i in range(0, n, step)
        ]
        return self._matching([c for part in parts for c in part.result()], checksums)

    def _matching(self, landed: list[int], checksums: list[int]) -> int:
        """How many leading ``landed`` checksums are the holder's."""
        n = min(len(landed), len(checksums))
        pairs = zip(landed, checksums, strict=False)
        good = next((i for i, (got, want) in enumerate(pairs) if got != want), n)
        if good < n:
            self.stats.pull_bad_blocks += 1
        return good

    def _pulled(
        self,
        peer: str,
        jobs: list[tuple[Namespace, list[bytes], list[int]]],
        results: list[tuple[Namespace, list[bytes], list[int], int]],
        timed_out: bool,
        seconds: float,
        connect_s: float = 0.0,
    ) -> None:
        """On the loop: commit the run every namespace verified, free (or quarantine) the rest."""
        self.settled += 1
        ps = self._peer(peer)
        ps.pulls += 1
        ps.queued_bytes = max(0, ps.queued_bytes - _jobs_bytes(jobs))
        if connect_s:
            ps.connect_s = _moving_average(ps.connect_s, connect_s)
        good = min((r[3] for r in results), default=0) if len(results) == len(jobs) else 0
        moved = 0
        for ns, keys, _slots in jobs:
            for k in keys:
                self._pulling.discard((scoped(ns.tenant, ns.name), k))
            if good:
                self.index.commit(ns.name, keys[:good], [], PROMOTER_SESSION, ns.tenant)
                moved += good * ns.block_bytes
            rest = keys[good:]
            # NIXL: a write may still land after a timeout; keep the slots a while (a stream's
            # bytes land only through our own reads, which ended with the connection)
            late = timed_out and self.transport is not None
            if rest and late and self._loop is not None:
                self._loop.call_later(self.quarantine_s, self._abort, ns, rest)
            else:
                self._abort(ns, rest)
        self.observe(seconds)
        if good:
            self.stats.pulled_blocks += good * len(jobs)
            self.stats.pulled_bytes += moved
            rate = moved / max(seconds, 1e-6)
            self.rate = _moving_average(self.rate, rate)
            ps.rate = _moving_average(ps.rate, rate)
            ps.pulled_bytes += moved
            self._backoff.pop(peer, None)
            self._slow.pop(peer, None)
        else:
            self.stats.pull_failures += 1
            ps.failures += 1
            if timed_out:  # less than what was asked arrived in the time: assume half of it did
                asked = _jobs_bytes(jobs) / max(seconds, 1e-6) / 2
                self.rate = min(self.rate, asked) if self.rate else asked
                ps.rate = min(ps.rate, asked) if ps.rate else asked
                self._slow[peer] = (asked, time.monotonic() + SLOW_LINK_S)
            failures = self._backoff.get(peer, (0, 0.0))[0] + 1
            first, longest = PEER_BACKOFF_S
            self._backoff[peer] = (failures, time.monotonic() + min(longest, first * 2 ** (failures - 1)))

    # -- holder (a thread per connection; holding blocks on the loop) ------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed: the agent stops
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._servers.submit(self._serve, conn)

    def _serve(self, raw: socket.socket) -> None:
        """One peer connection: pull requests until it closes (or sends something malformed)."""
        conn = raw
        self._connections.add(raw)
        try:
            if self._server_tls is not None:
                raw.settimeout(10.0)  # a handshake that never comes does not hold the thread
                conn = self._server_tls.wrap_socket(raw, server_side=True)
            while not self._closing:
                conn.settimeout(IDLE_CONNECTION_S)  # requesters connect per pull: idle ones go
                try:
                    request = _recv(conn, PullRequest)
                except (ConnectionError, msgspec.DecodeError, msgspec.ValidationError):
                    return
                assert isinstance(request, PullRequest)
                if request.stream:
                    self._serve_stream(request, conn)
                else:
                    conn.sendall(_frame(self._serve_one(request)))
        except (OSError, ssl.SSLError):
            return
        finally:
            self._connections.discard(raw)
            with contextlib.suppress(OSError):
                conn.close()

    def _on_loop_wait(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` run on the loop (which owns the index), its result here."""
        assert self._loop is not None

        async def run() -> _T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def _hold(self, request: PullRequest) -> tuple[Namespace | None, list[tuple[int, int]]]:
        """(On the loop) the request's namespace and its leading committed blocks, pinned:
        (slot, generation)."""
        ns = self.index.namespaces.get(scoped(request.tenant, request.namespace))
        if ns is None or ns.block_bytes != request.block_bytes:
            return None, []
        held: list[tuple[int, int]] = []
        for raw in request.keys:
            slot = self.index.committed_slot(ns, normalize_key(raw))
            if slot < 0:
                break
            held.append((slot, self.index.hold(ns, slot)))
        return ns, held

    def _served(self, ns: Namespace, held: list[tuple[int, int]], blocks: int, ok: bool) -> None:
        """(On the loop) the pins of a served pull end; its counts."""
        for slot, gen in held:
            self.index.unhold(ns, slot, gen)
        if ok:
            self.stats.served_blocks += blocks
            self.stats.served_bytes += blocks * ns.block_bytes
        else:
            self.stats.serve_failures += 1

    def _serve_stream(self, request: PullRequest, conn: socket.socket) -> None:
        """Sends the held blocks' bytes from pool memory, each hashed just before it goes
        (pinned: the bytes hashed are the bytes sent; the send's copy then reads them from the
        cache), then their checksums; gives up at the deadline."""
        deadline = time.monotonic() + request.deadline_ms / 1000
        ns, held = self._on_loop_wait(self._hold, request)
        if ns is None or not held:
            conn.sendall(_frame(PullReply(checksums=[], error="not held")))
            return
        slots, bb = [slot for slot, _ in held], ns.block_bytes
        ok = False
        try:
            conn.sendall(_frame(PullReply(checksums=[], streamed=len(slots))))
            checksums = []
            with memoryview(self.memory(ns)) as whole:
                for slot in slots:
                    block = whole[slot * bb : (slot + 1) * bb]
                    checksums.append(xxhash.xxh3_64_intdigest(block))
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("stream past its deadline")
                    conn.settimeout(left)
                    conn.sendall(block)
            conn.sendall(_frame(PullReply(checksums=checksums)))
            ok = True
        except OSError as exc:  # TimeoutError among them
            log.info("serving a pull failed", extra={"peer": request.requester, "error": str(exc)})
            raise ConnectionError("stream abandoned") from exc  # mid-stream: the connection goes
        finally:
            self._on_loop(self._served, ns, held, len(slots), ok)

    def _serve_one(self, request: PullRequest) -> PullReply:
        if self.transport is None:
            return PullReply(checksums=[], error="this agent sends blocks as a stream (no NIXL)")
        if len(request.dst) != len(request.keys):
            return PullReply(checksums=[], error="one destination per key")
        deadline = time.monotonic() + request.deadline_ms / 1000
        ns, held = self._on_loop_wait(self._hold, request)
        if ns is None or not held:
            return PullReply(checksums=[], error="not held")
        checksums: list[int] = []
        try:
            checksums = self._write(ns, request, [s for s, _ in held], deadline)
        except TransferFailed as exc:
            log.info("serving a pull failed", extra={"peer": request.requester, "error": str(exc)})
            return PullReply(checksums=[], error=str(exc))
        finally:
            self._on_loop(self._served, ns, held, len(checksums), bool(checksums))
        return PullReply(checksums=checksums)

    def _write(self, ns: Namespace, request: PullRequest, slots: list[int], deadline: float) -> list[int]:
        """Writes the held blocks to the requester; their checksums are computed meanwhile (the
        blocks are pinned: the bytes hashed are the bytes sent)."""
        mem = self.memory(ns)
        base, bb = address_of(mem), ns.block_bytes
        checksums = self._hashers.submit(self._checksums, mem, slots, bb)
        assert self.transport is not None
        self.transport.write(
            request.requester,
            request.requester_info,
            [base + s * bb for s in slots],
            request.dst[: len(slots)],
            bb,
            deadline,
        )
        return checksums.result()

    @staticmethod
    def _checksums(mem: PoolBuffer, slots: list[int], bb: int) -> list[int]:
        with memoryview(mem) as whole:
            return [xxhash.xxh3_64_intdigest(whole[s * bb : (s + 1) * bb]) for s in slots]

    # -- helpers ----------------------------------------------------------------------------

    def summary(self) -> dict[str, int | float | str]:
        out: dict[str, int | float | str] = {f"remote_{k}": v for k, v in vars(self.stats).items()}
        out["remote_pull_rate_bytes_per_s"] = round(self.rate)
        return out

    def peer_counts(self) -> dict[str, tuple[int, int, int]]:
        """holder -> (pulls, failed pulls, bytes pulled), for the per-peer metrics."""
        return {peer: (st.pulls, st.failures, st.pulled_bytes) for peer, st in list(self.peers.items())}

    def _on_loop(self, fn: Callable[..., None], *args: object) -> None:
        on_loop(self._loop, fn, *args)


def _jobs_bytes(jobs: list[tuple[Namespace, list[bytes], list[int]]]) -> int:
    """Bytes a pull's jobs (namespace, keys, slots) move."""
    return sum(len(keys) * ns.block_bytes for ns, keys, _ in jobs)


def _moving_average(old: float, sample: float) -> float:
    """The estimates' moving average (the first sample stands alone)."""
    return sample if not old else 0.7 * old + 0.3 * sample


def pool_regions(memory: PoolBuffer) -> list[tuple[int, int]]:
    return [(address_of(memory), len(memory))]
