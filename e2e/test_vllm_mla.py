"""An MLA model (a tiny DeepSeek-V2) on vLLM's CPU MLA backend: its latent KV cache
(``[blocks, 1, block_size, 576]`` per layer on the CPU) is saved and loaded, with TP=1 and TP=2
(one copy per TP group: every rank loads what rank 0 saved; see ``LayoutSpec.stored``).

That backend runs bf16 only, where a prefix hit (vLLM's own too) computes the rest of the prompt
with other matrix shapes than a cold run and may diverge after a few tokens. So the references
are vLLM's own, without the connector: its cold outputs, and its outputs with its own prefix cache
holding the same blocks; ours must equal them token for token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from e2e import tiny_model
from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from e2e.test_vllm import fast_retry, poison_pool

#: vLLM's CPU MLA backend with AMX keeps the engine's blocks and its own prefix cache; without
#: AMX (the reference backend) vLLM forces 16-token blocks and turns its prefix cache off.
AMX = torch.cpu._is_amx_tile_supported()
MLA_BLOCK = BLOCK if AMX else 16


def usable_tokens(name: str) -> int:
    """Tokens a hit can cover: whole blocks, short of the last prompt token vLLM computes."""
    return (len(PROMPTS[name]) - 1) // MLA_BLOCK * MLA_BLOCK


pytestmark = pytest.mark.vllm

NAMES = ["P", "Q"]
#: vLLM's CPU workers bind one core each for TP=2 (the machine has no second NUMA node).
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build_mla(tmp_path_factory.mktemp("mla"))


def engine(
    model: Path, tmp: Path, name: str, cfg: dict[str, Any] | None, tp: int, prefix_caching: bool = False
) -> EngineProcess:
    llm = {"dtype": "bfloat16", "tensor_parallel_size": tp}
    env = TP2_ENV if tp > 1 else None
    return EngineProcess(model, tmp, cfg, log_name=name, llm_args=llm, env=env, prefix_caching=prefix_caching)


@pytest.mark.parametrize("tp", [1, 2])
def test_an_mla_cache_is_saved_and_loaded_and_warm_equals_cold(
    mla_model: Path, tmp_path: Path, tp: int
) -> None:
    prompts = [PROMPTS[n] for n in NAMES]
    with engine(mla_model, tmp_path, "mla-baseline", None, tp, prefix_caching=True) as e:
        baseline = [o.tokens for o in e.generate(prompts, MAX_TOKENS)]
        own_hits = [e.generate([p], MAX_TOKENS)[0] for p in prompts]  # vLLM's own prefix cache
    # without its own cache (no AMX) the warm reference is the cold run again
    assert [o.cached_tokens for o in own_hits] == [usable_tokens(n) if AMX else 0 for n in NAMES]
    baseline_warm = [o.tokens for o in own_hits]
    with AgentProcess(tmp_path / "agent", "1GiB") as agent:
        cfg = fast_retry(agent)
        with engine(mla_model, tmp_path, "mla-cold", cfg, tp) as e:
            cold = e.generate(prompts, MAX_TOKENS)
        stats = agent.stats()
        full = sum(len(p) // MLA_BLOCK for p in prompts)
        # one copy of the latent KV per TP group (rank 0 saves it, the scheduler commits it)
        assert full <= stats["committed_blocks"] < 2 * full
        assert stats["namespaces"] == 1
        with engine(mla_model, tmp_path, "mla-warm", cfg, tp) as e:
            warm = e.generate(prompts, MAX_TOKENS)
        assert [o.tokens for o in cold] == baseline
        assert [o.cached_tokens for o in warm] == [usable_tokens(n) for n in NAMES]
        assert [o.tokens for o in warm] == baseline_warm  # the same blocks, from the agent
        if tp == 1:  # control: the hits carry the KV that decides the output
            poison_pool(agent)
            with engine(mla_model, tmp_path, "mla-poisoned", cfg, tp) as e:
                poisoned = e.generate(prompts, MAX_TOKENS)
            assert [o.cached_tokens for o in poisoned] == [o.cached_tokens for o in warm]
            assert [o.tokens for o in poisoned] != baseline_warm
