"""Derives the key namespace of each TP rank from vLLM's config (same on both connector roles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.identity import model_identity
from kvfabric.connector.keys import MLA_SUFFIX, LayoutSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: Physical KV layout per device type, as the worker checks it against the real tensors.
#: CPU: per layer ``[num_blocks, kv_heads, block_size, 2 * head_size]`` (K rows then V rows).
CPU_LAYOUT = "cpu:[blocks,kv_heads,block_size,2*head_size]"


#: CPU, MLA models: per layer ``[num_blocks, 1, block_size, kv_lora_rank + rope_dim]``.
CPU_MLA_LAYOUT = "cpu:[blocks,1,block_size,latent]"
#: CUDA: the agent copies blocks itself; a slot holds each layer's planes in the engine's byte
#: order. The agent refuses a second engine whose tensor layout differs within one namespace.
CUDA_LAYOUT = "cuda:agent-copy"


@dataclass(frozen=True)
class Route:
    """What the agent needs to answer routers for an engine's namespaces: the served model
    name, the namespace of TP rank 0 (the ranks' namespaces form one group), tokens per block."""

    model: str
    group: str
    block_tokens: int


def engine_route(vllm_config: VllmConfig, specs: list[LayoutSpec]) -> Route:
    model = vllm_config.model_config
    name = getattr(model, "served_model_name", None) or model.model
    if isinstance(name, list | tuple):
        name = name[0]
    return Route(str(name)[:256], specs[0].namespace(), vllm_config.cache_config.block_size)


def device_layout(device_type: str, mla: bool = False) -> str:
    if device_type == "cpu":
        return CPU_MLA_LAYOUT + MLA_SUFFIX if mla else CPU_LAYOUT
    if device_type == "cuda":
        return CUDA_LAYOUT + (MLA_SUFFIX if mla else "")
    return f"{device_type}:unsupported"


def layout_specs(vllm_config: VllmConfig, config: ConnectorConfig, device_type: str) -> list[LayoutSpec]:
    """One :class:`LayoutSpec` per TP rank, in rank order.

    MLA models hold the same latent KV on every TP rank: the pool keeps one copy per TP group
    (:meth:`LayoutSpec.stored`), which rank 0 saves and every rank loads under its own lease.
    With TP every rank's saves are committed by the scheduler once it heard from all ranks
    (:class:`~kvfabric.connector.metadata.StagedSave`): a load that failed on one rank spoils
    what every rank computed on top of it (the all-reduce carries the bad attention output)."""
    model = vllm_config.model_config
    mla = bool(getattr(model, "use_mla", False))
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    tp = parallel.tensor_parallel_size
    model_id = model_identity(vllm_config, config.model_id)  # content, not the path
    return [
        LayoutSpec(
            model=model_id,
            dtype=str(model.dtype),
            kv_cache_dtype=str(cache.cache_dtype),
            num_layers=model.get_num_layers(parallel),
            num_kv_heads=model.get_num_kv_heads(parallel),
            head_size=model.get_head_size(),
            block_size=cache.block_size,
            tp_size=tp,
            tp_rank=rank,
            layout=device_layout(device_type, mla),
            tenant=config.tenant,
        )
        for rank in range(tp)
    ]


def unsupported_setup(vllm_config: VllmConfig, kv_cache_config: object | None) -> str | None:
    """Why this engine's setup cannot be served correctly yet, or None. The engine then serves
    without the connector (one log line), instead of loading blocks that may not fit."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        return "pipeline parallelism (stages would share one namespace per TP rank)"
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            return f"context parallelism ({name}={getattr(parallel, name)}: KV blocks are split across ranks)"
    groups = getattr(kv_cache_config, "kv_cache_groups", None) if kv_cache_config is not None else None
    if groups is not None and len(groups) > 1:
        return f"{len(groups)} KV-cache groups (hybrid or sliding-window models): one group is supported"
    return None
