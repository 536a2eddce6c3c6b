"""KV events for KV-aware routers, in vLLM's schema and on vLLM's transport.

What is published: per node (this agent), per model, which blocks it holds and in which tier
(``medium`` ``CPU``: the memory pool; ``STORAGE``: the NVMe tier), named by *vLLM's own* block
hashes and token ids, which the engines' schedulers send with :class:`~kvfabric.connector.protocol.Annotate`
(our keys are not what a router computes). A block no engine annotated is not announced: a router
under-counts this node, it never routes to blocks that are not here.

Wire format: that of vLLM's ``ZmqEventPublisher`` (``vllm.distributed.kv_events``), so a
subscriber built for vLLM reads it unchanged (the tests decode it with vLLM's own classes):

- PUB, bound when the endpoint is a wildcard (``tcp://*:5557``), else connected to a subscriber
  that binds (vLLM's rule): multipart ``(topic, seq, payload)``; ``seq`` 8-byte big-endian, one
  counter for every topic; ``payload`` a msgpack ``KVEventBatch`` (``[ts, [event...], dp_rank]``,
  events tagged by class name);
- replay ROUTER: a DEALER/REQ sends ``(b"", start_seq)`` and gets ``(b"", topic, seq, payload)`` for
  every buffered batch from ``start_seq`` on, then ``(b"", b"", -1, b"")``.

Topics: ``--kv-events-topic`` with ``{node}`` and ``{model}`` (default ``kv@{node}@{model}``, the
shape llm-d's subscriber parses). The first time a model's namespace appears after a start, its
topic gets ``AllBlocksCleared``: whatever a router remembers of this node from before is gone.

Threads: the bookkeeping runs on the agent's loop (index listeners, annotations), batches are
flushed every ``flush_s`` to one publisher thread, which owns the ZMQ sockets, encodes and sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import msgspec

log = logging.getLogger(__name__)

MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
_IN_MEMORY, _ON_DISK = 1, 2
_MEDIUM = {_IN_MEMORY: MEDIUM_CPU, _ON_DISK: MEDIUM_STORAGE}
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Annotations of blocks not committed yet, at most (oldest forgotten first): a save that never
#: commits must not grow them without bound.
MAX_PENDING = 1 << 18

RouterHash = int | bytes


# -- vLLM's schema (vllm.distributed.kv_events), mirrored so the agent needs no vLLM ---------------


class BlockStored(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    block_hashes: list[RouterHash]
    parent_block_hash: RouterHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[object, ...] | None] | None = None
    locality: str | None = None


class BlockRemoved(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    block_hashes: list[RouterHash]
    medium: str | None
    locality: str | None = None


class AllBlocksCleared(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


def binds(endpoint: str) -> bool:
    """vLLM's rule: wildcard, ``ipc://`` and ``inproc://`` endpoints are bound, others connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# -- what the agent knows of a block ----------------------------------------------------------


@dataclass(slots=True)
class RouterBlock:
    hash: RouterHash
    parent: RouterHash | None
    tokens: array[int]
    lora_name: str | None
    extra: tuple[object, ...] | None
    media: int = 0  # _IN_MEMORY | _ON_DISK, as announced


@dataclass
class EventCounters:
    annotated_blocks: int = 0
    stored_events: int = 0
    removed_events: int = 0
    batches: int = 0
    pending_dropped: int = 0
    replays: int = 0


@dataclass
class _Topic:
    events: list[Event] = field(default_factory=list)


class KVEvents:
    """The agent's KV event publisher. Loop-side methods must run on the agent's loop."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str,
        node: str,
        *,
        buffer_batches: int = 10_000,
        flush_s: float = 0.05,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic_format = topic
        self.node = node
        self.flush_s = flush_s
        self.counters = EventCounters()
        #: (scoped namespace, key) -> block: announced in some tier, or annotated and awaited
        self._held: dict[tuple[str, bytes], RouterBlock] = {}
        self._pending: OrderedDict[tuple[str, bytes], RouterBlock] = OrderedDict()
        self._models: set[str] = set()
        self._topics: dict[str, _Topic] = {}
        self._by_model: dict[str, _Topic] = {}
        self._queue: queue.SimpleQueue[tuple[bytes, KVEventBatch] | None] = queue.SimpleQueue()
        self._buffer_batches = buffer_batches
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: Exception | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.bound_endpoint = ""  # with a tcp port 0: the port the OS chose
        self.bound_replay_endpoint = ""

    # -- lifecycle (loop) ----------------------------------------------------------------------

    def start(self) -> None:
        """Binds the sockets (in the publisher thread); raises what binding raised."""
        self._thread = threading.Thread(target=self._run, name="kvfabric-kv-events", daemon=True)
        self._thread.start()
        self._started.wait(10.0)
        if self._start_error is not None:
            raise self._start_error
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
            self._thread = None

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            self.flush()

    def flush(self) -> None:
        """Hands each topic's events to the publisher thread as one batch."""
        now = time.time()
        for topic, t in self._topics.items():
            if t.events:
                self._queue.put((topic.encode(), KVEventBatch(ts=now, events=t.events)))
                t.events = []
                self.counters.batches += 1

    # -- bookkeeping (loop) --------------------------------------------------------------------

    def model_seen(self, model: str) -> None:
        """A namespace of ``model`` was registered: its topic starts from a clean slate."""
        if model and model not in self._models:
            self._models.add(model)
            self._events(model).append(AllBlocksCleared())

    def annotate(
        self,
        ident: tuple[str, bytes],
        model: str,
        block: RouterBlock,
        committed: bool,
        on_disk: bool = False,
    ) -> bool:
        """Records what routers call block ``ident``; announces it now in the tiers that hold
        it (``committed``: the pool; ``on_disk``: the NVMe tier). True when announced now."""
        if ident in self._held:
            return False  # known already (another engine computed the same prefix)
        self.counters.annotated_blocks += 1
        if committed or on_disk:
            self._held[ident] = block
            if committed:
                self._announce(model, block, _IN_MEMORY)
            if on_disk:
                self._announce(model, block, _ON_DISK)
            return True
        self._pending[ident] = block
        self._pending.move_to_end(ident)
        if len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
            self.counters.pending_dropped += 1
        return False

    def committed(self, ident: tuple[str, bytes], model: str) -> None:
        """The block is in the memory pool now (saved, promoted from NVMe, or pulled)."""
        block = self._held.get(ident)
        if block is None:
            block = self._pending.pop(ident, None)
            if block is None:
                return
            self._held[ident] = block
        if not block.media & _IN_MEMORY:
            self._announce(model, block, _IN_MEMORY)

    def dropped(self, ident: tuple[str, bytes], model: str) -> None:
        """The block left the memory pool."""
        self._pending.pop(ident, None)
        self._leave(ident, model, _IN_MEMORY)

    def on_disk(self, ident: tuple[str, bytes], model: str) -> None:
        """The NVMe tier holds the block now."""
        block = self._held.get(ident)
        if block is not None and not block.media & _ON_DISK:
            self._announce(model, block, _ON_DISK)

    def off_disk(self, ident: tuple[str, bytes], model: str) -> None:
        """The NVMe tier no longer holds the block (evicted, or found damaged)."""
        self._leave(ident, model, _ON_DISK)

    def _announce(self, model: str, block: RouterBlock, medium: int) -> None:
        block.media |= medium
        events = self._events(model)
        tokens = block.tokens.tolist()
        last = events[-1] if events else None
        if (
            isinstance(last, BlockStored)
            and last.medium == _MEDIUM[medium]
            and last.lora_name == block.lora_name
            and last.block_hashes[-1] == block.parent
            and len(last.block_hashes) < 1024
        ):  # the next block of the same chain: one event, as vLLM sends a request's blocks
            last.block_hashes.append(block.hash)
            last.token_ids.extend(tokens)
            if last.extra_keys is not None or block.extra is not None:
                if last.extra_keys is None:
                    last.extra_keys = [None] * (len(last.block_hashes) - 1)
                last.extra_keys.append(block.extra)
        else:
            events.append(
                BlockStored(
                    block_hashes=[block.hash],
                    parent_block_hash=block.parent,
                    token_ids=tokens,
                    block_size=len(tokens),
                    lora_id=None,
                    medium=_MEDIUM[medium],
                    lora_name=block.lora_name,
                    extra_keys=[block.extra] if block.extra is not None else None,
                    locality="LOCAL",
                )
            )
        self.counters.stored_events += 1

    def _leave(self, ident: tuple[str, bytes], model: str, medium: int) -> None:
        block = self._held.get(ident)
        if block is None or not block.media & medium:
            return
        block.media &= ~medium
        if not block.media:
            del self._held[ident]
        events = self._events(model)
        last = events[-1] if events else None
        if (
            isinstance(last, BlockRemoved)
            and last.medium == _MEDIUM[medium]
            and len(last.block_hashes) < 4096
        ):
            last.block_hashes.append(block.hash)
        else:
            events.append(BlockRemoved(block_hashes=[block.hash], medium=_MEDIUM[medium], locality="LOCAL"))
        self.counters.removed_events += 1

    def _events(self, model: str) -> list[Event]:
        """The pending events of ``model``'s topic (called per block: the topic is formatted once)."""
        t = self._by_model.get(model)
        if t is None:
            topic = self.topic_format.replace("{node}", self.node).replace("{model}", model)
            t = self._by_model[model] = self._topics.setdefault(topic, _Topic())
        return t.events

    def held(self, ident: tuple[str, bytes]) -> RouterBlock | None:
        return self._held.get(ident)

    def summary(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {f"kv_events_{k}": v for k, v in vars(self.counters).items()}
        out.update(
            kv_events_endpoint=self.bound_endpoint,
            kv_events_replay_endpoint=self.bound_replay_endpoint,
            kv_events_known_blocks=len(self._held),
            kv_events_pending_blocks=len(self._pending),
        )
        return out

    # -- the publisher thread ----------------------------------------------------------------------

    def _run(self) -> None:
        import zmq

        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        replay = None
        try:
            pub.setsockopt(zmq.LINGER, 0)
            pub.set_hwm(100_000)
            if binds(self.endpoint):
                pub.bind(self.endpoint)
                self.bound_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:  # a subscriber that binds (llm-d's indexer): publishers connect to it
                pub.connect(self.endpoint)
                self.bound_endpoint = self.endpoint
            if self.replay_endpoint is not None:
                replay = ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 0)
                replay.bind(self.replay_endpoint)
                self.bound_replay_endpoint = replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception as exc:  # an address in use, a bad endpoint: the agent says so at start
            self._start_error = exc
            pub.close()
            if replay is not None:
                replay.close()
            ctx.term()
            self._started.set()
            return
        self._started.set()
        encode = msgspec.msgpack.Encoder().encode
        buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=self._buffer_batches)  # (seq, topic, payload)
        seq = 0
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._serve_replay(replay, buffer)
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    break
                topic, batch = item
                payload = encode(batch)
                pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
                buffer.append((seq, topic, payload))
                seq += 1
        except Exception:  # the cache serves on without events; routers then see none
            log.exception("kv events: the publisher stopped")
        finally:
            pub.close()
            if replay is not None:
                replay.close()
            ctx.term()

    def _serve_replay(self, replay: object, buffer: deque[tuple[int, bytes, bytes]]) -> None:
        frames = replay.recv_multipart()  # type: ignore[attr-defined]
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv events: a malformed replay request was ignored")
            return
        client, _, raw = frames
        start = int.from_bytes(raw, "big")
        self.counters.replays += 1  # (a plain int; read on the loop only for stats)
        for seq, topic, payload in buffer:
            if seq >= start:
                replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))  # type: ignore[attr-defined]
        replay.send_multipart((client, b"", b"", END_SEQ, b""))  # type: ignore[attr-defined]
