"""What a KVCachePool turns into (pure builders; the real control plane tests come with issue 3)."""

import pytest

from kvfabric.agent.settings import AgentSettings
from kvfabric.operator.manifests import POOL_PATH, SOCKET_PATH, children, configmap, daemonset, spec_hash
from kvfabric.operator.spec import KVCachePoolSpec

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
    ds = daemonset("ml", "pool-a", "uid-1", SPEC)
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert paths == {"run": "/run/kvfabric/ml.pool-a", "shm": "/dev/shm/kvfabric/ml.pool-a"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["memory"] == str((8 << 30) + (512 << 20))
    assert "capabilities" not in container["securityContext"]
    assert ds["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kvfabric.io/v1alpha1",
        "kind": "KVCachePool",
        "name": "pool-a",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_rdma_adds_only_ipc_lock() -> None:
    spec = SPEC.model_copy(update={"rdma": SPEC.rdma.model_copy(update={"enabled": True})})
    (container,) = daemonset("ml", "p", "u", spec)["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["capabilities"] == {"add": ["IPC_LOCK"]}


def test_a_spec_change_rolls_the_agents() -> None:
    bigger = KVCachePoolSpec.model_validate({**SPEC.model_dump(by_alias=True), "memory": {"size": "16Gi"}})
    assert spec_hash(bigger) != spec_hash(SPEC)
    assert spec_hash(KVCachePoolSpec.model_validate(SPEC.model_dump(by_alias=True))) == spec_hash(SPEC)


def test_children_are_owned_and_named_per_pool() -> None:
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children("ml", "p", "u", SPEC)]
    assert kinds == [
        ("ConfigMap", "kvfabric-p-agent"),
        ("DaemonSet", "kvfabric-p-agent"),
        ("Service", "kvfabric-p-agents"),
    ]
    assert all(c["metadata"]["ownerReferences"][0]["uid"] == "u" for c in children("ml", "p", "u", SPEC))


def test_host_ipc_shares_the_nodes_ipc_namespace_for_gpu_pools_only() -> None:
    gpu = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "cuda": True, "hostIPC": True})
    assert daemonset("ml", "p", "u", gpu)["spec"]["template"]["spec"]["hostIPC"] is True
    assert "hostIPC" not in daemonset("ml", "p", "u", SPEC)["spec"]["template"]["spec"]
    with pytest.raises(ValueError, match="cuda: true"):
        KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "hostIPC": True})
