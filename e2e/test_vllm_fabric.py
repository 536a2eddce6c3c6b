"""Real vLLM CPU engines on two "nodes" (agents in network namespaces of their own, one Valkey):
a prompt served on node A is a hit on node B, pulled from A's agent over the network; outputs
equal those without the connector; and node A's agent gone, B recomputes with the same output."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from e2e.netns import Fabric, require_netns
from e2e.test_vllm import fast_retry, usable_blocks
from e2e.valkey import ValkeyProcess
from tests.integration.test_fabric import VALKEY_PORT, fabric_agent

pytestmark = [pytest.mark.vllm, pytest.mark.multihost]


def test_a_prompt_served_on_node_a_is_a_hit_on_node_b_and_a_dead_peer_costs_only_the_hit(
    model_dir: Path, tmp_path: Path, baseline: dict[str, list[int]]
) -> None:
    require_netns()
    with (
        Fabric(2) as fabric,
        ValkeyProcess(tmp_path / "valkey", "0.0.0.0", VALKEY_PORT, fabric.prefix(fabric.hub)),
        fabric_agent(fabric, 0, tmp_path, pool_size="1GiB") as a,
        fabric_agent(fabric, 1, tmp_path, pool_size="1GiB") as b,
    ):
        with EngineProcess(model_dir, tmp_path, fast_retry(a), log_name="node-a") as ea:
            cold_a = ea.generate([PROMPTS["P"], PROMPTS["Q"]], MAX_TOKENS)
        assert [o.tokens for o in cold_a] == [baseline["P"], baseline["Q"]]
        assert all(o.cached_tokens == 0 for o in cold_a)
        with EngineProcess(model_dir, tmp_path, fast_retry(b), log_name="node-b") as eb:
            (warm_b,) = eb.generate([PROMPTS["P"]], MAX_TOKENS)
            pulled = b.stats()["remote_pulled_blocks"]
            assert warm_b.cached_tokens == usable_blocks("P") * BLOCK  # every block, from A over the link
            assert warm_b.tokens == baseline["P"]
            assert pulled == usable_blocks("P") and a.stats()["remote_served_blocks"] == pulled
            # A's agent gone: B's lookups of Q find it in the index, the pull fails, B recomputes
            a.kill()
            (cold_b,) = eb.generate([PROMPTS["Q"]], MAX_TOKENS)
            assert cold_b.cached_tokens == 0 and cold_b.tokens == baseline["Q"]
            assert b.stats()["remote_pull_failures"] >= 1
        # B holds P itself now: another engine on B hits without any pull
        with EngineProcess(model_dir, tmp_path, fast_retry(b), log_name="node-b2") as eb2:
            (again,) = eb2.generate([PROMPTS["P"]], MAX_TOKENS)
        assert again.cached_tokens == usable_blocks("P") * BLOCK and again.tokens == baseline["P"]
        assert b.stats()["remote_pulled_blocks"] == pulled
