"""The agent's RPC server: sessions over Unix sockets, dispatching to the block index.

One asyncio loop runs every session and the admin HTTP server; index operations cost
O(the request) (see :mod:`kvfabric.agent.index`), so they run inline. A bad frame or a
vanished client costs only that connection; the agent logs why and serves everyone else.

Trust model: the agent trusts the kernel, not its clients. A session's tenant comes from the
socket it connected through or its peer credentials; every size, count and id a client sends is
bounded by the schema and checked against what the agent knows; what one connection can hold
(frames before hello, time to say hello, time a reply may wait, reserved and leased bytes,
sessions per tenant) is bounded.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import gc
import hmac
import itertools
import logging
import os
import secrets
import socket
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kvfabric.agent import nics
from kvfabric.agent.discovery import KubeAPI, PeerDiscovery, pod_namespace
from kvfabric.agent.events import KVEvents, RouterBlock
from kvfabric.agent.gpu_service import GpuError, GpuService
from kvfabric.agent.index import BlockIndex, LeaseConflict, Namespace, QuotaExceeded, normalize_key, scoped
from kvfabric.agent.metrics import AgentMetrics
from kvfabric.agent.pool import PoolDoesNotFit, PoolError, Segment, SlotAllocator
from kvfabric.agent.remote import PeerTLS, RemoteTier, pool_regions
from kvfabric.agent.remote_index import ValkeyIndex
from kvfabric.agent.settings import AgentSettings
from kvfabric.agent.tenancy import TENANT_RE, PeerCredentials, TenantPools, peer_credentials, tenant_of_uid
from kvfabric.agent.tiering import TierService
from kvfabric.connector import protocol as p
from kvfabric.connector.pool_files import PoolBuffer

log = logging.getLogger(__name__)


class AgentStartError(RuntimeError):
    """The agent cannot start (socket owned by a live agent, pool cannot be reserved)."""


def _drop_gpu_session(gpu: GpuService, session_id: int) -> None:
    closed = gpu.drop_session(session_id)
    if closed:
        log.info("engine IPC mappings closed", extra={"session": session_id, "allocations": closed})


class _ProtocolError(Exception):
    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


@dataclass
class Session:
    session_id: int
    client: str
    peer: PeerCredentials | None
    tenant: str = ""
    opened_at: float = field(default_factory=time.time)
    #: names the session in a delegated commit (ids repeat across agent restarts, tokens do not)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    requests: int = 0
    #: kv_id -> the namespace its GPU registration serves (copies may touch only its slots)
    gpu_namespaces: dict[int, Namespace] = field(default_factory=dict)


#: Warnings logged per connection before the rest are only counted (a fuzzing or broken client
#: must not flood the log, which is written on the loop).
_WARNINGS_PER_CONNECTION = 5
#: GPU registrations one session may hold (a worker registers once; each costs streams,
#: events and staging memory on the engines' GPU).
MAX_GPU_REGISTRATIONS = 8
#: How often housekeeping runs: tenant sockets appear, tenant files are audited.
_HOUSEKEEPING_S = 1.0
_GC_FREEZE_EVERY_S = 30.0
#: Keys of a save handled before the loop serves others (about 1 ms of work).
_KEYS_PER_SLICE = 256


class _Connection:
    """Per-connection state that is not the session: peer, tenant hint, log budget."""

    def __init__(self, writer: asyncio.StreamWriter, tenant: str | None) -> None:
        self.writer = writer
        self.tenant = tenant  # from the tenant socket it came through, if any
        self.peer = peer_credentials(writer.get_extra_info("socket"))
        self.warnings = 0

    @property
    def pid(self) -> int | None:
        return self.peer.pid if self.peer else None

    def warn(self, msg: str, **extra: object) -> None:
        self.warnings += 1
        if self.warnings <= _WARNINGS_PER_CONNECTION:
            log.warning(msg, extra={"peer_pid": self.pid, **extra})
        elif self.warnings == _WARNINGS_PER_CONNECTION + 1:
            log.warning("further warnings of this connection are not logged", extra={"peer_pid": self.pid})


class Agent:
    """Pool + index + sessions. ``start()`` binds and reserves; ``stop()`` releases it all."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.agent_id = uuid.uuid4().hex
        self.segment: Segment | None = None
        # A CUDA pool lends an arena once its bytes are pinned (GpuService.on_pinned)
        self.allocator = SlotAllocator(settings.pool_size, settings.arena_size, usable=not settings.cuda)
        self.isolated = settings.tenancy == "isolated"
        quota = int(settings.tenant_share * self.allocator.n_arenas) if self.isolated else None
        self.index = BlockIndex(
            self.allocator,
            max_session_bytes=int(settings.session_share * settings.pool_size),
            max_namespaces=settings.max_namespaces,
            tenant_arenas=max(1, quota) if quota is not None and settings.tenant_share < 1 else None,
        )
        self.tenant_pools: TenantPools | None = None
        if self.isolated:
            self.tenant_pools = TenantPools(settings.pool_size, self.allocator.arena_bytes)
            self.allocator.on_arena_returned = self.tenant_pools.punch
        self.pool_id = uuid.uuid4().hex  # the segment's, or the tenant files' when there is none
        self.sessions: dict[int, Session] = {}
        self.metrics = AgentMetrics(self.index, lambda: len(self.sessions))
        self._ids = itertools.count(1)
        self._servers: dict[str, asyncio.AbstractServer] = {}  # tenant ("" main) -> listener
        self._socket_inodes: dict[Path, int] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._tenant_sessions: dict[str, int] = {}
        #: prefetch token -> (the worker's session, its kv_id)
        self._prefetch_targets: dict[bytes, tuple[Session, int]] = {}
        self._buffered = 0  # bytes of frame bodies being received, all connections
        self._background: list[threading.Thread] = []  # pinning or prefaulting the pool
        self._lock_fd: int | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = 0.0
        self.ready = False
        #: set when the agent cannot go on (a sticky CUDA error): not ready, and main() exits
        self.fatal: str | None = None
        self.fatal_event = asyncio.Event()
        self.gpu: GpuService | None = None
        self._gpu_copies = ThreadPoolExecutor(4, "kvfabric-gpu-copy")
        self.tiers: TierService | None = None
        if settings.nvme_path is not None and settings.nvme_size is not None:
            self.tiers = TierService(
                settings.nvme_path,
                settings.nvme_size,
                self.index,
                self._pool_memory,
                threads=settings.nvme_threads,
                queue_blocks=settings.nvme_queue_blocks,
                read_deadline_s=settings.nvme_read_deadline_ms / 1000,
                observe=lambda op, s: self.metrics.nvme_seconds.labels(op).observe(s),
            )
            self.metrics.watch_tier(self.tiers)
        #: the fabric (``--fabric-valkey``): the pool's block index and pulls from peers
        self.remote_index: ValkeyIndex | None = None
        self.remote: RemoteTier | None = None
        #: the pool's members (--fabric-peers-service); None: any holder the index names
        self.discovery: PeerDiscovery | None = None
        self.fabric_error = ""  # why the fabric is off although configured
        self.nics: list[nics.RdmaDevice] = []  # the node's RDMA devices, found when the fabric starts
        #: KV events for routers (``--kv-events-endpoint``)
        self.events: KVEvents | None = None
        self.events_error = ""
        self.node_name = settings.node_name or socket.gethostname()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Takes the agent's lock, binds its sockets (answering 'busy' until ready), then
        reserves the pool: a second agent on the same socket exits before touching anything."""
        path = self.settings.socket
        self._loop = asyncio.get_running_loop()  # copy threads report fatal errors to it
        self._take_lock(path)
        self._servers[""] = await self._listen(path, None)
        if not self.isolated or self.settings.cuda:
            self.segment = await self._create_segment()
            self.pool_id = self.segment.pool_id
        if self.settings.cuda:
            assert self.segment is not None
            self.gpu = GpuService(
                self.segment,
                self.settings.pin_threads,
                on_fatal=self._on_gpu_fatal,
                ready_bytes=self.settings.cuda_ready_bytes,
                dma_saves=self.settings.cuda_dma_saves,
                dma_loads=self.settings.cuda_dma_loads,
                on_pinned=self._on_pinned,
            )
            self._background.append(threading.Thread(target=self.gpu.pin, name="kvfabric-pin", daemon=True))
        elif self.segment is not None and self.settings.prefault:
            self._background.append(
                threading.Thread(target=self.segment.prefault, name="kvfabric-prefault", daemon=True)
            )
        for t in self._background:
            t.start()
        if self.tiers is not None:
            self.tiers.start(self._loop)
        if self.settings.fabric_valkey is not None:
            try:
                await self._start_fabric()
            except (ImportError, OSError, ValueError) as exc:  # no NIXL or Valkey client, port taken
                # the cache still serves this node: remote hits are what is lost, and said
                self.fabric_error = f"{type(exc).__name__}: {exc}"
                log.error("fabric off: this agent serves local hits only", extra={"error": self.fabric_error})
                await self._stop_fabric()
        if self.settings.kv_events_endpoint is not None:
            self._start_events(self.settings.kv_events_endpoint)
        self._housekeeping = asyncio.create_task(self._housekeep())
        gc.freeze()  # start-up objects never need a collection pass again
        self.started_at = time.time()
        self.ready = True
        self.metrics.up.set(1)
        log.info(
            "agent ready",
            extra={
                "socket": str(path),
                "pool_path": str(self.settings.pool_path) if self.segment else "",
                "pool_bytes": self.settings.pool_size,
                "pool_id": self.pool_id,
                "tenancy": self.settings.tenancy,
            },
        )

    async def _start_fabric(self) -> None:
        """Joins the pool's fabric: NIXL over the pool's memory, the peers' port, the index."""
        st = self.settings
        assert st.fabric_valkey is not None and st.fabric_listen is not None and self.segment is not None
        self.nics = nics.discover()
        active = any(d.active for d in self.nics)
        if not active:
            log.info("no active RDMA port: block transfers go over TCP", extra={"devices": len(self.nics)})
        elif st.fabric_ucx_tls == "tcp":
            log.warning("RDMA ports are active but --fabric-ucx-tls is 'tcp' (e.g. 'rc,tcp' uses them)")
        rdma = active and st.fabric_ucx_tls != "tcp"
        use_nixl = st.fabric_transport == "nixl" or (st.fabric_transport == "auto" and rdma)
        transport = None
        if use_nixl:
            from kvfabric.agent.transport import NixlTransport

            # Before NIXL creates its UCX context: two network namespaces of one host would
            # otherwise talk through shared memory, and small socket buffers halve TCP throughput.
            os.environ["UCX_TLS"] = st.fabric_ucx_tls
            if rdma:  # the NIC nearest this agent's CPUs (and so its pool), unless set already
                near = nics.ucx_net_devices(self.nics, nics.numa_node_of(os.sched_getaffinity(0)))
                if near:
                    os.environ.setdefault("UCX_NET_DEVICES", near)
            os.environ.setdefault("UCX_TCP_SNDBUF", "4m")
            os.environ.setdefault("UCX_TCP_RCVBUF", "4m")
            transport = NixlTransport(self.agent_id, pool_regions(self.segment.map))
        tls = None
        if st.fabric_tls_cert is not None and st.fabric_tls_key is not None and st.fabric_tls_ca is not None:
            tls = PeerTLS(str(st.fabric_tls_cert), str(st.fabric_tls_key), str(st.fabric_tls_ca))
        self.remote = RemoteTier(
            self.index,
            self._pool_memory,
            transport,
            pull_deadline_s=st.fabric_pull_deadline_ms / 1000,
            tls=tls,
        )
        if st.fabric_peers_service is not None:
            api = KubeAPI.in_cluster(st.fabric_kube_api, st.fabric_kube_token_file, st.fabric_kube_ca_file)
            self.discovery = PeerDiscovery(
                api, st.fabric_peers_namespace or pod_namespace(), st.fabric_peers_service
            )
            self.remote.admits = self.discovery.admits
            self.discovery.start()
        host, _, port = st.fabric_listen.rpartition(":")
        await self.remote.start(host, int(port))
        self.remote_index = index = ValkeyIndex(
            st.fabric_valkey, st.fabric_pool, st.fabric_advertise or st.fabric_listen
        )
        self.index.commit_listeners.append(self._published)
        self.index.drop_listeners.append(self._unpublished)
        index.start()
        self.remote.observe = self.metrics.watch_remote(self._fabric_summary, self.remote.peer_counts).observe
        log.info(
            "fabric on", extra={"listen": st.fabric_listen, "pool": st.fabric_pool, "tls": tls is not None}
        )

    def _start_events(self, endpoint: str) -> None:
        st = self.settings
        events = KVEvents(
            endpoint,
            st.kv_events_replay_endpoint,
            st.kv_events_topic,
            self.node_name,
            buffer_batches=st.kv_events_buffer_batches,
        )
        try:
            events.start()
        except Exception as exc:  # zmq missing, address in use: the cache serves on, unseen by routers
            self.events_error = f"{type(exc).__name__}: {exc}"
            log.error("KV events off", extra={"error": self.events_error})
            return
        self.events = events
        self.metrics.watch_events(events.summary)
        self.index.commit_listeners.append(self._announce_committed)
        self.index.drop_listeners.append(self._announce_dropped)
        if self.tiers is not None:
            self.tiers.disk_listeners.append(self._announce_disk)
        log.info(
            "KV events on", extra={"endpoint": events.bound_endpoint, "replay": events.bound_replay_endpoint}
        )

    def _announce_committed(self, ns: Namespace, slot: int, key: bytes, session: int) -> None:
        if self.events is not None:
            self.events.committed((scoped(ns.tenant, ns.name), key), ns.model)

    def _announce_dropped(self, ns: Namespace, key: bytes) -> None:
        if self.events is not None:
            self.events.dropped((scoped(ns.tenant, ns.name), key), ns.model)

    def _announce_disk(self, tenant: str, name: str, key: bytes, stored: bool) -> None:
        ns = self.index.namespaces.get(scoped(tenant, name))
        if self.events is not None and ns is not None:
            ident = (scoped(tenant, name), key)
            (self.events.on_disk if stored else self.events.off_disk)(ident, ns.model)

    def _annotate(self, request: p.Annotate, tenant: str) -> int:
        """Records vLLM's names of blocks for the KV events; returns how many were announced."""
        ns = self.index.namespace(request.namespace, tenant)
        width = ns.block_tokens
        self._check_annotation(request, width)
        events = self.events
        if events is None:
            return 0
        name = scoped(ns.tenant, ns.name)
        tier = self.tiers.tier if self.tiers is not None else None
        parent = request.parent_hash
        announced = 0
        for i, raw in enumerate(request.keys):
            key = normalize_key(raw)
            extra = request.extra_keys[i] if request.extra_keys is not None else None
            block = RouterBlock(
                request.hashes[i],
                parent,
                array.array("l", request.token_ids[i * width : (i + 1) * width]),
                request.lora_name,
                tuple(tuple(x) if isinstance(x, list) else x for x in extra) if extra is not None else None,
            )
            committed = self.index.committed_slot(ns, key) >= 0
            on_disk = tier is not None and tier.holds(ns.tenant, ns.name, key, ns.block_bytes)
            announced += events.annotate((name, key), ns.model, block, committed, on_disk)
            parent = request.hashes[i]
        return announced

    @staticmethod
    def _check_annotation(request: p.Annotate, width: int) -> None:
        n = len(request.keys)
        if (
            len(request.hashes) != n
            or len(request.token_ids) != n * width
            or (request.extra_keys is not None and len(request.extra_keys) != n)
        ):
            raise _ProtocolError(
                p.E_BAD_REQUEST, f"an annotation needs a hash (and extra keys) and {width} token ids per key"
            )

    def _published(self, ns: Namespace, slot: int, key: bytes, session: int) -> None:
        if self.remote_index is not None:
            self.remote_index.publish(scoped(ns.tenant, ns.name), key)

    def _unpublished(self, ns: Namespace, key: bytes) -> None:
        if self.remote_index is not None:
            self.remote_index.remove(scoped(ns.tenant, ns.name), key)

    async def _stop_fabric(self) -> None:
        loop = asyncio.get_running_loop()
        if self.discovery is not None:
            await loop.run_in_executor(None, self.discovery.stop)
            self.discovery = None
        if self._published in self.index.commit_listeners:
            self.index.commit_listeners.remove(self._published)
        if self._unpublished in self.index.drop_listeners:
            self.index.drop_listeners.remove(self._unpublished)
        if self.remote_index is not None:
            await loop.run_in_executor(None, self.remote_index.close)
            self.remote_index = None
        if self.remote is not None:  # its transfers use pool memory: before the pool goes
            await self.remote.stop()
            self.remote = None

    async def _remote_lookup(self, request: p.Lookup, session: Session) -> p._Reply:
        """A lookup that may pull the blocks after its hits from a peer (see :mod:`remote`)."""
        reply = self._dispatch(request, session)
        remote, index = self.remote, self.remote_index
        if (
            not isinstance(reply, p.LookupReply)
            or remote is None
            or index is None
            or reply.promoting
            or reply.hits >= len(request.keys)
        ):
            return reply
        unique = self._lookup_spaces(request, session.tenant)
        if unique is None:
            return reply

        def promoting(n: int) -> p.LookupReply:
            return msgspec.structs.replace(reply, promoting=n, promote_eta_ms=round(remote.eta_s() * 1000, 3))

        rest = request.keys[reply.hits :]
        coming = remote.coming(unique, [normalize_key(k) for k in rest])
        if coming:  # asked again while its pull runs: no need to ask the index
            return promoting(coming)
        names = [scoped(ns.tenant, ns.name) for ns in unique]
        settled = remote.settled
        holders = await asyncio.get_running_loop().run_in_executor(None, index.locate, names, rest)
        if remote.settled != settled:  # a pull ended meanwhile: maybe with these blocks
            return await self._remote_lookup(request, session)
        parent = request.keys[reply.hits - 1] if reply.hits else None
        pulling = remote.pull(unique, rest, parent, holders) if holders else 0
        log.debug(
            "remote lookup",
            extra={"hits": reply.hits, "located": sum(h is not None for h in holders), "pulling": pulling},
        )
        if not pulling:
            return reply
        remote.stats.located_blocks += pulling
        return promoting(pulling)

    def _lookup_spaces(self, request: p.Lookup, tenant: str) -> list[Namespace] | None:
        """The lookup's namespaces, each once (MLA ranks may share one); None if one is unknown."""
        spaces = [self.index.namespaces.get(scoped(tenant, n)) for n in request.namespaces]
        if any(ns is None for ns in spaces):
            return None
        return list({id(ns): ns for ns in spaces if ns is not None}.values())

    async def _create_segment(self) -> Segment:
        """The pool segment. When it does not fit yet, waits up to ``--start-wait-s`` for space:
        after a crash, CPU engines still map the dead agent's pool; they drop that mapping once
        they find no agent (their next call, answered 'busy' by this one while it waits), and
        its pages are freed."""
        deadline = time.monotonic() + self.settings.start_wait_s
        while True:
            try:
                return Segment(
                    self.settings.pool_path,
                    self.settings.pool_size,
                    self.settings.huge_pages,
                    threads=self.settings.pin_threads,
                    reserve=not self.settings.cuda,  # pinning populates it (statvfs checked it fits)
                    parts=1 if self.isolated else self.settings.pool_parts,
                )
            except PoolDoesNotFit as exc:
                if time.monotonic() >= deadline:
                    raise AgentStartError(str(exc)) from exc
                log.warning("the pool does not fit yet; waiting for space", extra={"reason": str(exc)})
                await asyncio.sleep(0.5)
            except (OSError, PoolError) as exc:
                raise AgentStartError(str(exc)) from exc

    def _take_lock(self, path: Path) -> None:
        """``flock`` on ``<socket>.lock`` for the process's lifetime decides which agent owns the
        socket (and so the pool): probing the socket and binding later left a window in which
        two agents both started."""
        os.makedirs(path.parent, exist_ok=True)
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentStartError(
                f"another agent holds {lock_path} (it serves {path}); refusing to start"
            ) from None
        self._lock_fd = fd

    async def _listen(self, path: Path, tenant: str | None) -> asyncio.AbstractServer:
        """Binds ``path`` (a file left there is stale: we hold the lock) with mode 0660."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._handle(reader, writer, tenant)

        server = await asyncio.start_unix_server(handle, path=str(path), limit=1 << 16)
        os.chmod(path, 0o660)
        self._socket_inodes[path] = os.stat(path).st_ino
        return server

    def _unlink_own(self, path: Path) -> None:
        """Removes a socket only if it is still the one this agent bound."""
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._socket_inodes.get(path):
                os.unlink(path)

    async def _housekeep(self) -> None:
        last_freeze = time.monotonic()
        while True:
            await asyncio.sleep(_HOUSEKEEPING_S)
            try:
                if self.settings.tenant_socket_dir is not None:
                    await self._serve_tenant_sockets(self.settings.tenant_socket_dir)
                if self.tenant_pools is not None:
                    self._audit_tenant_files(self.tenant_pools)
                if time.monotonic() - last_freeze > _GC_FREEZE_EVERY_S:
                    # Index entries live long and form no cycles: keep them out of full
                    # collections, whose pause grows with every object tracked (seconds at 8M
                    # blocks). Young garbage is collected first.
                    gc.collect(1)
                    gc.freeze()
                    last_freeze = time.monotonic()
            except Exception:  # housekeeping must never stop for good
                log.exception("housekeeping failed")

    async def _serve_tenant_sockets(self, root: Path) -> None:
        """One socket per tenant directory ``root/<tenant>`` (created by whoever mounts it)."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(root):
                tenant = entry.name
                if tenant in self._servers or not entry.is_dir(follow_symlinks=False):
                    continue
                if not TENANT_RE.match(tenant) or tenant.startswith("uid-"):
                    continue
                self._servers[tenant] = await self._listen(Path(entry.path) / "agent.sock", tenant)
                log.info("tenant socket served", extra={"tenant": tenant})

    def _audit_tenant_files(self, pools: TenantPools) -> None:
        lent: dict[str, set[int]] = {}
        for ns in self.allocator.namespaces.values():
            lent.setdefault(ns.tenant, set()).update(ns.arenas)
        for tenant in pools.tenants():
            pools.audit(tenant, lent.get(tenant, set()), self.allocator.n_arenas)

    def _on_pinned(self, offset: int, length: int) -> None:
        """Called from a pinning thread: the arenas inside these bytes may be lent now (the
        allocator lives on the loop; a request after this sees them, being queued after it)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
            self._loop.call_soon_threadsafe(self.allocator.make_usable, offset, offset + length)

    def _on_gpu_fatal(self, why: str) -> None:
        """Called from a copy thread: the CUDA context is unusable for every engine."""

        def mark() -> None:
            self.fatal = why
            self.ready = False
            self.metrics.up.set(0)
            self.fatal_event.set()
            log.error(
                "CUDA context lost; the agent stops (engines recompute meanwhile)", extra={"error": why}
            )

        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
                self._loop.call_soon_threadsafe(mark)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.up.set(0)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        for server in self._servers.values():
            server.close()
        for w in list(self._writers):
            w.close()
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for path in list(self._socket_inodes):
            self._unlink_own(path)
        self._socket_inodes.clear()
        # Joining threads can take a while: not on the loop. Pinning and prefaulting stop at
        # their next chunk and are joined before the pool is unmapped under them.
        loop = asyncio.get_running_loop()
        if self.segment is not None:
            self.segment.stopping.set()
        for t in self._background:
            await loop.run_in_executor(None, t.join, 60.0)
        if self.tiers is not None:  # its threads use pool memory: before the pool goes
            await loop.run_in_executor(None, self.tiers.close)
        await self._stop_fabric()
        if self.events is not None:
            await self.events.stop()
            self.events = None
        await loop.run_in_executor(None, self._gpu_copies.shutdown, True)
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        if self.tenant_pools is not None:
            self.tenant_pools.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock (the file stays: removing it would race)
            self._lock_fd = None
        log.info("agent stopped")

    @property
    def serving(self) -> bool:
        """Ready for every kind of engine: started, and pinned when CUDA is on."""
        return self.ready and self.fatal is None and (self.gpu is None or self.gpu.ready.is_set())

    # -- sessions ----------------------------------------------------------------------------------

    async def _read_frame(self, reader: asyncio.StreamReader, limit: int) -> bytes:
        """One frame's body. Bodies being received count against ``--max-buffered-bytes`` for
        all connections together (many sessions each sending part of a large frame would
        otherwise hold gigabytes), and must arrive within ``--write-timeout-s`` of their header."""
        header = await reader.readexactly(p.HEADER.size)
        (length,) = p.HEADER.unpack(header)
        if length > limit:
            raise _ProtocolError(
                p.E_BAD_FRAME,
                f"frame of {length} bytes exceeds the limit of {limit}"
                + (" before hello" if limit == p.PRE_HELLO_MAX_FRAME_BYTES else ""),
                fatal=True,
            )
        if self._buffered + length > self.settings.max_buffered_bytes:
            raise _ProtocolError(
                p.E_BUSY, f"frames of {self._buffered} bytes are being received; retry", fatal=True
            )
        self._buffered += length
        try:
            return await asyncio.wait_for(reader.readexactly(length), self.settings.write_timeout_s)
        except TimeoutError:
            raise _ProtocolError(
                p.E_BAD_FRAME, "the frame's body did not arrive in time", fatal=True
            ) from None
        finally:
            self._buffered -= length

    async def _send(self, conn: _Connection, reply: p._Reply) -> None:
        await self._write(conn.writer, p.encode(reply))

    async def _write(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        """Queues a frame and waits, at most ``--write-timeout-s``, until the client took it."""
        writer.write(frame)
        await asyncio.wait_for(writer.drain(), self.settings.write_timeout_s)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tenant: str | None
    ) -> None:
        conn = _Connection(writer, tenant)
        session: Session | None = None
        if len(self._writers) >= self.settings.max_sessions:  # connections, with or without hello
            self.metrics.errors.labels("too_many_connections").inc()
            conn.warn("too many connections; refusing one")
            with contextlib.suppress(Exception):
                await self._send(conn, p.ErrorReply(code=p.E_BUSY, message="too many connections"))
            writer.close()
            return
        self._writers.add(writer)
        try:
            while True:
                try:
                    if session is None:
                        body = await asyncio.wait_for(
                            self._read_frame(reader, p.PRE_HELLO_MAX_FRAME_BYTES),
                            self.settings.hello_timeout_s,
                        )
                    else:
                        body = await self._read_frame(reader, self.settings.max_frame_bytes)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.metrics.errors.labels("truncated_frame").inc()
                        conn.warn("client vanished mid-frame")
                    return
                except TimeoutError:
                    self.metrics.errors.labels("hello_timeout").inc()
                    conn.warn("no hello in time; closing the connection")
                    return
                started = time.perf_counter()
                op = "invalid"
                fd_to_pass: int | None = None
                try:
                    try:
                        request = p.request_decoder.decode(body)
                    except (msgspec.DecodeError, RecursionError) as exc:
                        raise _ProtocolError(p.E_BAD_REQUEST, f"undecodable request: {exc}") from None
                    op = p.op_name(request)
                    if isinstance(request, p.Hello):
                        if session is not None:
                            raise _ProtocolError(p.E_BAD_REQUEST, "hello sent twice")
                        session = self._open_session(request, conn)
                        reply: p._Reply = self._hello_reply(session)
                    elif session is None:
                        raise _ProtocolError(p.E_NO_SESSION, "first request must be hello", fatal=True)
                    elif isinstance(request, p.GpuCopy | p.RegisterGpuKV):
                        session.requests += 1
                        reply = await self._gpu_request(request, session)
                    elif isinstance(request, p.GpuPrefetch):
                        session.requests += 1
                        reply = await self._gpu_prefetch(request, session)
                    elif isinstance(request, p.Lookup) and request.promote and self.remote is not None:
                        session.requests += 1
                        reply = await self._remote_lookup(request, session)
                    elif isinstance(request, p.Annotate) and len(request.keys) > _KEYS_PER_SLICE:
                        reply = await self._annotate_in_slices(request, session)
                    elif isinstance(request, p.Reserve | p.Commit) and len(request.keys) > _KEYS_PER_SLICE:
                        session.requests += 1
                        reply = await self._save_in_slices(request, session)
                    elif isinstance(request, p.OpenPool):
                        session.requests += 1
                        reply, fd_to_pass = self._open_pool(request, session)
                    else:
                        session.requests += 1
                        reply = self._dispatch(request, session)
                    frame = p.encode(reply)  # inside the barrier: an unencodable reply is an error
                except _ProtocolError as exc:
                    if fd_to_pass is not None:
                        os.close(fd_to_pass)
                    self.metrics.errors.labels(exc.code).inc()
                    conn.warn("bad request", code=exc.code, reason=str(exc), op=op)
                    await self._send(conn, p.ErrorReply(code=exc.code, message=str(exc)))
                    if exc.fatal:
                        return
                    continue
                except Exception:  # a bug must cost one request, not the agent
                    if fd_to_pass is not None:
                        os.close(fd_to_pass)
                    self.metrics.errors.labels(p.E_INTERNAL).inc()
                    log.exception("request failed", extra={"op": op, "peer_pid": conn.pid})
                    await self._send(
                        conn, p.ErrorReply(code=p.E_INTERNAL, message="internal error (logged by the agent)")
                    )
                    continue
                self.metrics.rpc_seconds.labels(op).observe(time.perf_counter() - started)
                if fd_to_pass is None:
                    await self._write(writer, frame)
                else:
                    try:
                        await self._send_with_fd(writer, frame, fd_to_pass)
                    finally:
                        os.close(fd_to_pass)
        except TimeoutError:
            self.metrics.errors.labels("write_timeout").inc()
            conn.warn("client stopped reading; closing its session")
        except _ProtocolError as exc:  # a frame that cannot be read: say why, then close
            self.metrics.errors.labels(exc.code).inc()
            conn.warn("closing connection", code=exc.code, reason=str(exc))
            with contextlib.suppress(OSError, TimeoutError):
                await self._send(conn, p.ErrorReply(code=exc.code, message=str(exc)))
        except (ConnectionError, OSError) as exc:
            self.metrics.errors.labels("connection").inc()
            log.info("connection lost", extra={"reason": repr(exc), "peer_pid": conn.pid})
        finally:
            self._writers.discard(writer)
            if session is not None:
                self._close_session(session)
            writer.close()

    async def _send_with_fd(self, writer: asyncio.StreamWriter, frame: bytes, fd: int) -> None:
        """Sends one frame with a descriptor attached (``SCM_RIGHTS``). asyncio's transports
        cannot, so the frame goes on a duplicate of the socket, once everything queued before
        it has been written (the transport's buffer is empty after drain)."""
        await asyncio.wait_for(writer.drain(), self.settings.write_timeout_s)
        transport_sock = writer.get_extra_info("socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(transport_sock.fileno()))
        try:
            deadline = time.monotonic() + self.settings.write_timeout_s
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sent = 0
            while sent < len(frame):
                try:
                    sent += sock.sendmsg([frame[sent:]], fds if sent == 0 else [])
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError from None
                    await asyncio.sleep(0.005)
        finally:
            sock.close()  # the duplicate only; the transport's descriptor stays open

    def _tenant_of(self, conn: _Connection) -> str:
        """The session's tenant, from what the kernel says, never from the client."""
        if not self.isolated:
            return ""
        if conn.tenant is not None:
            return conn.tenant
        if conn.peer is None:
            raise _ProtocolError(p.E_BAD_REQUEST, "peer credentials unavailable", fatal=True)
        return tenant_of_uid(conn.peer.uid)

    @staticmethod
    def _peer_key(session: Session) -> str:
        """Whose sessions count together against --max-sessions-per-tenant: the tenant, or in
        a shared pool the peer's uid (one misbehaving engine cannot take every session)."""
        if session.tenant:
            return f"tenant {session.tenant!r}"
        return f"peer uid {session.peer.uid}" if session.peer else "peer unknown"

    def _open_session(self, hello: p.Hello, conn: _Connection) -> Session:
        if hello.protocol_version != p.PROTOCOL_VERSION:
            raise _ProtocolError(
                p.E_VERSION,
                f"client speaks protocol {hello.protocol_version}, agent {p.PROTOCOL_VERSION}",
                fatal=True,
            )
        if not self.ready:
            raise _ProtocolError(p.E_BUSY, "the agent is starting; retry shortly", fatal=True)
        if len(self.sessions) >= self.settings.max_sessions:
            raise _ProtocolError(p.E_BUSY, "too many sessions", fatal=True)
        tenant = self._tenant_of(conn)
        session = Session(session_id=next(self._ids), client=hello.client, peer=conn.peer, tenant=tenant)
        who = self._peer_key(session)
        if self._tenant_sessions.get(who, 0) >= self.settings.max_sessions_per_tenant:
            raise _ProtocolError(p.E_QUOTA, f"{who} has too many sessions", fatal=True)
        self.sessions[session.session_id] = session
        self._tenant_sessions[who] = self._tenant_sessions.get(who, 0) + 1
        self.metrics.sessions_opened.inc()
        log.info(
            "session opened",
            extra={
                "session": session.session_id,
                "client": hello.client,
                "peer_pid": conn.pid,
                "peer_uid": conn.peer.uid if conn.peer else None,
                "tenant": tenant,
            },
        )
        return session

    async def _gpu_request(self, request: p.GpuCopy | p.RegisterGpuKV, session: Session) -> p._Reply:
        """GPU work runs on the GPU executor: CUDA calls can block (copies, opening IPC handles),
        and the event loop must keep serving every other session meanwhile. Whatever a copy
        may touch is checked here, on the loop that owns the index, before it is queued."""
        if self.gpu is None:
            raise _ProtocolError(p.E_GPU, "this agent does not serve GPU engines (start it with --cuda)")
        gpu, loop = self.gpu, asyncio.get_running_loop()
        started = time.perf_counter()
        tenant = session.tenant
        try:
            if isinstance(request, p.GpuCopy):
                self._check_gpu_slots(request, session)
                method = await loop.run_in_executor(self._gpu_copies, gpu.copy, session.session_id, request)
                # Not observed into the copy histograms here: the engine reports the whole
                # copy's time with its commit or release (a layered load's reply comes early).
                return p.GpuCopyReply(method=method, seconds=time.perf_counter() - started)
            if len(session.gpu_namespaces) >= MAX_GPU_REGISTRATIONS:
                raise _ProtocolError(
                    p.E_QUOTA, f"at most {MAX_GPU_REGISTRATIONS} GPU registrations per session"
                )
            self.index.check_layout(request.namespace, request.description, tenant)  # before opening anything
            kv_id, block_bytes, layered = await loop.run_in_executor(
                self._gpu_copies, gpu.register, session.session_id, request
            )
            try:
                ns = self.index.register(
                    request.namespace,
                    block_bytes,
                    request.block_tokens or 1,
                    request.description,
                    tenant,
                    request.model,
                    request.group,
                )
            except ValueError:
                # Not left registered: a kv_id nobody may use (its namespace was refused).
                await loop.run_in_executor(self._gpu_copies, gpu.unregister, session.session_id, kv_id)
                raise
            ns.gpu = True  # its blocks live in the segment the agent copies through
            session.gpu_namespaces[kv_id] = ns
            token = request.prefetch_token
            prefetch = layered and len(token) >= 16 and token not in self._prefetch_targets
            if prefetch:
                self._prefetch_targets[token] = (session, kv_id)
            if self.events is not None:
                self.events.model_seen(ns.model)
        except GpuError as exc:
            raise _ProtocolError(p.E_GPU, str(exc)) from exc
        except QuotaExceeded as exc:
            raise _ProtocolError(p.E_QUOTA, str(exc)) from exc
        except ValueError as exc:
            raise _ProtocolError(p.E_NAMESPACE, str(exc)) from exc
        log.info(
            "GPU engine KV registered",
            extra={
                "session": session.session_id,
                "kv_id": kv_id,
                "layers": len(request.handles),
                "layer_events": len(request.layer_events) if layered else 0,
                "layout": request.description,
                "namespace": ns.name,
                "tenant": tenant,
                "seconds": round(time.perf_counter() - started, 4),
            },
        )
        return p.GpuKVReply(kv_id=kv_id, block_bytes=block_bytes, layered=layered, prefetch=prefetch)

    async def _gpu_prefetch(self, request: p.GpuPrefetch, session: Session) -> p._Reply:
        """A scheduler's loads into its workers' registrations, queued now (layered, as the
        worker's own would be). A load is refused (not queued) unless its token names a live
        registration of the scheduler's tenant and every slot is under a lease of that
        registration's namespace; refusing one costs a copy by the worker, never wrong KV."""
        if self.gpu is None:
            raise _ProtocolError(p.E_GPU, "this agent does not serve GPU engines (start it with --cuda)")
        gpu, loop = self.gpu, asyncio.get_running_loop()
        queued: list[bool] = []
        refused = self.metrics.prefetched_blocks.labels("refused")
        for load in request.loads:
            target = self._prefetch_targets.get(load.token)
            if target is None or target[0].tenant != session.tenant or not load.block_ids:
                refused.inc(len(load.block_ids))
                queued.append(False)
                continue
            owner, kv_id = target
            copy = p.GpuCopy(
                kv_id=kv_id,
                to_pool=False,
                block_ids=load.block_ids,
                slots=load.slots,
                layered=True,
                event_set=request.event_set,
            )
            try:
                self._check_gpu_slots(copy, owner)
                await loop.run_in_executor(self._gpu_copies, gpu.copy, owner.session_id, copy)
            except (_ProtocolError, GpuError) as exc:
                log.warning("prefetch refused; the worker loads", extra={"error": str(exc)})
                refused.inc(len(load.block_ids))
                queued.append(False)
                continue
            self.metrics.prefetched_blocks.labels("queued").inc(len(load.block_ids))
            queued.append(True)
        return p.GpuPrefetchReply(queued=queued)

    async def _save_in_slices(self, request: p.Reserve | p.Commit, session: Session) -> p._Reply:
        """A long save (a 128k-token prompt is 8k keys) in slices, yielding the loop between
        them: other sessions and /healthz wait for one slice at most, not for the whole save.
        Each key's reservation or commit is independent, so interleaving changes nothing."""
        keys, n = request.keys, _KEYS_PER_SLICE
        if isinstance(request, p.Reserve):
            slots: list[int] = []
            for i in range(0, len(keys), n):
                parent = request.parent if i == 0 else keys[i - 1]
                part = p.Reserve(namespace=request.namespace, keys=keys[i : i + n], parent=parent)
                reply = self._dispatch(part, session)
                assert isinstance(reply, p.ReserveReply)
                slots += reply.slots
                await asyncio.sleep(0)
            return p.ReserveReply(pool_id=self.pool_id, slots=slots)
        done = 0
        for i in range(0, len(keys), n):
            last = i + n >= len(keys)
            commit = p.Commit(
                namespace=request.namespace,
                keys=keys[i : i + n],
                abort=request.abort if last else [],
                copy_seconds=request.copy_seconds if last else 0.0,
                owner=request.owner,
                owner_token=request.owner_token,
            )
            done_reply = self._dispatch(commit, session)
            assert isinstance(done_reply, p.CommitReply)
            done += done_reply.committed
            await asyncio.sleep(0)
        return p.CommitReply(committed=done)

    async def _annotate_in_slices(self, request: p.Annotate, session: Session) -> p._Reply:
        """A long annotation in slices (as a long save), checked whole first."""
        try:
            width = self.index.namespace(request.namespace, session.tenant).block_tokens
        except KeyError as exc:
            raise _ProtocolError(p.E_NAMESPACE, str(exc.args[0] if exc.args else exc)) from exc
        self._check_annotation(request, width)
        n, announced = _KEYS_PER_SLICE, 0
        for i in range(0, len(request.keys), n):
            part = p.Annotate(
                namespace=request.namespace,
                keys=request.keys[i : i + n],
                hashes=request.hashes[i : i + n],
                token_ids=request.token_ids[i * width : (i + n) * width],
                parent_hash=request.parent_hash if i == 0 else request.hashes[i - 1],
                lora_name=request.lora_name,
                extra_keys=request.extra_keys[i : i + n] if request.extra_keys is not None else None,
            )
            done = self._dispatch(part, session)
            assert isinstance(done, p.AnnotateReply)
            announced += done.announced
            await asyncio.sleep(0)
        return p.AnnotateReply(announced=announced)

    def _check_gpu_slots(self, request: p.GpuCopy, session: Session) -> None:
        """A save may write only slots this session reserved in the registration's namespace;
        a load may read only slots under a live lease of that namespace (its tenant's: the
        scheduler's session leases, the worker's copies)."""
        ns = session.gpu_namespaces.get(request.kv_id)
        if ns is None:
            raise _ProtocolError(p.E_GPU, f"unknown kv_id {request.kv_id} for this session")
        if len(request.slots) != len(request.block_ids):
            raise _ProtocolError(p.E_BAD_REQUEST, "block_ids and slots differ in length")
        ok = (
            self.index.reserved_slots_ok(ns, request.slots, session.session_id)
            if request.to_pool
            else self.index.leased_slots_ok(ns, request.slots)
        )
        if not ok:
            self.metrics.errors.labels("slot_not_owned").inc()
            raise _ProtocolError(
                p.E_GPU,
                "a slot of this copy is not "
                + ("reserved by this session" if request.to_pool else "under a lease")
                + " in the registration's namespace",
            )

    def _pool_memory(self, ns: Namespace) -> PoolBuffer:
        """The mapping that holds ``ns``'s slots: its tenant's own file (isolated tenancy, CPU
        engines), else the shared segment."""
        if self.tenant_pools is not None and not ns.gpu:
            return self.tenant_pools.mapping(ns.tenant)
        assert self.segment is not None
        return self.segment.map

    def _open_pool(self, request: p.OpenPool, session: Session) -> tuple[p.PoolReply, int]:
        """The session's pool file as a descriptor: its tenant's own file with isolated
        tenancy, else the shared segment."""
        if self.tenant_pools is not None:
            fd = self.tenant_pools.open_for_client(session.tenant, request.writable)
        else:
            assert self.segment is not None
            fd = os.open(self.segment.path, (os.O_RDWR if request.writable else os.O_RDONLY) | os.O_CLOEXEC)
        reply = p.PoolReply(
            pool_id=self.pool_id, pool_bytes=self.settings.pool_size, writable=request.writable
        )
        return reply, fd

    def _close_session(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        for token in [t for t, (owner, _) in self._prefetch_targets.items() if owner is session]:
            del self._prefetch_targets[token]
        self._tenant_sessions[self._peer_key(session)] -= 1
        if self.gpu is not None:
            # Copies of this session have completed (_handle awaits each one before reading on).
            # Closing IPC mappings can block in the driver: not on the event loop. An executor
            # already shut down means the agent is stopping, and gpu.close() drops every session.
            with contextlib.suppress(RuntimeError):
                self._gpu_copies.submit(_drop_gpu_session, self.gpu, session.session_id)
        leases, reservations = self.index.drop_session(session.session_id)
        log.info(
            "session closed",
            extra={
                "session": session.session_id,
                "client": session.client,
                "leases_dropped": leases,
                "reservations_dropped": reservations,
            },
        )

    def _hello_reply(self, session: Session) -> p.HelloReply:
        return p.HelloReply(
            session_id=session.session_id,
            agent_id=self.agent_id,
            pool_id=self.pool_id,
            # No path to open with isolated tenancy: the pool comes by descriptor (OpenPool).
            pool_path=str(self.segment.path) if self.segment is not None and not self.isolated else "",
            pool_bytes=self.settings.pool_size,
            pool_files=len(self.segment.sizes) if self.segment is not None else 1,
            protocol_version=p.PROTOCOL_VERSION,
            features=[*p.FEATURES, p.KV_EVENTS_FEATURE] if self.events is not None else list(p.FEATURES),
            tenant=session.tenant,
            session_token=session.token,
        )

    # -- requests ------------------------------------------------------------------------------------

    def _commit_owner(self, request: p.Commit, session: Session) -> int | None:
        """The session whose reservations a commit settles: the caller's own, or (delegated) one
        of the same tenant that proved it by its token. None: that session is gone."""
        if request.owner is None or request.owner == session.session_id:
            return session.session_id
        owner = self.sessions.get(request.owner)
        if owner is None:
            return None
        if owner.tenant != session.tenant or not hmac.compare_digest(owner.token, request.owner_token):
            raise _ProtocolError(p.E_BAD_REQUEST, "not a session whose reservations this one may commit")
        return owner.session_id

    def _dispatch(self, request: p._Request, session: Session) -> p._Reply:
        pool_id = self.pool_id
        tenant = session.tenant
        try:
            if isinstance(request, p.Lookup):
                result = self.index.lookup(
                    request.namespaces,
                    request.keys,
                    request.block_tokens,
                    session.session_id,
                    request.lease_id,
                    tenant,
                )
                promoting, eta = 0, 0.0
                if request.promote and self.tiers is not None and result.hits < len(request.keys):
                    spaces = self._lookup_spaces(request, tenant)
                    if spaces is not None:
                        promoting = self.tiers.promote(
                            spaces,
                            request.keys[result.hits :],
                            request.keys[result.hits - 1] if result.hits else None,
                        )
                        eta = self.tiers.eta_s() * 1000 if promoting else 0.0
                return p.LookupReply(
                    hits=result.hits,
                    pool_id=pool_id,
                    slots=result.slots,
                    leases=result.leases,
                    promoting=promoting,
                    promote_eta_ms=round(eta, 3),
                )
            if isinstance(request, p.Reserve):
                slots = self.index.reserve(
                    request.namespace, request.keys, request.parent, session.session_id, tenant
                )
                return p.ReserveReply(pool_id=pool_id, slots=slots)
            if isinstance(request, p.Commit):
                owner = self._commit_owner(request, session)
                if owner is None:
                    return p.CommitReply(committed=0)  # gone, and its reservations with it
                done = self.index.commit(request.namespace, request.keys, request.abort, owner, tenant)
                if done:
                    self.metrics.save_seconds.observe(request.copy_seconds)
                return p.CommitReply(committed=done)
            if isinstance(request, p.Release):
                held = self.index.release_many(request.lease_ids, request.loaded_blocks, tenant)
                if request.loaded_blocks and held and held[0]:
                    self.metrics.load_seconds.observe(request.copy_seconds)
                return p.ReleaseReply(held=held)
            if isinstance(request, p.RegisterNamespace):
                ns = self.index.register(
                    request.namespace,
                    request.block_bytes,
                    request.block_tokens,
                    request.description,
                    tenant,
                    request.model,
                    request.group,
                )
                if self.events is not None:
                    self.events.model_seen(ns.model)
                log.info(
                    "namespace registered",
                    extra={
                        "namespace": ns.name,
                        "block_bytes": ns.block_bytes,
                        "session": session.session_id,
                        "tenant": tenant,
                    },
                )
                return p.NamespaceReply(namespace=ns.name, block_bytes=ns.block_bytes)
            if isinstance(request, p.Annotate):
                return p.AnnotateReply(announced=self._annotate(request, tenant))
            if isinstance(request, p.Stats):
                return p.StatsReply(stats=self.stats())
        except LeaseConflict as exc:
            raise _ProtocolError(p.E_LEASE, str(exc)) from exc
        except QuotaExceeded as exc:
            raise _ProtocolError(p.E_QUOTA, str(exc)) from exc
        except KeyError as exc:
            raise _ProtocolError(p.E_NAMESPACE, str(exc.args[0] if exc.args else exc)) from exc
        except ValueError as exc:
            raise _ProtocolError(p.E_NAMESPACE, str(exc)) from exc
        raise _ProtocolError(p.E_BAD_REQUEST, f"unsupported request {type(request).__name__}")

    def stats(self) -> dict[str, int | float | str]:
        c = self.index.counters
        out: dict[str, int | float | str] = {k: v for k, v in vars(c).items()}
        out.update(
            agent_id=self.agent_id,
            pool_id=self.pool_id,
            pool_bytes=self.allocator.pool_bytes,
            pool_used_bytes=self.allocator.used_bytes,
            pool_prefaulted_bytes=self.segment.prefaulted_bytes if self.segment else 0,
            free_arenas=self.allocator.free_arenas,
            usable_arenas=self.allocator.usable_arenas,
            namespaces=len(self.index.namespaces),
            sessions=len(self.sessions),
            connections=len(self._writers),
            frames_buffered_bytes=self._buffered,
            tenancy=self.settings.tenancy,
            tenants=len({s.tenant for s in self.sessions.values() if s.tenant}),
            leases_active=len(self.index.leases),
            uptime_s=round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            cuda=int(self.gpu is not None),
            cuda_pinned=int(self.gpu is not None and self.gpu.pinned is not None),
            cuda_pin_seconds=round(self.gpu.pin_seconds, 3) if self.gpu else 0.0,
            cuda_pinned_bytes=self.gpu.pinned_bytes if self.gpu else 0,
            cuda_ipc_mappings=self.gpu.mapped() if self.gpu else 0,
            fatal=self.fatal or "",
        )
        out.update({f"blocks_{k}": v for k, v in self.index.block_counts().items()})
        if self.tiers is not None:
            out.update(self.tiers.summary())
        out.update(self._fabric_summary())
        if self.events is not None:
            out.update(self.events.summary())
        elif self.events_error:
            out["kv_events_error"] = self.events_error
        return out

    def _fabric_summary(self) -> dict[str, int | float | str]:
        if self.remote is None or self.remote_index is None:
            return {"fabric_error": self.fabric_error} if self.fabric_error else {}
        i = self.remote_index
        return {
            **self.remote.summary(),
            **nics.summary(self.nics),
            "fabric_ucx_tls": self.settings.fabric_ucx_tls,
            "fabric_ucx_net_devices": os.environ.get("UCX_NET_DEVICES", ""),
            "fabric_transport": "nixl" if self.remote.transport is not None else "stream",
            "valkey_up": int(i.up),
            "valkey_published": i.published,
            "valkey_removed": i.removed,
            "valkey_failures": i.failures,
            "valkey_lookups": i.lookups,
            **(self.discovery.summary() if self.discovery is not None else {}),
        }
