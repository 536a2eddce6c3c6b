"""Saves that finish after the step: the engine thread hands them to one background thread.

On a GPU engine the agent copies blocks over PCIe (about 27 ms for a 10k-token prompt of an
8B model); waiting for that in ``wait_for_save`` would add it to every cold request. Instead
vLLM keeps a request's blocks allocated until its saves are done: the scheduler answers
``request_finished`` with "delay freeing" for every request that had a save, and the worker
lists the request in ``get_finished`` once its last save ended (committed or failed: a failed
save is only a future miss). A preempted request's blocks are freed at once, so
:meth:`BackgroundSaves.flush` waits for its saves before the step that may overwrite them.

Both sides decide from the same save intents, so they agree on which requests are delayed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

#: How long a preemption or shutdown waits for saves in flight before giving up on them.
FLUSH_TIMEOUT_S = 30.0


class _Save(Protocol):
    @property
    def req_id(self) -> str: ...


S = TypeVar("S", bound=_Save)


class BackgroundSaves(Generic[S]):
    """Runs ``save(intent)`` on a daemon thread, after ``ready()`` of the step that queued it."""

    def __init__(self, save: Callable[[S], None]) -> None:
        self._save = save
        self._cond = threading.Condition()
        self._pending: Counter[str] = Counter()  # req_id -> saves queued or running
        self._delayed: set[str] = set()  # requests the scheduler keeps allocated for us
        self._finished: set[str] = set()  # of those, finished by the scheduler
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], list[S]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvfabric-saves", daemon=True)
        self._thread.start()

    def note(self, intents: Iterable[S]) -> None:
        """Records requests the scheduler delays, even when this worker cannot save them."""
        with self._cond:
            self._delayed.update(i.req_id for i in intents)

    def submit(self, ready: Callable[[], None], intents: list[S]) -> None:
        """Queues ``intents``; ``ready`` blocks until the blocks they read are written."""
        with self._cond:
            self._delayed.update(i.req_id for i in intents)
            self._pending.update(i.req_id for i in intents)
        self._queue.put((ready, intents))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            ready, intents = item
            try:
                ready()
            except Exception as exc:  # a broken CUDA context: the copies below will fail too
                log.warning("waiting for the forward pass failed", extra={"error": str(exc)})
            for intent in intents:
                try:
                    self._save(intent)
                except Exception as exc:  # never let one save stop the thread: blocks would leak
                    log.warning("save failed", extra={"req": intent.req_id, "error": str(exc)})
                finally:
                    with self._cond:
                        self._pending[intent.req_id] -= 1
                        if self._pending[intent.req_id] <= 0:
                            del self._pending[intent.req_id]
                        self._cond.notify_all()

    def finished(self, finished_req_ids: Iterable[str]) -> set[str]:
        """Delayed requests the scheduler has finished and whose saves have all ended."""
        with self._cond:
            self._finished.update(r for r in finished_req_ids if r in self._delayed)
            done = {r for r in self._finished if r not in self._pending}
            self._finished -= done
            self._delayed -= done
            return done

    def flush(self, req_ids: Iterable[str] | None = None, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Waits until the saves of ``req_ids`` (all if None) have ended; False on timeout."""
        wanted = None if req_ids is None else set(req_ids)

        def idle() -> bool:
            return not (self._pending if wanted is None else wanted & self._pending.keys())

        with self._cond:
            return self._cond.wait_for(idle, timeout)

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Finishes queued saves (an engine shutting down keeps what it computed), then stops."""
        if not self.flush(timeout=timeout):
            log.warning("saves still running at shutdown; they are dropped")
        self._queue.put(None)
        self._thread.join(timeout=1.0)
