"""Which of vLLM's KV blocks the agent may write before the engine's GPU has caught up.

A prefetch (the scheduler having the agent start a step's loads when vLLM allocates the blocks)
runs on the agent's streams, which know nothing of the engine's. It is safe only for blocks no
GPU work of the engine may still read or write. A block vLLM freed while step ``L`` was the
latest one scheduled may still be touched by steps up to ``L``: with async scheduling a request
that finished at step ``L - 1``'s output was scheduled once more in ``L``; a preempted request's
blocks are freed while the step scheduled before runs, and its background saves may still read
them until the worker flushes them at the start of ``L``. Once step ``L``'s output came back,
every step up to ``L`` has ended on the GPU (vLLM copied its sampled tokens out) and the worker
has run step ``L``'s hooks.

Pure bookkeeping, driven by the scheduler's connector hooks:

- :meth:`step_scheduled` per ``build_connector_meta``; :meth:`step_completed` per
  ``update_connector_output`` (one per step's output, in order: if vLLM skipped one, the count
  lags and blocks stay unsafe longer; never shorter);
- :meth:`freed` with the block ids of every finished request (``request_finished``);
- :meth:`barrier` when a step preempted requests (their blocks are not listed to the connector).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

#: Freed blocks remembered at most; past it (outputs that never come back) nothing is safe
#: until every step scheduled so far has completed.
_MAX_TRACKED = 1 << 20


class FreedBlocks:
    def __init__(self, max_tracked: int = _MAX_TRACKED) -> None:
        self.scheduled = 0
        self.completed = 0
        self._max = max_tracked
        self._latest: dict[int, int] = {}  # block -> the latest step that may still touch it
        self._order: deque[tuple[int, list[int]]] = deque()  # (step, blocks), in step order
        self._tracked = 0
        #: no block is safe before this step's output (a preemption, or too much to track)
        self._barrier = 0

    def step_scheduled(self) -> None:
        self.scheduled += 1

    def step_completed(self) -> None:
        self.completed = min(self.completed + 1, self.scheduled)
        while self._order and self._order[0][0] <= self.completed:
            step, blocks = self._order.popleft()
            self._tracked -= len(blocks)
            for b in blocks:
                if self._latest.get(b) == step:
                    del self._latest[b]

    def freed(self, blocks: Iterable[int]) -> None:
        step = self.scheduled
        if step <= self.completed:
            return  # every step that could have touched them has ended
        ids = list(blocks)
        if self._tracked + len(ids) > self._max:
            self.barrier()
            self._latest.clear()
            self._order.clear()
            self._tracked = 0
            return
        for b in ids:
            self._latest[b] = step
        self._order.append((step, ids))
        self._tracked += len(ids)

    def barrier(self) -> None:
        """Nothing freed so far is safe before the output of the latest scheduled step."""
        self._barrier = self.scheduled

    def safe(self, blocks: Iterable[int]) -> bool:
        """Whether none of ``blocks`` may still be touched by the engine's GPU work."""
        if self.completed < self._barrier:
            return False
        latest = self._latest
        return not any(b in latest for b in blocks)
