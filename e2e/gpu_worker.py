"""A connector worker (``WorkerSide``) on a GPU against a real ``kvfabric-agent --cuda``, for
the GPU tests that drive it without an engine: ``LAYERS`` bf16 layers of vLLM's per-layer
shape (``[NB, 8, 16, 256]``: K and V of 8 heads of 128 per 16-token block). Import it only
after :func:`e2e.gpu_host.require_gpu` (it imports torch and vLLM's metadata types)."""

from __future__ import annotations

from pathlib import Path

import torch

from e2e.agent import AgentProcess, wait_until
from kvfabric.connector import protocol as p
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.keys import LayoutSpec
from kvfabric.connector.worker import WorkerSide

LAYERS, NB = 6, 512  # layers, blocks per layer tensor


def layout(model: str, layers: int = LAYERS) -> LayoutSpec:
    return LayoutSpec(
        model=model,
        dtype="bfloat16",
        kv_cache_dtype="auto",
        num_layers=layers,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
        tp_size=1,
        tp_rank=0,
        layout="cuda",
    )


def cuda_agent(workdir: Path, pool: str = "1GiB") -> AgentProcess:
    """An agent serving GPU engines, not yet started (use it as a context manager)."""
    return AgentProcess(workdir, pool, extra_args=["--cuda", "--pin-threads", "8"])


def registered_worker(
    agent: AgentProcess,
    spec: LayoutSpec,
    blocks: int = NB,
    engine_saves: bool = True,  # the option under test here (off by default in the product)
    background_saves: bool = False,
) -> tuple[WorkerSide, list[torch.Tensor]]:
    """A worker with random KV of ``blocks`` blocks per layer registered, layered loads on; with
    ``engine_saves``, once the pool is registered here, so that it copies every save itself."""
    cfg = ConnectorConfig(socket_path=str(agent.socket_path), timeout_ms=30_000, engine_saves=engine_saves)
    w = WorkerSide(cfg, spec, "t", background_saves=background_saves)
    kv = [
        torch.randn(blocks, 8, 16, 256, device="cuda", dtype=torch.bfloat16) for _ in range(spec.num_layers)
    ]
    w.register_kv_caches({f"model.layers.{i}.attn": t for i, t in enumerate(kv)})
    assert w.cuda is not None and len(w.cuda.events) == spec.num_layers * p.EVENT_SETS
    assert w._layered_ok, "the agent could not open the layer events"
    if engine_saves:
        saves = w._engine_saves
        assert saves is not None, "the worker did not map the pool for its own saves"
        wait_until("the pool registered in the engine", lambda: saves.fully_registered, 120)
    return w, kv
