"""The scheduler's wait for blocks the agent promotes from NVMe (pure decision logic: a stub
stands in for the agent's replies; e2e/test_connector_roles.py runs it against real agents)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's own import-time deprecations are not ours to fix
    warnings.simplefilter("ignore")
    import vllm.distributed.kv_transfer.kv_connector.v1.base  # noqa: F401

from kvfabric.connector import protocol as p
from kvfabric.connector import scheduler as sched_mod
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.scheduler import SchedulerSide

pytestmark = pytest.mark.vllm  # the scheduler's metadata types come from vLLM


class Agent:
    """Answers lookups with ``promoting`` blocks due in ``eta_ms``, none in the pool yet."""

    def __init__(self, eta_ms: float) -> None:
        self.eta_ms = eta_ms
        self.hello = SimpleNamespace(session_id=1, features=list(p.FEATURES))
        self.promote_asked: list[bool] = []

    def lookup(
        self, namespaces: list[str], keys: list[bytes], bt: int, lease: Any = None, promote: bool = False
    ) -> Any:
        self.promote_asked.append(promote)
        return p.LookupReply(
            hits=0, pool_id="p", slots=[[]], leases=[], promoting=len(keys), promote_eta_ms=self.eta_ms
        )

    def release(self, ids: list[str]) -> list[bool]:
        return [True for _ in ids]

    def supports(self, feature: str) -> bool:
        return feature in self.hello.features

    def close(self) -> None:
        pass


def scheduler(agent: Agent, wait_ms: int) -> SchedulerSide:
    s = SchedulerSide(
        ConnectorConfig(socket_path="/nonexistent/agent.sock", promote_wait_ms=wait_ms), ["ns"], 16, "t"
    )
    s.client = agent  # type: ignore[assignment]
    return s


def request(req_id: str) -> SimpleNamespace:
    tokens = list(range(80))
    return SimpleNamespace(
        request_id=req_id, prompt_token_ids=tokens, all_token_ids=tokens, cache_salt=None, lora_request=None
    )


def test_blocks_due_within_the_wait_defer_the_request() -> None:
    s = scheduler(Agent(eta_ms=50), wait_ms=500)
    assert s.get_num_new_matched_tokens(request("r"), 0) == (None, False)
    assert s.stats.promote_waits == 1 and s.stats.promote_too_slow == 0


def test_blocks_due_after_the_wait_are_not_waited_for() -> None:
    agent = Agent(eta_ms=2000)  # a slow disk: recomputing is sooner
    s = scheduler(agent, wait_ms=500)
    assert s.get_num_new_matched_tokens(request("r"), 0) == (0, False)
    assert s.stats.promote_too_slow == 1 and s.stats.promote_waits == 0
    s.get_num_new_matched_tokens(request("r"), 0)
    assert agent.promote_asked == [True, False]  # not asked to promote again for this request


def test_the_wait_ends_at_promote_wait_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(sched_mod.time, "monotonic", lambda: now[0])
    s = scheduler(Agent(eta_ms=0), wait_ms=500)  # no estimate yet: wait
    assert s.get_num_new_matched_tokens(request("r"), 0) == (None, False)
    now[0] += 0.4
    assert s.get_num_new_matched_tokens(request("r"), 0) == (None, False)
    now[0] += 0.2  # past 500 ms: goes on with what the pool holds
    assert s.get_num_new_matched_tokens(request("r"), 0) == (0, False)


def test_no_wait_configured_never_defers() -> None:
    s = scheduler(Agent(eta_ms=1), wait_ms=0)
    assert s.get_num_new_matched_tokens(request("r"), 0) == (0, False)


def step(tokens: int) -> SimpleNamespace:
    """A scheduled step of ``tokens`` computed tokens and no requests of ours."""
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[])
    return SimpleNamespace(
        preempted_req_ids=set(),
        scheduled_new_reqs=[],
        scheduled_cached_reqs=cached,
        num_scheduled_tokens={"other-engine-request": tokens},  # none of ours
    )


def run_steps(s: SchedulerSide, now: list[float], steps: list[tuple[int, float]]) -> None:
    """Each (tokens, seconds): scheduled, then its output back that much later."""
    for tokens, seconds in steps:
        s.build_connector_meta(step(tokens))  # type: ignore[arg-type]
        now[0] += seconds
        s.update_connector_output(0, 0)


def test_the_prefill_rate_is_measured_from_prefill_sized_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(sched_mod.time, "monotonic", lambda: now[0])
    s = scheduler(Agent(eta_ms=0), wait_ms=500)
    run_steps(s, now, [(8, 0.5)])  # a decode step: says nothing about prefill
    assert s.prefill_tokens_per_s == 0.0
    run_steps(s, now, [(2048, 0.2)])
    assert s.prefill_tokens_per_s == pytest.approx(10240)
    run_steps(s, now, [(1024, 0.2)])  # a slower step moves the average part of the way
    assert s.prefill_tokens_per_s == pytest.approx(0.7 * 10240 + 0.3 * 5120)


@pytest.mark.parametrize(
    ("step_seconds", "waits"),
    [
        (0.05, False),  # 40k tokens/s: 80 tokens in 2 ms, far sooner than the 200 ms the link needs
        (20.0, True),  # 102 tokens/s: 80 tokens take 0.78 s, the link's 200 ms win
    ],
)
def test_promoted_blocks_are_waited_for_only_when_they_come_sooner_than_the_engine_computes_them(
    monkeypatch: pytest.MonkeyPatch, step_seconds: float, waits: bool
) -> None:
    now = [100.0]
    monkeypatch.setattr(sched_mod.time, "monotonic", lambda: now[0])
    s = scheduler(Agent(eta_ms=200), wait_ms=500)  # due within the wait: without rates, it waits
    run_steps(s, now, [(2048, step_seconds)])
    got = s.get_num_new_matched_tokens(request("r"), 0)
    assert got == ((None, False) if waits else (0, False))
    assert s.stats.promote_recompute_sooner == (0 if waits else 1)
    assert s.stats.promote_waits == (1 if waits else 0)
