"""vLLM's own names of a request's blocks, for agents that publish KV events.

KV-aware routers (llm-d, Dynamo, AIBrix) match prompts against vLLM's block hashes, not our keys
(which also cover model, dtype and layout). The scheduler sends the agent vLLM's hashes, token
ids and per-block extra keys (:class:`~kvfabric.connector.protocol.Annotate`) next to our keys;
the agent names blocks by them in its events. Computed with vLLM's own helpers, so they equal
what vLLM's native publisher would send for the same request (``maybe_convert_block_hash``
honours ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvfabric.connector import protocol as p

if TYPE_CHECKING:
    from vllm.v1.request import Request


def annotation(
    request: Request, namespace: str, keys: Sequence[bytes], start: int, end: int, block_size: int
) -> p.Annotate | None:
    """Blocks ``start:end`` of ``request`` as routers name them; None when vLLM has not hashed
    them (its hashes cover full blocks only) or this vLLM lacks the helpers."""
    try:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    except ImportError:
        return None
    hashes = list(getattr(request, "block_hashes", None) or [])
    end = min(end, len(hashes), len(keys))
    if end <= start:
        return None
    lora = getattr(request, "lora_request", None)
    return p.Annotate(
        namespace=namespace,
        keys=list(keys[start:end]),
        hashes=[maybe_convert_block_hash(h) for h in hashes[start:end]],
        token_ids=list(request.all_token_ids[start * block_size : end * block_size]),
        parent_hash=maybe_convert_block_hash(hashes[start - 1]) if start else None,
        lora_name=getattr(lora, "lora_name", None) if lora is not None else None,
        extra_keys=_extra_keys(request, start, end, block_size),
    )


def _extra_keys(request: Request, start: int, end: int, block_size: int) -> Any:
    """vLLM's per-block extra keys in its events' untagged form, or None when no block has any."""
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys
    except ImportError:
        return None
    per_block = []
    mm_index = 0
    # The multimodal cursor advances from the first block; without items it stays at 0.
    first = 0 if getattr(request, "mm_features", None) else start
    for i in range(first, end):
        keys, mm_index = generate_block_hash_extra_keys(
            request, i * block_size, (i + 1) * block_size, mm_index
        )
        if i >= start:
            per_block.append(keys)
    if all(k is None for k in per_block):
        return None
    return to_event_extra_keys(per_block)
