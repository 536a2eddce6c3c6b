"""Which freed blocks a prefetch may write (``FreedBlocks``), replayed in the order vLLM's engine
core calls the scheduler's hooks, with and without async scheduling."""

from __future__ import annotations

from kvfabric.connector.freed_blocks import FreedBlocks


def test_sync_scheduling_a_finished_requests_blocks_are_safe_once_its_last_step_came_back() -> None:
    f = FreedBlocks()
    f.step_scheduled()  # step 1 uses blocks 1-3
    # update_from_output(1): the request finishes (request_finished), then the output is counted
    f.freed([1, 2, 3])
    assert not f.safe([2]), "step 1's output has not been counted yet"
    f.step_completed()
    f.step_scheduled()  # step 2 may load into them: step 1 has ended on the GPU
    assert f.safe([1, 2, 3])


def test_async_scheduling_blocks_stay_unsafe_while_the_step_scheduled_ahead_runs() -> None:
    """vLLM's batch queue: schedule(S) runs while S-1 is on the GPU; a request that finished at
    S-2's output was scheduled once more in S-1, which may still write its blocks."""
    f = FreedBlocks()
    f.step_scheduled()  # 1
    f.step_scheduled()  # 2 (1 still running)
    f.freed([7, 8])  # update_from_output(1): finished; step 2, scheduled, still reads them
    f.step_completed()  # output 1
    f.step_scheduled()  # 3: 2 may be running
    assert not f.safe([8]), "step 2 may still touch block 8"
    assert f.safe([9]), "a block nobody freed is safe"
    f.step_completed()  # output 2
    f.step_scheduled()  # 4
    assert f.safe([7, 8])


def test_a_block_freed_again_later_stays_unsafe_until_its_latest_use_ended() -> None:
    f = FreedBlocks()
    f.step_scheduled()  # 1
    f.freed([5])
    f.step_scheduled()  # 2: block 5 reused, then freed again while 2 is the latest
    f.freed([5])
    f.step_completed()  # output 1: the first free is settled, not the second
    assert not f.safe([5])
    f.step_completed()  # output 2
    assert f.safe([5])


def test_a_preemption_makes_nothing_safe_until_its_steps_output() -> None:
    """Preempted requests' blocks are freed unseen by the connector (and their background saves
    are flushed only at that step's start on the worker)."""
    f = FreedBlocks()
    f.step_scheduled()  # 1
    f.step_completed()
    f.step_scheduled()  # 2 preempts
    f.barrier()
    assert not f.safe([1])
    f.step_scheduled()  # 3: 2's output not back yet
    assert not f.safe([1])
    f.step_completed()  # output 2
    f.step_completed()  # output 3
    assert f.safe([1])


def test_outputs_that_never_come_back_keep_blocks_unsafe_and_memory_bounded() -> None:
    f = FreedBlocks(max_tracked=100)
    for i in range(50):
        f.step_scheduled()
        f.freed(range(i * 10, i * 10 + 10))  # no output ever counted
    assert not f.safe([0]) and not f.safe([495])
    assert len(f._latest) <= 100
    assert not f.safe([10_000]), "past the bound nothing is safe until every step so far ended"
    for _ in range(50):
        f.step_completed()
    assert f.safe([0, 495, 10_000])


def test_more_outputs_than_steps_never_run_ahead() -> None:
    f = FreedBlocks()
    f.step_scheduled()
    f.freed([1])
    f.step_completed()
    f.step_completed()  # a spurious extra call must not settle a step not yet scheduled
    f.step_scheduled()
    f.freed([2])
    assert not f.safe([2])
