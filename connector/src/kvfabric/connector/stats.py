"""The worker's counters in vLLM's own metrics: ``vllm:kvfabric_*_total`` on the engine's /metrics.

After each step a worker reports what changed since its last report
(``get_kv_connector_stats``); vLLM adds up the reports of all workers and hands them to
:class:`KVFabricPromMetrics`, which counts them per engine (vLLM's stats logger may also log
them). The agent's own /metrics covers the pool; these say what one engine got from it.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: ``WorkerStats`` field -> help text of its ``vllm:kvfabric_<field>_total`` counter.
COUNTERS = {
    "loaded_blocks": "KV blocks this engine loaded from the KVFabric pool.",
    "load_errors": "KV blocks whose load from the KVFabric pool failed (vLLM recomputed them).",
    "saved_blocks": "KV blocks this engine saved to the KVFabric pool.",
    "save_skipped_blocks": "KV blocks not saved: already in the pool, or no room was granted.",
    "save_failures": "Saves that failed (agent unreachable or refused): those blocks are future misses.",
    "engine_copied_blocks": "KV blocks written for saves by this engine's own copies (GPU, engine_saves); "
    "the agent copied the rest.",
}


class KVFabricStats(KVConnectorStats):
    """Counter increments (``COUNTERS`` keys); reports add up."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: value for name, value in self.data.items() if value}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVFabricPromMetrics(KVConnectorPromMetrics):
    """One counter per ``COUNTERS`` entry, labelled like vLLM's own metrics (per engine)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counters = {
            name: self._counter_cls(name=f"vllm:kvfabric_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items()
        }
        self._per_engine = {
            engine: {name: c.labels(*values) for name, c in counters.items()}
            for engine, values in per_engine_labelvalues.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        counters = self._per_engine[engine_idx]
        for name, value in transfer_stats_data.items():
            if name in counters and value > 0:
                counters[name].inc(value)
