"""Pod mutation for the admission webhook: wires an annotated vLLM pod to its node's agent.

A pod annotated ``kvfabric.io/pool: <pool>`` (a pool of its namespace) or ``<namespace>/<pool>``
(a ``perNamespace`` pool serving several namespaces) gets, in its vLLM container: the pool's
socket and shared-memory host directories (at the paths the agent uses), ``KVFABRIC_SOCKET_PATH``,
and ``--kv-transfer-config`` with the connector line. With ``perNamespace`` tenancy it gets
instead only its own namespace's socket directory (the agent puts every session that comes
through it in that tenant, and hands the tenant's pool file over the socket), plus
``KVFABRIC_TENANT``. The container is the one named by ``kvfabric.io/container``, else the one
named ``vllm``, else the only one. The pod also gets the pool's node selector and tolerations,
so it is scheduled only where the pool's agents run. Injection is recorded in
``kvfabric.io/injected`` so a re-admitted pod is not injected twice; a pod that cannot be
injected correctly is admitted unchanged except for a ``kvfabric.io/skipped`` annotation saying
why (never half-injected, never made invalid):

- its vLLM runs through a shell (``command: [sh, -c, ...]``): arguments appended there would
  become the shell's ``$0 $1`` and be dropped;
- it already has a ``--kv-transfer-config`` for another connector (left as the user wrote it;
  one naming ``KVFabricConnector`` is kept and the rest is injected);
- a volume or mount it has collides with the ones injected;
- its own node selector contradicts the pool's.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kvfabric.operator.manifests import (
    RUN_DIR,
    SHM_DIR,
    SOCKET_PATH,
    chown_init,
    host_dirs,
    tenant_host_dir,
)
from kvfabric.operator.spec import KVCachePoolSpec

POOL_ANNOTATION = "kvfabric.io/pool"
CONTAINER_ANNOTATION = "kvfabric.io/container"
INJECTED_ANNOTATION = "kvfabric.io/injected"
SKIPPED_ANNOTATION = "kvfabric.io/skipped"
CONNECTOR_LINE = json.dumps(
    {
        "kv_connector": "KVFabricConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "kvfabric.connector",
    },
    separators=(",", ":"),
)
Body = dict[str, Any]


def _pick_container(pod: Body) -> tuple[Body | None, str]:
    containers = pod.get("spec", {}).get("containers", [])
    wanted = pod.get("metadata", {}).get("annotations", {}).get(CONTAINER_ANNOTATION)
    if wanted:
        for c in containers:
            if c.get("name") == wanted:
                return c, ""
        return None, f"no container named {wanted!r} (annotation {CONTAINER_ANNOTATION})"
    for c in containers:
        if c.get("name") == "vllm":
            return c, ""
    if len(containers) == 1:
        return containers[0], ""
    return None, f"{len(containers)} containers and none named 'vllm'; set {CONTAINER_ANNOTATION}"


SHELLS = {"sh", "bash", "dash", "ash", "zsh"}
VOLUMES = ("kvfabric-run", "kvfabric-shm")


def _transfer_config(argv: list[str]) -> str | None:
    """The value of ``--kv-transfer-config`` in ``argv`` (None when absent)."""
    for i, a in enumerate(argv):
        if a == "--kv-transfer-config":
            return argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith("--kv-transfer-config="):
            return a.split("=", 1)[1]
    return None


def _argv(container: Body) -> list[str]:
    return [str(c) for c in container.get("command") or []] + [str(a) for a in container.get("args") or []]


def _command_problem(container: Body) -> str:
    """Why the connector line cannot be appended to the container's arguments ("" if it can)."""
    argv = _argv(container)
    existing = _transfer_config(argv)
    if existing is not None:
        if "KVFabricConnector" in existing:
            return ""  # the user's own line for our connector (e.g. with extra config): kept
        return "it already sets --kv-transfer-config for another connector; left as written"
    if argv and argv[0].rsplit("/", 1)[-1] in SHELLS and "-c" in argv[1:]:
        return (
            "its command runs a shell (sh -c): appended arguments would be dropped; add the "
            "connector line to the script yourself or run vLLM without a shell"
        )
    return ""


def _collision(pod: Body, container: Body) -> str:
    names = {v.get("name") for v in pod.get("spec", {}).get("volumes") or []}
    paths = {m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts") or []}
    taken = sorted(n for n in VOLUMES if n in names) + sorted(p for p in (RUN_DIR, SHM_DIR) if p in paths)
    return f"its volumes or mounts already use {', '.join(taken)}" if taken else ""


def _place(pod_spec: Body, spec: KVCachePoolSpec) -> str:
    """Adds the pool's node selector and tolerations; why not, if the pod's own selector disagrees."""
    selector = pod_spec.setdefault("nodeSelector", {})
    clash = sorted(k for k, v in spec.node_selector.items() if k in selector and selector[k] != v)
    if clash:
        return f"its nodeSelector contradicts the pool's on {', '.join(clash)}: it would run without an agent"
    selector.update(spec.node_selector)
    if not selector:
        pod_spec.pop("nodeSelector")
    tolerations = pod_spec.setdefault("tolerations", [])
    for t in spec.tolerations:
        wanted = t.model_dump(by_alias=True, exclude_none=True)
        if wanted not in tolerations:
            tolerations.append(wanted)
    if not tolerations:
        pod_spec.pop("tolerations")
    return ""


def pool_ref(annotation: str, namespace: str) -> tuple[str, str]:
    """(namespace, name) of the pool a pod names: ``<pool>`` in its own namespace, or
    ``<namespace>/<pool>`` (a ``perNamespace`` pool that serves several namespaces)."""
    ns, _, name = annotation.rpartition("/")
    return (ns or namespace), name


TENANT_DIR_INIT = "kvfabric-tenant-dir"


def tenant_dir_init(image: str) -> Body:
    """Gives the pod's tenant socket directory to the agent's user: the kubelet creates it
    root-owned when the engine pod comes first, and the non-root agent could not serve in it."""
    return chown_init(TENANT_DIR_INIT, image, [{"name": "kvfabric-run", "mountPath": RUN_DIR}])


def mutate(
    pod: Body, namespace: str, spec: KVCachePoolSpec | None, unreadable: str = "", agent_image: str = ""
) -> tuple[Body, str]:
    """Returns (the pod to admit, why it was skipped or ""). Never raises for a bad pod.
    ``spec`` None: the pool does not exist, or ``unreadable`` says why it could not be read.
    ``agent_image``: the operator's agent image (for ``perNamespace`` pools' init container)."""
    out = copy.deepcopy(pod)
    annotations = out.setdefault("metadata", {}).setdefault("annotations", {})
    ref = annotations.get(POOL_ANNOTATION)
    if not ref:
        return pod, ""  # not ours: untouched
    if annotations.get(INJECTED_ANNOTATION) == ref:
        return pod, ""  # already injected (re-admission)
    pool_ns, pool = pool_ref(ref, namespace)
    if spec is None:
        problem = f"could not be used: {unreadable[:200]}" if unreadable else "not found"
        annotations[SKIPPED_ANNOTATION] = f"KVCachePool {pool_ns}/{pool} {problem}"
        return out, annotations[SKIPPED_ANNOTATION]
    if pool_ns != namespace and spec.tenancy != "perNamespace":
        annotations[SKIPPED_ANNOTATION] = (
            f"KVCachePool {pool_ns}/{pool} serves only its own namespace (tenancy: shared); "
            "a pool shared across namespaces needs tenancy: perNamespace"
        )
        return out, annotations[SKIPPED_ANNOTATION]
    container, why = _pick_container(out)
    why = why or _command_problem(container or {}) or _collision(out, container or {})
    why = why or _place(out.setdefault("spec", {}), spec)
    if container is None or why:
        skipped = copy.deepcopy(pod)  # unchanged but for the annotation (no half injection)
        skipped.setdefault("metadata", {}).setdefault("annotations", {})[SKIPPED_ANNOTATION] = why
        return skipped, why
    run_dir, shm_dir = host_dirs(pool_ns, pool)
    volumes = out["spec"].setdefault("volumes", [])
    mounts = container.setdefault("volumeMounts", [])
    if spec.tenancy == "perNamespace":  # its own tenant's socket, and no shared memory
        tenant_dir = tenant_host_dir(pool_ns, pool, namespace)
        volumes.append(
            {"name": "kvfabric-run", "hostPath": {"path": tenant_dir, "type": "DirectoryOrCreate"}}
        )
        mounts.append({"name": "kvfabric-run", "mountPath": RUN_DIR})
        image = spec.image or agent_image
        if image:
            out["spec"].setdefault("initContainers", []).insert(0, tenant_dir_init(image))
    else:
        volumes += [
            {"name": "kvfabric-run", "hostPath": {"path": run_dir, "type": "DirectoryOrCreate"}},
            {"name": "kvfabric-shm", "hostPath": {"path": shm_dir, "type": "DirectoryOrCreate"}},
        ]
        mounts += [
            {"name": "kvfabric-run", "mountPath": RUN_DIR},
            {"name": "kvfabric-shm", "mountPath": SHM_DIR},
        ]
    env = container.setdefault("env", [])
    env.append({"name": "KVFABRIC_SOCKET_PATH", "value": SOCKET_PATH})
    if spec.tenancy == "perNamespace":
        env.append({"name": "KVFABRIC_TENANT", "value": namespace})
    if spec.host_ipc:  # the agent's pods share it too: CUDA IPC events need one /dev/shm
        out["spec"]["hostIPC"] = True
    if _transfer_config(_argv(container)) is None:
        container.setdefault("args", []).extend(["--kv-transfer-config", CONNECTOR_LINE])
    annotations[INJECTED_ANNOTATION] = ref
    annotations.pop(SKIPPED_ANNOTATION, None)
    return out, ""


def json_patch(old: Body, new: Body) -> list[Body]:
    """RFC 6902 operations turning ``old`` into ``new`` (whole ``metadata.annotations`` and
    ``spec`` replaced: simple and exact for the webhook's response)."""
    ops: list[Body] = []
    if old.get("metadata", {}).get("annotations") != new["metadata"]["annotations"]:
        op = "replace" if "annotations" in old.get("metadata", {}) else "add"
        ops.append({"op": op, "path": "/metadata/annotations", "value": new["metadata"]["annotations"]})
    if old.get("spec") != new.get("spec"):
        ops.append({"op": "replace", "path": "/spec", "value": new["spec"]})
    return ops
