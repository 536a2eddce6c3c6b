"""A real Prometheus scrapes a live agent that served real traffic; the dashboard's queries
return data. (Debian's ``prometheus`` package, installed by ``make install-tools``.)"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from e2e import prometheus
from e2e.agent import AgentProcess, wait_until
from e2e.valkey import fabric_args, loopback_valkey
from kvfabric.connector.client import AgentClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus not installed (make install-tools)"
    ),
]


def test_prometheus_scrapes_the_agent_and_dashboard_queries_have_data(tmp_path: Path) -> None:
    from kvfabric.operator.dashboard import PANELS

    nvme = ["--nvme-path", str(tmp_path / "nvme"), "--nvme-size", "64MiB"]  # the NVMe panels too
    with (
        loopback_valkey(tmp_path) as valkey,  # and the fabric's
        AgentProcess(tmp_path / "agent", "32MiB", extra_args=nvme + fabric_args(valkey)) as agent,
        # a peer that pulls the agent's blocks: the per-peer panel's data
        AgentProcess(tmp_path / "peer", "32MiB", extra_args=fabric_args(valkey)) as peer,
    ):
        agent.wait_nvme()
        c = AgentClient(str(agent.socket_path), "traffic")
        keys = [bytes([i]) * 16 for i in range(16)]
        c.register_namespace("ns", 4096, 16)
        c.reserve("ns", keys, None)
        c.commit("ns", keys, [], 0.002)
        pc = AgentClient(str(peer.socket_path), "puller")
        pc.register_namespace("ns", 4096, 16)
        wait_until(
            "pulled from the agent", lambda: pc.lookup(["ns"], keys, 16, promote=True).hits == len(keys), 30
        )
        pc.close()
        targets = [f"127.0.0.1:{a.http_port}" for a in (agent, peer)]
        prom, port = prometheus.start(
            tmp_path, [{"job_name": "kvfabric", "static_configs": [{"targets": targets}]}]
        )
        try:

            def empty_panels() -> list[str]:
                """Panels without data; histograms of copies need copy traffic, so not those."""
                return [
                    f"{title}: {expr}"
                    for title, _, targets in PANELS
                    for _, expr in targets
                    if "copy_seconds" not in expr
                    and not prometheus.query(port, expr.replace("$__rate_interval", "10s"))
                ]

            # Until every panel has data (each target needs two scrapes in the window for a
            # rate; the two agents are scraped at their own offsets) or the deadline.
            deadline = time.monotonic() + 60
            hits: list[object] = []
            empty = ["not queried yet"]
            while time.monotonic() < deadline:
                # traffic between scrapes, so rates have something to show
                c.lookup(["ns"], keys, 16, lease_id="l")
                c.release(["l#0"], 16, 0.001)
                c.lookup(["ns"], [b"x" * 16], 16)
                try:
                    hits = prometheus.query(
                        port, 'sum(rate(kvfabric_lookup_blocks_total{result="hit"}[10s]))'
                    )
                    if hits and float(hits[0]["value"][1]) > 0:  # type: ignore[index]
                        empty = empty_panels()
                        if not empty:
                            break
                except OSError:
                    hits = []
                time.sleep(0.5)
            assert hits and float(hits[0]["value"][1]) > 0, "no hit rate scraped"  # type: ignore[index]
            assert not empty, empty
        finally:
            prom.terminate()
            prom.wait(30)
            c.close()
