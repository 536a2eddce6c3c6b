"""Which freed blocks a prefetch may write (``FreedBlocks``), replayed in the order vLLM's engine
core calls the scheduler's hooks, with and without async scheduling."""

from __future__ import annotations

from kvfabric.connector.freed_blocks import FreedBlocks


def test_sync_scheduling_a_finished_requests_blocks_are_safe_once_its_last_step_came_back() -> None:
    f = FreedBlocks()
    # update_from_output(1): the request (last scheduled in step 1) finishes, then the output
    # of step 1 is counted
    f.freed([1, 2, 3], last_step=1)
    assert not f.safe([2]), "step 1's output has not been counted yet"
    f.completed_through(1)
    assert f.safe([1, 2, 3])


def test_async_scheduling_blocks_stay_unsafe_while_the_step_scheduled_ahead_runs() -> None:
    """vLLM's batch queue: schedule(S) runs while S-1 is on the GPU; a request that finished at
    S-2's output was scheduled once more in S-1, which may still write its blocks."""
    f = FreedBlocks()
    f.freed([7, 8], last_step=2)  # update_from_output(1): finished, but scheduled in step 2 too
    f.completed_through(1)
    assert not f.safe([8]), "step 2 may still touch block 8"
    assert f.safe([9]), "a block nobody freed is safe"
    f.completed_through(2)
    assert f.safe([7, 8])


def test_steps_whose_output_reports_nothing_do_not_hold_blocks_back() -> None:
    """An empty step (nothing scheduled) may come back without the workers' report: the next
    report names a later step, and everything up to it has ended (outputs are in order)."""
    f = FreedBlocks()
    f.freed([1], last_step=3)
    f.completed_through(2)  # step 3 empty: no report; step 4's comes next
    assert not f.safe([1])
    f.completed_through(4)
    assert f.safe([1])


def test_a_block_freed_again_later_stays_unsafe_until_its_latest_use_ended() -> None:
    f = FreedBlocks()
    f.freed([5], last_step=1)
    f.freed([5], last_step=2)  # reused by a request scheduled in step 2, freed again
    f.completed_through(1)
    assert not f.safe([5])
    f.completed_through(2)
    assert f.safe([5])


def test_a_preemption_makes_nothing_safe_until_its_steps_output() -> None:
    """Preempted requests' blocks are freed unseen by the connector (and their background saves
    are flushed only at that step's start on the worker)."""
    f = FreedBlocks()
    f.completed_through(1)
    f.barrier(2)  # step 2 preempts
    assert not f.safe([1])
    f.completed_through(2)
    assert f.safe([1])


def test_outputs_that_never_come_back_keep_blocks_unsafe_and_memory_bounded() -> None:
    f = FreedBlocks(max_tracked=100)
    for step in range(1, 51):
        f.freed(range(step * 10, step * 10 + 10), last_step=step)  # no output ever reported
    assert not f.safe([10]) and not f.safe([505])
    assert len(f._latest) <= 100
    assert not f.safe([10_000]), "past the bound nothing is safe until every step freed so far ended"
    f.completed_through(50)
    assert f.safe([10, 505, 10_000])


def test_a_report_of_an_earlier_step_never_settles_a_later_one() -> None:
    f = FreedBlocks()
    f.freed([1], last_step=3)
    f.completed_through(4)
    f.completed_through(2)  # stale: completed stays at 4
    f.freed([2], last_step=5)
    assert f.safe([1]) and not f.safe([2])
