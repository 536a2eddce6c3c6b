"""Prometheus metrics of the agent (all prefixed ``kvfabric_``; catalogue in docs/metrics.md).

Counts the index already keeps are read at scrape time by a collector rather than duplicated;
latencies are real histograms observed on the request path. Each agent has its own registry so
several agents can live in one test process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvfabric.connector.protocol import (
    E_BAD_FRAME,
    E_BAD_REQUEST,
    E_GPU,
    E_INTERNAL,
    E_NAMESPACE,
    E_NO_SESSION,
    E_VERSION,
    OPS,
)

if TYPE_CHECKING:
    from kvfabric.agent.index import BlockIndex
    from kvfabric.agent.tiering import TierService

ERROR_KINDS = (
    E_BAD_FRAME,
    E_BAD_REQUEST,
    E_GPU,
    E_NO_SESSION,
    E_VERSION,
    E_NAMESPACE,
    E_INTERNAL,
    "truncated_frame",
    "connection",
)
_RPC_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0)
_COPY_BUCKETS = (100e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 5.0)


class _IndexCollector(Collector):
    def __init__(self, index: BlockIndex, sessions: Callable[[], int]) -> None:
        self._index = index
        self._sessions = sessions
        self.tiers: TierService | None = None

    def collect(self) -> Iterator[Metric]:
        idx = self._index
        c = idx.counters
        alloc = idx.allocator

        def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
            fam = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
            fam.add_metric(list(labels.values()) if labels else [], value)
            return fam

        blocks = CounterMetricFamily(
            "kvfabric_lookup_blocks", "Blocks asked for in lookups, by result.", labels=["tier", "result"]
        )
        blocks.add_metric(["memory", "hit"], c.hit_blocks)
        blocks.add_metric(["memory", "miss"], c.miss_blocks)
        if self.tiers is not None:  # a pool miss the tier held is an NVMe hit
            blocks.add_metric(["nvme", "hit"], self.tiers.stats.promoted_blocks)
            blocks.add_metric(["nvme", "miss"], self.tiers.stats.lookup_misses)
        yield blocks
        tokens = CounterMetricFamily(
            "kvfabric_lookup_tokens", "Tokens asked for in lookups, by result.", labels=["tier", "result"]
        )
        tokens.add_metric(["memory", "hit"], c.hit_tokens)
        tokens.add_metric(["memory", "miss"], c.miss_tokens)
        yield tokens
        yield counter("kvfabric_lookups", "Lookup requests served.", c.lookups)
        yield counter("kvfabric_saved_blocks", "Blocks committed to the pool.", c.committed_blocks)
        yield counter("kvfabric_saved_bytes", "Bytes committed to the pool.", c.committed_bytes)
        yield counter("kvfabric_loaded_blocks", "Blocks engines loaded from the pool.", c.loaded_blocks)
        yield counter("kvfabric_loaded_bytes", "Bytes engines loaded from the pool.", c.loaded_bytes)
        yield counter("kvfabric_evictions", "Blocks evicted to make room.", c.evictions)
        yield counter("kvfabric_evicted_bytes", "Bytes evicted to make room.", c.evicted_bytes)
        refused = CounterMetricFamily(
            "kvfabric_save_refused_blocks", "Blocks a save could not reserve, by reason.", labels=["reason"]
        )
        refused.add_metric(["present"], c.reserve_refused_present)
        refused.add_metric(["full"], c.reserve_refused_full)
        yield refused
        yield counter("kvfabric_leases", "Leases granted on lookups.", c.leases_granted)
        yield counter("kvfabric_leases_lost", "Leases dropped because their session vanished.", c.leases_lost)
        cap = GaugeMetricFamily("kvfabric_pool_capacity_bytes", "Bytes of the pool.")
        cap.add_metric([], alloc.pool_bytes)
        yield cap
        used = GaugeMetricFamily("kvfabric_pool_used_bytes", "Bytes of the pool holding blocks.")
        used.add_metric([], alloc.used_bytes)
        yield used
        arenas = GaugeMetricFamily("kvfabric_pool_free_arenas", "Arenas not lent to any layout.")
        arenas.add_metric([], alloc.free_arenas)
        yield arenas
        usable = GaugeMetricFamily(
            "kvfabric_pool_usable_arenas",
            "Arenas that may be lent (a CUDA pool's pinned so far; every arena otherwise).",
        )
        usable.add_metric([], alloc.usable_arenas)
        yield usable
        states = GaugeMetricFamily("kvfabric_pool_blocks", "Blocks in the pool, by state.", labels=["state"])
        for state, n in idx.block_counts().items():
            states.add_metric([state], n)
        yield states
        ns = GaugeMetricFamily("kvfabric_namespaces", "Layouts registered with the agent.")
        ns.add_metric([], len(idx.namespaces))
        yield ns
        sess = GaugeMetricFamily("kvfabric_sessions", "Engine sessions connected now.")
        sess.add_metric([], self._sessions())
        yield sess


class _TierCollector(Collector):
    """The NVMe tier's counts, read from the tier at scrape time (``kvfabric_nvme_*``)."""

    _COUNTERS = (
        ("written_blocks", "kvfabric_nvme_written_blocks", "Blocks written to the NVMe tier."),
        ("written_bytes", "kvfabric_nvme_written_bytes", "Bytes written to the NVMe tier."),
        ("promoted_blocks", "kvfabric_nvme_read_blocks", "Blocks read from the NVMe tier into the pool."),
        ("promoted_bytes", "kvfabric_nvme_read_bytes", "Bytes read from the NVMe tier into the pool."),
        (
            "damaged_blocks",
            "kvfabric_nvme_damaged_blocks",
            "Blocks found damaged (checksum, header, length) and dropped, never served.",
        ),
        ("evictions", "kvfabric_nvme_evictions", "Blocks evicted from the NVMe tier to stay in capacity."),
        (
            "foreign_files",
            "kvfabric_nvme_foreign_files",
            "Files in the tier directory that are not the tier's (left alone), counted at open.",
        ),
    )

    def __init__(self, tiers: TierService) -> None:
        self._tiers = tiers

    def collect(self) -> Iterator[Metric]:
        s = self._tiers.summary()
        for key, name, doc in self._COUNTERS:
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], int(s.get(f"nvme_{key}", 0)))
            yield fam
        dropped = CounterMetricFamily(
            "kvfabric_nvme_dropped_writes", "Writes to the NVMe tier not done, by reason.", labels=["reason"]
        )
        dropped.add_metric(["queue_full"], int(s["nvme_writes_dropped_queue_full"]))
        dropped.add_metric(["error"], int(s["nvme_writes_failed"]))
        yield dropped
        skipped = CounterMetricFamily(
            "kvfabric_nvme_skipped_reads",
            "Reads of the NVMe tier not done or not served, by reason.",
            labels=["reason"],
        )
        skipped.add_metric(["late"], int(s["nvme_reads_skipped_late"]))
        skipped.add_metric(["queue_full"], int(s["nvme_reads_skipped_queue_full"]))
        skipped.add_metric(["failed"], int(s["nvme_promote_failed"]))
        yield skipped
        errors = CounterMetricFamily(
            "kvfabric_nvme_io_errors", "Disk errors of the NVMe tier.", labels=["op"]
        )
        errors.add_metric(["read"], int(s.get("nvme_read_errors", 0)))
        errors.add_metric(["write"], int(s.get("nvme_write_errors", 0)))
        yield errors
        for key, name, doc in (
            ("ready", "kvfabric_nvme_ready", "1 when the NVMe tier is open and serving."),
            ("capacity_bytes", "kvfabric_nvme_capacity_bytes", "Bytes of disk the NVMe tier may fill."),
            ("used_bytes", "kvfabric_nvme_used_bytes", "Bytes of the NVMe tier holding blocks."),
            ("blocks", "kvfabric_nvme_blocks", "Blocks on the NVMe tier."),
            ("direct_io", "kvfabric_nvme_direct_io", "1 when the tier's filesystem takes direct I/O."),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s[f"nvme_{key}"]))
            yield g
        queue = GaugeMetricFamily(
            "kvfabric_nvme_queue_blocks", "Blocks waiting for the NVMe tier's threads.", labels=["op"]
        )
        queue.add_metric(["write"], int(s["nvme_writes_queued"]))
        queue.add_metric(["read"], int(s["nvme_reads_queued"]))
        yield queue


class _RemoteCollector(Collector):
    """The fabric's counts (``--fabric-valkey``), read from the remote tier and index at scrape."""

    def __init__(
        self,
        summary: Callable[[], dict[str, int | float | str]],
        peers: Callable[[], dict[str, tuple[int, int, int]]],
    ) -> None:
        self._summary = summary
        self._peers = peers

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        pulls = CounterMetricFamily(
            "kvfabric_remote_peer_pulls",
            "Pulls from each holder of the pool, by result (ok: brought blocks).",
            labels=["peer", "result"],
        )
        peer_bytes = CounterMetricFamily(
            "kvfabric_remote_peer_pulled_bytes", "Bytes pulled from each holder.", labels=["peer"]
        )
        for peer, (n, failed, nbytes) in sorted(self._peers().items()):
            pulls.add_metric([peer, "ok"], n - failed)
            pulls.add_metric([peer, "failed"], failed)
            peer_bytes.add_metric([peer], nbytes)
        yield pulls
        yield peer_bytes
        if "fabric_peers" in s and int(s["fabric_peers"]) >= 0:
            members = GaugeMetricFamily(
                "kvfabric_fabric_peers", "Agents of the pool the EndpointSlices list (this one included)."
            )
            members.add_metric([], int(s["fabric_peers"]))
            yield members
        blocks = CounterMetricFamily(
            "kvfabric_remote_blocks", "Blocks moved between agents of the pool.", labels=["direction"]
        )
        blocks.add_metric(["pulled"], int(s["remote_pulled_blocks"]))
        blocks.add_metric(["served"], int(s["remote_served_blocks"]))
        yield blocks
        moved = CounterMetricFamily(
            "kvfabric_remote_bytes", "Bytes moved between agents of the pool.", labels=["direction"]
        )
        moved.add_metric(["pulled"], int(s["remote_pulled_bytes"]))
        moved.add_metric(["served"], int(s["remote_served_bytes"]))
        yield moved
        failures = CounterMetricFamily(
            "kvfabric_remote_failures",
            "Pulls that brought nothing, blocks that failed their checksum, pulls this agent could "
            "not serve, lookups that skipped a failing peer, pulls not started because the measured "
            "rate could not meet the pull deadline, holders the pool's EndpointSlices do not list.",
            labels=["kind"],
        )
        failures.add_metric(["pull"], int(s["remote_pull_failures"]))
        failures.add_metric(["bad_block"], int(s["remote_pull_bad_blocks"]))
        failures.add_metric(["serve"], int(s["remote_serve_failures"]))
        failures.add_metric(["peer_backoff"], int(s["remote_peer_backoffs"]))
        failures.add_metric(["too_slow"], int(s["remote_pulls_skipped_slow"]))
        failures.add_metric(["not_member"], int(s["remote_not_members"]))
        yield failures
        index = CounterMetricFamily(
            "kvfabric_valkey_failures", "Calls to the pool's Valkey block index that failed."
        )
        index.add_metric([], int(s["valkey_failures"]))
        yield index
        up = GaugeMetricFamily("kvfabric_valkey_up", "1 when the pool's Valkey block index answers.")
        up.add_metric([], float(s["valkey_up"]))
        yield up


class _EventsCollector(Collector):
    """The KV events for routers (``--kv-events-endpoint``), read at scrape."""

    def __init__(self, summary: Callable[[], dict[str, int | str]]) -> None:
        self._summary = summary

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        events = CounterMetricFamily(
            "kvfabric_kv_events", "Block events published for routers, by kind.", labels=["kind"]
        )
        events.add_metric(["stored"], int(s["kv_events_stored_events"]))
        events.add_metric(["removed"], int(s["kv_events_removed_events"]))
        yield events
        batches = CounterMetricFamily("kvfabric_kv_event_batches", "KV event batches published.")
        batches.add_metric([], int(s["kv_events_batches"]))
        yield batches
        replays = CounterMetricFamily("kvfabric_kv_event_replays", "Replay requests served.")
        replays.add_metric([], int(s["kv_events_replays"]))
        yield replays
        known = GaugeMetricFamily(
            "kvfabric_kv_events_known_blocks",
            "Blocks routers were told of (named by an engine's annotation) and still held here.",
        )
        known.add_metric([], int(s["kv_events_known_blocks"]))
        yield known


class AgentMetrics:
    def __init__(self, index: BlockIndex, sessions: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._index_collector = _IndexCollector(index, sessions)
        self.registry.register(self._index_collector)
        self.rpc_seconds = Histogram(
            "kvfabric_rpc_seconds",
            "Time the agent spent handling one request, by operation.",
            ["op"],
            buckets=_RPC_BUCKETS,
            registry=self.registry,
        )
        self.save_seconds = Histogram(
            "kvfabric_save_copy_seconds",
            "Time an engine spent copying one batch of blocks into the pool.",
            buckets=_COPY_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "kvfabric_load_copy_seconds",
            "Time an engine spent copying one batch of leased blocks out of the pool.",
            buckets=_COPY_BUCKETS,
            registry=self.registry,
        )
        self.sessions_opened = Counter(
            "kvfabric_sessions_opened", "Engine sessions opened.", registry=self.registry
        )
        self.errors = Counter(
            "kvfabric_errors",
            "Requests or connections that failed, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.prefetched_blocks = Counter(
            "kvfabric_gpu_prefetched_blocks",
            "Blocks of GPU engines' loads their schedulers had queued when vLLM allocated them "
            "(queued), or that were left to the workers (refused: unknown registration, other "
            "tenant, slots not leased).",
            ["result"],
            registry=self.registry,
        )
        # Pre-created children, so dashboards and alerts see zeros rather than absent series.
        for result in ("queued", "refused"):
            self.prefetched_blocks.labels(result)
        for op in OPS:
            self.rpc_seconds.labels(op)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.nvme_seconds = Histogram(
            "kvfabric_nvme_io_seconds",
            "Time one block's read or write of the NVMe tier took, checksum included.",
            ["op"],
            buckets=_COPY_BUCKETS,
            registry=self.registry,
        )
        self.up = Gauge("kvfabric_agent_ready", "1 when the agent serves requests.", registry=self.registry)

    def watch_remote(
        self,
        summary: Callable[[], dict[str, int | float | str]],
        peers: Callable[[], dict[str, tuple[int, int, int]]],
    ) -> Histogram:
        """Exposes the fabric's metrics (``peers``: holder -> pulls, failed, bytes); returns the
        pull-time histogram to observe."""
        self.registry.register(_RemoteCollector(summary, peers))
        return Histogram(
            "kvfabric_remote_pull_seconds",
            "Time one pull from a peer took, from the lookup that started it to its commit.",
            buckets=_COPY_BUCKETS,
            registry=self.registry,
        )

    def watch_events(self, summary: Callable[[], dict[str, int | str]]) -> None:
        """Exposes the KV events' counts (agents started with ``--kv-events-endpoint``)."""
        self.registry.register(_EventsCollector(summary))

    def watch_tier(self, tiers: TierService) -> None:
        """Exposes the NVMe tier's metrics (agents started with ``--nvme-path``)."""
        self.registry.register(_TierCollector(tiers))
        self._index_collector.tiers = tiers
        for op in ("read", "write"):
            self.nvme_seconds.labels(op)
