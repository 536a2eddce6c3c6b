"""The operator against a real control plane (etcd + kube-apiserver + kube-controller-manager).

Skipped with the reason when the control plane is not built (``make test`` builds it first).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import k8s_cluster
from e2e.conftest import collect_leftover_sockets

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(bool(k8s_cluster.available()), reason=k8s_cluster.available() or "ok"),
    # kopf and the kubernetes client emit deprecations and close sockets lazily at shutdown
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _collect_client_sockets() -> Iterator[None]:
    """The kubernetes client and kopf's aiohttp leave sockets for the garbage collector: collect
    them at the end of this module with ResourceWarning ignored (see e2e/conftest.py)."""
    yield
    collect_leftover_sockets()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[k8s_cluster.ControlPlane]:
    cp = k8s_cluster.ControlPlane(tmp_path_factory.mktemp("k8s")).start()
    try:
        cp.kubectl("apply", "-f", str(REPO / "crds" / "kvcachepools.kvfabric.io.yaml"))
        cp.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/kvcachepools.kvfabric.io")
        cp.kubectl("create", "namespace", "kvfabric")
        cp.kubectl("create", "namespace", "vllm")  # the samples'
        for node, selected in (("node-a", True), ("node-b", False)):
            lbl = {"kvfabric.io/node": "true"} if selected else {"other": "x"}
            node_body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": lbl}}
            cp.kubectl(
                "apply",
                "-f",
                "-",
                input=json.dumps(node_body),
            )
        yield cp
    finally:
        cp.stop()


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Polls ``check`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def get(cp: k8s_cluster.ControlPlane, *args: str) -> dict[str, Any] | None:
    r = cp.kubectl("get", "-o", "json", *args, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def sample(name: str) -> str:
    """A manifest of manifests/ moved to the test namespace (the samples use ``vllm``)."""
    import yaml

    body = yaml.safe_load((REPO / "manifests" / name).read_text())
    body["metadata"]["namespace"] = "kvfabric"
    return json.dumps(body)


def webhook_configuration(name: str, url: str, ca: bytes | None) -> str:
    """A webhook configuration as the chart makes it (scoped), at a URL the apiserver calls."""
    import base64

    from kvfabric.operator import webhook

    body = webhook.configuration({"url": url, **({"caBundle": base64.b64encode(ca).decode()} if ca else {})})
    body["metadata"]["name"] = name
    return json.dumps(body)


def pool_manifest(name: str, spec: dict[str, Any]) -> str:
    """A KVCachePool in the test namespace, as kubectl's input."""
    return json.dumps(
        {
            "apiVersion": "kvfabric.io/v1alpha1",
            "kind": "KVCachePool",
            "metadata": {"name": name, "namespace": "kvfabric"},
            "spec": spec,
        }
    )


def test_crd_schema_rejects_invalid_pools(cluster: k8s_cluster.ControlPlane) -> None:
    bad = pool_manifest("bad", {"memory": {"size": "lots"}, "tenancy": "everyone"})
    r = cluster.kubectl("apply", "-f", "-", input=bad, check=False)
    assert r.returncode != 0
    assert "spec.memory.size" in r.stderr and "spec.tenancy" in r.stderr
    r = cluster.kubectl(
        "apply", "--dry-run=server", "-f", str(REPO / "manifests" / "sample-pool.yaml"), check=False
    )
    assert r.returncode == 0, r.stderr


def test_operator_reconciles_a_pool_into_owned_agents(
    cluster: k8s_cluster.ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import kopf
    from kopf.testing import KopfRunner
    from kubernetes import config as kube_config

    from e2e.agent import free_port
    from kvfabric.operator import reconcile, webhook
    from kvfabric.operator.certs import self_signed

    # kopf's login_via_client loads the default kubeconfig, whose path the client read at import
    monkeypatch.setattr(kube_config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cluster.kubeconfig))
    kube_config.load_kube_config(config_file=str(cluster.kubeconfig))
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    reconcile.register(
        registry, reconcile.AgentImages("kvfabric/agent:t", "kvfabric/agent:t-cuda"), 2.0, ["kvfabric"]
    )
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    # The webhook as the operator serves it, at a URL the apiserver calls over TLS.
    cert, key = self_signed(["127.0.0.1"])
    (cluster.dir / "tls.crt").write_bytes(cert)
    (cluster.dir / "tls.key").write_bytes(key)
    port = free_port()
    hook = webhook.server(port, str(cluster.dir / "tls.crt"), str(cluster.dir / "tls.key"), host="127.0.0.1")
    hook_thread = threading.Thread(target=hook.run, daemon=True)
    hook_thread.start()
    until(lambda: hook.started, what="webhook server")
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=webhook_configuration("kvfabric.test", f"https://127.0.0.1:{port}{webhook.PATH}", cert),
    )

    def pod(name: str, annotations: dict[str, str]) -> str:
        container = {"name": "vllm", "image": "vllm/vllm-openai", "args": ["--model", "m"]}
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "kvfabric", "annotations": annotations},
                "spec": {"containers": [container]},
            }
        )

    with KopfRunner(
        ["run", "--standalone", "--namespace=kvfabric"], registry=registry, settings=settings
    ) as runner:
        cluster.kubectl("apply", "-f", "-", input=sample("sample-pool.yaml"))
        pool = until(lambda: get(cluster, "kvcachepool", "default", "-n", "kvfabric"), what="pool")
        ds = until(
            lambda: get(cluster, "daemonset", "kvfabric-default-agent", "-n", "kvfabric"), what="DaemonSet"
        )
        owner = ds["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "KVCachePool" and owner["uid"] == pool["metadata"]["uid"]
        pod_spec = ds["spec"]["template"]["spec"]
        assert pod_spec["nodeSelector"] == {"kvfabric.io/node": "true"}
        cm = get(cluster, "configmap", "kvfabric-default-agent", "-n", "kvfabric")
        assert cm is not None and cm["data"]["KVFABRIC_POOL_SIZE"] == str(8 << 30)
        assert get(cluster, "service", "kvfabric-default-agents", "-n", "kvfabric") is not None
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "kvfabric/agent:t"
        # no finalizer: a pool can be deleted when the operator is gone (helm uninstall keeps pools)
        pool = get(cluster, "kvcachepool", "default", "-n", "kvfabric")
        assert pool is not None and not pool["metadata"].get("finalizers"), pool["metadata"]

        # Drift: a DaemonSet deleted by hand comes back at once, an edited ConfigMap at the resync.
        cluster.kubectl("delete", "daemonset", "kvfabric-default-agent", "-n", "kvfabric", "--wait=true")
        until(
            lambda: get(cluster, "daemonset", "kvfabric-default-agent", "-n", "kvfabric"), 30, "DS restored"
        )
        cluster.kubectl(
            "patch", "configmap", "kvfabric-default-agent", "-n", "kvfabric", "--type=merge",
            "-p", '{"data": {"KVFABRIC_POOL_SIZE": "1"}}',
        )  # fmt: skip
        until(
            lambda: (
                (get(cluster, "configmap", "kvfabric-default-agent", "-n", "kvfabric") or {})["data"][
                    "KVFABRIC_POOL_SIZE"
                ]
                == str(8 << 30)
            ),
            30,
            "ConfigMap restored",
        )
        ds = get(cluster, "daemonset", "kvfabric-default-agent", "-n", "kvfabric")
        assert ds is not None

        # The DaemonSet controller places an agent pod on the selected node only.
        def agent_pods() -> list[dict[str, Any]]:
            pods = get(cluster, "pods", "-n", "kvfabric", "-l", "kvfabric.io/pool=default") or {"items": []}
            return list(pods["items"])

        pods = until(agent_pods, what="agent pods")
        terms = pods[0]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert len(pods) == 1 and "node-a" in json.dumps(terms) and "node-b" not in json.dumps(terms)

        # Status follows the DaemonSet (no kubelet here, so desired 1, ready 0).
        status = until(
            lambda: (
                (get(cluster, "kvcachepool", "default", "-n", "kvfabric") or {})
                .get("status", {})
                .get("nodesDesired")
            ),
            what="status",
        )
        assert status == 1
        conditions = {
            c["type"]: c
            for c in get(cluster, "kvcachepool", "default", "-n", "kvfabric")["status"]["conditions"]
        }
        assert conditions["ConfigValid"]["status"] == "True" and conditions["Ready"]["status"] == "False"

        # The apiserver calls the webhook over TLS: an annotated pod is injected, exactly once.
        until(lambda: get(cluster, "mutatingwebhookconfiguration", "kvfabric.test"), what="webhook config")
        until(
            lambda: (
                cluster.kubectl(
                    "apply", "-f", "-", input=pod("vllm-1", {"kvfabric.io/pool": "default"}), check=False
                ).returncode
                == 0
            ),
            what="pod admitted",
        )
        stored = get(cluster, "pod", "vllm-1", "-n", "kvfabric")
        assert stored is not None
        (c,) = stored["spec"]["containers"]
        assert {"name": "KVFABRIC_SOCKET_PATH", "value": "/kvfabric/run/agent.sock"} in c.get("env", []), (
            stored
        )
        assert c["args"].count("--kv-transfer-config") == 1
        assert [v["name"] for v in stored["spec"]["volumes"] if v["name"].startswith("kvfabric")] == [
            "kvfabric-run",
            "kvfabric-shm",
        ]
        assert stored["metadata"]["annotations"]["kvfabric.io/injected"] == "default"
        cluster.kubectl("apply", "-f", "-", input=pod("plain", {}))
        plain = get(cluster, "pod", "plain", "-n", "kvfabric")
        assert plain is not None and "env" not in plain["spec"]["containers"][0]
        cluster.kubectl("apply", "-f", "-", input=pod("orphan", {"kvfabric.io/pool": "missing"}))
        orphan = get(cluster, "pod", "orphan", "-n", "kvfabric")
        assert orphan is not None and "not found" in orphan["metadata"]["annotations"]["kvfabric.io/skipped"]
        assert "env" not in orphan["spec"]["containers"][0]

        def skip_events() -> list[dict[str, Any]]:
            events = (get(cluster, "events", "-n", "kvfabric") or {"items": []})["items"]
            return [e for e in events if e.get("reason") == "KVFabricNotInjected"]

        (event,) = until(skip_events, what="the skip event")
        assert event["involvedObject"]["name"] == "orphan" and "not found" in event["message"]

        # The sample vLLM Deployment: the ReplicaSet controller creates its pod, the webhook wires it.
        cluster.kubectl("apply", "-f", "-", input=sample("sample-vllm-deployment.yaml"))

        def vllm_pod() -> dict[str, Any] | None:
            items = (get(cluster, "pods", "-n", "kvfabric", "-l", "app=vllm") or {"items": []})["items"]
            return items[0] if items else None

        vp = until(vllm_pod, what="the sample Deployment's pod")
        assert vp["metadata"]["annotations"].get("kvfabric.io/injected") == "default", vp["metadata"]
        assert "--kv-transfer-config" in vp["spec"]["containers"][0]["args"]
        assert vp["spec"]["nodeSelector"] == {"kvfabric.io/node": "true"}  # only where agents run

        # A spec change rolls the agents (new template hash) and updates their settings.
        old_hash = ds["spec"]["template"]["metadata"]["annotations"]["kvfabric.io/spec-hash"]
        cluster.kubectl(
            "patch",
            "kvcachepool",
            "default",
            "-n",
            "kvfabric",
            "--type=merge",
            "-p",
            '{"spec": {"memory": {"size": "16Gi"}}}',
        )
        until(
            lambda: (
                (get(cluster, "daemonset", "kvfabric-default-agent", "-n", "kvfabric") or {})["spec"][
                    "template"
                ]["metadata"]["annotations"]["kvfabric.io/spec-hash"]
                != old_hash
            ),
            what="rolled DaemonSet",
        )
        cm = get(cluster, "configmap", "kvfabric-default-agent", "-n", "kvfabric")
        assert cm is not None and cm["data"]["KVFABRIC_POOL_SIZE"] == str(16 << 30)

        # A spec the CRD accepts but the agent cannot run with: ConfigValid=False, nothing applied.
        cluster.kubectl("apply", "-f", "-", input=pool_manifest("tiny", {"memory": {"size": "1Ki"}}))

        def config_valid() -> dict[str, Any] | None:
            obj = get(cluster, "kvcachepool", "tiny", "-n", "kvfabric") or {}
            found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "ConfigValid"]
            return found[0] if found else None

        cond = until(config_valid, what="ConfigValid on the tiny pool")
        assert (
            cond["status"] == "False" and cond["reason"] == "InvalidSpec" and "pool_size" in cond["message"]
        )
        assert get(cluster, "daemonset", "kvfabric-tiny-agent", "-n", "kvfabric") is None
        cluster.kubectl("delete", "kvcachepool", "tiny", "-n", "kvfabric")
        # A name its children cannot carry (too long for the Service, or dotted): refused, said why.
        for bad in ("team.a", "p" * 48):
            cluster.kubectl("apply", "-f", "-", input=pool_manifest(bad, {"memory": {"size": "1Gi"}}))

            def named(bad: str = bad) -> dict[str, Any] | None:
                obj = get(cluster, "kvcachepool", bad, "-n", "kvfabric") or {}
                found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "ConfigValid"]
                return found[0] if found else None

            cond = until(named, what=f"ConfigValid on {bad}")
            assert cond["status"] == "False" and "pool name" in cond["message"], cond
            cluster.kubectl("delete", "kvcachepool", bad, "-n", "kvfabric")

        # A GPU pool with hostIPC: its agents and the engines wired to it share the node's IPC
        # namespace and /dev/shm (CUDA IPC events for layered loads need that).
        gpu_pool = {"memory": {"size": "1Gi"}, "cuda": True, "hostIPC": True}
        cluster.kubectl("apply", "-f", "-", input=pool_manifest("gpu", gpu_pool))
        gds = until(
            lambda: get(cluster, "daemonset", "kvfabric-gpu-agent", "-n", "kvfabric"), what="GPU DaemonSet"
        )
        assert gds["spec"]["template"]["spec"].get("hostIPC") is True
        cluster.kubectl("apply", "-f", "-", input=pod("vllm-gpu", {"kvfabric.io/pool": "gpu"}))
        gp = get(cluster, "pod", "vllm-gpu", "-n", "kvfabric")
        assert gp is not None and gp["metadata"]["annotations"].get("kvfabric.io/injected") == "gpu", gp
        assert gp["spec"].get("hostIPC") is True
        cluster.kubectl("delete", "kvcachepool", "gpu", "-n", "kvfabric")

        # A pool whose agents share blocks: the fabric port on the agents and their Service, and a
        # NetworkPolicy that admits it only from the pool's own agents (the apiserver accepts it).
        shared = {
            "memory": {"size": "1Gi"},
            "remoteSharing": True,
            "fabric": {"valkeyURL": "valkey://valkey:6379/0"},
        }
        cluster.kubectl("apply", "-f", "-", input=pool_manifest("shared", shared))
        policy = until(
            lambda: get(cluster, "networkpolicy", "kvfabric-shared-agents", "-n", "kvfabric"),
            what="NetworkPolicy",
        )
        assert policy["spec"]["ingress"][0]["ports"] == [{"port": 7450, "protocol": "TCP"}]
        assert policy["metadata"]["ownerReferences"][0]["kind"] == "KVCachePool"
        svc = get(cluster, "service", "kvfabric-shared-agents", "-n", "kvfabric")
        assert svc is not None and {p["name"] for p in svc["spec"]["ports"]} == {"metrics", "fabric"}
        cm = get(cluster, "configmap", "kvfabric-shared-agent", "-n", "kvfabric")
        assert cm is not None and cm["data"]["KVFABRIC_FABRIC_VALKEY"] == "valkey://valkey:6379/0"
        assert cm["data"]["KVFABRIC_FABRIC_POOL"] == "kvfabric.shared"
        cluster.kubectl("delete", "kvcachepool", "shared", "-n", "kvfabric", "--wait=true")
        until(
            lambda: get(cluster, "networkpolicy", "kvfabric-shared-agents", "-n", "kvfabric") is None,
            what="GC of NetworkPolicy",
        )

        # Deleting the pool garbage-collects everything it owns.
        cluster.kubectl("delete", "kvcachepool", "default", "-n", "kvfabric", "--wait=true")
        until(
            lambda: get(cluster, "daemonset", "kvfabric-default-agent", "-n", "kvfabric") is None,
            what="GC of DaemonSet",
        )
        until(
            lambda: get(cluster, "configmap", "kvfabric-default-agent", "-n", "kvfabric") is None,
            what="GC of ConfigMap",
        )
        until(
            lambda: get(cluster, "service", "kvfabric-default-agents", "-n", "kvfabric") is None,
            what="GC of Service",
        )
    assert runner.exit_code == 0, runner.output
    hook.should_exit = True
    hook_thread.join(10)

    # The operator (and its webhook) is gone: pods are still admitted (failurePolicy Ignore).
    r = cluster.kubectl(
        "apply", "-f", "-", input=pod("while-down", {"kvfabric.io/pool": "default"}), check=False
    )
    assert r.returncode == 0, r.stderr
    down = get(cluster, "pod", "while-down", "-n", "kvfabric")
    assert down is not None and "kvfabric.io/injected" not in down["metadata"]["annotations"]


def test_the_operator_entry_point_reconciles_serves_and_rotates_its_certificate(
    cluster: k8s_cluster.ControlPlane, tmp_path: Path
) -> None:
    """``kvfabric-operator`` as the chart runs it (one process): pools reconciled, /metrics
    served; the chart's webhook configuration gets the operator's CA; the certificate is rotated
    while it runs (a lifetime of seconds here) and admissions keep working across rotations."""
    import base64
    import os
    import subprocess
    import sys
    import urllib.request

    from e2e.agent import free_port

    metrics, port = free_port(), free_port()
    name = "kvfabric.entry"
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=webhook_configuration(name, f"https://127.0.0.1:{port}/kvfabric-inject", None),
    )
    env = dict(
        os.environ,
        KUBECONFIG=str(cluster.kubeconfig),
        POD_NAMESPACE="kvfabric",
        KVFABRIC_OPERATOR_NAMESPACES="kvfabric",
        KVFABRIC_METRICS_PORT=str(metrics),
        KVFABRIC_HEALTH_PORT=str(free_port()),
        KVFABRIC_WEBHOOK_PORT=str(port),
        KVFABRIC_WEBHOOK_HOST="127.0.0.1",
        KVFABRIC_WEBHOOK_CONFIGURATION=name,
        KVFABRIC_WEBHOOK_CERT_DAYS=str(12 / 86400),  # 12 s: a new certificate every 4 s
        KVFABRIC_WEBHOOK_CHECK_SECONDS="0.5",
    )
    log = open(tmp_path / "operator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvfabric.operator.main"], env=env, stdout=log, stderr=log)

    def bundle() -> bytes:
        config = get(cluster, "mutatingwebhookconfiguration", name) or {}
        return base64.b64decode(config.get("webhooks", [{}])[0].get("clientConfig", {}).get("caBundle", ""))

    def admitted(pod_name: str) -> str:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": "kvfabric",
                "annotations": {"kvfabric.io/pool": "second"},
            },
            "spec": {"containers": [{"name": "vllm", "image": "x", "args": ["--model", "m"]}]},
        }
        out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body))
        return str(json.loads(out.stdout)["metadata"].get("annotations", {}).get("kvfabric.io/injected", ""))

    try:
        cluster.kubectl("apply", "-f", "-", input=pool_manifest("second", {"memory": {"size": "1Gi"}}))
        until(lambda: get(cluster, "daemonset", "kvfabric-second-agent", "-n", "kvfabric"), what="DaemonSet")
        first = until(bundle, what="the CA published in the chart's configuration")
        until(lambda: admitted("p1") == "second", what="an admission over TLS")
        # rotations: the published bundle changes (new and previous), admissions keep working
        until(
            lambda: bundle() not in (b"", first) and bundle().count(b"BEGIN CERTIFICATE") == 2, 30, "rotation"
        )
        for i in range(6):  # across further rotations: never a failed TLS call (the pod would be uninjected)
            assert admitted(f"p{i + 2}") == "second", (tmp_path / "operator.log").read_text()[-3000:]
            time.sleep(1)

        def scraped() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                text = str(r.read().decode())
            applied = re.search(r'^kvfabric_operator_reconciles_total\{result="applied"\} (\S+)$', text, re.M)
            injected = re.search(
                r'^kvfabric_webhook_admissions_total\{result="injected"\} (\S+)$', text, re.M
            )
            ok = applied and float(applied.group(1)) >= 1 and injected and float(injected.group(1)) >= 7
            return text if ok else ""

        until(scraped, what="operator metrics")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        cluster.kubectl("delete", "kvcachepool", "second", "-n", "kvfabric", "--wait=false", check=False)
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("kvfabric-webhook-*")]
    assert not [p for p in leftovers if (p / "tls.key").exists() and p.stat().st_mtime > time.time() - 120]


def test_agents_of_a_sharing_pool_pull_only_from_peers_the_services_endpointslices_list(
    cluster: k8s_cluster.ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's objects for a sharing pool on the real apiserver, then real agents using
    them: each lists its peers with the pool's own service-account token (the Role the operator
    made), from the EndpointSlices the real EndpointSlice controller makes for the agents'
    Service. Pods do not run here (no kubelet): the test creates the agents' pods and sets their
    status (address, Ready) as a kubelet would, and runs the agents beside them on loopback
    addresses (127.0.0.2 and .3; a third, .4, is no pod of the pool)."""
    import base64
    import mmap

    from kubernetes import client
    from kubernetes import config as kube_config

    from e2e.agent import AgentProcess, free_port, wait_until
    from e2e.valkey import ValkeyProcess
    from kvfabric.connector.client import AgentClient
    from kvfabric.connector.keys import chain_keys, request_seed
    from kvfabric.operator import manifests, reconcile

    monkeypatch.setattr(kube_config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cluster.kubeconfig))
    kube_config.load_kube_config(config_file=str(cluster.kubeconfig))
    core = client.CoreV1Api()
    name, ns, port = "peers", "kvfabric", free_port()
    spec = {
        "memory": {"size": "1Gi"},
        "remoteSharing": True,
        "fabric": {"valkeyURL": "valkey://v:1/0", "port": port},
    }
    cluster.kubectl("apply", "-f", "-", input=pool_manifest(name, spec))
    pool = until(lambda: get(cluster, "kvcachepool", name, "-n", ns), what="pool")
    uid = pool["metadata"]["uid"]
    plan = reconcile.validate(ns, name, uid, spec, reconcile.AgentImages("a:t", "a:t-cuda"))
    assert not plan.why
    reconcile.apply_pool(ns, name, uid, plan)  # what the operator's handler does
    account = manifests.agent_account(name)
    secret = until(
        lambda: get(cluster, "secret", f"kvfabric-{name}-fabric-tls", "-n", ns), what="certificates"
    )
    reconcile.apply_pool(ns, name, uid, plan)  # a resync keeps the certificates
    again = get(cluster, "secret", f"kvfabric-{name}-fabric-tls", "-n", ns)
    assert again is not None and again["data"] == secret["data"]
    # the agents' token, from the token controller's secret for their service account
    token_secret = until(
        lambda: (get(cluster, "serviceaccount", account, "-n", ns) or {}).get("secrets"), what="token"
    )[0]["name"]
    token = base64.b64decode(core.read_namespaced_secret(token_secret, ns).data["token"])
    (tmp_path / "token").write_bytes(token)
    for key, data in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(data))

    # the agents' pods as a kubelet reports them: the controller lists them in the Service's slices
    ds = get(cluster, "daemonset", f"kvfabric-{name}-agent", "-n", ns)
    assert ds is not None
    template = ds["spec"]["template"]
    assert template["spec"]["serviceAccountName"] == account
    # the DaemonSet's own controller would adopt these pods and delete those off its nodes
    cluster.kubectl("delete", "daemonset", f"kvfabric-{name}-agent", "-n", ns, "--wait=true")

    def agent_pod(pod: str, node: str, ip: str, ready: bool) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns, "labels": template["metadata"]["labels"]},
            "spec": {**template["spec"], "nodeName": node, "initContainers": []},
        }
        if get(cluster, "pod", pod, "-n", ns) is None:
            core.create_namespaced_pod(ns, body)
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        core.patch_namespaced_pod_status(pod, ns, {"status": status})

    agent_pod("agent-a", "node-a", "127.0.0.2", True)
    agent_pod("agent-b", "node-b", "127.0.0.3", True)

    def fabric_agent(host: str, tmp: Path, valkey: ValkeyProcess) -> AgentProcess:
        return AgentProcess(
            tmp,
            "128MiB",
            extra_args=[
                "--arena-size", "4MiB",
                "--fabric-valkey", valkey.url,
                "--fabric-listen", f"{host}:{port}",
                "--fabric-pool", f"{ns}.{name}",
                "--fabric-tls-cert", str(tmp_path / "tls.crt"),
                "--fabric-tls-key", str(tmp_path / "tls.key"),
                "--fabric-tls-ca", str(tmp_path / "ca.crt"),
                "--fabric-peers-service", manifests.service_name(name),
                "--fabric-peers-namespace", ns,
                "--fabric-kube-api", cluster.url,
                "--fabric-kube-token-file", str(tmp_path / "token"),
                "--fabric-kube-ca-file", str(cluster.ca_file),
            ],
        )  # fmt: skip

    bb, space = 64 << 10, "peers-test"
    clients: list[AgentClient] = []

    def write(agent: AgentProcess, keys: list[bytes], fill: int) -> None:
        c = AgentClient(str(agent.socket_path), "engine")
        clients.append(c)
        c.register_namespace(space, bb, 16)
        slots = c.reserve(space, keys, None).slots
        with open(agent.pool_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            for s in slots:
                m[s * bb : (s + 1) * bb] = bytes([fill]) * bb
        c.commit(space, keys, [], 0.0)
        wait_until("published", lambda: agent.stats()["valkey_published"] >= len(keys), 10)

    def hits(agent: AgentProcess, keys: list[bytes]) -> int:
        c = AgentClient(str(agent.socket_path), "reader")
        try:
            c.register_namespace(space, bb, 16)
            deadline = time.monotonic() + 10
            while True:
                reply = c.lookup([space], keys, 16, lease_id="r", promote=True)
                if not reply.promoting or time.monotonic() > deadline:
                    c.release(list(reply.leases))
                    return reply.hits
                time.sleep(0.01)
        finally:
            c.close()

    def chain(tag: str) -> list[bytes]:
        return chain_keys(list(range(16 * 4)), 16, request_seed([tag]))

    with (
        ValkeyProcess(tmp_path / "valkey", "127.0.0.1", free_port()) as valkey,
        fabric_agent("127.0.0.2", tmp_path / "a", valkey) as a,
        fabric_agent("127.0.0.3", tmp_path / "b", valkey) as b,
        fabric_agent("127.0.0.4", tmp_path / "c", valkey) as outsider,
    ):
        try:
            wait_until("peers listed", lambda: b.stats().get("fabric_peers") == 2, 30)
            assert b.stats()["fabric_discovery_failures"] == 0
            from_a, from_outsider, later = chain("a"), chain("outsider"), chain("later")
            write(a, from_a, 1)
            write(outsider, from_outsider, 2)
            assert hits(b, from_a) == len(from_a)  # a member: pulled over mutual TLS
            assert hits(b, from_outsider) == 0  # the index names it, the slices do not: a miss
            sb = b.stats()
            assert sb["remote_not_members"] >= 1 and sb["remote_pulled_blocks"] == len(from_a)
            assert 'kvfabric_remote_failures_total{kind="not_member"}' in b.metrics_text()
            assert (
                f'kvfabric_remote_peer_pulls_total{{peer="127.0.0.2:{port}",result="ok"}} 1.0'
                in b.metrics_text()
            )
            # A's pod stops being ready: B stops asking it once the controller updates the slice
            agent_pod("agent-a", "node-a", "127.0.0.2", False)
            wait_until("A left the slices", lambda: b.stats().get("fabric_peers") == 1, 30)
            write(a, later, 3)
            assert hits(b, later) == 0
        finally:
            for c in clients:
                c.close()
    cluster.kubectl("delete", "kvcachepool", name, "-n", ns, "--wait=true")
    until(
        lambda: get(cluster, "secret", f"kvfabric-{name}-fabric-tls", "-n", ns) is None, what="GC of Secret"
    )
    until(lambda: get(cluster, "role", account, "-n", ns) is None, what="GC of Role")
    for pod in ("agent-a", "agent-b"):
        cluster.kubectl("delete", "pod", pod, "-n", ns, "--grace-period=0", "--force", check=False)


def test_a_pool_with_its_own_valkey_gets_it_from_the_operator_on_a_real_apiserver(
    cluster: k8s_cluster.ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.fabric.valkey: the apiserver takes the StatefulSet, its Service and NetworkPolicy and
    the password Secret; the real StatefulSet controller makes the Valkey pod from them (no
    kubelet runs it here: the test node has no cluster DNS, by which agents reach it); a resync
    keeps the password; deleting the pool collects all of it."""
    from kubernetes import config as kube_config

    from kvfabric.operator import reconcile

    monkeypatch.setattr(kube_config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cluster.kubeconfig))
    kube_config.load_kube_config(config_file=str(cluster.kubeconfig))
    name, ns = "ownvalkey", "kvfabric"
    spec = {"memory": {"size": "1Gi"}, "remoteSharing": True, "fabric": {"valkey": {"memory": "512Mi"}}}
    cluster.kubectl("apply", "-f", "-", input=pool_manifest(name, spec))
    pool = until(lambda: get(cluster, "kvcachepool", name, "-n", ns), what="pool")
    uid = pool["metadata"]["uid"]
    images = reconcile.AgentImages("a:t", "a:t-cuda", "vk:t")
    plan = reconcile.validate(ns, name, uid, spec, images)
    assert not plan.why
    reconcile.apply_pool(ns, name, uid, plan)
    child = f"kvfabric-{name}-valkey"
    secret = get(cluster, "secret", child, "-n", ns)
    assert secret is not None and {"password", "url"} <= set(secret["data"])
    pod = until(lambda: get(cluster, "pod", f"{child}-0", "-n", ns), what="the Valkey pod")
    assert pod["spec"]["containers"][0]["image"] == "vk:t"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "kvfabric-valkey"
    assert get(cluster, "networkpolicy", child, "-n", ns) is not None
    svc = get(cluster, "service", child, "-n", ns)
    assert svc is not None and svc["spec"]["ports"][0]["port"] == 6379
    ds = get(cluster, "daemonset", f"kvfabric-{name}-agent", "-n", ns)
    assert ds is not None
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KVFABRIC_FABRIC_VALKEY"]["valueFrom"]["secretKeyRef"] == {"name": child, "key": "url"}
    reconcile.apply_pool(ns, name, uid, plan)  # a resync
    again = get(cluster, "secret", child, "-n", ns)
    assert again is not None and again["data"] == secret["data"]  # the same password
    cluster.kubectl("delete", "kvcachepool", name, "-n", ns, "--wait=true")
    until(lambda: get(cluster, "statefulset", child, "-n", ns) is None, what="GC of the StatefulSet")
    until(lambda: get(cluster, "secret", child, "-n", ns) is None, what="GC of the Secret")
