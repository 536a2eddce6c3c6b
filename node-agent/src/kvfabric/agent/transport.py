"""Moves block bytes between the pools of two agents: one interface, NIXL behind it.

The holder pushes (one-sided WRITE) into slots the requester reserved and named: over TCP,
UCX only emulates READ in software and it collapses when the holder's CPU is busy
(``shared/probes/crossnode.md``), while WRITE runs zero-copy. On an RDMA fabric the same call
goes over the NIC (``UCX_TLS`` picks the transports; the agent pins ``tcp`` unless told
otherwise, since two network namespaces of one host otherwise silently use shared memory).

Every transfer has a deadline: a partitioned peer leaves a NIXL transfer in progress forever,
so the handle is released at the deadline and the peer dropped (the next request re-adds it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)


class TransferFailed(Exception):
    """A transfer did not complete (peer gone, link down, deadline passed)."""


class Transport(Protocol):
    name: str

    def local_info(self) -> bytes:
        """What a peer needs to write into this agent's pool (sent with each pull request)."""
        ...

    def write(
        self, peer: str, peer_info: bytes, src: list[int], dst: list[int], size: int, deadline: float
    ) -> None:
        """Writes ``size`` bytes from each local address in ``src`` to the peer's ``dst``
        (``time.monotonic()`` deadline); raises :class:`TransferFailed`."""
        ...

    def close(self) -> None: ...


def _nixl() -> tuple[type, type]:
    try:
        from nixl._api import nixl_agent, nixl_agent_config  # the "nixl" meta package
    except ImportError:
        from nixl_cu12._api import nixl_agent, nixl_agent_config  # nixl-cu12 alone (--no-deps)
    return nixl_agent, nixl_agent_config


class NixlTransport:
    """One NIXL agent (UCX backend) with the pool's memory registered once."""

    def __init__(self, name: str, regions: list[tuple[int, int]]) -> None:
        """``regions``: (address, length) of the pool memory peers may write into."""
        nixl_agent, nixl_agent_config = _nixl()
        self.name = name
        self._agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))
        self._agent.register_memory([(addr, length, 0, "pool") for addr, length in regions], "DRAM")
        self._peers: dict[str, str] = {}  # peer name -> NIXL's name for its registered agent
        self._lock = threading.Lock()  # NIXL agents are not documented thread-safe for setup

    def local_info(self) -> bytes:
        info: bytes = self._agent.get_agent_metadata()
        return info

    def write(
        self, peer: str, peer_info: bytes, src: list[int], dst: list[int], size: int, deadline: float
    ) -> None:
        import numpy as np

        if len(src) != len(dst):
            raise ValueError("src and dst differ in length")
        agent = self._agent
        handle = None
        try:
            with self._lock:
                remote = self._peers.get(peer)
                if remote is None:
                    remote = self._peers[peer] = agent.add_remote_agent(peer_info)
            local = agent.get_xfer_descs(np.array([(a, size, 0) for a in src], dtype=np.uint64), "DRAM")
            far = agent.get_xfer_descs(np.array([(a, size, 0) for a in dst], dtype=np.uint64), "DRAM")
            handle = agent.initialize_xfer("WRITE", local, far, remote)
            state = agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferFailed(f"write to {peer} still in progress at its deadline")
                time.sleep(0.0002)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferFailed(f"write to {peer} ended {state}")
        except TransferFailed:
            self._drop_peer(peer)
            raise
        except Exception as exc:  # NIXL raises its own types (nixlRemoteDisconnectError, ...)
            self._drop_peer(peer)
            raise TransferFailed(f"write to {peer} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if handle is not None:
                try:
                    agent.release_xfer_handle(handle)
                except Exception as exc:  # still posted: the peer is dropped below anyway
                    log.debug("nixl: handle not released", extra={"error": str(exc)})

    def _drop_peer(self, peer: str) -> None:
        with self._lock:
            remote = self._peers.pop(peer, None)
            if remote is not None:
                try:
                    self._agent.remove_remote_agent(remote)
                except Exception as exc:
                    log.debug("nixl: peer not removed", extra={"peer": peer, "error": str(exc)})

    def close(self) -> None:
        for peer in list(self._peers):
            self._drop_peer(peer)
