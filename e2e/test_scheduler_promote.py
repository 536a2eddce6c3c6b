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
