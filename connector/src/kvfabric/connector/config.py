"""The connector's settings, parsed once from ``kv_connector_extra_config`` and ``KVFABRIC_*``.

Precedence: ``kv_connector_extra_config`` > environment > default. Unknown keys in the extra
config are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvfabric.connector.errors import ConfigError

ENV_PREFIX = "KVFABRIC_"


class ConnectorConfig(BaseModel):
    """Settings of the vLLM connector. Every field: unit, default and reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket_path: str = Field(
        default="/run/kvfabric/agent.sock",
        min_length=1,
        description="The node agent's Unix socket (the agent's --socket).",
    )
    timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60_000,
        description="Deadline of one agent call; past it the engine recomputes and the breaker opens.",
    )
    backoff_initial_ms: int = Field(
        default=200, ge=1, description="First wait before reconnecting to a failed agent."
    )
    backoff_max_ms: int = Field(default=5000, ge=1, description="Longest wait between reconnect attempts.")
    promote_wait_ms: int = Field(
        default=500,
        ge=0,
        le=60_000,
        description="How long a request waits, at most, for blocks the agent reads from its NVMe "
        "tier into the pool (vLLM schedules other requests meanwhile); past it the request goes on "
        "with the hits already in the pool and computes the rest. It does not wait at all when the "
        "agent expects the blocks later than that, nor when this engine, at its measured prefill "
        "rate, computes them sooner than they would arrive (a disk or link slower than "
        "recomputing). 0: never wait.",
    )
    handoff_wait_ms: int = Field(
        default=3000,
        ge=0,
        le=600_000,
        description="P/D decode engines: how long a request waits, at most, for the blocks the "
        "prefill engine promised in its kv_transfer_params (its save commits, this node's agent "
        "pulls them from the prefill node); past it the request computes what did not arrive. "
        "0: never wait.",
    )
    load: bool = Field(default=True, description="Load hits from the pool.")
    save: bool = Field(default=True, description="Save newly computed full blocks to the pool.")
    save_generated: bool = Field(
        default=True,
        description="Also save blocks filled by generated tokens, so the next turn of a conversation "
        "(whose prompt repeats the answer) finds them.",
    )
    background_saves: bool | None = Field(
        default=None,
        description="Copy saves after the step on a background thread, vLLM keeping the request's "
        "blocks until they are done, so a cold request does not wait for its own save. Default: on "
        "for GPU engines (the agent copies over PCIe while the engine goes on), off for CPU engines "
        "(the copy would take the cores the forward pass needs).",
    )
    layered_loads: bool = Field(
        default=True,
        description="GPU engines: a load's copies overlap the forward pass layer by layer (the "
        "agent records a shared CUDA event after each layer's copies; the engine's stream waits "
        "on it just before that layer's attention). vLLM then captures CUDA graphs piecewise "
        "only (no full decode graphs): a layer-by-layer wait cannot live inside a graph.",
    )
    prefetch_loads: bool = Field(
        default=True,
        description="GPU engines with layered_loads: the scheduler has the agent start a step's "
        "loads as soon as vLLM allocated their blocks, so the copies run while vLLM prepares the "
        "step. Only into blocks no GPU work of the engine may still touch (a block a finished or "
        "preempted request freed waits until the steps that used it have ended: those loads are "
        "started by the worker, after the engine's stream).",
    )
    engine_saves: bool = Field(
        default=False,
        description="GPU engines: copy saves from the engine's own CUDA context into the pool, which "
        "the engine maps and registers with CUDA piece by piece in the background after start "
        "(the pages are the agent's: no new memory; 128 MiB of GPU memory for blocks not in runs), "
        "instead of having the agent copy them from its context. Off by default: on an H200 it "
        "costs a cold request as much as the agent's kernel-gathered saves (1.037x of no connector "
        "against 1.034x; the agent's copy-engine-only saves: 1.015-1.021x, benchmarks/RESULTS.md). "
        "Until a piece is registered, and always under isolated tenancy "
        "(the engine may not map the shared pool), the agent copies.",
    )
    cross_layer_blocks: bool = Field(
        default=True,
        description="GPU engines without layered_loads: ask vLLM for KV blocks that hold every "
        "layer in one chunk (2 MiB for an 8B model), so the agent moves a block in one copy "
        "instead of one per layer. vLLM 0.26 honours it in its V1 model runner only; elsewhere, or "
        "where the model or attention backend cannot, it registers per-layer tensors, which work "
        "as well.",
    )
    model_id: str | None = Field(
        default=None,
        description="Model identity in block keys, instead of a fingerprint of the checkpoint's "
        "weight files (sizes, headers, sampled bytes) read at start. Set it for a model whose "
        "files are not local (streamed by a loader), and change it whenever the weights change; "
        "the effective model config is part of the identity either way.",
    )
    tenant: str = Field(
        default="",
        max_length=256,
        description="Tenant in block keys: engines of different tenants never share blocks.",
    )
    load_failure_policy: Literal["recompute", "fail"] = Field(
        default="recompute",
        description="What vLLM does with a block the connector failed to load. 'recompute' keeps "
        "serving through cache failures; vLLM's own default is 'fail'.",
    )

    @classmethod
    def from_sources(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update(extra or {})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(x) for x in err["loc"]) or "config"
                problems.append(
                    f"kv_connector_extra_config.{key} (or {ENV_PREFIX}{key.upper()}): {err['msg']}"
                )
            raise ConfigError("invalid KVFabric connector settings: " + "; ".join(problems)) from None
