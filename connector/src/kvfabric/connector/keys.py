"""Block keys: a namespace digest plus a chained hash over token ids.

Two blocks share a key only if every factor that shapes their KV bytes matches (the
:class:`LayoutSpec`) and the same tokens precede them. We do not reuse vLLM's block hashes:
they leave out model, dtype and layout, and their seed depends on ``PYTHONHASHSEED``.

BLAKE2b (stdlib, 128-bit output) rather than a non-cryptographic hash: keys cross tenant
boundaries in a shared pool, so a crafted collision must be infeasible; at ~1 us per block it is
far below the cost of a single RPC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

#: Bumped whenever the key scheme or the slot byte layout changes.
FORMAT_VERSION = 1
KEY_BYTES = 16


#: Ends the ``layout`` of an MLA model (see :attr:`LayoutSpec.mla`).
MLA_SUFFIX = "+mla"


@dataclass(frozen=True)
class LayoutSpec:
    """Everything that makes the KV bytes of one worker incompatible with another's."""

    model: str
    dtype: str
    kv_cache_dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    tp_size: int
    tp_rank: int
    layout: str
    tenant: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def mla(self) -> bool:
        """An MLA model's layout: one latent vector (``kv_lora_rank + rope_dim``) per token."""
        return self.layout.endswith(MLA_SUFFIX)

    @property
    def one_copy_per_tp_group(self) -> bool:
        """MLA under tensor parallelism: every rank holds the same latent KV, so the pool keeps one
        copy that rank 0 saves and every rank loads (a namespace without a rank)."""
        return self.mla and self.tp_size > 1

    def stored(self) -> LayoutSpec:
        """The layout of the blocks as the pool keeps them: rank ``-1`` when the TP group shares
        one copy. Its ``repr`` is the description the agent checks every registration against."""
        return replace(self, tp_rank=-1) if self.one_copy_per_tp_group else self

    def namespace(self) -> str:
        """Stable hex digest naming this layout in the agent (independent of process seeds)."""
        canonical = json.dumps(asdict(self.stored()), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=KEY_BYTES).hexdigest()


def request_seed(extra: Sequence[str] = ()) -> bytes:
    """Seed of a request's key chain: per-request factors such as ``cache_salt`` or a LoRA name.

    The namespace is *not* mixed in: one chain of keys serves every TP rank's namespace, and the
    agent scopes each key by its namespace.
    """
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvfabric-seed")
    for part in extra:
        h.update(len(part).to_bytes(4, "little"))
        h.update(part.encode())
    return h.digest()


def mm_block_extras(features: Sequence[object], block_size: int) -> dict[int, bytes]:
    """Per block index, the multimodal items whose placeholders overlap that block.

    As vLLM's own prefix cache does, each overlapping item contributes its content hash
    (``identifier``) and its start relative to the block (negative when it began in an earlier
    block): two prompts with the same text and placeholders but other images get other keys from
    the first block an image touches on. ``features`` are vLLM's ``MultiModalFeatureSpec``s.
    """
    extras: dict[int, list[bytes]] = {}
    for f in features:
        ident = str(getattr(f, "identifier", "") or getattr(f, "mm_hash", ""))
        pos = f.mm_position  # type: ignore[attr-defined]
        if not ident or pos.length <= 0:
            raise ValueError("a multimodal item without a hash or a position cannot be keyed")
        first, last = pos.offset // block_size, (pos.offset + pos.length - 1) // block_size
        for b in range(first, last + 1):
            rel = pos.offset - b * block_size
            extras.setdefault(b, []).append(
                b"mm"
                + len(ident).to_bytes(4, "little")
                + ident.encode()
                + rel.to_bytes(8, "little", signed=True)
            )
    return {b: b"".join(parts) for b, parts in extras.items()}


def chain_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    seed: bytes,
    start_block: int = 0,
    parent: bytes | None = None,
    extras: dict[int, bytes] | None = None,
    end_block: int | None = None,
) -> list[bytes]:
    """Keys of the full blocks of ``token_ids`` (a trailing partial block gets none).

    Key ``i`` covers tokens ``[0, (i+1) * block_size)``. To extend a chain computed earlier,
    pass ``start_block`` and the key of block ``start_block - 1`` as ``parent``; ``end_block``
    stops before that block. Only the tokens of blocks ``start_block..end_block`` are read, so
    extending a long context by a block costs one block, not the context. ``extras[i]``: bytes
    that must also match for block ``i`` (multimodal items, :func:`mm_block_extras`).
    """
    n_full = len(token_ids) // block_size
    if end_block is not None:
        n_full = min(n_full, end_block)
    prev = seed if start_block == 0 else parent
    if prev is None:
        raise ValueError("parent is required when start_block > 0")
    if n_full <= start_block:
        return []
    tokens = np.asarray(token_ids[start_block * block_size : n_full * block_size], dtype="<i8")
    keys: list[bytes] = []
    for j, b in enumerate(range(start_block, n_full)):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(tokens[j * block_size : (j + 1) * block_size].tobytes())
        if extras and (extra := extras.get(b)):
            h.update(b"\xffextra" + extra)  # no token run of int64s can spell this tag and length
        prev = h.digest()
        keys.append(prev)
    return keys
