"""Scheduler -> worker intents for one engine step (picklable: vLLM ships them across processes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class LoadIntent:
    """Copy leased pool slots into vLLM blocks before the forward pass.

    ``slots[rank]`` are the slots of TP rank ``rank``; the worker releases its own lease
    (``leases[rank]``, which names the lease's generation, or ``f"{lease_id}#{rank}"`` from an
    agent that issues none) after copying and trusts the bytes only if the lease was still held.
    """

    req_id: str
    lease_id: str
    pool_id: str
    block_ids: tuple[int, ...]
    slots: tuple[tuple[int, ...], ...]
    leases: tuple[str, ...] = ()
    #: the request's epoch when planned (see :class:`SaveIntent`)
    epoch: int = 0
    #: per TP rank: the token of the worker registration the scheduler had the agent queue this
    #: load into already (:class:`~kvfabric.connector.protocol.GpuPrefetch`; b"": not queued);
    #: the worker then only waits for it
    prefetched: tuple[bytes, ...] = ()

    def lease_of(self, rank: int) -> str:
        return self.leases[rank] if rank < len(self.leases) else lease_of_rank(self.lease_id, rank)

    def prefetched_for(self, rank: int) -> bytes:
        return self.prefetched[rank] if rank < len(self.prefetched) else b""


@dataclass(frozen=True)
class SaveIntent:
    """Copy freshly computed full blocks into the pool after the forward pass."""

    req_id: str
    block_ids: tuple[int, ...]
    keys: tuple[bytes, ...]
    parent: bytes | None
    #: The request's epoch, one more after each failed load vLLM recomputes: a worker drops
    #: saves of the epoch a load of which failed (computed attending to suspect blocks, in that
    #: step or one scheduled before vLLM saw the failure) and keeps the later, recomputed ones.
    epoch: int = 0


@dataclass
class KVFabricMetadata(KVConnectorMetadata):
    loads: list[LoadIntent] = field(default_factory=list)
    saves: list[SaveIntent] = field(default_factory=list)
    #: Requests preempted this step whose background saves may still read their (now freed) blocks.
    preempted: tuple[str, ...] = ()
    #: The scheduler's step count: layered loads record event set ``step % EVENT_SETS``.
    step: int = 0


@dataclass(frozen=True)
class StagedSave:
    """Blocks a TP worker wrote into slots it reserved, not yet visible: the scheduler commits
    them for it (``Commit.owner``) once it saw every rank's outcome of the step, or aborts them
    when a load of the request failed on any rank (their KV may derive from the bad blocks: the
    ranks' all-reduce spreads one rank's bad attention output to all)."""

    req_id: str
    epoch: int
    namespace: str
    keys: tuple[bytes, ...]
    owner: int  # the worker's agent session
    owner_token: str
    pool_id: str


@dataclass
class KVFabricWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler after each step; vLLM aggregates the workers' objects."""

    staged: tuple[StagedSave, ...] = ()
    #: (TP rank, token) of GPU registrations the scheduler may prefetch into (after each
    #: registration, for a few steps)
    prefetch_targets: tuple[tuple[int, bytes], ...] = ()
    #: the step (``KVFabricMetadata.step``) this output is of, from workers that take prefetches
    #: (the scheduler's which-blocks-are-safe bookkeeping); 0: not reported
    step: int = 0

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVFabricWorkerMeta)
        steps = [s for s in (self.step, other.step) if s]
        return KVFabricWorkerMeta(
            staged=self.staged + other.staged,
            prefetch_targets=self.prefetch_targets + other.prefetch_targets,
            step=min(steps, default=0),
        )


@dataclass(frozen=True)
class KVFabricHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler once at engine start (vLLM's handshake, after the KV caches were
    registered): the token naming the worker's GPU registration, so the scheduler prefetches
    from the first step (a later re-registration is named in the worker metadata)."""

    prefetch_token: bytes = b""


def lease_of_rank(lease_id: str, rank: int) -> str:
    """The agent leases each namespace (TP rank) of a lookup separately under this id."""
    return f"{lease_id}#{rank}"


def lease_id_for(engine_tag: str, request_id: str) -> str:
    """A request's lease id: short whatever vLLM's request id is (clients may choose those, and
    the agent takes ids of at most 128 characters), unique per engine and request."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=12).hexdigest()
    return f"{engine_tag[:64]}:{digest}"
