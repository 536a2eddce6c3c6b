"""``KVFabricConnector``: vLLM's ``KVConnectorBase_V1``, a thin facade over one role object.

Enable with::

    --kv-transfer-config '{"kv_connector":"KVFabricConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvfabric.connector"}'

Loads start in ``start_load_kv`` before the forward pass: CPU engines copy there; GPU engines
have the agent queue the copies layer by layer and wait per layer in ``wait_for_layer_load``
(``layered_loads``), the copies ending in ``wait_for_save``. Saves start in ``wait_for_save``
after the forward, on GPU engines in the background (see ``background_saves``). Any
agent failure degrades to a miss or a skipped save, and a block that could not be loaded is
reported through ``get_block_ids_with_load_errors`` so vLLM recomputes it.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.layout import engine_route, layout_specs, unsupported_setup
from kvfabric.connector.metadata import KVFabricHandshake, KVFabricMetadata, KVFabricWorkerMeta
from kvfabric.connector.scheduler import SchedulerSide
from kvfabric.connector.stats import KVFabricPromMetrics, KVFabricStats
from kvfabric.connector.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _full_attention_only(kv_cache_config: KVCacheConfig | None) -> bool:
    """Whether vLLM frees a request's blocks only when it finishes or is preempted (one KV-cache
    group of full attention: a sliding window frees blocks of running requests, unseen by us),
    which starting loads at allocation relies on (see :mod:`kvfabric.connector.freed_blocks`)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups or len(groups) != 1:
        return False
    spec = getattr(groups[0], "kv_cache_spec", None)
    return type(spec).__name__ in ("FullAttentionSpec", "MLAAttentionSpec") and not getattr(
        spec, "sliding_window", None
    )


def _frees_are_fenced(vllm_config: VllmConfig) -> bool:
    """Whether no block vLLM hands out may still be written by a step in flight: steps do not
    overlap, or vLLM defers freeing blocks until the steps that scheduled their request ended
    (0.26 and later, for KV consumers). Without either, a freed block the connector is never
    told of (one past the computed tokens) could take a prefetch under a running step's write."""
    if vllm_config.max_concurrent_batches <= 1:
        return True
    from vllm.v1.core.sched.scheduler import Scheduler

    transfer = vllm_config.kv_transfer_config
    return bool(getattr(transfer, "is_kv_consumer", False)) and hasattr(Scheduler, "_drain_deferred_frees")


class KVFabricConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        self.config = ConnectorConfig.from_sources(transfer.kv_connector_extra_config)
        from vllm.platforms import current_platform

        why = unsupported_setup(vllm_config, kv_cache_config)
        if why is not None:
            log.error("KVFabric cannot serve this engine correctly yet: %s; serving without it", why)
            self.config = self.config.model_copy(update={"load": False, "save": False})
        specs = layout_specs(vllm_config, self.config, current_platform.device_type)
        self._on_cuda = current_platform.device_type == "cuda"
        background = self._on_cuda if self.config.background_saves is None else self.config.background_saves
        tag = uuid.uuid4().hex[:12]
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            # The scheduler reads this right after building us: cache failures must not fail
            # requests unless the user asked for that.
            transfer.kv_load_failure_policy = self.config.load_failure_policy
            self._scheduler = SchedulerSide(
                self.config,
                [s.namespace() for s in specs],
                vllm_config.cache_config.block_size,
                tag,
                background_saves=background,
                prefetch=self._on_cuda
                and _full_attention_only(kv_cache_config)
                and _frees_are_fenced(vllm_config),
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(
                self.config,
                specs[get_tensor_model_parallel_rank()],
                tag,
                background_saves=background,
                route=engine_route(vllm_config, specs),
            )
        log.info(
            "KVFabric connector ready",
            extra={"role": role.name, "socket": self.config.socket_path, "namespace": specs[0].namespace()},
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is just a future miss

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        """GPU engines: one chunk per block over all layers, one copy per block for the agent
        (not with layered loads, which need each layer on its own)."""
        c = self.config
        return self._worker is not None and self._on_cuda and c.cross_layer_blocks and not c.layered_loads

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layered loads wait per layer in Python, between graph pieces: no full CUDA graphs."""
        return ConnectorConfig.from_sources(extra_config).layered_loads

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches, self._num_blocks())

    def _num_blocks(self) -> int | None:
        """vLLM's KV block count: a KV tensor with more rows holds each block split for the
        attention kernel (``block_size`` larger than the kernel's)."""
        config = getattr(self, "_kv_cache_config", None)
        n = getattr(config, "num_blocks", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any) -> None:
        """vLLM >= 0.26 with :attr:`prefer_cross_layer_blocks`: one tensor whose dim 0 is the
        block (its stride order puts blocks outermost); the agent sees it as a single layer."""
        assert self._worker is not None
        self._worker.register_kv_caches({"all_layers": kv_cache}, self._num_blocks())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVFabricMetadata)
        self._worker.start_load_kv(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None and isinstance(kv_connector_metadata, KVFabricMetadata)
        self._worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids), None

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved after the step, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVFabricMetadata)
        self._worker.wait_for_save(meta)

    def get_kv_connector_stats(self) -> KVFabricStats | None:
        if self._worker is None:
            return None
        delta = self._worker.take_stats()
        return KVFabricStats(data=delta) if any(delta.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVFabricStats:
        return KVFabricStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVFabricPromMetrics:
        """``vllm:kvfabric_*_total`` counters on the engine's /metrics (see ``stats``)."""
        return KVFabricPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_handshake_metadata(self) -> KVFabricHandshake | None:
        """The worker's prefetch token, for the scheduler at engine start (None: none taken)."""
        token = self._worker.prefetch_token if self._worker is not None else b""
        return KVFabricHandshake(prefetch_token=token) if token else None

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """The workers' handshakes, by TP rank (scheduler side)."""
        if self._scheduler is None:
            return
        for rank, meta in metadata.items():
            if isinstance(meta, KVFabricHandshake) and meta.prefetch_token:
                self._scheduler.prefetch_into(rank, meta.prefetch_token)

    def build_connector_worker_meta(self) -> KVFabricWorkerMeta | None:
        return self._worker.build_connector_worker_meta() if self._worker is not None else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors() if self._worker is not None else set()

    # -- scheduler side -------------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        super().update_connector_output(connector_output)
        stats = getattr(connector_output, "kv_connector_stats", None)
        data = stats.data if isinstance(stats, KVFabricStats) else {}
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(worker_meta, KVFabricWorkerMeta):
            worker_meta = KVFabricWorkerMeta()
        self._scheduler.update_connector_output(
            data.get("loaded_blocks", 0),
            data.get("load_errors", 0),
            getattr(connector_output, "invalid_block_ids", None) or (),
            worker_meta.staged,
            worker_meta.prefetch_targets,
            worker_meta.step,
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def shutdown(self) -> None:
        for side in (self._scheduler, self._worker):
            if side is not None:
                side.shutdown()
