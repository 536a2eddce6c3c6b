"""The Grafana dashboard and the Prometheus alert rules, generated from one source.

    python -m kvfabric.operator.dashboard dashboard > charts/kvfabric/dashboards/kvfabric.json
    python -m kvfabric.operator.dashboard rules     > charts/kvfabric/rules/kvfabric.rules.yaml

Tests check that every expression parses (``promtool check rules``), names only metrics a live
agent exports, and that the chart's copies equal these outputs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

UID = "kvfabric-overview"
RATE = "$__rate_interval"

#: (title, unit, [(legend, expr)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Agents ready", "none", [("{{instance}}", "kvfabric_agent_ready")]),
    (
        "Pool use",
        "percentunit",
        [("{{instance}}", "kvfabric_pool_used_bytes / kvfabric_pool_capacity_bytes")],
    ),
    (
        "Hit ratio per tier (blocks)",
        "percentunit",
        [
            (
                "{{tier}}",
                f'sum by (tier) (rate(kvfabric_lookup_blocks_total{{result="hit"}}[{RATE}]))'
                f" / sum by (tier) (rate(kvfabric_lookup_blocks_total[{RATE}]))",
            )
        ],
    ),
    (
        "Save and load throughput",
        "Bps",
        [
            ("saved {{instance}}", f"rate(kvfabric_saved_bytes_total[{RATE}])"),
            ("loaded {{instance}}", f"rate(kvfabric_loaded_bytes_total[{RATE}])"),
        ],
    ),
    (
        "Copy latency p99",
        "s",
        [
            (
                "save",
                f"histogram_quantile(0.99, sum by (le) (rate(kvfabric_save_copy_seconds_bucket[{RATE}])))",
            ),
            (
                "load",
                f"histogram_quantile(0.99, sum by (le) (rate(kvfabric_load_copy_seconds_bucket[{RATE}])))",
            ),
        ],
    ),
    (
        "Agent request latency p99",
        "s",
        [
            (
                "{{op}}",
                f"histogram_quantile(0.99, sum by (le, op) (rate(kvfabric_rpc_seconds_bucket[{RATE}])))",
            )
        ],
    ),
    ("Evictions", "short", [("{{instance}}", f"rate(kvfabric_evictions_total[{RATE}])")]),
    ("Engine sessions", "short", [("{{instance}}", "kvfabric_sessions")]),
    ("Errors", "short", [("{{kind}}", f"sum by (kind) (rate(kvfabric_errors_total[{RATE}]))")]),
    (
        "NVMe tier use",
        "percentunit",
        [("{{instance}}", "kvfabric_nvme_used_bytes / kvfabric_nvme_capacity_bytes")],
    ),
    (
        "NVMe tier throughput",
        "Bps",
        [
            ("written {{instance}}", f"rate(kvfabric_nvme_written_bytes_total[{RATE}])"),
            ("read {{instance}}", f"rate(kvfabric_nvme_read_bytes_total[{RATE}])"),
        ],
    ),
    (
        "NVMe block I/O p99",
        "s",
        [
            (
                "{{op}}",
                f"histogram_quantile(0.99, sum by (le, op) (rate(kvfabric_nvme_io_seconds_bucket[{RATE}])))",
            )
        ],
    ),
    (
        "NVMe queues, dropped writes, skipped reads",
        "short",
        [
            ("queued {{op}}", "sum by (op) (kvfabric_nvme_queue_blocks)"),
            ("dropped {{reason}}", f"sum by (reason) (rate(kvfabric_nvme_dropped_writes_total[{RATE}]))"),
            ("skipped {{reason}}", f"sum by (reason) (rate(kvfabric_nvme_skipped_reads_total[{RATE}]))"),
        ],
    ),
    (
        "NVMe damaged blocks",
        "short",
        [("{{instance}}", f"increase(kvfabric_nvme_damaged_blocks_total[{RATE}])")],
    ),
    (
        "Fabric: bytes pulled from and served to peers",
        "Bps",
        [
            (
                "{{direction}} {{instance}}",
                f"sum by (direction, instance) (rate(kvfabric_remote_bytes_total[{RATE}]))",
            )
        ],
    ),
    (
        "Fabric: failures",
        "short",
        [("{{kind}}", f"sum by (kind) (rate(kvfabric_remote_failures_total[{RATE}]))")],
    ),
    (
        "Fabric: pulls per peer",
        "short",
        [
            (
                "{{peer}} {{result}}",
                f"sum by (peer, result) (rate(kvfabric_remote_peer_pulls_total[{RATE}]))",
            )
        ],
    ),
    (
        "Fabric: pull time p99",
        "s",
        [
            (
                "p99",
                f"histogram_quantile(0.99, sum by (le) (rate(kvfabric_remote_pull_seconds_bucket[{RATE}])))",
            )
        ],
    ),
    ("Fabric: Valkey block index up", "short", [("{{instance}}", "kvfabric_valkey_up")]),
]

ALERTS: list[dict[str, Any]] = [
    {
        "alert": "KVFabricAgentDown",
        "expr": "kvfabric_agent_ready == 0",
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "A KVFabric agent is not serving: its engines recompute."},
    },
    {
        # A crash-looping or unschedulable agent is never scraped (not Ready: not a target), so
        # the operator reports what the DaemonSet sees.
        "alert": "KVFabricAgentsNotReady",
        "expr": 'max by (pool_namespace, pool) (kvfabric_operator_agents{state="desired"})'
        ' - max by (pool_namespace, pool) (kvfabric_operator_agents{state="ready"}) > 0',
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "A KVCachePool has nodes whose agent is not ready (crash loop, pending, "
            "or stuck pinning): engines there recompute."
        },
    },
    {
        "alert": "KVFabricHitRatioCollapsed",
        # The memory tier's counts see every lookup (blocks promoted from NVMe are memory hits
        # when asked again); the NVMe rows count a subset of the same blocks.
        "expr": 'sum(rate(kvfabric_lookup_blocks_total{tier="memory",result="hit"}[15m]))'
        ' / sum(rate(kvfabric_lookup_blocks_total{tier="memory"}[15m])) < 0.05'
        ' and sum(rate(kvfabric_lookup_blocks_total{tier="memory"}[15m])) > 1',
        "for": "30m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "Under 5% of looked-up blocks hit: keys changed (model, layout) or the pool thrashes."
        },
    },
    {
        "alert": "KVFabricPoolFull",
        "expr": 'rate(kvfabric_save_refused_blocks_total{reason="full"}[10m]) > 0',
        "for": "15m",
        "labels": {"severity": "info"},
        "annotations": {"summary": "Saves are refused because every block is leased: grow the pool."},
    },
    {
        "alert": "KVFabricNvmeDamagedBlocks",
        "expr": "increase(kvfabric_nvme_damaged_blocks_total[15m]) > 0",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "The NVMe tier found damaged blocks (checksum, header or length wrong) and "
            "dropped them (never served): check the disk (SMART, dmesg) and the filesystem."
        },
    },
    {
        "alert": "KVFabricNvmeTierOff",
        "expr": "kvfabric_nvme_ready == 0",
        "for": "15m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "An agent configured with an NVMe tier runs without it (directory not a tier, "
            "not writable, or still opening): see its log and the nvme_error in /stats."
        },
    },
    {
        "alert": "KVFabricPeerPullsFailing",
        # per holder: the one peer that is gone or partitioned, named by its label
        "expr": 'sum by (instance, peer) (rate(kvfabric_remote_peer_pulls_total{result="failed"}[10m])) > 0',
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "Pulls from peer agent {{ $labels.peer }} keep failing (gone, partitioned or too "
            "slow): engines recompute what they could have pulled."
        },
    },
    {
        "alert": "KVFabricBadBlocks",
        "expr": 'sum by (instance) (rate(kvfabric_remote_failures_total{kind="bad_block"}[10m])) > 0',
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "Blocks pulled from peers fail the holder's checksum (corrupted in flight or "
            "in a peer's memory): they are discarded and recomputed."
        },
    },
    {
        "alert": "KVFabricValkeyDown",
        "expr": "kvfabric_valkey_up == 0",
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "An agent cannot reach the pool's Valkey block index: it serves local hits only."
        },
    },
    {
        "alert": "KVFabricLoadErrors",
        "expr": 'rate(kvfabric_leases_lost_total[10m]) > 0 or sum by (instance) (rate(kvfabric_errors_total{kind!="connection"}[10m])) > 0',
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "Engines lose leases or send failing requests: loads fall back to recompute."
        },
    },
]


def expressions() -> list[str]:
    return [expr for _, _, targets in PANELS for _, expr in targets] + [a["expr"] for a in ALERTS]


def dashboard() -> dict[str, Any]:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)
                ],
            }
        )
    return {
        "uid": UID,
        "title": "KVFabric",
        "tags": ["kvfabric", "vllm", "kv-cache"],
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
            ]
        },
        "panels": panels,
    }


def rules() -> dict[str, Any]:
    return {"groups": [{"name": "kvfabric", "rules": ALERTS}]}


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "dashboard"
    if what == "dashboard":
        sys.stdout.write(json.dumps(dashboard(), indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(rules(), sort_keys=False, width=200))
