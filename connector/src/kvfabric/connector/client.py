"""Blocking client for the agent's Unix-socket protocol, with a circuit breaker.

vLLM's connector hooks are synchronous, so this client is too: one request in flight per
connection, a deadline on every call. Any failure closes the connection and opens the breaker;
while it is open every call fails fast with :class:`AgentUnavailable` (the caller recomputes),
and after an exponential backoff the next call tries to reconnect.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec

from kvfabric.connector import protocol as p
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.errors import AgentRejected, AgentUnavailable

log = logging.getLogger(__name__)

R = TypeVar("R", bound=p._Reply)


class AgentClient:
    """One session with the agent. Thread-safe: calls are serialised."""

    def __init__(
        self,
        socket_path: str,
        client_name: str,
        timeout_s: float = 1.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES,
        on_connect: Callable[[AgentClient, p.HelloReply], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        """``on_disconnect``: called (under the client's lock, from whichever thread's call
        failed) when the session is lost; it must not call the client."""
        self.socket_path = socket_path
        self._on_disconnect = on_disconnect
        self.client_name = client_name
        self.timeout_s = timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_frame_bytes = max_frame_bytes
        self._on_connect = on_connect
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self.hello: p.HelloReply | None = None
        self.connects = 0
        self.failures = 0

    @classmethod
    def from_config(
        cls,
        config: ConnectorConfig,
        client_name: str,
        on_connect: Callable[[AgentClient, p.HelloReply], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> AgentClient:
        """A client with the connector's socket, deadline and backoff settings."""
        return cls(
            config.socket_path,
            client_name,
            timeout_s=config.timeout_ms / 1000,
            backoff_initial_s=config.backoff_initial_ms / 1000,
            backoff_max_s=config.backoff_max_ms / 1000,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        )

    # -- connection management -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def peer_closed(self) -> bool:
        """Whether the agent's end of the session is closed (e.g. the agent died): a cheap
        non-blocking peek, for waits that cannot use a deadline."""
        with self._lock:
            sock = self._sock
            if sock is None:
                return True
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                # Nothing to read: open. Readable with nothing to peek at: the peer closed it.
                return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

    def connect(self) -> bool:
        """Opens the session now if it is not open (breaker permitting); True when connected."""
        with self._lock:
            try:
                self._ensure_connected()
            except AgentUnavailable:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None
                    self.hello = None

    def _fail(self, why: str) -> AgentUnavailable:
        """Drops the connection and opens the breaker."""
        was_open = self._sock is not None
        self.close()
        if was_open and self._on_disconnect is not None:
            try:
                self._on_disconnect()
            except Exception:  # a bad hook must not turn a miss into a crash
                log.exception("on_disconnect failed")
        self.failures += 1
        self._backoff_s = min(self.backoff_max_s, max(self.backoff_initial_s, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        log.warning(
            "kvfabric agent unavailable, recomputing for %.2fs",
            self._backoff_s,
            extra={"socket": self.socket_path, "reason": why},
        )
        return AgentUnavailable(why)

    def _ensure_connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if time.monotonic() < self._retry_at:
            raise AgentUnavailable("circuit breaker open")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise self._fail(f"connect {self.socket_path}: {exc}") from exc
        self._sock = sock
        hello = self._roundtrip(
            p.Hello(protocol_version=p.PROTOCOL_VERSION, client=self.client_name),
            p.HelloReply,
        )
        self.hello = hello
        self.connects += 1
        self._backoff_s = 0.0
        log.info(
            "kvfabric agent session opened",
            extra={"socket": self.socket_path, "session": hello.session_id, "pool": hello.pool_id},
        )
        if self._on_connect is not None:
            try:
                self._on_connect(self, hello)
            except AgentUnavailable:
                raise
            except Exception as exc:  # a bad hook must not wedge the session open half-way
                raise self._fail(f"on_connect failed: {exc!r}") from exc
        return sock

    # -- framing ------------------------------------------------------------------------------

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("agent closed the connection")
            got += k
        return bytes(buf)

    def _recv_header(self, sock: socket.socket, fds: list[int] | None) -> bytes:
        """A reply's length header; with ``fds``, also collects descriptors sent with it."""
        if fds is None:
            return self._recv_exact(sock, p.HEADER.size)
        header = b""
        while len(header) < p.HEADER.size:
            data, ancdata, _, _ = sock.recvmsg(p.HEADER.size - len(header), socket.CMSG_SPACE(4))
            if not data:
                raise ConnectionError("agent closed the connection")
            header += data
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(
                        int.from_bytes(payload[i : i + 4], "little") for i in range(0, len(payload) - 3, 4)
                    )
        return header

    def _roundtrip(self, request: p._Request, expect: type[R], fds: list[int] | None = None) -> R:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(p.encode(request))
            (length,) = p.HEADER.unpack(self._recv_header(sock, fds))
            if length > self.max_frame_bytes:
                raise ConnectionError(f"reply frame of {length} bytes exceeds limit")
            reply = p.reply_decoder.decode(self._recv_exact(sock, length))
        except (OSError, ConnectionError, msgspec.DecodeError) as exc:
            raise self._fail(f"{type(request).__name__}: {exc!r}") from exc
        if isinstance(reply, p.ErrorReply):
            raise AgentRejected(reply.code, reply.message)
        if not isinstance(reply, expect):
            raise self._fail(f"unexpected reply {type(reply).__name__} to {type(request).__name__}")
        return reply

    def _roundtrip_fd(self, request: p._Request, expect: type[R]) -> tuple[R, int]:
        """Like :meth:`_roundtrip`, for a reply whose frame carries one file descriptor (the
        caller owns it; any other received is closed)."""
        fds: list[int] = []
        try:
            reply = self._roundtrip(request, expect, fds)
            if len(fds) != 1:
                raise self._fail(f"{type(reply).__name__} came with {len(fds)} descriptors, not 1")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return reply, fds[0]

    def open_pool(self, writable: bool = True) -> tuple[p.PoolReply, int]:
        """The pool file as a descriptor the caller owns (agents listing ``pool_fd``)."""
        with self._lock:
            self._ensure_connected()
            return self._roundtrip_fd(p.OpenPool(writable=writable), p.PoolReply)

    def call(self, request: p._Request, expect: type[R]) -> R:
        """Sends one request and returns its reply; raises ``AgentError`` on any failure."""
        with self._lock:
            self._ensure_connected()
            return self._roundtrip(request, expect)

    # -- typed helpers ---------------------------------------------------------------------------

    def register_namespace(
        self, namespace: str, block_bytes: int, block_tokens: int, description: str = ""
    ) -> p.NamespaceReply:
        return self.call(
            p.RegisterNamespace(
                namespace=namespace,
                block_bytes=block_bytes,
                block_tokens=block_tokens,
                description=description,
            ),
            p.NamespaceReply,
        )

    def lookup(
        self,
        namespaces: list[str],
        keys: list[bytes],
        block_tokens: int,
        lease_id: str | None = None,
        promote: bool = False,
    ) -> p.LookupReply:
        """``promote``: ask the agent to bring blocks of its NVMe tier into the pool (sent only
        to agents that list the feature; older ones would refuse the field)."""
        promote = promote and self.supports("promote")
        return self.call(
            p.Lookup(
                namespaces=namespaces,
                keys=keys,
                block_tokens=block_tokens,
                lease_id=lease_id,
                promote=promote,
            ),
            p.LookupReply,
        )

    def reserve(self, namespace: str, keys: list[bytes], parent: bytes | None) -> p.ReserveReply:
        return self.call(p.Reserve(namespace=namespace, keys=keys, parent=parent), p.ReserveReply)

    def commit(
        self,
        namespace: str,
        keys: list[bytes],
        abort: list[bytes],
        copy_seconds: float,
        owner: int | None = None,
        owner_token: str = "",
    ) -> p.CommitReply:
        """``owner``: settle the reservations of that session (``delegated_commit``) instead of ours."""
        return self.call(
            p.Commit(
                namespace=namespace,
                keys=keys,
                abort=abort,
                copy_seconds=copy_seconds,
                owner=owner,
                owner_token=owner_token,
            ),
            p.CommitReply,
        )

    def supports(self, feature: str) -> bool:
        """Whether the agent of the current session lists ``feature`` (False when not connected)."""
        return self.hello is not None and feature in self.hello.features

    def release(self, lease_ids: list[str], loaded_blocks: int = 0, copy_seconds: float = 0.0) -> list[bool]:
        reply = self.call(
            p.Release(lease_ids=lease_ids, loaded_blocks=loaded_blocks, copy_seconds=copy_seconds),
            p.ReleaseReply,
        )
        return reply.held

    def stats(self) -> dict[str, int | float | str]:
        return self.call(p.Stats(), p.StatsReply).stats
