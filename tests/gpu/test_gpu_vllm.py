"""Real vLLM (0.26, CUDA) with a ``kvfabric-agent --cuda``: the agent copies blocks over CUDA IPC.

A seeded random checkpoint (``e2e.tiny_model``), bf16, greedy. A warm engine's first token must
equal the cold run's, and a control shows the check can fail: after the pool is overwritten
with noise the warm outputs change. Each engine is its own process; the pool is the agent's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu(vllm=True)


from e2e import tiny_model  # noqa: E402
from e2e.agent import AgentProcess  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

BLOCK = 16  # vLLM's default block size on CUDA
LLM_ARGS = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 4096}
PROMPTS = [[random.Random(s).randrange(3, 4096) for _ in range(1000 + 37 * s)] for s in range(4)]
MAX_TOKENS = 8


def poison_pool(agent: AgentProcess) -> None:
    with open(agent.pool_path, "r+b") as f:
        for offset in range(0, agent.stats()["pool_used_bytes"] + (64 << 20), 1 << 20):
            f.seek(offset)
            f.write(random.randbytes(1 << 20))


def engine(
    model: Path,
    tmp: Path,
    name: str,
    cfg: dict[str, Any] | None,
    env: dict[str, str],
    llm: dict[str, Any] | None = None,
) -> EngineProcess:
    args = {**LLM_ARGS, **(llm or {})}
    return EngineProcess(model, tmp, cfg, log_name=name, kv_cache_bytes=1 << 30, llm_args=args, env=env)


#: (VLLM_USE_V2_MODEL_RUNNER, KV tensors the agent sees, connector settings, vLLM settings).
#: vLLM 0.26 runs dense models on its V2 model runner, which registers per-layer KV tensors:
#: the default layered loads, with CUDA graphs (vLLM turns them piecewise for the connector).
#: Its V1 runner honours the wish for cross-layer blocks (one tensor for all layers).
RUNNERS: dict[str, tuple[str, int, dict[str, Any], dict[str, Any]]] = {
    "v2-layered": ("1", 4, {}, {"enforce_eager": False}),
    "v1-cross-layer": ("0", 1, {"layered_loads": False}, {}),
}


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_warm_first_token_equals_cold_and_poisoned_pool_changes_it(tmp_path: Path, runner: str) -> None:
    flag, layers, settings, llm = RUNNERS[runner]
    env = {"VLLM_USE_V2_MODEL_RUNNER": flag}
    model = tiny_model.build(tmp_path / "model")
    with engine(model, tmp_path, "baseline", None, env, llm) as e:
        cold = e.generate(PROMPTS, MAX_TOKENS)
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=["--cuda"]) as agent:
        cfg = {"socket_path": str(agent.socket_path), "timeout_ms": 10_000, **settings}
        with engine(model, tmp_path, "engine1", cfg, env, llm) as e1:
            first = e1.generate(PROMPTS, MAX_TOKENS)
        # The agent logs each registration; the runner decides how many tensors it sees. Layered
        # loads register two sets of layer events (loads started at allocation: prefetches).
        layered = settings.get("layered_loads", True)
        events = layers * 2 if layered else 0
        assert f"layers={layers} " in agent.log_tail(100_000), agent.log_tail()
        assert f"layer_events={events} " in agent.log_tail(100_000), agent.log_tail()
        # Shutdown waits for the background saves: every full block of prompt and answer
        # (save_generated) whose KV was computed (all but the last sampled token's).
        assert agent.stats()["committed_blocks"] == sum((len(p) + MAX_TOKENS - 1) // BLOCK for p in PROMPTS)
        assert [o.tokens[0] for o in first] == [o.tokens[0] for o in cold]

        with engine(model, tmp_path, "engine2", cfg, env, llm) as e2:
            warm = e2.generate(PROMPTS, MAX_TOKENS)
        loaded = agent.stats()["loaded_blocks"]
        assert loaded == sum((len(p) - 1) // BLOCK for p in PROMPTS), engine_log(e2)
        # Layered: the scheduler started every load when vLLM allocated the blocks (the workers
        # named their registration in vLLM's handshake; a fresh engine's blocks were never freed).
        prefetched = agent.metric('kvfabric_gpu_prefetched_blocks_total{result="queued"}')
        assert prefetched == (loaded if layered else 0), (prefetched, loaded)
        assert "did not wait" not in e2.log_path.read_text(errors="replace"), engine_log(e2)
        assert [o.tokens[0] for o in warm] == [o.tokens[0] for o in cold]
        pairs = [
            (a, b) for o, c in zip(warm, cold, strict=True) for a, b in zip(o.tokens, c.tokens, strict=True)
        ]
        same = sum(a == b for a, b in pairs)
        print(f"warm == cold: {same} of {MAX_TOKENS * len(PROMPTS)} tokens (bf16)")

        poison_pool(agent)
        with engine(model, tmp_path, "engine3", cfg, env, llm) as e3:
            poisoned = e3.generate(PROMPTS, MAX_TOKENS)
        assert agent.stats()["loaded_blocks"] > loaded
        assert [o.tokens for o in poisoned] != [o.tokens for o in cold]


def engine_log(e: EngineProcess) -> str:
    return e.log_path.read_text(errors="replace")[-3000:]
