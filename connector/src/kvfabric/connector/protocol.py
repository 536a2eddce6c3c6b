"""Wire protocol between connectors and the node agent.

Transport: a Unix stream socket. Every frame is a 4-byte big-endian length followed by one
msgpack body (msgspec). A client sends one request and waits for its reply; several sessions
(one per engine process role) talk to one agent at once.

The first request on a connection must be :class:`Hello`; the session it opens lives as long
as the connection, and the agent drops its leases and reservations when the connection goes.

Blocks are addressed by ``(namespace, key)``: the namespace is a digest of everything that makes
KV bytes incompatible (see :mod:`kvfabric.connector.keys`), the key a chained hash of the
block's tokens. The agent hands out *slots*: indices of ``block_bytes``-sized units counted from
the start of the pool segment, so a client can view the segment as ``[n, block_bytes]`` and
copy many blocks with one vectorised gather or scatter.

Adding a request type: add a Struct with a unique ``tag``, add it to :data:`Request`, and handle
it in the agent's dispatcher. Bump :data:`PROTOCOL_VERSION` for incompatible changes.

Compatible changes need no bump. Requests refuse unknown fields, so a new request field must
have a default, and requests are encoded without fields at their defaults: an older agent
accepts a newer client's request as long as it uses nothing new. A client that wants a newer
field first checks that the agent lists the feature in :attr:`HelloReply.features` (replies
ignore unknown fields, so a newer agent's reply never troubles an older client).
"""

from __future__ import annotations

import struct
import typing
from typing import Annotated

import msgspec

PROTOCOL_VERSION = 1
#: Default largest frame either side accepts (a 1M-token prompt's keys are ~17 MiB).
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
HEADER = struct.Struct(">I")

#: Largest frame the agent reads before a session said hello (a hello is ~100 bytes).
PRE_HELLO_MAX_FRAME_BYTES = 4096
#: Most keys one request names: a 2M-token prompt in blocks of 16 tokens.
MAX_KEYS = 1 << 17
#: Smallest block the agent accepts: a slot is a page at least (a tiny block would make the
#: agent's free lists explode: ``block_bytes=1`` cost 2.5 GiB per arena).
MIN_BLOCK_BYTES = 4096
MAX_BLOCK_TOKENS = 1 << 16
#: Engines' measured copy times: finite and at most an hour (``inf`` would poison the metrics).
MAX_SECONDS = 3600.0
#: Sets of layer events a GPU registration may hold (``prefetch``): consecutive steps' loads
#: record different sets, so a prefetch for step S never re-records events that step S-1's
#: forward pass (still running in another process under TP) has yet to wait on.
EVENT_SETS = 2

Key = Annotated[bytes, msgspec.Meta(min_length=1, max_length=64)]
Keys = Annotated[list[Key], msgspec.Meta(max_length=MAX_KEYS)]
Namespace = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LeaseId = Annotated[str, msgspec.Meta(min_length=1, max_length=160)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SECONDS)]
BlockTokens = Annotated[int, msgspec.Meta(gt=0, le=MAX_BLOCK_TOKENS)]


#: What this agent understands beyond protocol 1's first release; see :attr:`HelloReply.features`.
#: ``layered_loads``: ``RegisterGpuKV.layer_events`` and ``GpuCopy.layered``.
#: ``lease_generations``: ``LookupReply.leases`` (release those exact ids).
#: ``pool_fd``: :class:`OpenPool` (the pool is passed as a file descriptor, not a path).
#: ``promote``: ``Lookup.promote`` and ``LookupReply.promoting`` (the NVMe tier).
#: ``routing``: ``RegisterNamespace.model``/``group`` (the agent answers prefix lookups per model).
#: ``prefetch``: ``RegisterGpuKV.prefetch_token``, ``GpuCopy.event_set`` and :class:`GpuPrefetch`
#: (an engine's scheduler starts a step's loads into its workers' KV when vLLM allocates them).
#: An agent that publishes KV events lists :data:`KV_EVENTS_FEATURE` too: it wants :class:`Annotate`.
FEATURES = (
    "delegated_commit",
    "layered_loads",
    "lease_generations",
    "pool_fd",
    "prefetch",
    "promote",
    "repeated_namespaces",
    "routing",
)
KV_EVENTS_FEATURE = "kv_events"


class _Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    pass


class Hello(_Request, frozen=True, tag="hello"):
    """Opens the session. ``client`` names the engine process for logs and stats."""

    protocol_version: int
    client: Annotated[str, msgspec.Meta(max_length=256)]


class RegisterNamespace(_Request, frozen=True, tag="register_namespace"):
    """Declares a layout so the agent can carve slots for it; idempotent for equal sizes."""

    namespace: Namespace
    block_bytes: Annotated[int, msgspec.Meta(ge=MIN_BLOCK_BYTES, le=2**40)]
    block_tokens: BlockTokens
    description: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    #: The served model name routers know the engine by (agents listing ``routing``).
    model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    #: The namespace of TP rank 0 of the same engine layout: the ranks' namespaces together
    #: hold one prefix (a prefix lookup counts a block only when every rank of the group has it).
    group: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Lookup(_Request, frozen=True, tag="lookup"):
    """How many leading ``keys`` are committed in *every* listed namespace (all TP ranks).

    With ``lease_id`` set, the hit blocks of ``namespaces[i]`` are leased (pinned against
    eviction) under ``f"{lease_id}#{i}"`` until :class:`Release` or the end of the session, and
    their slots are returned. One lease per namespace lets each TP rank release its own.
    A namespace may be listed more than once (agents listing ``repeated_namespaces``): each
    entry gets its own lease on the same blocks, so TP ranks that read one shared copy (MLA's
    latent cache) each release their own. A lease id another live session holds is refused;
    the same session looking up again under its id replaces its earlier lease (a new generation).

    With ``promote`` (agents listing ``promote`` in their features), keys after the hits that
    the agent's NVMe tier holds start moving into the pool; the reply's ``promoting`` says how
    many, and a later lookup finds them as hits.
    """

    namespaces: Annotated[list[Namespace], msgspec.Meta(min_length=1, max_length=1024)]
    keys: Keys
    block_tokens: BlockTokens
    lease_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    promote: bool = False


class Reserve(_Request, frozen=True, tag="reserve"):
    """Reserves slots to save a chain of blocks; ``parent`` is the key before ``keys[0]``.

    Keys already present (or being written by another session) get slot ``-1``; so do keys
    for which no space could be freed. A reservation is invisible to lookups until committed.
    """

    namespace: Namespace
    keys: Keys
    parent: Key | None = None


class Commit(_Request, frozen=True, tag="commit"):
    """Makes reserved blocks visible (``keys``) and returns the rest (``abort``) to the pool.

    With ``owner`` (agents listing ``delegated_commit``), the blocks are those another session
    of the same tenant reserved, named by its :attr:`HelloReply.session_id` and ``session_token``:
    an engine's scheduler commits what its TP workers wrote once it knows every rank's outcome.
    An owner that is gone has no reservations left (nothing is committed).
    """

    namespace: Namespace
    keys: Keys
    abort: Keys = []
    copy_seconds: Seconds = 0.0
    owner: NonNegative | None = None
    owner_token: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Release(_Request, frozen=True, tag="release"):
    """Ends leases. ``loaded_blocks`` and ``copy_seconds`` feed the agent's load metrics
    (``loaded_blocks`` counts only up to the first lease's size).

    An id from :attr:`LookupReply.leases` (``"<id>#<i>/<generation>"``) ends that generation
    only: if the lease was replaced or dropped meanwhile, it is reported as not held. A plain
    ``"<id>#<i>"`` ends whatever generation is current. Only sessions of the lease's tenant
    can end it.
    """

    lease_ids: Annotated[list[LeaseId], msgspec.Meta(max_length=65536)]
    loaded_blocks: NonNegative = 0
    copy_seconds: Seconds = 0.0


TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
#: vLLM's block hash as its KV events carry it (``ExternalBlockHash``: an int, or the raw bytes).
RouterHash = int | Annotated[bytes, msgspec.Meta(max_length=64)]
#: One entry of vLLM's per-block ``extra_keys``: LoRA name, cache salt, ``(mm id, offset)`` (prompt
#: embeddings, whose digests are bytes, are never cached).
ExtraKey = int | Annotated[str, msgspec.Meta(max_length=4096)] | list[int | str]


class Annotate(_Request, frozen=True, tag="annotate"):
    """What routers know blocks by: vLLM's own block hashes and tokens for ``keys`` of
    ``namespace`` (sent by an engine's scheduler to agents listing ``kv_events``), so the KV
    events the agent publishes name blocks the way a KV-aware router hashes prompts.
    ``token_ids``: ``block_tokens`` ids per key, in order; ``parent_hash``: the hash before
    ``hashes[0]``. Blocks not committed yet are announced when they are."""

    namespace: Namespace
    keys: Keys
    hashes: Annotated[list[RouterHash], msgspec.Meta(max_length=MAX_KEYS)]
    token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=1 << 22)]
    parent_hash: RouterHash | None = None
    lora_name: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    extra_keys: Annotated[list[list[ExtraKey] | None], msgspec.Meta(max_length=MAX_KEYS)] | None = None


class Stats(_Request, frozen=True, tag="stats"):
    pass


class OpenPool(_Request, frozen=True, tag="open_pool"):
    """Asks for the pool as a file descriptor (``SCM_RIGHTS`` on the reply's frame) instead of
    opening :attr:`HelloReply.pool_path`: with isolated tenancy every tenant has its own pool
    file, which only the agent can open. ``writable``: False gives a read-only descriptor.
    Sent only to an agent that lists ``pool_fd``."""

    writable: bool = True


class RegisterGpuKV(_Request, frozen=True, tag="register_gpu_kv"):
    """A GPU engine worker's KV tensors, for the agent to copy blocks itself (CUDA IPC).

    ``handles[i]`` is layer ``i``'s ``storage._share_cuda_()`` handle and ``offsets[i]`` the
    byte offset of the tensor in that allocation. ``layout``: ``kv_planes`` ``[2, blocks, ...]``
    (``plane_bytes``: one block's K, or V, in one layer), ``blocks_first`` ``[blocks, 2, ...]``
    (likewise), or ``block_chunk``: each block one gap-free chunk of ``plane_bytes`` per layer
    (MLA ``[blocks, block_size, dim]`` or vLLM >= 0.26's K|V-packed ``[blocks, heads,
    block_size, 2*head_size]`` in either memory order; ``mla`` is accepted as a synonym).
    ``byte_order``: how one block's bytes are ordered (dims outermost first), so engines whose
    tensors order them differently never share a namespace. ``layer_events``: optional, one
    ``cudaIpcEventHandle_t`` per layer (interprocess events the engine created) for layered
    loads; with ``prefetch``, :data:`EVENT_SETS` sets of them (set ``k`` is
    ``layer_events[k * layers:(k + 1) * layers]``). ``prefetch_token``: a secret the worker
    hands its own scheduler (through vLLM's worker metadata), which names this registration in a
    :class:`GpuPrefetch`. The mappings and events live until the session ends.
    """

    namespace: Namespace
    device_uuid: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    layout: Annotated[str, msgspec.Meta(max_length=32)]
    num_blocks: Annotated[int, msgspec.Meta(gt=0, le=1 << 32)]
    plane_bytes: Annotated[int, msgspec.Meta(gt=0, le=1 << 36)]
    handles: Annotated[list[bytes], msgspec.Meta(min_length=1, max_length=4096)]
    offsets: Annotated[list[NonNegative], msgspec.Meta(max_length=4096)]
    byte_order: Annotated[str, msgspec.Meta(max_length=128)] = ""
    layer_events: Annotated[list[bytes], msgspec.Meta(max_length=4096)] = []
    #: as in :class:`RegisterNamespace` (agents listing ``routing``); ``block_tokens``: tokens
    #: per block, for prefix lookups by token ids (0: unknown)
    model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    group: Annotated[str, msgspec.Meta(max_length=128)] = ""
    block_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK_TOKENS)] = 0
    prefetch_token: Annotated[bytes, msgspec.Meta(max_length=64)] = b""

    @property
    def description(self) -> str:
        """The namespace's layout as the agent records and compares it."""
        return f"{self.layout} {self.byte_order}".strip()


class GpuCopy(_Request, frozen=True, tag="gpu_copy"):
    """Copy blocks between a registered engine's KV tensors and pool slots; the reply comes
    when the copy is complete (one round trip per batch, not per layer).

    ``layered`` (loads into an engine registered with ``layer_events``): the reply comes once
    the copies are queued; layer ``i``'s event is recorded after its copies, and the engine's
    stream waits on it before reading that layer. Sent only to an agent that lists
    ``layered_loads`` in its features (an older one would refuse the unknown field).
    """

    kv_id: int
    to_pool: bool
    block_ids: Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_KEYS)]
    slots: Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_KEYS)]
    layered: bool = False
    #: which set of layer events a layered load records (``prefetch``)
    event_set: Annotated[int, msgspec.Meta(ge=0, lt=EVENT_SETS)] = 0


class PrefetchLoad(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One worker's part of a :class:`GpuPrefetch`: the registration its token names, and the
    step's blocks to load into it from leased slots."""

    token: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
    block_ids: Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_KEYS)]
    slots: Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_KEYS)]


class GpuPrefetch(_Request, frozen=True, tag="gpu_prefetch"):
    """From an engine's scheduler (``prefetch``), right after vLLM allocated a step's blocks:
    queue that step's loads into the workers' KV now, layered as :class:`GpuCopy` with
    ``event_set``, so the copies run while vLLM prepares the step. The reply comes once they
    are queued (their events recorded): the scheduler tells the workers in the step's metadata,
    and their forward waits on the events as for their own layered loads. The scheduler only
    prefetches into blocks no GPU work of the engine may still touch (the agent's streams know
    nothing of the engine's); the agent checks the token's tenant and the slots' leases.
    """

    loads: Annotated[list[PrefetchLoad], msgspec.Meta(max_length=64)]
    event_set: Annotated[int, msgspec.Meta(ge=0, lt=EVENT_SETS)] = 0


Request = (
    Hello
    | RegisterNamespace
    | Lookup
    | Reserve
    | Commit
    | Release
    | Stats
    | OpenPool
    | RegisterGpuKV
    | GpuCopy
    | GpuPrefetch
    | Annotate
)


class _Reply(msgspec.Struct, tag_field="kind", frozen=True):
    pass


class HelloReply(_Reply, frozen=True, tag="hello"):
    session_id: int
    agent_id: str
    pool_id: str
    pool_path: str
    pool_bytes: int
    protocol_version: int
    #: Optional requests and fields the agent understands (:data:`FEATURES`); an agent older
    #: than this field sends none, and decodes as an empty list.
    features: list[str] = []
    #: The tenant the agent put this session in (isolated tenancy), for logs; "" when shared.
    tenant: str = ""
    #: A secret naming this session in a delegated :class:`Commit` (``delegated_commit``): session
    #: ids repeat after an agent restart, tokens do not.
    session_token: str = ""
    #: Files the pool at ``pool_path`` is kept in, mapped back to back (``pool_path``,
    #: ``pool_path.1``, ...: :mod:`kvfabric.connector.pool_files`).
    pool_files: int = 1


class NamespaceReply(_Reply, frozen=True, tag="namespace"):
    namespace: str
    block_bytes: int


class LookupReply(_Reply, frozen=True, tag="lookup"):
    hits: int
    pool_id: str
    #: ``slots[i][j]``: slot of hit block ``j`` in ``namespaces[i]``; empty without a lease.
    slots: list[list[int]]
    #: ``leases[i]``: the id that ends exactly this lease of ``namespaces[i]`` (with its
    #: generation); empty from an agent without ``lease_generations`` or without a lease.
    leases: list[str] = []
    #: blocks after the hits being read from the NVMe tier into the pool (``promote``)
    promoting: int = 0
    #: when the agent expects them all in the pool, in ms from now (0: no estimate yet)
    promote_eta_ms: float = 0.0


class ReserveReply(_Reply, frozen=True, tag="reserve"):
    pool_id: str
    slots: list[int]


class CommitReply(_Reply, frozen=True, tag="commit"):
    committed: int


class AnnotateReply(_Reply, frozen=True, tag="annotate"):
    #: blocks announced now (already committed); the rest are announced when committed
    announced: int


class ReleaseReply(_Reply, frozen=True, tag="release"):
    #: Per lease: False when it was unknown (already released or its session dropped); data a
    #: client copied under such a lease may have been overwritten and must not be trusted.
    held: list[bool]


class StatsReply(_Reply, frozen=True, tag="stats"):
    stats: dict[str, int | float | str]


class PoolReply(_Reply, frozen=True, tag="pool"):
    """The frame carries the pool file's descriptor (``SCM_RIGHTS``)."""

    pool_id: str
    pool_bytes: int
    writable: bool


class GpuKVReply(_Reply, frozen=True, tag="gpu_kv"):
    kv_id: int
    block_bytes: int
    #: Whether the agent opened the engine's layer events (layered loads possible). CUDA IPC
    #: events need the two processes to share /dev/shm; without it the engine loads whole.
    layered: bool = False
    #: Whether the registration's ``prefetch_token`` was taken (layered, and no other holds it).
    prefetch: bool = False


class GpuCopyReply(_Reply, frozen=True, tag="gpu_copy"):
    method: str  # "dma" (copy engines) or "kernel" (gather/scatter)
    seconds: float


class GpuPrefetchReply(_Reply, frozen=True, tag="gpu_prefetch"):
    #: per load: whether its copies were queued (False: the worker loads those blocks itself)
    queued: list[bool]


class ErrorReply(_Reply, frozen=True, tag="error"):
    code: str
    message: str


Reply = (
    HelloReply
    | NamespaceReply
    | LookupReply
    | ReserveReply
    | CommitReply
    | ReleaseReply
    | AnnotateReply
    | StatsReply
    | PoolReply
    | GpuKVReply
    | GpuCopyReply
    | GpuPrefetchReply
    | ErrorReply
)

# Error codes carried by ErrorReply.code.
E_BAD_FRAME = "bad_frame"
E_BAD_REQUEST = "bad_request"
E_NO_SESSION = "no_session"
E_VERSION = "version_mismatch"
E_NAMESPACE = "namespace"
E_INTERNAL = "internal"
E_GPU = "gpu"
E_LEASE = "lease"
E_QUOTA = "quota"
E_BUSY = "busy"

request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)


OPS: tuple[str, ...] = tuple(str(t.__struct_config__.tag) for t in typing.get_args(Request))


def op_name(request: _Request) -> str:
    """The request's wire tag (``"lookup"``...), used as a metrics label."""
    return str(request.__struct_config__.tag)


def frame(body: bytes) -> bytes:
    """Prefixes ``body`` with its length header."""
    return HEADER.pack(len(body)) + body


def encode(message: msgspec.Struct) -> bytes:
    """Encodes one request or reply as a complete frame."""
    return frame(request_encoder.encode(message))
