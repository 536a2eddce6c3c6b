"""Which agent of the pool holds which block: published to Valkey, read back per lookup.

One Valkey key per block and namespace, ``kvf:<pool>:<namespace>:<key hex>``, whose value is the
holder's fabric address, with a TTL: a block has one published holder (the last to commit it),
and an agent that crashed stops being found once its entries expire. Data never passes through
Valkey.

- *Publish*: commits are queued (thread-safe) and written by one thread in pipelined batches
  (one round trip per batch). Every ``ttl / 3`` the thread writes every block it holds again.
  Each second it checks its marker key (written with every full publish): a Valkey that
  restarted (empty) or a write that failed makes it publish everything again as soon as Valkey
  answers.
- *Remove*: a block leaving the pool is deleted only where the value is still ours (another
  agent may have published it since), in the same batches.
- *Locate*: one ``MGET`` for a prompt's chain in every namespace (the caller runs it off the
  event loop). Valkey down or slow: nothing is found, and lookups serve local hits only; after
  a failure it is not asked for ``retry_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

#: Deletes each KEYS[i] whose value is ARGV[1] (the caller's address): a block is removed only
#: by the agent that published it last.
_REMOVE_MINE = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
end
return n
"""


class ValkeyIndex:
    def __init__(
        self,
        url: str,
        pool: str,
        address: str,
        *,
        ttl_s: float = 600.0,
        batch: int = 4096,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        flush_s: float = 0.02,
        check_s: float = 1.0,
    ) -> None:
        """``address``: this agent's fabric address, the value peers read."""
        import valkey

        self.pool = pool
        self.address = address
        self.ttl_s = ttl_s
        self.batch = batch
        self.retry_s = retry_s
        self.flush_s = flush_s
        self.check_s = check_s
        self._marker = f"kvf:{pool}:agent:{address}"
        self._client = valkey.Valkey.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._remove = self._client.register_script(_REMOVE_MINE)
        self._queue: deque[tuple[bool, str, bytes]] = deque()  # (publish?, namespace, key)
        self._held: set[tuple[str, bytes]] = set()  # what we hold, for re-publishing (thread only)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._down_until = 0.0
        self.up = False
        self.published = 0
        self.removed = 0
        self.failures = 0
        self.lookups = 0
        self._thread = threading.Thread(target=self._run, name="kvfabric-valkey", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._client.close()

    def _name(self, namespace: str, key: bytes) -> str:
        return f"kvf:{self.pool}:{namespace}:{key.hex()}"

    # -- from the event loop ------------------------------------------------------------------

    def publish(self, namespace: str, key: bytes) -> None:
        self._queue.append((True, namespace, key))
        if len(self._queue) >= self.batch:
            self._wake.set()

    def remove(self, namespace: str, key: bytes) -> None:
        self._queue.append((False, namespace, key))

    # -- from a worker thread -----------------------------------------------------------------

    def locate(self, namespaces: list[str], keys: list[bytes]) -> list[str | None]:
        """Per key, the one address that holds it in every namespace (None: no such agent, or
        only this one). Empty when Valkey cannot be asked."""
        return [h if h != self.address else None for h in self.holders(namespaces, keys)]

    def holders(self, namespaces: list[str], keys: list[bytes]) -> list[str | None]:
        """Per key, the one address (this agent's too) that published it in every namespace."""
        if not keys or time.monotonic() < self._down_until:
            return []
        names = [self._name(ns, k) for k in keys for ns in namespaces]
        try:
            values: list[bytes | None] = list(self._client.mget(names))
        except Exception as exc:
            self._failed(exc)
            return []
        self.lookups += 1
        out: list[str | None] = []
        width = len(namespaces)
        for i in range(len(keys)):
            row = set(values[i * width : (i + 1) * width])
            holder = row.pop() if len(row) == 1 else None
            out.append(holder.decode() if holder is not None else None)
        return out

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.up:
            log.warning("valkey unreachable: serving local hits only", extra={"error": str(exc)})
        self.up = False
        self._down_until = time.monotonic() + self.retry_s

    # -- the publishing thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_refresh = time.monotonic() + self.ttl_s / 3
        next_check = 0.0
        stale = True  # everything is written (again) once Valkey answers: at start, after a failure
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            items = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch * 4))]
            for publish, ns, key in items:
                (self._held.add if publish else self._held.discard)((ns, key))
            now = time.monotonic()
            if now < self._down_until:
                continue  # what we hold is in _held: written with the refresh below
            try:
                if now >= next_check:
                    next_check = now + self.check_s
                    stale = stale or not self._client.exists(self._marker)  # restarted empty?
                if stale or now >= next_refresh:
                    self._write(list(self._held), [], full=True)
                    next_refresh = time.monotonic() + self.ttl_s / 3
                    if stale and self._held:
                        log.info("valkey: every block published again", extra={"blocks": len(self._held)})
                    stale = False
                else:
                    self._write(
                        [(ns, k) for publish, ns, k in items if publish],
                        [(ns, k) for publish, ns, k in items if not publish],
                    )
                self.up = True
            except Exception as exc:
                stale = True
                self._failed(exc)

    def _write(
        self, publish: list[tuple[str, bytes]], remove: list[tuple[str, bytes]], full: bool = False
    ) -> None:
        """``full``: ``publish`` is everything held; the marker then says Valkey has it all."""
        ttl = max(1, int(self.ttl_s))
        for start in range(0, len(publish), self.batch):
            pipe = self._client.pipeline(transaction=False)
            for ns, key in publish[start : start + self.batch]:
                pipe.set(self._name(ns, key), self.address, ex=ttl)
            pipe.execute()
            self.published += len(publish[start : start + self.batch])
        if full:
            self._client.set(self._marker, "1", ex=ttl)
        for start in range(0, len(remove), self.batch):
            names = [self._name(ns, k) for ns, k in remove[start : start + self.batch]]
            self.removed += int(self._remove(keys=names, args=[self.address]))
