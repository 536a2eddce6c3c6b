"""The agent's RPC server: sessions over a Unix socket, dispatching to the block index.

One asyncio loop runs every session and the admin HTTP server; index operations are short
and never block, so they run inline. A bad frame or a vanished client costs only that
connection; the agent logs why and serves everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec

from kvfabric.agent.gpu_service import GpuError, GpuService
from kvfabric.agent.index import BlockIndex
from kvfabric.agent.metrics import AgentMetrics
from kvfabric.agent.pool import PoolError, Segment, SlotAllocator
from kvfabric.agent.settings import AgentSettings
from kvfabric.connector import protocol as p

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
    peer_pid: int | None
    opened_at: float = field(default_factory=time.time)
    requests: int = 0


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(creds[:4], "little")
    except (OSError, AttributeError):
        return None


class Agent:
    """Pool + index + sessions. ``start()`` binds and reserves; ``stop()`` releases it all."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.agent_id = uuid.uuid4().hex
        self.segment: Segment | None = None
        self.allocator = SlotAllocator(settings.pool_size, settings.arena_size)
        self.index = BlockIndex(self.allocator)
        self.sessions: dict[int, Session] = {}
        self.metrics = AgentMetrics(self.index, lambda: len(self.sessions))
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.started_at = 0.0
        self.ready = False
        self.gpu: GpuService | None = None
        self._gpu_copies = ThreadPoolExecutor(4, "kvfabric-gpu-copy")

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.settings.socket
        self._claim_socket(str(path))
        try:
            self.segment = Segment(
                self.settings.pool_path,
                self.settings.pool_size,
                self.settings.huge_pages,
                threads=self.settings.pin_threads,
                reserve=not self.settings.cuda,  # pinning populates it (statvfs checked it fits)
            )
        except (OSError, PoolError) as exc:
            raise AgentStartError(str(exc)) from exc
        if self.settings.cuda:
            self.gpu = GpuService(self.segment, self.settings.pin_threads)
            threading.Thread(target=self.gpu.pin, name="kvfabric-pin", daemon=True).start()
        elif self.settings.prefault:
            threading.Thread(target=self.segment.prefault, name="kvfabric-prefault", daemon=True).start()
        self._server = await asyncio.start_unix_server(self._handle, path=str(path))
        os.chmod(path, 0o660)
        self.started_at = time.time()
        self.ready = True
        self.metrics.up.set(1)
        log.info(
            "agent ready",
            extra={
                "socket": str(path),
                "pool_path": str(self.settings.pool_path),
                "pool_bytes": self.settings.pool_size,
                "pool_id": self.segment.pool_id,
            },
        )

    @staticmethod
    def _claim_socket(path: str) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except FileNotFoundError:
            pass
        except (TimeoutError, ConnectionRefusedError, OSError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale socket of an agent that is gone
        else:
            raise AgentStartError(f"another agent is serving on {path}; refusing to start")
        finally:
            probe.close()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.up.set(0)
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.socket)
        self._gpu_copies.shutdown(wait=True)
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        log.info("agent stopped")

    @property
    def serving(self) -> bool:
        """Ready for every kind of engine: started, and pinned when CUDA is on."""
        return self.ready and (self.gpu is None or self.gpu.ready.is_set())

    # -- sessions ----------------------------------------------------------------------------------

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(p.HEADER.size)
        (length,) = p.HEADER.unpack(header)
        if length > self.settings.max_frame_bytes:
            raise _ProtocolError(
                p.E_BAD_FRAME,
                f"frame of {length} bytes exceeds max_frame_bytes={self.settings.max_frame_bytes}",
                fatal=True,
            )
        return await reader.readexactly(length)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        session: Session | None = None
        pid = _peer_pid(writer)
        try:
            while True:
                try:
                    body = await self._read_frame(reader)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.metrics.errors.labels("truncated_frame").inc()
                        log.warning("client vanished mid-frame", extra={"peer_pid": pid})
                    return
                started = time.perf_counter()
                op = "invalid"
                try:
                    try:
                        request = p.request_decoder.decode(body)
                    except msgspec.DecodeError as exc:
                        raise _ProtocolError(p.E_BAD_REQUEST, f"undecodable request: {exc}") from exc
                    op = p.op_name(request)
                    if isinstance(request, p.Hello):
                        if session is not None:
                            raise _ProtocolError(p.E_BAD_REQUEST, "hello sent twice")
                        session = self._open_session(request, pid)
                        reply: p._Reply = self._hello_reply(session)
                    elif session is None:
                        raise _ProtocolError(p.E_NO_SESSION, "first request must be hello", fatal=True)
                    elif isinstance(request, p.GpuCopy | p.RegisterGpuKV):
                        session.requests += 1
                        reply = await self._gpu_request(request, session)
                    else:
                        session.requests += 1
                        reply = self._dispatch(request, session)
                except _ProtocolError as exc:
                    self.metrics.errors.labels(exc.code).inc()
                    log.warning(
                        "bad request",
                        extra={"code": exc.code, "reason": str(exc), "peer_pid": pid, "op": op},
                    )
                    writer.write(p.encode(p.ErrorReply(code=exc.code, message=str(exc))))
                    await writer.drain()
                    if exc.fatal:
                        return
                    continue
                except Exception as exc:  # a bug must cost one request, not the agent
                    self.metrics.errors.labels(p.E_INTERNAL).inc()
                    log.exception("request failed", extra={"op": op, "peer_pid": pid})
                    writer.write(p.encode(p.ErrorReply(code=p.E_INTERNAL, message=repr(exc))))
                    await writer.drain()
                    continue
                self.metrics.rpc_seconds.labels(op).observe(time.perf_counter() - started)
                writer.write(p.encode(reply))
                await writer.drain()
        except _ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            log.warning("closing connection", extra={"code": exc.code, "reason": str(exc), "peer_pid": pid})
            with contextlib.suppress(OSError):
                writer.write(p.encode(p.ErrorReply(code=exc.code, message=str(exc))))
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            self.metrics.errors.labels("connection").inc()
            log.info("connection lost", extra={"reason": repr(exc), "peer_pid": pid})
        finally:
            self._writers.discard(writer)
            if session is not None:
                self._close_session(session)
            writer.close()

    def _open_session(self, hello: p.Hello, pid: int | None) -> Session:
        if hello.protocol_version != p.PROTOCOL_VERSION:
            raise _ProtocolError(
                p.E_VERSION,
                f"client speaks protocol {hello.protocol_version}, agent {p.PROTOCOL_VERSION}",
                fatal=True,
            )
        if len(self.sessions) >= self.settings.max_sessions:
            raise _ProtocolError(p.E_BAD_REQUEST, "too many sessions", fatal=True)
        session = Session(session_id=next(self._ids), client=hello.client, peer_pid=pid)
        self.sessions[session.session_id] = session
        self.metrics.sessions_opened.inc()
        log.info(
            "session opened", extra={"session": session.session_id, "client": hello.client, "peer_pid": pid}
        )
        return session

    async def _gpu_request(self, request: p.GpuCopy | p.RegisterGpuKV, session: Session) -> p._Reply:
        """GPU work runs on the GPU executor: CUDA calls can block (copies, opening IPC handles),
        and the event loop must keep serving every other session meanwhile."""
        if self.gpu is None:
            raise _ProtocolError(p.E_GPU, "this agent does not serve GPU engines (start it with --cuda)")
        gpu, loop = self.gpu, asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            if isinstance(request, p.GpuCopy):
                method = await loop.run_in_executor(self._gpu_copies, gpu.copy, session.session_id, request)
                # Not observed into the copy histograms here: the engine reports the whole
                # copy's time with its commit or release (a layered load's reply comes early).
                return p.GpuCopyReply(method=method, seconds=time.perf_counter() - started)
            self.index.check_layout(request.namespace, request.description)  # before opening anything
            kv_id, block_bytes, layered = await loop.run_in_executor(
                self._gpu_copies, gpu.register, session.session_id, request
            )
            ns = self.index.register(request.namespace, block_bytes, 1, request.description)
        except GpuError as exc:
            raise _ProtocolError(p.E_GPU, str(exc)) from exc
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
                "seconds": round(time.perf_counter() - started, 4),
            },
        )
        return p.GpuKVReply(kv_id=kv_id, block_bytes=block_bytes, layered=layered)

    def _close_session(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
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
        assert self.segment is not None
        return p.HelloReply(
            session_id=session.session_id,
            agent_id=self.agent_id,
            pool_id=self.segment.pool_id,
            pool_path=str(self.segment.path),
            pool_bytes=self.segment.size,
            protocol_version=p.PROTOCOL_VERSION,
            features=list(p.FEATURES),
        )

    # -- requests ------------------------------------------------------------------------------------

    def _dispatch(self, request: p._Request, session: Session) -> p._Reply:
        assert self.segment is not None
        pool_id = self.segment.pool_id
        try:
            if isinstance(request, p.Lookup):
                hits, leased = self.index.lookup(
                    request.namespaces,
                    request.keys,
                    request.block_tokens,
                    session.session_id,
                    request.lease_id,
                )
                return p.LookupReply(hits=hits, pool_id=pool_id, slots=leased)
            if isinstance(request, p.Reserve):
                slots = self.index.reserve(
                    request.namespace, request.keys, request.parent, session.session_id
                )
                return p.ReserveReply(pool_id=pool_id, slots=slots)
            if isinstance(request, p.Commit):
                done = self.index.commit(request.namespace, request.keys, request.abort, session.session_id)
                if done:
                    self.metrics.save_seconds.observe(request.copy_seconds)
                return p.CommitReply(committed=done)
            if isinstance(request, p.Release):
                held = self.index.release_many(request.lease_ids, request.loaded_blocks)
                if request.loaded_blocks:
                    self.metrics.load_seconds.observe(request.copy_seconds)
                return p.ReleaseReply(held=held)
            if isinstance(request, p.RegisterNamespace):
                ns = self.index.register(
                    request.namespace, request.block_bytes, request.block_tokens, request.description
                )
                log.info(
                    "namespace registered",
                    extra={
                        "namespace": ns.name,
                        "block_bytes": ns.block_bytes,
                        "session": session.session_id,
                    },
                )
                return p.NamespaceReply(namespace=ns.name, block_bytes=ns.block_bytes)
            if isinstance(request, p.Stats):
                return p.StatsReply(stats=self.stats())
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
            pool_id=self.segment.pool_id if self.segment else "",
            pool_bytes=self.allocator.pool_bytes,
            pool_used_bytes=self.allocator.used_bytes,
            pool_prefaulted_bytes=self.segment.prefaulted_bytes if self.segment else 0,
            free_arenas=self.allocator.free_arenas,
            namespaces=len(self.index.namespaces),
            sessions=len(self.sessions),
            leases_active=len(self.index.leases),
            uptime_s=round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            cuda=int(self.gpu is not None),
            cuda_pinned=int(self.gpu is not None and self.gpu.pinned is not None),
            cuda_pin_seconds=round(self.gpu.pin_seconds, 3) if self.gpu else 0.0,
            cuda_ipc_mappings=self.gpu.mapped() if self.gpu else 0,
        )
        out.update({f"blocks_{k}": v for k, v in self.index.block_counts().items()})
        return out
