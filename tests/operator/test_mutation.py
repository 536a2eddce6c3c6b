"""Pod mutation (pure): what the webhook injects, and when it leaves a pod alone."""

import json
from typing import Any

from kvfabric.operator.mutation import (
    CONNECTOR_LINE,
    INJECTED_ANNOTATION,
    SKIPPED_ANNOTATION,
    json_patch,
    mutate,
)
from kvfabric.operator.spec import KVCachePoolSpec

SPEC = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}})


def pod(annotations: dict[str, str] | None = None, names: tuple[str, ...] = ("vllm",)) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "annotations": dict(annotations or {})},
        "spec": {
            "containers": [{"name": n, "image": "vllm/vllm-openai", "args": ["--model", "m"]} for n in names]
        },
    }


def test_unannotated_pod_is_untouched() -> None:
    p = pod()
    assert mutate(p, "ml", SPEC) == (p, "")


def test_annotated_pod_gets_mounts_env_and_the_connector_line_once() -> None:
    out, why = mutate(pod({"kvfabric.io/pool": "default"}, ("sidecar", "vllm")), "ml", SPEC)
    assert why == ""
    sidecar, vllm = out["spec"]["containers"]
    assert "volumeMounts" not in sidecar
    assert {m["mountPath"] for m in vllm["volumeMounts"]} == {"/kvfabric/run", "/kvfabric/shm"}
    assert {"name": "KVFABRIC_SOCKET_PATH", "value": "/kvfabric/run/agent.sock"} in vllm["env"]
    assert vllm["args"][-2:] == ["--kv-transfer-config", CONNECTOR_LINE]
    assert json.loads(CONNECTOR_LINE)["kv_connector_module_path"] == "kvfabric.connector"
    paths = {v["hostPath"]["path"] for v in out["spec"]["volumes"]}
    assert paths == {"/run/kvfabric/ml.default", "/dev/shm/kvfabric/ml.default"}
    assert out["metadata"]["annotations"][INJECTED_ANNOTATION] == "default"
    again, _ = mutate(out, "ml", SPEC)
    assert again == out  # idempotent


def test_per_namespace_tenancy_mounts_only_the_pods_own_tenant_socket() -> None:
    spec = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "tenancy": "perNamespace"})
    out, why = mutate(pod({"kvfabric.io/pool": "infra/shared"}), "team-a", spec)
    assert why == ""
    assert {"name": "KVFABRIC_TENANT", "value": "team-a"} in out["spec"]["containers"][0]["env"]
    paths = [v["hostPath"]["path"] for v in out["spec"]["volumes"]]
    # its own tenant's socket directory of the pool in "infra", and no shared memory
    assert paths == ["/run/kvfabric/infra.shared/tenants/team-a"]
    assert [m["mountPath"] for m in out["spec"]["containers"][0]["volumeMounts"]] == ["/kvfabric/run"]
    assert "initContainers" not in out["spec"]  # without the operator's agent image: none
    # the tenant directory is the kubelet's (root) when the engine comes first: an init container
    # with CAP_CHOWN only gives it to the agent's user
    with_init, _ = mutate(
        pod({"kvfabric.io/pool": "infra/shared"}), "team-a", spec, agent_image="kvfabric/agent:1"
    )
    (init,) = with_init["spec"]["initContainers"]
    assert init["image"] == "kvfabric/agent:1" and init["command"] == [
        "chown",
        "65532:65532",
        "/kvfabric/run",
    ]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["volumeMounts"] == [{"name": "kvfabric-run", "mountPath": "/kvfabric/run"}]
    shared, _ = mutate(pod({"kvfabric.io/pool": "d"}), "ml", SPEC, agent_image="kvfabric/agent:1")
    assert "initContainers" not in shared["spec"]  # shared pools: the agent's own init container did it
    other, _ = mutate(pod({"kvfabric.io/pool": "infra/shared"}), "team-b", spec)
    assert [v["hostPath"]["path"] for v in other["spec"]["volumes"]] == [
        "/run/kvfabric/infra.shared/tenants/team-b"
    ]


def test_a_shared_pool_serves_only_its_own_namespace() -> None:
    out, why = mutate(pod({"kvfabric.io/pool": "infra/default"}), "team-a", SPEC)
    assert "tenancy: perNamespace" in why and out["spec"] == pod()["spec"]


def test_container_annotation_and_unsupported_pods() -> None:
    out, _ = mutate(pod({"kvfabric.io/pool": "d", "kvfabric.io/container": "b"}, ("a", "b")), "ml", SPEC)
    assert "env" in out["spec"]["containers"][1] and "env" not in out["spec"]["containers"][0]
    out, why = mutate(pod({"kvfabric.io/pool": "d"}, ("a", "b")), "ml", SPEC)
    assert "none named 'vllm'" in why and out["metadata"]["annotations"][SKIPPED_ANNOTATION] == why
    assert out["spec"] == pod(names=("a", "b"))["spec"]  # spec unchanged
    out, why = mutate(pod({"kvfabric.io/pool": "missing"}), "ml", None)
    assert "not found" in why and out["spec"] == pod()["spec"]


def test_existing_kv_transfer_config_is_kept() -> None:
    ours = '{"kv_connector":"KVFabricConnector","kv_role":"kv_both","kv_connector_extra_config":{}}'
    p = pod({"kvfabric.io/pool": "d"})
    p["spec"]["containers"][0]["args"].append(f"--kv-transfer-config={ours}")
    out, why = mutate(p, "ml", SPEC)
    assert why == "" and out["spec"]["containers"][0]["args"] == [
        "--model",
        "m",
        f"--kv-transfer-config={ours}",
    ]
    assert "volumeMounts" in out["spec"]["containers"][0]  # the rest is injected
    # another connector's line, in command: the pod is left as written, and says why
    nixl = pod({"kvfabric.io/pool": "d"})
    nixl["spec"]["containers"][0]["command"] = [
        "vllm",
        "serve",
        "--kv-transfer-config",
        '{"kv_connector":"NixlConnector"}',
    ]
    out, why = mutate(nixl, "ml", SPEC)
    assert "another connector" in why and out["spec"] == nixl["spec"]


def test_a_shell_command_is_refused_not_half_injected() -> None:
    p = pod({"kvfabric.io/pool": "d"})
    p["spec"]["containers"][0]["command"] = ["/bin/sh", "-c", "vllm serve m"]
    p["spec"]["containers"][0].pop("args")
    out, why = mutate(p, "ml", SPEC)
    assert "shell" in why and out["spec"] == p["spec"]
    assert out["metadata"]["annotations"][SKIPPED_ANNOTATION] == why
    assert INJECTED_ANNOTATION not in out["metadata"]["annotations"]
    # a plain command (no shell) takes the line in args, which follow it
    plain = pod({"kvfabric.io/pool": "d"})
    plain["spec"]["containers"][0]["command"] = ["vllm", "serve"]
    out, why = mutate(plain, "ml", SPEC)
    assert why == "" and out["spec"]["containers"][0]["args"][-2] == "--kv-transfer-config"


def test_colliding_volumes_or_mounts_are_refused_rather_than_made_invalid() -> None:
    p = pod({"kvfabric.io/pool": "d"})
    p["spec"]["volumes"] = [{"name": "kvfabric-run", "emptyDir": {}}]
    out, why = mutate(p, "ml", SPEC)
    assert "kvfabric-run" in why and out["spec"] == p["spec"]
    m = pod({"kvfabric.io/pool": "d"})
    m["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/kvfabric/shm/"}]
    out, why = mutate(m, "ml", SPEC)
    assert "/kvfabric/shm" in why and out["spec"] == m["spec"]


def test_engines_are_placed_where_the_pools_agents_run() -> None:
    spec = KVCachePoolSpec.model_validate(
        {
            "memory": {"size": "8Gi"},
            "nodeSelector": {"kvfabric.io/node": "true"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    p = pod({"kvfabric.io/pool": "d"})
    p["spec"]["nodeSelector"] = {"zone": "a"}
    out, why = mutate(p, "ml", spec)
    assert why == "" and out["spec"]["nodeSelector"] == {"zone": "a", "kvfabric.io/node": "true"}
    assert out["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    again, _ = mutate({**out, "metadata": {"annotations": {"kvfabric.io/pool": "d"}}}, "ml", spec)
    assert again["spec"]["tolerations"] == out["spec"]["tolerations"]  # not added twice
    clash = pod({"kvfabric.io/pool": "d"})
    clash["spec"]["nodeSelector"] = {"kvfabric.io/node": "false"}
    out, why = mutate(clash, "ml", spec)
    assert "contradicts" in why and out["spec"] == clash["spec"]
    plain, _ = mutate(pod({"kvfabric.io/pool": "d"}), "ml", SPEC)
    assert "nodeSelector" not in plain["spec"] and "tolerations" not in plain["spec"]


def test_json_patch_reproduces_the_mutation() -> None:
    old = pod({"kvfabric.io/pool": "d"})
    new, _ = mutate(old, "ml", SPEC)
    ops = json_patch(old, new)
    assert [o["path"] for o in ops] == ["/metadata/annotations", "/spec"]
    assert ops[1]["value"] == new["spec"]
    assert json_patch(new, new) == []


def test_admission_review_uses_the_request_namespace_and_always_allows() -> None:
    import base64

    from kvfabric.operator.webhook import configuration, review, skip_event

    seen = []

    def lookup(ns: str, name: str) -> KVCachePoolSpec | None:
        seen.append((ns, name))
        return SPEC

    p = pod({"kvfabric.io/pool": "default"})  # no metadata.namespace: created by a controller
    out, why = review(
        {"apiVersion": "admission.k8s.io/v1", "request": {"uid": "u1", "namespace": "ml", "object": p}},
        lookup,
    )
    r = out["response"]
    assert why == ""
    assert seen == [("ml", "default")] and r["uid"] == "u1" and r["allowed"] and r["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(r["patch"]))
    assert ops == json_patch(p, mutate(p, "ml", SPEC)[0])

    def broken(ns: str, name: str) -> KVCachePoolSpec | None:
        raise ConnectionError("apiserver unreachable")

    out, why = review({"request": {"uid": "u2", "namespace": "ml", "object": p}}, broken)
    r = out["response"]
    assert why == "KVCachePool ml/default could not be used: apiserver unreachable"
    assert r["allowed"] and json.loads(base64.b64decode(r["patch"]))[0]["value"]["kvfabric.io/skipped"] == why
    out, why = review({"request": {"uid": "u2b", "namespace": "ml", "object": p}}, lambda ns, name: None)
    assert why == "KVCachePool ml/default not found"
    assert "patch" not in review({"request": {"uid": "u3", "object": pod()}}, lookup)[0]["response"]
    hook = configuration({"url": "https://x"})["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore"
    assert "kube-system" in hook["namespaceSelector"]["matchExpressions"][0]["values"]
    event = skip_event("ml", {"metadata": {"generateName": "vllm-abc-"}}, "why")
    assert event["involvedObject"]["name"] == "vllm-abc-" and event["type"] == "Warning"


def test_host_ipc_pools_give_engine_pods_the_nodes_ipc_namespace() -> None:
    spec = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}, "cuda": True, "hostIPC": True})
    out, _ = mutate(pod({"kvfabric.io/pool": "gpu"}), "ml", spec)
    assert out["spec"]["hostIPC"] is True
    plain, _ = mutate(pod({"kvfabric.io/pool": "default"}), "ml", SPEC)
    assert "hostIPC" not in plain["spec"]
