"""What a KVCachePool turns into (pure builders; e2e/test_k8s_kubelet.py runs them on a real node)."""

import base64
import time
from pathlib import Path

import pytest

from kvfabric.agent.remote import PeerTLS
from kvfabric.agent.settings import AgentSettings
from kvfabric.operator.manifests import (
    AGENT_UID,
    MAX_POOL_NAME,
    POOL_PATH,
    SOCKET_PATH,
    children,
    configmap,
    daemonset,
    invalid_name,
    issued_tls_secret,
    service,
    spec_hash,
    valkey_password_secret,
)
from kvfabric.operator.spec import KVCachePoolSpec

IMAGE = "kvfabric/agent:9.9.9"
SPEC = KVCachePoolSpec.model_validate(
    {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "memory": {"size": "8Gi"},
    }
)


def test_configmap_is_the_agent_settings_model(monkeypatch: pytest.MonkeyPatch) -> None:
    data = configmap("ns", "p", "uid-1", SPEC)["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    assert settings.pool_size == 8 << 30
    assert str(settings.socket) == SOCKET_PATH and str(settings.pool_path) == POOL_PATH


def test_per_namespace_tenancy_runs_the_agent_isolated_with_tenant_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "tenancy": "perNamespace"})
    for key, value in configmap("ns", "p", "uid-1", spec)["data"].items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    assert settings.tenancy == "isolated" and str(settings.tenant_socket_dir) == "/kvfabric/run/tenants"
    shared = configmap("ns", "p", "uid-1", SPEC)["data"]
    assert shared["KVFABRIC_TENANCY"] == "shared" and "KVFABRIC_TENANT_SOCKET_DIR" not in shared


def test_daemonset_places_agents_and_shares_host_dirs_per_pool() -> None:
    ds = daemonset("ml", "pool-a", "uid-1", SPEC, IMAGE)
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert paths == {"run": "/run/kvfabric/ml.pool-a", "shm": "/dev/shm/kvfabric/ml.pool-a"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["memory"] == str((8 << 30) + (512 << 20))
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == IMAGE
    assert ds["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kvfabric.io/v1alpha1",
        "kind": "KVCachePool",
        "name": "pool-a",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_rdma_adds_ipc_lock_the_device_resource_and_ucxs_rdma_transports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rdma = {"enabled": True, "resourceName": "rdma/rdma_shared_device_a"}
    spec = KVCachePoolSpec.model_validate({**SPEC.model_dump(by_alias=True), "rdma": rdma})
    (container,) = daemonset("ml", "p", "u", spec, IMAGE)["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    for key, value in configmap("ml", "p", "u", spec)["data"].items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    # NIXL over RDMA where the agent finds an active port (auto), TCP streams where it finds none
    assert settings.fabric_ucx_tls == "rc,tcp" and settings.fabric_transport == "auto"
    (plain,) = daemonset("ml", "p", "u", SPEC, IMAGE)["spec"]["template"]["spec"]["containers"]
    assert "add" not in plain["securityContext"]["capabilities"]
    assert "rdma/rdma_shared_device_a" not in plain["resources"]["limits"]


def test_a_spec_change_rolls_the_agents() -> None:
    bigger = KVCachePoolSpec.model_validate({**SPEC.model_dump(by_alias=True), "memory": {"size": "16Gi"}})
    assert spec_hash(bigger) != spec_hash(SPEC)
    assert spec_hash(KVCachePoolSpec.model_validate(SPEC.model_dump(by_alias=True))) == spec_hash(SPEC)


def test_children_are_owned_and_named_per_pool() -> None:
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children("ml", "p", "u", SPEC, IMAGE)]
    assert kinds == [
        ("ConfigMap", "kvfabric-p-agent"),
        ("DaemonSet", "kvfabric-p-agent"),
        ("Service", "kvfabric-p-agents"),
    ]
    assert all(
        c["metadata"]["ownerReferences"][0]["uid"] == "u" for c in children("ml", "p", "u", SPEC, IMAGE)
    )


def test_host_ipc_shares_the_nodes_ipc_namespace_for_gpu_pools_only() -> None:
    gpu = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "cuda": True, "hostIPC": True})
    assert daemonset("ml", "p", "u", gpu, IMAGE)["spec"]["template"]["spec"]["hostIPC"] is True
    assert "hostIPC" not in daemonset("ml", "p", "u", SPEC, IMAGE)["spec"]["template"]["spec"]
    with pytest.raises(ValueError, match="cuda: true"):
        KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "hostIPC": True})


def test_agent_runs_as_its_user_on_host_dirs_an_init_container_gives_it() -> None:
    pod = daemonset("ml", "p", "u", SPEC, IMAGE)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # chown only: a chmod of a directory the agent already owns (its restart) needs CAP_FOWNER
    assert init["command"] == ["chown", f"{AGENT_UID}:{AGENT_UID}", "/kvfabric/run", "/kvfabric/shm"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/kvfabric/run", "/kvfabric/shm"}
    (agent,) = pod["containers"]
    ctx = agent["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (AGENT_UID, AGENT_UID, True)
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}


def test_startup_probe_waits_for_the_pool_in_proportion_to_its_size() -> None:
    def budget(size: str) -> int:
        spec = KVCachePoolSpec.model_validate({"memory": {"size": size}})
        probe = daemonset("ml", "p", "u", spec, IMAGE)["spec"]["template"]["spec"]["containers"][0][
            "startupProbe"
        ]
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    assert budget("1Gi") >= 60
    assert budget("500Gi") >= 1000 + 60  # a 500 GiB pool at 1 GiB / 2 s is not killed while pinning
    assert budget("500Gi") > budget("8Gi")


def test_pinned_image_wins_and_cuda_pools_get_the_gpu_runtime() -> None:
    pinned = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "image": "mine/agent:1"})
    assert (
        daemonset("ml", "p", "u", pinned, IMAGE)["spec"]["template"]["spec"]["containers"][0]["image"]
        == "mine/agent:1"
    )
    gpu = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "cuda": True})
    pod = daemonset("ml", "p", "u", gpu, IMAGE)["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]
    assert env["CUPY_CACHE_DIR"].startswith("/kvfabric/cache")  # writable although the root is not
    own = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "cuda": True, "runtimeClassName": "gpu"})
    assert daemonset("ml", "p", "u", own, IMAGE)["spec"]["template"]["spec"]["runtimeClassName"] == "gpu"
    assert "runtimeClassName" not in daemonset("ml", "p", "u", SPEC, IMAGE)["spec"]["template"]["spec"]


def test_pool_names_that_would_make_invalid_children_are_refused() -> None:
    assert invalid_name("a" * MAX_POOL_NAME) == ""
    assert "longer than" in invalid_name("a" * (MAX_POOL_NAME + 1))
    assert "DNS label" in invalid_name("team.a")
    assert "DNS label" in invalid_name("7b-pool")
    assert len(f"kvfabric-{'a' * MAX_POOL_NAME}-agents") == 63


def test_an_nvme_tier_gets_its_own_host_directory_per_pool_and_the_agent_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = KVCachePoolSpec.model_validate(
        {"memory": {"size": "8Gi"}, "nvme": {"path": "/mnt/nvme0/", "size": "500Gi"}}
    )
    for key, value in configmap("ml", "pool-a", "uid-1", spec)["data"].items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    assert str(settings.nvme_path) == "/kvfabric/nvme" and settings.nvme_size == 500 << 30
    pod = daemonset("ml", "pool-a", "uid-1", spec, IMAGE)["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    assert volumes["nvme"] == {"path": "/mnt/nvme0/ml.pool-a", "type": "DirectoryOrCreate"}
    (container,) = pod["containers"]
    assert {"name": "nvme", "mountPath": "/kvfabric/nvme"} in container["volumeMounts"]
    (init,) = pod["initContainers"]
    assert "/kvfabric/nvme" in init["command"]  # the non-root agent can write it
    plain = daemonset("ml", "pool-a", "uid-1", SPEC, IMAGE)["spec"]["template"]["spec"]
    assert "nvme" not in {v["name"] for v in plain["volumes"]}
    assert "KVFABRIC_NVME_PATH" not in configmap("ml", "pool-a", "uid-1", SPEC)["data"]
    with pytest.raises(ValueError, match="pattern"):
        KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "nvme": {"path": "rel", "size": "1Gi"}})


def test_agent_settings_refuse_an_nvme_path_without_a_size() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="go together"):
        AgentSettings(nvme_path="/x")


def test_remote_sharing_wires_the_fabric_port_valkey_tls_and_a_network_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = KVCachePoolSpec.model_validate(
        {
            "memory": {"size": "8Gi"},
            "remoteSharing": True,
            "fabric": {
                "valkeySecret": {"name": "valkey", "key": "url"},
                "port": 7451,
                "tlsSecret": "pool-tls",
            },
        }
    )
    data = configmap("ml", "pool-a", "uid-1", spec)["data"]
    assert "KVFABRIC_FABRIC_VALKEY" not in data  # credentials stay in their Secret
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KVFABRIC_FABRIC_VALKEY", "valkeys://u:p@valkey:6380/0")  # what the Secret gives
    settings = AgentSettings()
    assert settings.fabric_listen == "0.0.0.0:7451" and settings.fabric_pool == "ml.pool-a"
    assert str(settings.fabric_tls_ca) == "/kvfabric/fabric-tls/ca.crt"
    pod = daemonset("ml", "pool-a", "uid-1", spec, IMAGE)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KVFABRIC_FABRIC_VALKEY"]["valueFrom"] == {"secretKeyRef": {"name": "valkey", "key": "url"}}
    assert env["KVFABRIC_FABRIC_ADVERTISE"]["value"] == "$(POD_IP):7451"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "fabric", "containerPort": 7451, "protocol": "TCP"} in container["ports"]
    assert {"name": "fabric-tls", "secret": {"secretName": "pool-tls", "defaultMode": 0o400}} in pod[
        "volumes"
    ]
    assert settings.fabric_peers_service == "kvfabric-pool-a-agents"  # peers: the Service's slices
    built = children("ml", "pool-a", "uid-1", spec, IMAGE)
    kinds = [c["kind"] for c in built]
    assert kinds == [
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Service",
        "NetworkPolicy",
    ]
    # the agents' token reads EndpointSlices and nothing else
    account, role, binding = built[1:4]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "kvfabric-pool-a-agent"
    assert pod["automountServiceAccountToken"] is True
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kvfabric-pool-a-agent", "namespace": "ml"}
    ]
    assert issued_tls_secret("ml", "pool-a", "uid-1", spec) is None  # the user's Secret (tlsSecret)
    policy = built[-1]["spec"]
    fabric_rule, metrics_rule = policy["ingress"]
    assert fabric_rule["from"] == [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]
    assert fabric_rule["ports"] == [{"protocol": "TCP", "port": 7451}]
    assert "from" not in metrics_rule  # scrapers anywhere still reach the metrics port
    # without remoteSharing: none of it
    assert [c["kind"] for c in children("ml", "pool-a", "uid-1", SPEC, IMAGE)] == [
        "ConfigMap",
        "DaemonSet",
        "Service",
    ]
    plain = daemonset("ml", "pool-a", "uid-1", SPEC, IMAGE)["spec"]["template"]["spec"]
    assert plain["automountServiceAccountToken"] is False and "serviceAccountName" not in plain
    assert "KVFABRIC_FABRIC_LISTEN" not in configmap("ml", "pool-a", "uid-1", SPEC)["data"]


def test_routing_publishes_kv_events_on_service_ports_and_names_agents_after_their_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = KVCachePoolSpec.model_validate(
        {
            "memory": {"size": "8Gi"},
            "routing": {"eventsPort": 6557, "replayPort": 6558},
            "remoteSharing": True,
            "fabric": {"valkeyURL": "valkey://v:6379/0"},
        }
    )
    data = configmap("ml", "pool-a", "uid-1", spec)["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    assert settings.kv_events_endpoint == "tcp://*:6557"  # bound: routers subscribe to the agents
    assert settings.kv_events_replay_endpoint == "tcp://*:6558"
    assert settings.kv_events_topic == "kv@{node}@{model}"
    built = {c["kind"]: c for c in children("ml", "pool-a", "uid-1", spec, IMAGE)}
    (container,) = built["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KVFABRIC_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert {"name": "kv-events", "containerPort": 6557, "protocol": "TCP"} in container["ports"]
    assert {"name": "kv-replay", "containerPort": 6558, "protocol": "TCP"} in container["ports"]
    service_ports = {port["name"]: port for port in built["Service"]["spec"]["ports"]}
    assert service_ports["kv-events"] == {
        "name": "kv-events",
        "port": 6557,
        "protocol": "TCP",
        "targetPort": "kv-events",
    }
    assert service_ports["kv-replay"]["port"] == 6558
    _, open_rule = built["NetworkPolicy"]["spec"]["ingress"]  # routers reach the event ports from anywhere
    assert [r["port"] for r in open_rule["ports"]] == [9400, 6557, 6558]
    # without routing: none of it
    assert "KVFABRIC_KV_EVENTS_ENDPOINT" not in configmap("ml", "pool-a", "uid-1", SPEC)["data"]
    assert [p["name"] for p in service("ml", "pool-a", "uid-1", SPEC)["spec"]["ports"]] == ["metrics"]
    # kvEvents off: lookups only (the metrics port), no event ports
    quiet = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "routing": {"kvEvents": False}})
    assert "KVFABRIC_KV_EVENTS_ENDPOINT" not in configmap("ml", "pool-a", "uid-1", quiet)["data"]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"routing": {}, "tenancy": "perNamespace"}, "shared tenancy"),
        ({"routing": {"eventsPort": 7000, "replayPort": 7000}}, "must differ"),
        ({"remoteSharing": True}, "needs fabric"),
        (
            {"remoteSharing": True, "fabric": {"valkeyURL": "valkey://v:6379/0"}, "tenancy": "perNamespace"},
            "shared tenancy",
        ),
        ({"fabric": {}}, "exactly one of valkeyURL, valkeySecret and valkey"),
        ({"fabric": {"valkeyURL": "valkey://v:6379/0", "valkey": {}}}, "exactly one of"),
        ({"fabric": {"valkeyURL": "redis://v"}}, "pattern"),
    ],
)
def test_remote_sharing_specs_that_cannot_work_are_refused(fields: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, **fields})


def test_a_sharing_pool_without_a_tls_secret_gets_operator_issued_certificates_of_its_own_ca(
    tmp_path: Path,
) -> None:
    spec = KVCachePoolSpec.model_validate(
        {"memory": {"size": "8Gi"}, "remoteSharing": True, "fabric": {"valkeyURL": "valkey://v:6379/0"}}
    )
    secret = issued_tls_secret("ml", "pool-a", "uid-1", spec)
    assert secret is not None and secret["metadata"]["name"] == "kvfabric-pool-a-fabric-tls"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # goes with the pool
    pod = daemonset("ml", "pool-a", "uid-1", spec, IMAGE)["spec"]["template"]["spec"]
    assert {
        "name": "fabric-tls",
        "secret": {"secretName": "kvfabric-pool-a-fabric-tls", "defaultMode": 0o400},
    } in pod["volumes"]
    files = {}
    for name, data in secret["data"].items():
        files[name] = tmp_path / name
        files[name].write_bytes(base64.b64decode(data))
    # what the agents do with them: each presents the certificate and checks the peer's against the CA
    tls = PeerTLS(str(files["tls.crt"]), str(files["tls.key"]), str(files["ca.crt"]))
    tls.server(), tls.client()
    other = issued_tls_secret("ml", "pool-b", "uid-2", spec)
    assert other is not None and other["data"]["ca.crt"] != secret["data"]["ca.crt"]  # a CA per pool
    off = spec.model_copy(update={"fabric": spec.fabric.model_copy(update={"issue_certificates": False})})  # type: ignore[union-attr]
    assert issued_tls_secret("ml", "pool-a", "uid-1", off) is None
    assert not any(
        v["name"] == "fabric-tls"
        for v in daemonset("ml", "pool-a", "uid-1", off, IMAGE)["spec"]["template"]["spec"]["volumes"]
    )


def test_a_pool_can_run_its_own_valkey_reachable_only_from_its_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from e2e.agent import free_port
    from e2e.valkey import valkey_binary

    spec = KVCachePoolSpec.model_validate(
        {"memory": {"size": "8Gi"}, "remoteSharing": True, "fabric": {"valkey": {"memory": "256Mi"}}}
    )
    built = {
        (c["kind"], c["metadata"]["name"]): c for c in children("ml", "pool-a", "uid-1", spec, IMAGE, "vk:1")
    }
    sts = built[("StatefulSet", "kvfabric-pool-a-valkey")]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "vk:1" and container["resources"]["limits"]["memory"] == str(256 << 20)
    assert sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "kvfabric-valkey"
    # the agents' Service does not select it: the Valkey pod is no peer
    agents = built[("Service", "kvfabric-pool-a-agents")]["spec"]["selector"]
    assert not set(agents.items()) <= set(sts["spec"]["template"]["metadata"]["labels"].items())
    policy = built[("NetworkPolicy", "kvfabric-pool-a-valkey")]["spec"]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": agents}}], "ports": [{"protocol": "TCP", "port": 6379}]}
    ]
    # the agents get its URL from the Secret the operator writes, never from the ConfigMap
    secret = valkey_password_secret("ml", "pool-a", "uid-1", spec)
    assert secret is not None
    url = secret["stringData"]["url"]
    assert url.startswith("valkey://:") and url.endswith("@kvfabric-pool-a-valkey.ml.svc:6379/0")
    assert "KVFABRIC_FABRIC_VALKEY" not in configmap("ml", "pool-a", "uid-1", spec)["data"]
    pod = built[("DaemonSet", "kvfabric-pool-a-agent")]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KVFABRIC_FABRIC_VALKEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "kvfabric-pool-a-valkey", "key": "url"}
    }
    assert valkey_password_secret("ml", "pool-a", "uid-1", SPEC) is None
    # the container's arguments start a real valkey-server, which takes the password and no other
    port = free_port()
    args = [a.replace("$(VALKEY_PASSWORD)", secret["stringData"]["password"]) for a in container["args"]]
    args[args.index("--port") + 1], args[args.index("--bind") + 1] = str(port), "127.0.0.1"
    args[args.index("--dir") + 1] = str(tmp_path)
    server = subprocess.Popen([valkey_binary(), *args], stdout=subprocess.DEVNULL)
    try:
        import valkey

        local = url.replace("kvfabric-pool-a-valkey.ml.svc:6379", f"127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while True:  # until it listens
            try:
                assert valkey.Valkey.from_url(local).ping()
                break
            except valkey.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with pytest.raises(valkey.AuthenticationError):
            valkey.Valkey.from_url(f"valkey://127.0.0.1:{port}/0").set("k", "v")
        assert valkey.Valkey.from_url(local).config_get("maxmemory")["maxmemory"] == str((256 << 20) * 4 // 5)
    finally:
        server.terminate()
        server.wait(10)
