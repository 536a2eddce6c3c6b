"""BackgroundSaves: which requests vLLM may free, and when (pure logic, real threads)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvfabric.connector.background_saves import BackgroundSaves


@dataclass(frozen=True)
class Save:
    req_id: str


def intent(req: str) -> Save:
    return Save(req)


def test_a_request_is_freed_only_after_its_saves_end() -> None:
    gate = threading.Event()
    saved: list[str] = []
    saves = BackgroundSaves[Save](lambda i: saved.append(i.req_id))
    try:
        saves.submit(lambda: gate.wait(10), [intent("a"), intent("a")])
        assert saves.finished({"a"}) == set()  # finished by the scheduler, still saving
        assert not saves.flush(["a"], timeout=0.05)
        gate.set()
        assert saves.flush(["a"], timeout=10)
        assert saved == ["a", "a"]
        assert saves.finished(set()) == {"a"}  # remembered from the earlier call
        assert saves.finished({"a"}) == set()  # reported once
    finally:
        saves.close()


def test_requests_without_saves_are_never_reported() -> None:
    saves = BackgroundSaves[Save](lambda i: None)
    try:
        assert saves.finished({"x", "y"}) == set()
    finally:
        saves.close()


def test_noted_but_unsaved_requests_are_freed_when_finished() -> None:
    """A worker that cannot save (agent gone) must still release what the scheduler delayed."""
    saves = BackgroundSaves[Save](lambda i: None)
    try:
        saves.note([intent("n")])
        assert saves.finished(set()) == set()  # not finished yet
        assert saves.finished({"n"}) == {"n"}
    finally:
        saves.close()


def test_a_failing_save_still_ends_and_the_thread_goes_on() -> None:
    def save(i: Save) -> None:
        if i.req_id == "bad":
            raise RuntimeError("copy failed")

    saves = BackgroundSaves[Save](save)
    try:
        saves.submit(lambda: None, [intent("bad")])
        saves.submit(lambda: None, [intent("good")])
        assert saves.flush(timeout=10)
        assert saves.finished({"bad", "good"}) == {"bad", "good"}
    finally:
        saves.close()


def test_flush_of_some_requests_does_not_wait_for_others() -> None:
    gate = threading.Event()
    saves = BackgroundSaves[Save](lambda i: gate.wait(10) if i.req_id == "slow" else None)
    try:
        saves.submit(lambda: None, [intent("slow")])
        saves.submit(lambda: None, [intent("quick")])
        assert saves.flush(["unrelated"], timeout=0.05)
        assert not saves.flush(["slow"], timeout=0.05)
        gate.set()
        assert saves.flush(["quick", "slow"], timeout=10)
    finally:
        saves.close()


def test_close_finishes_queued_saves_first() -> None:
    saved: list[str] = []
    gate = threading.Event()
    saves = BackgroundSaves[Save](lambda i: saved.append(i.req_id))
    saves.submit(lambda: gate.wait(10), [intent("a")])
    saves.submit(lambda: None, [intent("b")])
    threading.Timer(0.1, gate.set).start()
    saves.close()
    assert saved == ["a", "b"]
