"""The Helm chart: lint, render for every values file, validate offline against Kubernetes 1.31
schemas, generated files in sync, dashboard and alert PromQL checked, and helm install/uninstall
against the real control plane.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from e2e import k8s_cluster
from e2e.agent import AgentProcess
from e2e.valkey import fabric_args, loopback_valkey

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kvfabric"
HELM = k8s_cluster.BIN / "helm"
pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(not HELM.exists(), reason="helm not fetched: run scripts/k8s/build-control-plane.sh"),
]
VALUES = ["", *sorted(str(p) for p in (CHART / "ci").glob("*-values.yaml"))]
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}


def helm(*args: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, env=k8s_cluster.helm_env(tmp), timeout=120
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_lint_strict(tmp_path: Path) -> None:
    helm("lint", "--strict", str(CHART), tmp=tmp_path)
    for values in VALUES[1:]:
        helm("lint", "--strict", str(CHART), "-f", values, tmp=tmp_path)


@pytest.mark.parametrize("values", VALUES, ids=lambda v: Path(v).name or "default")
def test_render_validates_against_current_kubernetes(values: str, tmp_path: Path) -> None:
    out = helm(
        "template", "rel", str(CHART), "-n", "kvfabric", *(["-f", values] if values else []), tmp=tmp_path
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kubernetes_validate([d for d in docs if d["kind"] not in CUSTOM_KINDS], tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ClusterRole", "Service"} <= kinds
    webhooks = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    for w in webhooks:
        assert all(h["failurePolicy"] == "Ignore" for h in w["webhooks"])


def kubernetes_validate(docs: list[dict[str, object]], tmp: Path) -> None:
    """Offline validation against the Kubernetes 1.31 schemas (strict: unknown fields fail)."""
    path = tmp / "objects.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    r = subprocess.run(
        [
            shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "-k",
            "1.31.0",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_what_the_operator_and_webhook_build_validates(tmp_path: Path) -> None:
    """The agents' objects for CPU, GPU (runtime class, NVIDIA variables, CuPy cache), RDMA and
    tenant pools, and an injected engine pod, against the Kubernetes schemas."""
    from kvfabric.operator.manifests import children
    from kvfabric.operator.mutation import mutate
    from kvfabric.operator.spec import KVCachePoolSpec

    specs = [
        {"memory": {"size": "8Gi"}, "nodeSelector": {"kvfabric.io/node": "true"}},
        {"memory": {"size": "64Gi"}, "cuda": True, "hostIPC": True, "rdma": {"enabled": True}},
        {
            "memory": {"size": "8Gi"},
            "tenancy": "perNamespace",
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        },
    ]
    docs: list[dict[str, object]] = []
    for i, raw in enumerate(specs):
        spec = KVCachePoolSpec.model_validate(raw)
        docs += children("ml", f"pool{i}", "uid", spec, "kvfabric/agent:0.1.0")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"vllm{i}",
                "namespace": "ml",
                "annotations": {"kvfabric.io/pool": f"pool{i}"},
            },
            "spec": {"containers": [{"name": "vllm", "image": "v", "args": ["--model", "m"]}]},
        }
        injected, why = mutate(pod, "ml", spec, agent_image="kvfabric/agent:0.1.0")
        assert why == ""
        docs.append(injected)
    kubernetes_validate(docs, tmp_path)


def test_schema_rejects_unknown_values(tmp_path: Path) -> None:
    r = helm(
        "template", "x", str(CHART), "--set", "webhook.failurePolicy=Sometimes", tmp=tmp_path, check=False
    )
    assert r.returncode != 0 and "failurePolicy" in r.stderr
    r = helm("template", "x", str(CHART), "--set", "surprise=1", tmp=tmp_path, check=False)
    assert r.returncode != 0


def test_install_manifest_is_rendered_from_the_chart(tmp_path: Path) -> None:
    rendered = helm("template", "kvfabric", str(CHART), "-n", "kvfabric", tmp=tmp_path).stdout
    committed = (REPO / "manifests" / "install.yaml").read_text()
    assert committed.split("\n", 1)[1] == rendered, "run: make manifests"


def test_chart_files_are_generated_ones() -> None:
    from kvfabric.operator.dashboard import dashboard, rules

    assert (CHART / "files" / "kvcachepools.kvfabric.io.yaml").read_text() == (
        REPO / "crds" / "kvcachepools.kvfabric.io.yaml"
    ).read_text()
    assert json.loads((CHART / "dashboards" / "kvfabric.json").read_text()) == dashboard()
    assert yaml.safe_load((CHART / "rules" / "kvfabric.rules.yaml").read_text()) == rules()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make install-tools)")
def test_dashboard_and_alerts_use_only_real_metrics_and_parse(tmp_path: Path) -> None:
    from kvfabric.operator.dashboard import ALERTS, dashboard, expressions

    d = dashboard()
    assert d["uid"] == "kvfabric-overview"
    assert d["templating"]["list"][0]["name"] == "datasource"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])
    panel_exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    assert all("$__rate_interval" in e for e in panel_exprs if "rate(" in e)
    # every expression parses: as recording rules (dashboard) and alerting rules
    recording = [
        {"record": f"kvfabric:check:{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(panel_exprs)
    ]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "dash", "rules": recording}, {"name": "alerts", "rules": ALERTS}]}
        )
    )
    r = subprocess.run(["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # every metric named exists on a live agent's /metrics
    nvme = ["--nvme-path", str(tmp_path / "nvme"), "--nvme-size", "64MiB"]  # its metrics too
    with (
        loopback_valkey(tmp_path) as valkey,  # and the fabric's
        AgentProcess(tmp_path / "agent", "32MiB", extra_args=nvme + fabric_args(valkey)) as agent,
    ):
        exported = set(re.findall(r"^# TYPE (kvfabric_\w+) (\w+)", agent.metrics_text(), re.M))
    # ... or on the operator's (its own registry: the reconciler's and the webhook's metrics)
    import prometheus_client

    import kvfabric.operator.reconcile
    import kvfabric.operator.webhook  # noqa: F401

    operator_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    exported |= set(
        re.findall(r"^# TYPE (kvfabric_operator_\w+|kvfabric_webhook_\w+) (\w+)", operator_text, re.M)
    )
    names = {n for n, _ in exported}
    series = (
        names
        | {f"{n}_total" for n, t in exported if t == "counter"}
        | {f"{n}_{s}" for n, t in exported if t == "histogram" for s in ("bucket", "sum", "count")}
    )
    used = {m for e in expressions() for m in re.findall(r"kvfabric_\w+", e)}
    assert used and used <= series, used - series


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[k8s_cluster.ControlPlane]:
    if k8s_cluster.available():
        pytest.skip(k8s_cluster.available())
    cp = k8s_cluster.ControlPlane(tmp_path / "k8s").start()
    try:
        yield cp
    finally:
        cp.stop()


def test_helm_install_and_uninstall_on_a_real_control_plane(cluster: k8s_cluster.ControlPlane) -> None:
    cluster.kubectl("create", "namespace", "kvfabric")
    cluster.helm("install", "kvf", str(CHART), "-n", "kvfabric", "--wait=false")
    for kind, name in [
        ("deployment", "kvf-operator"),
        ("service", "kvf-webhook"),
        ("configmap", "kvf-dashboard"),
        ("serviceaccount", "kvf-operator"),
    ]:
        cluster.kubectl("get", kind, name, "-n", "kvfabric")
    cluster.kubectl("get", "crd", "kvcachepools.kvfabric.io")
    cluster.kubectl("create", "namespace", "vllm")
    cluster.kubectl("apply", "--dry-run=server", "-f", str(REPO / "manifests" / "sample-pool.yaml"))
    # the chart owns the webhook configuration; the CA the operator published survives an upgrade
    mwc = "kvf.kvfabric.kvfabric.io"
    patch = json.dumps([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": "Q0E="}])
    cluster.kubectl("patch", "mutatingwebhookconfiguration", mwc, "--type=json", "-p", patch)
    cluster.helm("upgrade", "kvf", str(CHART), "-n", "kvfabric", "--set", "dashboard.enabled=false")
    kept = json.loads(cluster.kubectl("get", "mutatingwebhookconfiguration", mwc, "-o", "json").stdout)
    assert kept["webhooks"][0]["clientConfig"]["caBundle"] == "Q0E="
    assert cluster.kubectl("get", "configmap", "kvf-dashboard", "-n", "kvfabric", check=False).returncode != 0
    cluster.helm("uninstall", "kvf", "-n", "kvfabric")
    # the upgrade policy: the CRD (and so every pool) stays; everything else goes
    cluster.kubectl("get", "crd", "kvcachepools.kvfabric.io")
    assert cluster.kubectl("get", "deployment", "kvf-operator", "-n", "kvfabric", check=False).returncode != 0
    assert cluster.kubectl("get", "clusterrole", "kvf-operator", check=False).returncode != 0
    assert cluster.kubectl("get", "mutatingwebhookconfiguration", mwc, check=False).returncode != 0


def render(tmp: Path, *args: str) -> list[dict[str, object]]:
    out = helm("template", "rel", str(CHART), "-n", "ops", *args, tmp=tmp).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_webhook_configuration_is_scoped_and_follows_its_values(tmp_path: Path) -> None:
    (mwc,) = [d for d in render(tmp_path) if d["kind"] == "MutatingWebhookConfiguration"]
    (hook,) = mwc["webhooks"]  # type: ignore[index]
    excluded = hook["namespaceSelector"]["matchExpressions"][0]
    assert excluded["key"] == "kubernetes.io/metadata.name" and excluded["operator"] == "NotIn"
    assert {"kube-system", "ops"} <= set(excluded["values"])  # never kube-system, never its own
    assert hook["objectSelector"]["matchExpressions"][0]["values"] == ["kvfabric", "kvfabric-agent"]
    assert hook["failurePolicy"] == "Ignore" and hook["clientConfig"]["service"]["name"] == "rel-webhook"
    assert hook["sideEffects"] == "NoneOnDryRun"
    (mwc,) = [
        d
        for d in render(tmp_path, "--set", "webhook.failurePolicy=Fail", "--set", "webhook.timeoutSeconds=3",
                        "--set", "webhook.url=https://127.0.0.1:9443/kvfabric-inject")
        if d["kind"] == "MutatingWebhookConfiguration"
    ]  # fmt: skip
    (hook,) = mwc["webhooks"]  # type: ignore[index]
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 3)
    assert hook["clientConfig"] == {"url": "https://127.0.0.1:9443/kvfabric-inject"}
    (deploy,) = [
        d
        for d in render(tmp_path, "--set", "webhook.url=https://127.0.0.1:9443/x")
        if d["kind"] == "Deployment"
    ]
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}  # type: ignore[index]
    assert env["KVFABRIC_WEBHOOK_HOST"].split(",")[-1] == "127.0.0.1"  # in the certificate
    assert env["KVFABRIC_WEBHOOK_CONFIGURATION"] == "rel.ops.kvfabric.io"
    assert env["KVFABRIC_AGENT_IMAGE"] == "kvfabric/agent:0.1.0"  # follows the chart's version


def test_rbac_is_narrowed_to_what_the_operator_uses(tmp_path: Path) -> None:
    (role,) = [d for d in render(tmp_path) if d["kind"] == "ClusterRole"]
    (mwc_rule,) = [r for r in role["rules"] if "admissionregistration.k8s.io" in r["apiGroups"]]  # type: ignore[index]
    assert mwc_rule["resourceNames"] == ["rel.ops.kvfabric.io"] and "create" not in mwc_rule["verbs"]
    docs = render(tmp_path, "--set", "watchNamespaces={ml,team}")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    cluster_resources = {res for r in role["rules"] for res in r["resources"]}  # type: ignore[index]
    assert "daemonsets" not in cluster_resources and "configmaps" not in cluster_resources
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}  # type: ignore[index]
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}  # type: ignore[index]
    assert roles == bindings == {"ml", "team"}
