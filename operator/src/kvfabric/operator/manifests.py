"""Builds the objects a ``KVCachePool`` owns: agent settings ConfigMap, DaemonSet, headless Service.

Pure functions from the pool to Kubernetes bodies (plain dicts), so they are unit-tested without
a cluster. The agent's settings come from the agent's own settings model
(:class:`kvfabric.agent.settings.AgentSettings`): one source of truth.

Host paths shared by the agent and the engines of one pool (mounted at the same paths in both,
because the agent tells engines where its pool file is):

- ``/run/kvfabric/<namespace>.<pool>`` -> ``/kvfabric/run`` (the agent's socket);
- ``/dev/shm/kvfabric/<namespace>.<pool>`` -> ``/kvfabric/shm`` (the pool file).

With ``tenancy: perNamespace`` the agent serves one socket per Kubernetes namespace, at
``/run/kvfabric/<namespace>.<pool>/tenants/<pod namespace>/agent.sock``; an engine pod mounts
only its own namespace's directory there (at ``/kvfabric/run``), gets its tenant's pool file by
descriptor passing and mounts no shared memory at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kvfabric.agent.settings import AgentSettings, parse_bytes
from kvfabric.operator.spec import GROUP, KIND, VERSION, KVCachePoolSpec

RUN_DIR = "/kvfabric/run"
SHM_DIR = "/kvfabric/shm"
SOCKET_PATH = f"{RUN_DIR}/agent.sock"
POOL_PATH = f"{SHM_DIR}/pool"
METRICS_PORT = 9400
Body = dict[str, Any]


TENANTS_DIR = f"{RUN_DIR}/tenants"


def host_dirs(namespace: str, name: str) -> tuple[str, str]:
    """(socket dir, shm dir) on the host for one pool."""
    return f"/run/kvfabric/{namespace}.{name}", f"/dev/shm/kvfabric/{namespace}.{name}"


def tenant_host_dir(namespace: str, name: str, tenant: str) -> str:
    """The host directory of one tenant's socket (``perNamespace`` tenancy)."""
    return f"{host_dirs(namespace, name)[0]}/tenants/{tenant}"


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvfabric-agent", "kvfabric.io/pool": name}


def owner_reference(name: str, uid: str) -> Body:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def agent_settings(spec: KVCachePoolSpec) -> AgentSettings:
    return AgentSettings(
        pool_size=parse_bytes(spec.memory.size),
        pool_path=Path(POOL_PATH),
        huge_pages=spec.memory.huge_pages,
        cuda=spec.cuda,
        socket=Path(SOCKET_PATH),
        tenancy="isolated" if spec.tenancy == "perNamespace" else "shared",
        tenant_socket_dir=Path(TENANTS_DIR) if spec.tenancy == "perNamespace" else None,
        http_host="0.0.0.0",  # the pod network: scraped through the headless Service
        http_port=METRICS_PORT,
        log_format="json",
    )


def _meta(namespace: str, name: str, uid: str, suffix: str) -> Body:
    return {
        "name": f"kvfabric-{name}{suffix}",
        "namespace": namespace,
        "labels": labels(name),
        "ownerReferences": [owner_reference(name, uid)],
    }


def configmap(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(namespace, name, uid, "-agent"),
        "data": agent_settings(spec).to_env(),
    }


def spec_hash(spec: KVCachePoolSpec) -> str:
    """Changes with every spec change; put on the pod template, it rolls the agents."""
    canonical = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def daemonset(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body:
    run_dir, shm_dir = host_dirs(namespace, name)
    pool_bytes = parse_bytes(spec.memory.size)
    memory = pool_bytes + parse_bytes(spec.resources.memory_overhead)  # the pool is charged to the agent
    container: Body = {
        "name": "agent",
        "image": spec.image,
        "args": [],
        "envFrom": [{"configMapRef": {"name": f"kvfabric-{name}-agent"}}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": spec.resources.cpu, "memory": str(memory)},
            "limits": {"cpu": spec.resources.cpu, "memory": str(memory)},
        },
        "volumeMounts": [
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "shm", "mountPath": SHM_DIR},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }
    if spec.rdma.enabled:  # pinning memory for RDMA registration needs IPC_LOCK, nothing more
        container["securityContext"]["capabilities"] = {"add": ["IPC_LOCK"]}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(namespace, name, uid, "-agent"),
        "spec": {
            "selector": {"matchLabels": labels(name)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {"kvfabric.io/spec-hash": spec_hash(spec)},
                },
                "spec": {
                    **({"hostIPC": True} if spec.host_ipc else {}),
                    "nodeSelector": dict(spec.node_selector),
                    "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations],
                    "containers": [container],
                    "volumes": [
                        {"name": "run", "hostPath": {"path": run_dir, "type": "DirectoryOrCreate"}},
                        {"name": "shm", "hostPath": {"path": shm_dir, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }


def service(namespace: str, name: str, uid: str) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(namespace, name, uid, "-agents"),
        "spec": {
            "clusterIP": "None",
            "selector": labels(name),
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def children(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> list[Body]:
    """Everything the operator applies for one pool, in apply order."""
    return [
        configmap(namespace, name, uid, spec),
        daemonset(namespace, name, uid, spec),
        service(namespace, name, uid),
    ]
