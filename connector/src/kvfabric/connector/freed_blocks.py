"""Which of vLLM's KV blocks the agent may write before the engine's GPU has caught up.

A prefetch (the scheduler having the agent start a step's loads when vLLM allocates the blocks)
runs on the agent's streams, which know nothing of the engine's. It is safe only for blocks no
GPU work of the engine may still read or write. The blocks of a request last scheduled in step
``L`` may be touched by the GPU work of steps up to ``L`` (with async scheduling a request that
finished at one step's output was scheduled once more in the step after), and a preempted
request's background saves may still read its blocks until the worker flushes them at the start
of the step that preempted it. Once step ``L``'s output came back, every step up to ``L`` has
ended on the GPU (vLLM copied its sampled tokens out) and the worker has run step ``L``'s hooks.

vLLM (0.26 and later) fences the first itself where steps overlap: it returns a finished or
preempted request's blocks to the pool only once the output of the last step that scheduled it
came back (``defer_block_free``), blocks the connector is never told of included (the block ids
``request_finished`` gets cover the computed tokens only). The scheduler prefetches only under
that fence, or where steps do not overlap (see ``vllm_connector``). This is the connector's own
check on top, and the one for what vLLM's fence does not cover: our saves of a preempted
request (a preemption rules out every block until that step's output).

Pure bookkeeping, driven by the scheduler's connector hooks:

- :meth:`completed_through` with the step a worker reports having run, in its metadata with
  that step's output (outputs come back in order: every earlier step has ended too; a step
  whose output carries none only delays the next report);
- :meth:`freed` with the block ids of a finished request and the last step that scheduled it;
- :meth:`barrier` with the step that preempted requests (their blocks are not listed to us).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

#: Freed blocks remembered at most; past it (outputs that never come back) nothing is safe
#: until every step freed so far has completed.
_MAX_TRACKED = 1 << 20


class FreedBlocks:
    def __init__(self, max_tracked: int = _MAX_TRACKED) -> None:
        self.completed = 0  # the latest step known to have ended on the GPU
        self._max = max_tracked
        self._latest: dict[int, int] = {}  # block -> the latest step that may still touch it
        self._order: deque[tuple[int, list[int]]] = deque()  # (step, blocks), in step order
        self._tracked = 0
        #: no block is safe before this step's output (a preemption, or too much to track)
        self._barrier = 0

    def completed_through(self, step: int) -> None:
        if step <= self.completed:
            return
        self.completed = step
        while self._order and self._order[0][0] <= step:
            last, blocks = self._order.popleft()
            self._tracked -= len(blocks)
            for b in blocks:
                if self._latest.get(b) == last:
                    del self._latest[b]

    def freed(self, blocks: Iterable[int], last_step: int) -> None:
        """``blocks`` were freed; the GPU work of steps up to ``last_step`` may touch them."""
        if last_step <= self.completed:
            return  # every step that could have touched them has ended
        ids = list(blocks)
        if self._tracked + len(ids) > self._max:
            self.barrier(max(last_step, max(self._latest.values(), default=0)))
            self._latest.clear()
            self._order.clear()
            self._tracked = 0
            return
        for b in ids:
            self._latest[b] = max(last_step, self._latest.get(b, 0))
        if self._order and self._order[-1][0] > last_step:  # kept in step order for pruning
            last_step = self._order[-1][0]
        self._order.append((last_step, ids))
        self._tracked += len(ids)

    def barrier(self, step: int) -> None:
        """Nothing is safe before step ``step``'s output."""
        self._barrier = max(self._barrier, step)

    def safe(self, blocks: Iterable[int]) -> bool:
        """Whether none of ``blocks`` may still be touched by the engine's GPU work."""
        if self.completed < self._barrier:
            return False
        latest = self._latest
        return not any(b in latest for b in blocks)
