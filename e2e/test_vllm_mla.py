"""An MLA model (a tiny DeepSeek-V2) on vLLM's CPU MLA backends: its latent KV cache
(``[blocks, 1, block_size, 576]`` per layer on the CPU) is saved and loaded, with TP=1 and TP=2
(one copy per TP group: every rank loads what rank 0 saved; see ``LayoutSpec.stored``).

vLLM has two CPU MLA backends, and each needs its own reference:

* ``AMX_MLA`` (CPUs with AMX) runs bf16 only, where a prefix hit (vLLM's own too) computes the
  rest of the prompt with other matrix shapes than a cold run and may diverge after a few
  tokens. It keeps vLLM's own prefix cache, so the warm reference is vLLM's own outputs with its
  own prefix cache holding the same blocks.
* ``CPU_MLA`` (the reference backend, the only one without AMX; forced here on any CPU) makes vLLM
  turn its own prefix cache off and use 16-token blocks, so there is no vLLM hit to compare with.
  It runs float32, where a hit computes what a cold run does (as the Llama tests rely on): the
  warm reference is the cold run. (In bf16 a CPU without AMX saw warm and cold part after 3
  tokens at TP=2: rounding, not wrong KV; hence float32 there.)

Ours must equal the reference token for token."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from e2e import tiny_model
from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from e2e.test_vllm import fast_retry, poison_pool

AMX = torch.cpu._is_amx_tile_supported()


@dataclass(frozen=True)
class Backend:
    name: str
    dtype: str
    block: int  # vLLM forces 16-token blocks on CPU_MLA
    own_prefix_cache: bool  # vLLM turns its prefix cache off on CPU_MLA


CPU_MLA = Backend("CPU_MLA", "float32", 16, own_prefix_cache=False)
AMX_MLA = Backend("AMX_MLA", "bfloat16", BLOCK, own_prefix_cache=True)
BACKENDS = [
    pytest.param(CPU_MLA, id="cpu_mla"),
    pytest.param(
        AMX_MLA, id="amx_mla", marks=pytest.mark.skipif(not AMX, reason="AMX_MLA needs a CPU with AMX")
    ),
]


def usable_tokens(name: str, backend: Backend) -> int:
    """Tokens a hit can cover: whole blocks, short of the last prompt token vLLM computes."""
    return (len(PROMPTS[name]) - 1) // backend.block * backend.block


pytestmark = pytest.mark.vllm

NAMES = ["P", "Q"]
#: vLLM's CPU workers bind one core each for TP=2 (the machine has no second NUMA node).
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build_mla(tmp_path_factory.mktemp("mla"))


def engine(
    model: Path,
    tmp: Path,
    name: str,
    cfg: dict[str, Any] | None,
    tp: int,
    backend: Backend,
    prefix_caching: bool = False,
) -> EngineProcess:
    llm = {"dtype": backend.dtype, "tensor_parallel_size": tp, "attention_backend": backend.name}
    env = TP2_ENV if tp > 1 else None
    return EngineProcess(model, tmp, cfg, log_name=name, llm_args=llm, env=env, prefix_caching=prefix_caching)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tp", [1, 2])
def test_an_mla_cache_is_saved_and_loaded_and_warm_equals_cold(
    mla_model: Path, tmp_path: Path, tp: int, backend: Backend
) -> None:
    prompts = [PROMPTS[n] for n in NAMES]
    start = functools.partial(engine, mla_model, tmp_path, tp=tp, backend=backend)
    with start("mla-baseline", None, prefix_caching=True) as e:
        baseline = [o.tokens for o in e.generate(prompts, MAX_TOKENS)]
        own_hits = [e.generate([p], MAX_TOKENS)[0] for p in prompts]  # vLLM's own prefix cache
    # without its own prefix cache (CPU_MLA) the warm reference is the cold run again
    own_cached = [usable_tokens(n, backend) if backend.own_prefix_cache else 0 for n in NAMES]
    assert [o.cached_tokens for o in own_hits] == own_cached
    baseline_warm = [o.tokens for o in own_hits]
    with AgentProcess(tmp_path / "agent", "1GiB") as agent:
        cfg = fast_retry(agent)
        with start("mla-cold", cfg) as e:
            cold = e.generate(prompts, MAX_TOKENS)
        stats = agent.stats()
        full = sum(len(p) // backend.block for p in prompts)
        # one copy of the latent KV per TP group (rank 0 saves it, the scheduler commits it)
        assert full <= stats["committed_blocks"] < 2 * full
        assert stats["namespaces"] == 1
        with start("mla-warm", cfg) as e:
            warm = e.generate(prompts, MAX_TOKENS)
        assert [o.tokens for o in cold] == baseline
        assert [o.cached_tokens for o in warm] == [usable_tokens(n, backend) for n in NAMES]
        assert [o.tokens for o in warm] == baseline_warm  # the same blocks, from the agent
        if tp == 1:  # control: the hits carry the KV that decides the output
            poison_pool(agent)
            with start("mla-poisoned", cfg) as e:
                poisoned = e.generate(prompts, MAX_TOKENS)
            assert [o.cached_tokens for o in poisoned] == [o.cached_tokens for o in warm]
            assert [o.tokens for o in poisoned] != baseline_warm
