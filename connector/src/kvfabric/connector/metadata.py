"""Scheduler -> worker intents for one engine step (picklable: vLLM ships them across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadIntent:
    """Copy leased pool slots into vLLM blocks before the forward pass.

    ``slots[rank]`` are the slots of TP rank ``rank``; the worker releases its own lease
    ``f"{lease_id}#{rank}"`` after copying and trusts the bytes only if the lease was still held.
    """

    req_id: str
    lease_id: str
    pool_id: str
    block_ids: tuple[int, ...]
    slots: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SaveIntent:
    """Copy freshly computed full blocks into the pool after the forward pass."""

    req_id: str
    block_ids: tuple[int, ...]
    keys: tuple[bytes, ...]
    parent: bytes | None


@dataclass
class KVFabricMetadata(KVConnectorMetadata):
    loads: list[LoadIntent] = field(default_factory=list)
    saves: list[SaveIntent] = field(default_factory=list)
    #: Requests preempted this step whose background saves may still read their (now freed) blocks.
    preempted: tuple[str, ...] = ()


def lease_of_rank(lease_id: str, rank: int) -> str:
    """The agent leases each namespace (TP rank) of a lookup separately under this id."""
    return f"{lease_id}#{rank}"
