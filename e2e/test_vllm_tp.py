"""Tensor parallelism on real vLLM CPU engines (TP=2, float32, greedy): each rank saves its own
shard through the scheduler's delegated commits, a restarted engine loads every rank's shard, and
the output equals the same TP=2 engine without the connector (control: a poisoned pool differs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from e2e.test_vllm import fast_retry, full_blocks, poison_pool, usable_blocks
from e2e.test_vllm_mla import TP2_ENV

pytestmark = pytest.mark.vllm

NAMES = ["P", "Q"]


def engine(model: Path, tmp: Path, name: str, agent: AgentProcess | None) -> EngineProcess:
    cfg = fast_retry(agent) if agent is not None else None
    return EngineProcess(model, tmp, cfg, log_name=name, llm_args={"tensor_parallel_size": 2}, env=TP2_ENV)


def test_tp2_every_rank_saves_and_loads_its_shard_and_warm_equals_cold(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = [PROMPTS[n] for n in NAMES]
    with engine(model_dir, tmp_path, "tp2-baseline", None) as e:
        baseline = [o.tokens for o in e.generate(prompts, MAX_TOKENS)]
    with AgentProcess(tmp_path / "agent", "1GiB") as agent:
        with engine(model_dir, tmp_path, "tp2-cold", agent) as e:
            cold = e.generate(prompts, MAX_TOKENS)
        stats = agent.stats()
        full = sum(full_blocks(n) for n in NAMES)
        assert stats["namespaces"] == 2  # one per rank: each holds its own heads
        # under TP only the scheduler commits (the workers stage): these counts are its commits
        assert 2 * full <= stats["committed_blocks"] <= 2 * (full + 2 * len(NAMES))  # + generated blocks
        with engine(model_dir, tmp_path, "tp2-warm", agent) as e:
            warm = e.generate(prompts, MAX_TOKENS)
        assert [o.tokens for o in cold] == baseline
        assert [o.cached_tokens for o in warm] == [usable_blocks(n) * BLOCK for n in NAMES]
        assert [o.tokens for o in warm] == baseline
        poison_pool(agent)  # control: the hits carry the KV that decides the output
        with engine(model_dir, tmp_path, "tp2-poisoned", agent) as e:
            poisoned = e.generate(prompts, MAX_TOKENS)
        assert [o.cached_tokens for o in poisoned] == [o.cached_tokens for o in warm]
        assert [o.tokens for o in poisoned] != baseline
