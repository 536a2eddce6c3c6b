"""A real Prometheus scrapes a live agent that served real traffic; the dashboard's queries
return data. (Debian's ``prometheus`` package, installed by ``make install-tools``.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from e2e.agent import AgentProcess, free_port
from kvfabric.connector.client import AgentClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus not installed (make install-tools)"
    ),
]


def query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_the_agent_and_dashboard_queries_have_data(tmp_path: Path) -> None:
    from kvfabric.operator.dashboard import PANELS

    with AgentProcess(tmp_path / "agent", "32MiB") as agent:
        c = AgentClient(str(agent.socket_path), "traffic")
        keys = [bytes([i]) * 16 for i in range(16)]
        c.register_namespace("ns", 4096, 16)
        c.reserve("ns", keys, None)
        c.commit("ns", keys, [], 0.002)
        port = free_port()
        target = f"127.0.0.1:{agent.http_port}"
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n- job_name: kvfabric\n  static_configs:\n  - targets: ['{target}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 60
            hits = []
            while time.monotonic() < deadline:
                # traffic between scrapes, so rates have something to show
                c.lookup(["ns"], keys, 16, lease_id="l")
                c.release(["l#0"], 16, 0.001)
                c.lookup(["ns"], [b"x" * 16], 16)
                try:
                    hits = query(port, 'sum(rate(kvfabric_lookup_blocks_total{result="hit"}[10s]))')
                except OSError:
                    hits = []
                if hits and float(hits[0]["value"][1]) > 0:  # type: ignore[index]
                    break
                time.sleep(0.5)
            assert hits and float(hits[0]["value"][1]) > 0, "no hit rate scraped"  # type: ignore[index]
            empty = []
            for title, _, targets in PANELS:
                for _, expr in targets:
                    if not query(port, expr.replace("$__rate_interval", "10s")):
                        empty.append(f"{title}: {expr}")
            # histograms of copies need copy traffic; every other panel must show data
            assert not [e for e in empty if "copy_seconds" not in e], empty
        finally:
            prom.terminate()
            prom.wait(30)
            log.close()
            c.close()
