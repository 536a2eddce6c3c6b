"""The user's whole story on a real node: kube-apiserver, kube-scheduler and a kubelet with
containerd run the project's images as real pods (``e2e/k8s_node.py``; no registry, no traffic
off the machine), and the README's Kubernetes quick start is followed as written:

helm install -> the operator runs as a pod -> a KVCachePool becomes an agent DaemonSet whose pod
is Ready -> the sample vLLM Deployment (CPU engine image, tiny local model) is admitted, injected
and Running -> requests through its OpenAI server -> the engine pod replaced: external prefix-cache
hits, identical output -> the agent pod deleted: the engine keeps serving, the new agent comes up,
hits resume -> drift is corrected -> a real Prometheus scrapes the agent (found through the
apiserver) and the dashboard's queries return data -> helm uninstall removes what the README says.

The machine is compared before and after (sysctls, iptables, mounts, links, netns, cgroups).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import prometheus, tiny_model
from e2e.agent import free_port
from e2e.conftest import PROMPTS
from e2e.k8s_cluster import ControlPlane
from e2e.k8s_node import (
    Node,
    assert_machine_unchanged,
    build_images,
    machine_state,
    node_available,
    stop_all,
)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kvfabric"
NS = "vllm"  # the samples' namespace
pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(1500)]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180.0, every: float = 0.5) -> Any:
    """Polls ``check`` until it returns something truthy; fails with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, subprocess.SubprocessError, KeyError, ValueError, IndexError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Cluster:
    """The control plane and node, with kubectl/helm and JSON helpers."""

    def __init__(self, cp: ControlPlane, node: Node) -> None:
        self.cp, self.node = cp, node

    def get(self, *args: str) -> Any:
        return json.loads(self.cp.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return list(self.get("pods", "-n", namespace, "-l", selector)["items"])

    def ready_pod(self, namespace: str, selector: str, other_than: str = "") -> dict[str, Any]:
        """The one Ready pod matching ``selector`` (not ``other_than``), waited for."""

        def one() -> dict[str, Any] | None:
            for p in self.pods(namespace, selector):
                conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
                meta = p["metadata"]
                if (
                    meta["name"] != other_than
                    and conds.get("Ready") == "True"
                    and not meta.get("deletionTimestamp")
                ):
                    return p
            return None

        try:
            return dict(wait_for(f"a Ready pod {selector} in {namespace}", one, timeout=420))
        except AssertionError as exc:  # say why: the pods' states and events
            described = self.cp.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False)
            raise AssertionError(f"{exc}\n{described.stdout[-4000:]}") from None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = node_available()
    if why:
        pytest.skip(why)
    build_images()
    d = tmp_path_factory.mktemp("kubelet")
    cp = ControlPlane(d / "cp", for_node=True)
    node = Node(d / "node", cp).claim()  # first removes what a killed earlier run left
    before = machine_state()
    try:
        cp.start()
        node.start()
        yield Cluster(cp, node)
    finally:
        stop_all(node, cp)
    assert_machine_unchanged(before, "the node")


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(url: str, name: str) -> float:
    """Sum of the samples of ``name`` on a /metrics page (0 when absent)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


class Engine:
    """A vLLM pod's OpenAI server, reached at its pod IP on the node's bridge."""

    def __init__(self, pod: dict[str, Any]) -> None:
        self.name = pod["metadata"]["name"]
        self.url = f"http://{pod['status']['podIP']}:8000"

    def complete(self, prompt: list[int]) -> str:
        body = {"model": "/models/tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        return str(http_json(self.url + "/v1/completions", body)["choices"][0]["text"])

    def metric(self, name: str) -> float:
        return metric(self.url + "/metrics", name)


def start_prometheus(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real Prometheus scraping the agents listed in ``targets.json`` (Debian's build has no
    Kubernetes service discovery: :func:`discover_agents` plays its part from the apiserver)."""
    (tmp / "targets.json").write_text("[]")
    return prometheus.start(
        tmp, [{"job_name": "kvfabric-agents", "file_sd_configs": [{"files": [str(tmp / "targets.json")]}]}]
    )


def discover_agents(c: Cluster, tmp: Path) -> None:
    """The agent pods' metrics ports, as Kubernetes service discovery (role pod) would find them."""
    targets = [
        {
            "targets": [f"{p['status']['podIP']}:{port['containerPort']}"],
            "labels": {"namespace": p["metadata"]["namespace"], "pod": p["metadata"]["name"]},
        }
        for p in c.pods(NS, "app.kubernetes.io/name=kvfabric-agent")
        if p["status"].get("podIP")
        for port in p["spec"]["containers"][0]["ports"]
        if port["name"] == "metrics"
    ]
    part = tmp / "targets.json.new"
    part.write_text(json.dumps(targets))
    part.replace(tmp / "targets.json")


def admitted(c: Cluster, namespace: str) -> dict[str, str]:
    """The annotations of a pod annotated for the pool as the apiserver would admit it (a
    server-side dry run: admission webhooks run, nothing is stored)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace, "annotations": {"kvfabric.io/pool": "default"}},
        "spec": {
            "containers": [{"name": "vllm", "image": "kvfabric/vllm-cpu:0.1.0", "args": ["--model", "m"]}]
        },
    }
    out = c.cp.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    return dict(json.loads(out.stdout)["metadata"].get("annotations") or {})


def quick_start_values(c: Cluster, tmp: Path) -> Path:
    """What this test cluster needs beyond the chart's defaults: pods cannot reach the apiserver's
    Service (no kube-proxy), so the operator runs on the host network and the apiserver calls the
    webhook by URL on 127.0.0.1 (never a Service name it would resolve off the machine)."""
    webhook = free_port()
    values = {
        "image": {"pullPolicy": "Never"},
        "hostNetwork": True,
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(c.cp.port)},
        ],
        "resyncSeconds": 3,
        "webhook": {"port": webhook, "url": f"https://127.0.0.1:{webhook}/kvfabric-inject"},
        "metrics": {"port": free_port()},
        "health": {"port": free_port()},
    }
    path = tmp / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_readme_story_on_a_real_node(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    models = Path("/var/lib/kvfabric/models")
    made_models = not models.exists()
    tiny_model.build(tmp_path / "tiny")
    models.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tmp_path / "tiny", models / "tiny", dirs_exist_ok=True)
    prom: subprocess.Popen[bytes] | None = None
    try:
        # Kubernetes 1.21+ labels every namespace with its name; 1.20 does not (README).
        c.cp.kubectl("label", "namespace", "kube-system", "kubernetes.io/metadata.name=kube-system")
        c.cp.kubectl("create", "namespace", "kvfabric")
        c.cp.kubectl("label", "namespace", "kvfabric", "kubernetes.io/metadata.name=kvfabric")
        # --- the README's quick start ------------------------------------------------------
        c.cp.helm(
            "install", "kvfabric", str(CHART), "-n", "kvfabric", "-f", str(quick_start_values(c, tmp_path))
        )
        operator = c.ready_pod("kvfabric", "app.kubernetes.io/component=operator")
        assert operator["spec"]["containers"][0]["image"] == "kvfabric/operator:0.1.0"
        mwc = "kvfabric.kvfabric.kvfabric.io"
        wait_for(
            "the operator to publish its CA in the chart's webhook configuration",
            lambda: c.get("mutatingwebhookconfiguration", mwc)["webhooks"][0]["clientConfig"].get("caBundle"),
        )
        c.cp.kubectl("label", "node", c.node.name, "kvfabric.io/node=true", "--overwrite")
        c.cp.kubectl("create", "namespace", NS)
        wait_for("the namespace's service account", lambda: c.cp.kubectl("get", "sa", "default", "-n", NS))
        pool = yaml.safe_load((REPO / "manifests" / "sample-pool.yaml").read_text())
        pool["spec"]["memory"]["size"] = "1Gi"  # this machine's size; the sample says 8Gi
        pool["spec"]["nvme"] = {"path": str(tmp_path / "nvme"), "size": "256Mi"}  # a disk tier too
        c.apply([pool])
        agent = c.ready_pod(NS, "app.kubernetes.io/name=kvfabric-agent")
        assert agent["spec"]["containers"][0]["image"] == "kvfabric/agent:0.1.0"  # the operator's version
        assert agent["spec"]["containers"][0]["securityContext"]["runAsUser"] == 65532

        def pool_row() -> str | None:
            out = str(c.cp.kubectl("get", "kvcachepools", "-n", NS).stdout)
            return out if re.search(r"default\s+1Gi\s+256Mi\s+1\s+1\s+True", out) else None

        table = wait_for("kubectl get kvcachepools to show the pool Ready on 1/1 nodes", pool_row, timeout=60)
        assert "READY" in table.upper()
        prom, prom_port = start_prometheus(tmp_path)
        discover_agents(c, tmp_path)
        # the webhook's scope: a pod annotated for the pool is injected in the pool's namespace,
        # and never even sent to the webhook in kube-system
        assert "kvfabric.io/injected" in admitted(c, NS)
        assert set(admitted(c, "kube-system")) == {"kvfabric.io/pool"}  # neither injected nor skipped

        deployment = yaml.safe_load((REPO / "manifests" / "sample-vllm-deployment.yaml").read_text())
        c.apply([deployment])
        first = c.ready_pod(NS, "app=vllm")
        ann = first["metadata"]["annotations"]
        assert ann.get("kvfabric.io/injected") == "default", ann
        (vllm,) = first["spec"]["containers"]
        assert "--kv-transfer-config" in vllm["args"]
        assert first["spec"]["nodeSelector"] == {"kvfabric.io/node": "true"}  # placed with the agents
        engine = Engine(first)
        cold = engine.complete(PROMPTS["P"])
        full = len(PROMPTS["P"]) // 128
        agent_metrics = f"http://{agent['status']['podIP']}:9400/metrics"
        wait_for(
            "the engine's blocks in the agent",
            lambda: metric(agent_metrics, "kvfabric_saved_blocks_total") >= full,
        )
        assert engine.metric("vllm:external_prefix_cache_hits_total") == 0

        # --- the engine pod replaced: its replacement is warm, output identical --------------
        c.cp.kubectl("delete", "pod", "-n", NS, first["metadata"]["name"], "--wait=false")
        second = Engine(c.ready_pod(NS, "app=vllm", other_than=first["metadata"]["name"]))
        warm = second.complete(PROMPTS["P"])
        assert warm == cold
        assert second.metric("vllm:external_prefix_cache_hits_total") >= (full - 1) * 128

        # --- the agent pod deleted: serving goes on (recompute), hits resume -----------------
        c.cp.kubectl("delete", "pod", "-n", NS, agent["metadata"]["name"], "--wait=false")
        assert second.complete(PROMPTS["Q"])  # served while the agent is gone or restarting
        new_agent = c.ready_pod(
            NS, "app.kubernetes.io/name=kvfabric-agent", other_than=agent["metadata"]["name"]
        )
        new_metrics = f"http://{new_agent['status']['podIP']}:9400/metrics"
        discover_agents(c, tmp_path)
        served = second.complete(PROMPTS["R1"])
        wait_for(
            "the engine to reconnect and save to the new agent",
            lambda: metric(new_metrics, "kvfabric_saved_blocks_total") >= len(PROMPTS["R1"]) // 128,
            timeout=120,
        )
        c.cp.kubectl("delete", "pod", "-n", NS, second.name, "--wait=false")
        third = Engine(c.ready_pod(NS, "app=vllm", other_than=second.name))
        assert third.complete(PROMPTS["R1"]) == served
        assert third.metric("vllm:external_prefix_cache_hits_total") > 0
        # P went to the old agent only: the new one has it from its NVMe tier (a hostPath that
        # outlived the agent pod), read back into its pool
        assert third.complete(PROMPTS["P"]) == cold
        assert metric(new_metrics, "kvfabric_nvme_read_blocks_total") >= full - 1

        # --- a real Prometheus has scraped the agents; the dashboard's queries have data ------
        from kvfabric.operator.dashboard import PANELS

        def panels_without_data() -> list[str]:
            empty = [
                f"{title}: {expr}"
                for title, _, targets in PANELS
                for _, expr in targets
                if not prometheus.query(prom_port, expr.replace("$__rate_interval", "5m"))
            ]
            # copy histograms need GPU copies; this pool does not share blocks between nodes (the
            # fabric's panels have data in e2e/test_prometheus.py and the multihost tests)
            return [
                e
                for e in empty
                if not any(m in e for m in ("copy_seconds", "kvfabric_remote_", "kvfabric_valkey_"))
            ]

        wait_for(
            "Prometheus to scrape an agent", lambda: prometheus.query(prom_port, "kvfabric_agent_ready"), 90
        )
        wait_for("every dashboard panel to have data", lambda: not panels_without_data(), 60)

        # --- drift: a deleted DaemonSet and an edited ConfigMap come back -------------------
        c.cp.kubectl("delete", "daemonset", "-n", NS, "kvfabric-default-agent", "--wait=true")
        wait_for("the DaemonSet restored", lambda: c.get("daemonset", "-n", NS, "kvfabric-default-agent"), 60)
        c.cp.kubectl(
            "patch", "configmap", "-n", NS, "kvfabric-default-agent", "--type=merge",
            "-p", '{"data": {"KVFABRIC_POOL_SIZE": "1"}}',
        )  # fmt: skip
        wait_for(
            "the ConfigMap restored by the resync",
            lambda: (
                c.get("configmap", "-n", NS, "kvfabric-default-agent")["data"]["KVFABRIC_POOL_SIZE"]
                == str(1 << 30)
            ),
            60,
        )
        c.ready_pod(NS, "app.kubernetes.io/name=kvfabric-agent")

        # --- the webhook down: pods are still admitted (failurePolicy Ignore), uninjected -----
        c.cp.kubectl("scale", "deployment", "-n", "kvfabric", "kvfabric-operator", "--replicas=0")
        wait_for(
            "the operator stopped", lambda: not c.pods("kvfabric", "app.kubernetes.io/component=operator")
        )
        assert "kvfabric.io/injected" not in admitted(c, NS)

        # --- helm uninstall: the operator and its webhook go; the CRD and pools stay ---------
        c.cp.helm("uninstall", "kvfabric", "-n", "kvfabric")
        wait_for(
            "the operator pod gone",
            lambda: not c.pods("kvfabric", "app.kubernetes.io/component=operator"),
            120,
        )
        assert c.cp.kubectl("get", "mutatingwebhookconfiguration", mwc, check=False).returncode != 0
        c.cp.kubectl("get", "crd", "kvcachepools.kvfabric.io")
        c.cp.kubectl("get", "kvcachepool", "-n", NS, "default")
        c.cp.kubectl("delete", "deployment", "-n", NS, "vllm")
        c.cp.kubectl("delete", "kvcachepool", "-n", NS, "default")  # its agents follow (owned)
        wait_for(
            "the agents garbage-collected",
            lambda: not c.pods(NS, "app.kubernetes.io/name=kvfabric-agent"),
            120,
        )
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        shutil.rmtree(models / "tiny", ignore_errors=True)
        if made_models:
            shutil.rmtree(models, ignore_errors=True)
            with_parent = models.parent
            if not any(with_parent.iterdir()):
                with_parent.rmdir()
