"""Prefix lookups for routers and operators: given a model and a prompt, how many of its leading
tokens this node holds, in which tier, and (through the fabric's index) which nodes of the pool
hold its blocks. Served on the admin HTTP port as ``POST /v1/lookup``.

The agent computes the connector's own keys (:mod:`kvfabric.connector.keys`) for the prompt, in
every namespace an engine of that model registered (engines say which served model name they
are, and which namespaces belong to one TP group: a block counts when every rank holds it).
Requests with a LoRA adapter or multimodal items key their blocks with more than token ids, so
they cannot be looked up here (refused, with that reason). Answers are a snapshot: blocks may be
evicted the next millisecond, and a lookup takes no lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvfabric.agent.index import Namespace, scoped
from kvfabric.connector.keys import chain_keys, request_seed

if TYPE_CHECKING:
    from kvfabric.agent.server import Agent

#: Longest prompt a lookup takes (tokens): a 2M-token prompt's keys are computed in ~1 s.
MAX_LOOKUP_TOKENS = 1 << 21
_KEYS_PER_SLICE = 1024


class PrefixQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="The served model name.")
    token_ids: list[Annotated[int, Field(ge=0, lt=2**32)]] | None = Field(
        default=None, max_length=MAX_LOOKUP_TOKENS, description="The prompt's token ids."
    )
    text: str | None = Field(
        default=None,
        max_length=8 * MAX_LOOKUP_TOKENS,
        description="Or the prompt's text, tokenized with `tokenizer` (a local path or a name in "
        "the local Hugging Face cache: nothing is downloaded).",
    )
    tokenizer: str | None = Field(default=None, max_length=4096)
    cache_salt: str = Field(default="", max_length=4096, description="The requests' cache_salt, if any.")
    scope: Literal["node", "pool"] = Field(
        default="node", description="'pool': also ask the fabric's index which nodes hold the blocks."
    )

    @model_validator(mode="after")
    def _prompt(self) -> PrefixQuery:
        if (self.token_ids is None) == (self.text is None):
            raise ValueError("give token_ids or text (not both)")
        if self.text is not None and not self.tokenizer:
            raise ValueError("text needs a tokenizer")
        return self


class LookupRefused(ValueError):
    """The query cannot be answered (unknown model, no tokenizer): 4xx with the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Callable[[str], list[int]]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LookupRefused(
            400, "this agent cannot tokenize (transformers is not installed): send token_ids"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:
        raise LookupRefused(400, f"tokenizer {name!r} is not available locally: {exc}") from None
    return lambda text: list(tok(text, add_special_tokens=True)["input_ids"])


def _groups(agent: Agent, model: str) -> dict[str, list[Namespace]]:
    """The model's namespaces (shared tenancy), by TP group."""
    out: dict[str, list[Namespace]] = {}
    for ns in agent.index.namespaces.values():
        if ns.model == model and not ns.tenant:
            out.setdefault(ns.group or ns.name, []).append(ns)
    return out


async def _held(agent: Agent, spaces: list[Namespace], keys: Sequence[bytes]) -> tuple[int, int]:
    """Leading blocks every namespace of the group holds in the pool, and in the pool or NVMe
    (the loop serves others every ``_KEYS_PER_SLICE`` keys)."""
    index = agent.index
    tier = agent.tiers.tier if agent.tiers is not None else None
    in_memory = held = 0
    for key in keys:
        if held and not held % _KEYS_PER_SLICE:
            await asyncio.sleep(0)
        here = [index.committed_slot(ns, key) >= 0 for ns in spaces]
        if all(here) and held == in_memory:
            in_memory += 1
        elif not all(
            h or (tier is not None and tier.holds(ns.tenant, ns.name, key, ns.block_bytes))
            for h, ns in zip(here, spaces, strict=True)
        ):
            break
        held += 1
    return in_memory, held


async def lookup(agent: Agent, q: PrefixQuery) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    if q.text is not None:
        assert q.tokenizer is not None
        tokens = await loop.run_in_executor(None, lambda: _tokenizer(q.tokenizer)(q.text))  # type: ignore[arg-type]
    else:
        assert q.token_ids is not None
        tokens = q.token_ids
    groups = _groups(agent, q.model)
    if not groups:
        known = sorted({ns.model for ns in agent.index.namespaces.values() if ns.model and not ns.tenant})
        raise LookupRefused(
            404, f"no engine serving {q.model!r} has registered with this agent (known: {known})"
        )
    seed = request_seed([q.cache_salt, ""])  # what the connector seeds a request without LoRA with
    sizes = {spaces[0].block_tokens for spaces in groups.values()}
    keys_by_size = {size: await loop.run_in_executor(None, chain_keys, tokens, size, seed) for size in sizes}
    best: dict[str, Any] = {"memory_tokens": 0, "tokens": 0, "block_size": 0}
    best_keys: list[bytes] = []
    best_spaces: list[Namespace] = []
    for spaces in groups.values():
        size = spaces[0].block_tokens
        keys = keys_by_size[size]
        in_memory, held = await _held(agent, spaces, keys)
        if held * size > best["tokens"] or not best["block_size"]:
            best = {"memory_tokens": in_memory * size, "tokens": held * size, "block_size": size}
            best_keys, best_spaces = keys, spaces
    node: dict[str, Any] = {
        "node": agent.node_name,
        "address": agent.settings.fabric_advertise or agent.settings.fabric_listen or "",
        "tokens": best["tokens"],
        "tiers": {"memory": best["memory_tokens"], "nvme": best["tokens"]},
    }
    reply: dict[str, Any] = {
        "model": q.model,
        "prompt_tokens": len(tokens),
        "block_size": best["block_size"],
        "nodes": [node],
    }
    if q.scope == "pool":
        reply["pool"] = await _pool(
            agent, best_spaces, best_keys, best["tokens"] // max(1, best["block_size"])
        )
        reply["pool"]["tokens"] *= best["block_size"]
    return reply


async def _pool(agent: Agent, spaces: list[Namespace], keys: list[bytes], local: int) -> dict[str, Any]:
    """The fabric's index: per block the node that published it last; the leading run of
    blocks some node of the pool holds (this one's included)."""
    index = agent.remote_index
    if index is None:
        raise LookupRefused(
            400, "this agent is not part of a fabric (no --fabric-valkey): scope=pool needs one"
        )
    names = [scoped(ns.tenant, ns.name) for ns in spaces]
    holders = await asyncio.get_running_loop().run_in_executor(None, index.holders, names, keys)
    if not holders and keys:
        raise LookupRefused(503, "the fabric's index (Valkey) cannot be asked right now")
    run = 0
    by_node: dict[str, int] = {}
    for i, holder in enumerate(holders):
        if holder is None and i >= local:
            break
        run += 1
        if holder is not None:
            by_node[holder] = by_node.get(holder, 0) + 1
    return {"tokens": run, "blocks_by_holder": by_node}
