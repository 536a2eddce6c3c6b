"""Real vLLM (0.26, CUDA) serving an MLA model (a tiny DeepSeek-V2, bf16) with a
``kvfabric-agent --cuda``: the latent KV (``[blocks, block_size, 576]`` per layer) goes through the
agent's CUDA IPC copies. bf16 prefix hits may diverge from a cold run after a few tokens (vLLM's
own too), so the reference for warm outputs is vLLM's own prefix cache holding the same blocks;
the first token must equal cold's, and a poisoned pool must change the output."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from e2e.gpu_host import require_gpu

pytestmark = pytest.mark.gpu

require_gpu(vllm=True)

from e2e import tiny_model  # noqa: E402
from e2e.agent import AgentProcess  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402
from tests.gpu.test_gpu_vllm import poison_pool  # noqa: E402

BLOCK = 16
TOKENS = 32
PROMPTS = [[random.Random(s).randrange(3, 4096) for _ in range(700 + 41 * s)] for s in range(3)]
LLM = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 4096}


def engine(
    model: Path, tmp: Path, name: str, cfg: dict[str, object] | None, prefix: bool = False
) -> EngineProcess:
    return EngineProcess(
        model, tmp, cfg, log_name=name, kv_cache_bytes=1 << 30, llm_args=LLM, prefix_caching=prefix
    )


def test_mla_warm_equals_vllms_own_prefix_hits_and_a_poisoned_pool_changes_it(tmp_path: Path) -> None:
    # KVFABRIC_MLA_MODEL_DIR: a checkpoint built elsewhere by tiny_model.build_mla(deepseek_dims=True)
    # (a GPU host whose transformers lacks DeepseekV2Config)
    model_dir = Path(os.environ.get("KVFABRIC_MLA_MODEL_DIR", tmp_path / "mla"))
    model = tiny_model.build_mla(model_dir, deepseek_dims=True)
    with engine(model, tmp_path, "mla-baseline", None, prefix=True) as e:
        cold = e.generate(PROMPTS, TOKENS)
        own = [e.generate([p], TOKENS)[0] for p in PROMPTS]
    assert [o.cached_tokens for o in own] == [(len(p) - 1) // BLOCK * BLOCK for p in PROMPTS]
    with AgentProcess(tmp_path / "agent", "2GiB", extra_args=["--cuda"]) as agent:
        cfg = {"socket_path": str(agent.socket_path), "timeout_ms": 10_000}
        with engine(model, tmp_path, "mla-1", cfg) as e1:
            first = e1.generate(PROMPTS, TOKENS)
        assert [o.tokens for o in first] == [o.tokens for o in cold]
        assert agent.stats()["committed_blocks"] > 0
        with engine(model, tmp_path, "mla-2", cfg) as e2:
            warm = e2.generate(PROMPTS, TOKENS)
        assert [o.cached_tokens for o in warm] == [o.cached_tokens for o in own]
        assert [o.tokens[0] for o in warm] == [o.tokens[0] for o in cold]
        same = sum(
            a == b for w, c in zip(warm, own, strict=True) for a, b in zip(w.tokens, c.tokens, strict=True)
        )
        print(f"MLA warm == vLLM's own prefix hits: {same} of {TOKENS * len(PROMPTS)} tokens")
        assert [o.tokens for o in warm] == [o.tokens for o in own]
        poison_pool(agent)
        with engine(model, tmp_path, "mla-3", cfg) as e3:
            poisoned = e3.generate(PROMPTS, TOKENS)
        assert [o.tokens for o in poisoned] != [o.tokens for o in own]
