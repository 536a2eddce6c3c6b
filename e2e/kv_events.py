"""A KV-event subscriber built on vLLM's own event classes (``vllm.distributed.kv_events``), as a
router's indexer is: it decodes the stream, fills gaps through the replay endpoint, and keeps
which block hashes the publisher holds per medium."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq


@dataclass
class Seen:
    """What the events said, applied in sequence order."""

    held: dict[str, set[Any]] = field(default_factory=lambda: {"CPU": set(), "STORAGE": set(), "GPU": set()})
    tokens: dict[Any, list[int]] = field(default_factory=dict)  # hash -> its block's token ids
    parents: dict[Any, Any] = field(default_factory=dict)
    extra: dict[Any, Any] = field(default_factory=dict)  # hash -> its extra keys (salt, LoRA, mm)
    topics: set[str] = field(default_factory=set)
    cleared: int = 0
    batches: int = 0


def _vllm_events() -> Any:
    """vLLM's event module (importing vLLM warns about torch features it uses; not ours to fix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import vllm.distributed.kv_events as events
    return events


class Subscriber:
    def __init__(
        self, endpoint: str, replay_endpoint: str | None = None, topic: str = "", bind: bool = False
    ) -> None:
        """``bind``: the subscriber binds and publishers connect to it (as llm-d's indexer does)."""
        batch_type = _vllm_events().KVEventBatch

        self._ctx = zmq.Context()
        self.sub = self._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        (self.sub.bind if bind else self.sub.connect)(endpoint)
        self.replay_endpoint = replay_endpoint
        self.decoder = msgspec.msgpack.Decoder(type=batch_type)
        self.next_seq = 0
        self.seen = Seen()
        self.replayed_batches = 0
        self.missed_batches = 0  # gaps it had no replay endpoint to fill

    def close(self) -> None:
        self.sub.close()
        self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replay(self, start: int) -> None:
        """Asks the replay endpoint for every batch from ``start`` on, and applies them."""
        assert self.replay_endpoint is not None, "a gap, and no replay endpoint to fill it"
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                if not dealer.poll(5000):
                    raise TimeoutError("the replay endpoint did not answer")
                _, topic, seq_raw, payload = dealer.recv_multipart()
                seq = int.from_bytes(seq_raw, "big", signed=True)
                if seq < 0:
                    return
                self.replayed_batches += 1
                self._apply(topic, seq, payload)
        finally:
            dealer.close()

    def poll(self, timeout_s: float = 0.2) -> None:
        """Takes every message that arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sub.poll(int(left * 1000) + 1):
                return
            topic, seq_raw, payload = self.sub.recv_multipart()
            seq = int.from_bytes(seq_raw, "big")
            if seq > self.next_seq:  # missed some (joined late, or dropped): fill from replay
                if self.replay_endpoint is None:  # a slow joiner without one just counts them
                    self.missed_batches += seq - self.next_seq
                else:
                    self.replay(self.next_seq)
            self._apply(topic, seq, payload)

    def until(self, what: str, cond: Callable[[Seen], bool], timeout_s: float = 15.0) -> None:
        """Reads until ``cond`` holds. Idle for a second, it asks the replay endpoint for what
        came after its last batch: a PUB socket drops what it sends before a new subscriber's
        connection is up, and a gap is otherwise noticed only when the next batch comes."""
        deadline = time.monotonic() + timeout_s
        idle_since = time.monotonic()
        while not cond(self.seen):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not seen in {timeout_s} s; seen {self.seen}")
            batches = self.seen.batches
            self.poll(0.1)
            if self.seen.batches != batches:
                idle_since = time.monotonic()
            elif self.replay_endpoint is not None and time.monotonic() - idle_since > 1.0:
                self.replay(self.next_seq)
                idle_since = time.monotonic()

    def _apply(self, topic: bytes, seq: int, payload: bytes) -> None:
        ev_types = _vllm_events()
        if seq < self.next_seq:
            return  # had it already (replay and live overlap)
        self.next_seq = seq + 1
        batch = self.decoder.decode(payload)
        s = self.seen
        s.batches += 1
        s.topics.add(topic.decode())
        for ev in batch.events:
            if isinstance(ev, ev_types.BlockStored):
                parent = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    s.held[str(ev.medium)].add(h)
                    s.tokens[h] = list(ev.token_ids[i * ev.block_size : (i + 1) * ev.block_size])
                    s.parents[h] = parent
                    s.extra[h] = tuple(ev.extra_keys[i] or ()) if ev.extra_keys else ()
                    parent = h
            elif isinstance(ev, ev_types.BlockRemoved):
                for h in ev.block_hashes:
                    s.held[str(ev.medium)].discard(h)
            elif isinstance(ev, ev_types.AllBlocksCleared):
                s.cleared += 1
                for held in s.held.values():
                    held.clear()
