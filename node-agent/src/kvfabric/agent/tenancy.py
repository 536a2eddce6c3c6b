"""Who a session is, and each tenant's own pool file (isolated tenancy).

The agent trusts the kernel, not its clients: a session's identity comes from the socket it
connected through (one per tenant, each mounted only into that tenant's pods) or from
``SO_PEERCRED``, never from anything the client sends.

With isolated tenancy a CPU engine maps only its tenant's pool file. Every tenant's file is an
anonymous shared-memory file (``memfd``) the size of the pool, sparse: only arenas lent to that
tenant hold pages, at the same offsets as in the pool's slot numbering, and an arena leaving
the tenant is punched out (its pages freed, so the next tenant that gets it starts from zeros).
Engines get the file as a descriptor over their socket; it has no path anyone could open.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import socket
import struct
from dataclasses import dataclass

from kvfabric.agent.files import punch_hole

log = logging.getLogger(__name__)

#: Tenant names: what a Kubernetes namespace may be called, plus ``uid-<n>``.
TENANT_RE = re.compile(r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class PeerCredentials:
    """What the kernel says about the process at the other end of a Unix socket. ``pid`` is 0
    when that process lives in another PID namespace (another pod)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | None) -> PeerCredentials | None:
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def tenant_of_uid(uid: int) -> str:
    return f"uid-{uid}"


class TenantPools:
    """One sparse pool file per tenant; ``arena_bytes`` maps an arena index to its byte range."""

    def __init__(self, pool_bytes: int, arena_bytes: int) -> None:
        self.pool_bytes = pool_bytes
        self.arena_bytes = arena_bytes
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}

    def fd(self, tenant: str) -> int:
        """The tenant's pool file (created at its first use)."""
        fd = self._fds.get(tenant)
        if fd is None:
            fd = os.memfd_create(f"kvfabric-pool-{tenant}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.pool_bytes)
            except OSError:
                os.close(fd)
                raise
            self._fds[tenant] = fd
            log.info("tenant pool file created", extra={"tenant": tenant})
        return fd

    def open_for_client(self, tenant: str, writable: bool) -> int:
        """A new descriptor for a client: read-write, or read-only (a reopen of the memfd
        through /proc: a read-only descriptor cannot be turned into a writable mapping)."""
        fd = self.fd(tenant)
        if writable:
            return os.dup(fd)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)

    def mapping(self, tenant: str) -> mmap.mmap:
        """The tenant's pool file mapped into the agent (the NVMe tier reads and writes its
        slots there); mapped at its first use."""
        m = self._maps.get(tenant)
        if m is None:
            m = self._maps[tenant] = mmap.mmap(self.fd(tenant), self.pool_bytes, mmap.MAP_SHARED)
        return m

    def punch(self, tenant: str, arena: int) -> None:
        """Frees the pages of one arena in the tenant's file (it left the tenant)."""
        fd = self._fds.get(tenant)
        if fd is None:
            return
        try:
            punch_hole(fd, arena * self.arena_bytes, self.arena_bytes)
        except OSError as exc:
            log.warning("cannot free a tenant's arena", extra={"tenant": tenant, "error": exc.strerror})

    def allocated_bytes(self, tenant: str) -> int:
        fd = self._fds.get(tenant)
        return os.fstat(fd).st_blocks * 512 if fd is not None else 0

    def audit(self, tenant: str, lent: set[int], n_arenas: int) -> int:
        """Punches out every arena not lent to ``tenant`` when its file holds more pages than
        its arenas (an engine wrote outside its slots: those pages are freed, not kept);
        returns how many arenas were punched."""
        if self.allocated_bytes(tenant) <= len(lent) * self.arena_bytes:
            return 0
        punched = 0
        for arena in range(n_arenas):
            if arena not in lent:
                self.punch(tenant, arena)
                punched += 1
        log.warning(
            "a tenant's pool file held pages outside its arenas; freed",
            extra={"tenant": tenant, "arenas_punched": punched},
        )
        return punched

    def tenants(self) -> list[str]:
        return list(self._fds)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
