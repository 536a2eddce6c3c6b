"""Builds the objects a ``KVCachePool`` owns: agent settings ConfigMap, DaemonSet, headless Service.

Pure functions from the pool to Kubernetes bodies (plain dicts), so they are unit-tested without
a cluster. The agent's settings come from the agent's own settings model
(:class:`kvfabric.agent.settings.AgentSettings`): one source of truth.

Host paths shared by the agent and the engines of one pool (mounted at the same paths in both,
because the agent tells engines where its pool file is):

- ``/run/kvfabric/<namespace>.<pool>`` -> ``/kvfabric/run`` (the agent's socket);
- ``/dev/shm/kvfabric/<namespace>.<pool>`` -> ``/kvfabric/shm`` (the pool file);
- with ``spec.nvme``: ``<nvme.path>/<namespace>.<pool>`` -> ``/kvfabric/nvme`` (the agent's only).

With ``tenancy: perNamespace`` the agent serves one socket per Kubernetes namespace, at
``/run/kvfabric/<namespace>.<pool>/tenants/<pod namespace>/agent.sock``; an engine pod mounts
only its own namespace's directory there (at ``/kvfabric/run``), gets its tenant's pool file by
descriptor passing and mounts no shared memory at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvfabric.agent.settings import AgentSettings, parse_bytes
from kvfabric.operator import __version__
from kvfabric.operator.certs import pool_certificates
from kvfabric.operator.spec import GROUP, KIND, VERSION, KVCachePoolSpec

#: The Valkey image of pools that deploy one without naming an image (the operator's setting
#: overrides it): built by scripts/k8s/build-images.sh valkey.
DEFAULT_VALKEY_IMAGE = f"kvfabric/valkey:{__version__}"
RUN_DIR = "/kvfabric/run"
SHM_DIR = "/kvfabric/shm"
SOCKET_PATH = f"{RUN_DIR}/agent.sock"
POOL_PATH = f"{SHM_DIR}/pool"
NVME_DIR = "/kvfabric/nvme"
FABRIC_TLS_DIR = "/kvfabric/fabric-tls"
METRICS_PORT = 9400
AGENT_UID = 65532  # the agent image's user (images/agent.Dockerfile, scripts/k8s/build-images.sh)
# The longest pool name whose children's names stay valid: "kvfabric-<name>-agents" is a Service
# name (a DNS-1035 label, at most 63 characters) and the name is a label value (at most 63).
MAX_POOL_NAME = 63 - len("kvfabric--agents")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A CPU pool is written once at start (fallocate, about 4 GB/s per core measured) and a CUDA pool
# pinned (cudaHostRegister, slower): the startup probe allows this long per GiB, plus a minute.
STARTUP_SECONDS_PER_GIB = 2
GPU_RUNTIME_CLASS = "nvidia"
Body = dict[str, Any]


TENANTS_DIR = f"{RUN_DIR}/tenants"


def host_dirs(namespace: str, name: str) -> tuple[str, str]:
    """(socket dir, shm dir) on the host for one pool."""
    return f"/run/kvfabric/{namespace}.{name}", f"/dev/shm/kvfabric/{namespace}.{name}"


def nvme_host_dir(namespace: str, name: str, spec: KVCachePoolSpec) -> str | None:
    """The host directory of the pool's NVMe tier (one per pool: two pools never share one)."""
    return f"{spec.nvme.path.rstrip('/')}/{namespace}.{name}" if spec.nvme is not None else None


def tenant_host_dir(namespace: str, name: str, tenant: str) -> str:
    """The host directory of one tenant's socket (``perNamespace`` tenancy)."""
    return f"{host_dirs(namespace, name)[0]}/tenants/{tenant}"


def invalid_name(name: str) -> str:
    """Why a pool name cannot name its children ("" when it can)."""
    if len(name) > MAX_POOL_NAME:
        return f"pool name {name!r} is longer than {MAX_POOL_NAME} characters (its Service would be invalid)"
    if not _DNS_LABEL.match(name):
        return (
            f"pool name {name!r} must be a DNS label (lower-case letters, digits and '-', starting "
            "with a letter, no dots): it names the agents' Service"
        )
    return ""


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


def sharing(spec: KVCachePoolSpec) -> bool:
    return spec.remote_sharing and spec.fabric is not None


def events(spec: KVCachePoolSpec) -> bool:
    return spec.routing is not None and spec.routing.kv_events


def agent_settings(spec: KVCachePoolSpec, namespace: str = "default", name: str = "default") -> AgentSettings:
    """The agents' settings of the pool ``name`` in ``namespace``."""
    fabric = spec.fabric if sharing(spec) else None
    routing = spec.routing if events(spec) else None
    tls = fabric is not None and fabric.tls_secret_name(name) is not None
    return AgentSettings(
        pool_size=parse_bytes(spec.memory.size),
        pool_path=Path(POOL_PATH),
        huge_pages=spec.memory.huge_pages,
        cuda=spec.cuda,
        socket=Path(SOCKET_PATH),
        tenancy="isolated" if spec.tenancy == "perNamespace" else "shared",
        tenant_socket_dir=Path(TENANTS_DIR) if spec.tenancy == "perNamespace" else None,
        nvme_path=Path(NVME_DIR) if spec.nvme is not None else None,
        nvme_size=parse_bytes(spec.nvme.size) if spec.nvme is not None else None,
        http_host="0.0.0.0",  # the pod network: scraped through the headless Service
        http_port=METRICS_PORT,
        log_format="json",
        # A Valkey URL from a Secret reaches the agent as an env var of its own (see daemonset).
        fabric_valkey=(fabric.valkey_url or "valkey://from-secret") if fabric is not None else None,
        fabric_listen=f"0.0.0.0:{fabric.port}" if fabric is not None else None,
        fabric_pool=f"{namespace}.{name}",
        # peers only from the agents' own Service (read with the agents' service account)
        fabric_peers_service=service_name(name) if fabric is not None else None,
        fabric_tls_cert=Path(f"{FABRIC_TLS_DIR}/tls.crt") if tls else None,
        fabric_tls_key=Path(f"{FABRIC_TLS_DIR}/tls.key") if tls else None,
        fabric_tls_ca=Path(f"{FABRIC_TLS_DIR}/ca.crt") if tls else None,
        # RDMA: NIXL over UCX's RDMA transports where a port is active (auto), TCP streams where not
        fabric_ucx_tls=spec.rdma.ucx_tls if spec.rdma.enabled else "tcp",
        kv_events_endpoint=f"tcp://*:{routing.events_port}" if routing is not None else None,
        kv_events_replay_endpoint=f"tcp://*:{routing.replay_port}" if routing is not None else None,
        kv_events_topic=routing.topic if routing is not None else "kv@{node}@{model}",
    )


def _meta(namespace: str, name: str, uid: str, suffix: str) -> Body:
    return {
        "name": f"kvfabric-{name}{suffix}",
        "namespace": namespace,
        "labels": labels(name),
        "ownerReferences": [owner_reference(name, uid)],
    }


def valkey_url_secret(spec: KVCachePoolSpec, name: str) -> Body | None:
    """The Secret key the agents' Valkey URL comes from (credentials stay out of ConfigMaps):
    the user's, or the one the operator writes for a Valkey it runs; None: a plain valkeyURL."""
    f = spec.fabric
    if f is None:
        return None
    if f.valkey is not None:
        return {"name": valkey_name(name), "key": "url"}
    if f.valkey_secret is not None:
        return {"name": f.valkey_secret.name, "key": f.valkey_secret.key}
    return None


def service_name(name: str) -> str:
    """The agents' headless Service (:func:`service`)."""
    return f"kvfabric-{name}-agents"


def configmap(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(namespace, name, uid, "-agent"),
        "data": {
            k: v
            for k, v in agent_settings(spec, namespace, name).to_env().items()
            # from its Secret (the daemonset's env), never in a ConfigMap
            if not (k == "KVFABRIC_FABRIC_VALKEY" and valkey_url_secret(spec, name) is not None)
        },
    }


def spec_hash(spec: KVCachePoolSpec) -> str:
    """Changes with every spec change; put on the pod template, it rolls the agents."""
    canonical = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def startup_probe(spec: KVCachePoolSpec) -> Body:
    """Liveness waits this long for the pool to be written or pinned (a 500 GiB pool is not
    killed at 30 s and crash-looped)."""
    gib = math.ceil(parse_bytes(spec.memory.size) / (1 << 30))
    period = 5
    return {
        "httpGet": {"path": "/healthz", "port": "metrics"},
        "periodSeconds": period,
        "failureThreshold": math.ceil((60 + STARTUP_SECONDS_PER_GIB * gib) / period),
    }


def chown_init(name: str, image: str, mounts: list[Body]) -> Body:
    """An init container that gives host directories (mounted at ``mounts``) to the agent's
    user: the kubelet creates ``DirectoryOrCreate`` paths as root 0755, where a non-root agent
    cannot write. chown only (``CAP_CHOWN``): idempotent for directories it already owns."""
    return {
        "name": name,
        "image": image,
        "command": ["chown", f"{AGENT_UID}:{AGENT_UID}", *(m["mountPath"] for m in mounts)],
        "volumeMounts": mounts,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }


def prepare_dirs(image: str, nvme: bool = False) -> Body:
    """The agent pod's init container for its socket, shm and NVMe tier directories."""
    mounts = [{"name": "run", "mountPath": RUN_DIR}, {"name": "shm", "mountPath": SHM_DIR}]
    if nvme:
        mounts.append({"name": "nvme", "mountPath": NVME_DIR})
    return chown_init("prepare-dirs", image, mounts)


def restricted_container(capabilities: Body) -> Body:
    """A container's security context: the image's non-root user, read-only root, no escalation."""
    return {
        "runAsUser": AGENT_UID,
        "runAsGroup": AGENT_UID,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": capabilities,
    }


def daemonset(namespace: str, name: str, uid: str, spec: KVCachePoolSpec, agent_image: str) -> Body:
    """``agent_image``: the operator's agent image, used unless the pool pins ``spec.image``."""
    run_dir, shm_dir = host_dirs(namespace, name)
    image = spec.image or agent_image
    pool_bytes = parse_bytes(spec.memory.size)
    memory = pool_bytes + parse_bytes(spec.resources.memory_overhead)  # the pool is charged to the agent
    capabilities: Body = {"drop": ["ALL"]}
    rdma_device: Body = {}
    if spec.rdma.enabled:  # pinning memory for RDMA registration needs IPC_LOCK, nothing more
        capabilities["add"] = ["IPC_LOCK"]
        if spec.rdma.resource_name is not None:
            rdma_device[spec.rdma.resource_name] = "1"
    env: list[Body] = []
    volumes: list[Body] = [
        {"name": "run", "hostPath": {"path": run_dir, "type": "DirectoryOrCreate"}},
        {"name": "shm", "hostPath": {"path": shm_dir, "type": "DirectoryOrCreate"}},
    ]
    mounts: list[Body] = [{"name": "run", "mountPath": RUN_DIR}, {"name": "shm", "mountPath": SHM_DIR}]
    nvme_dir = nvme_host_dir(namespace, name, spec)
    if nvme_dir is not None:
        volumes.append({"name": "nvme", "hostPath": {"path": nvme_dir, "type": "DirectoryOrCreate"}})
        mounts.append({"name": "nvme", "mountPath": NVME_DIR})
    if spec.cuda:
        # The NVIDIA runtime (its RuntimeClass) mounts the driver and the devices these name;
        # CuPy compiles its kernels into a cache, which the read-only root cannot hold.
        env += [
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"},
            {"name": "CUPY_CACHE_DIR", "value": "/kvfabric/cache/cupy"},
        ]
        volumes.append({"name": "cache", "emptyDir": {}})
        mounts.append({"name": "cache", "mountPath": "/kvfabric/cache"})
    ports: list[Body] = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if sharing(spec):
        assert spec.fabric is not None
        f = spec.fabric
        # peers reach this agent at its pod IP; Kubernetes expands $(POD_IP) in a later variable
        env += [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "KVFABRIC_FABRIC_ADVERTISE", "value": f"$(POD_IP):{f.port}"},
        ]
        ref = valkey_url_secret(spec, name)
        if ref is not None:
            env.append({"name": "KVFABRIC_FABRIC_VALKEY", "valueFrom": {"secretKeyRef": ref}})
        tls_secret = f.tls_secret_name(name)
        if tls_secret is not None:
            volumes.append({"name": "fabric-tls", "secret": {"secretName": tls_secret, "defaultMode": 0o400}})
            mounts.append({"name": "fabric-tls", "mountPath": FABRIC_TLS_DIR, "readOnly": True})
        ports.append({"name": "fabric", "containerPort": f.port, "protocol": "TCP"})
    if spec.routing is not None:
        # the node's name in events and lookups (routers map it to the engines on that node)
        env.append({"name": "KVFABRIC_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
        ports += _event_ports(spec, "containerPort")
    container: Body = {
        "name": "agent",
        "image": image,
        "args": [],
        "envFrom": [{"configMapRef": {"name": f"kvfabric-{name}-agent"}}],
        **({"env": env} if env else {}),
        "ports": ports,
        "startupProbe": startup_probe(spec),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": spec.resources.cpu, "memory": str(memory), **rdma_device},
            "limits": {"cpu": spec.resources.cpu, "memory": str(memory), **rdma_device},
        },
        "volumeMounts": mounts,
        "securityContext": restricted_container(capabilities),
    }
    runtime_class = spec.runtime_class_name or (GPU_RUNTIME_CLASS if spec.cuda else None)
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
                    # only agents that list their peers get a token, and it reads EndpointSlices only
                    **(
                        {"serviceAccountName": agent_account(name), "automountServiceAccountToken": True}
                        if sharing(spec)
                        else {"automountServiceAccountToken": False}
                    ),
                    **({"hostIPC": True} if spec.host_ipc else {}),
                    **({"runtimeClassName": runtime_class} if runtime_class else {}),
                    "nodeSelector": dict(spec.node_selector),
                    "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations],
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [prepare_dirs(image, nvme=nvme_dir is not None)],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _event_ports(spec: KVCachePoolSpec, field: str) -> list[Body]:
    if not events(spec):
        return []
    assert spec.routing is not None
    r = spec.routing
    out = [{"name": "kv-events", field: r.events_port}, {"name": "kv-replay", field: r.replay_port}]
    for port in out:
        port["protocol"] = "TCP"
        if field == "port":
            port["targetPort"] = port["name"]
    return out


def service(namespace: str, name: str, uid: str, spec: KVCachePoolSpec | None = None) -> Body:
    ports: list[Body] = [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    ]
    if spec is not None and sharing(spec):
        assert spec.fabric is not None
        ports.append({"name": "fabric", "port": spec.fabric.port, "targetPort": "fabric", "protocol": "TCP"})
    if spec is not None:
        ports += _event_ports(spec, "port")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(namespace, name, uid, "-agents"),
        "spec": {"clusterIP": "None", "selector": labels(name), "ports": ports},
    }


def network_policy(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body:
    """The agents' fabric port admits only the pool's own agents; metrics stay open to scrapers."""
    assert spec.fabric is not None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(namespace, name, uid, "-agents"),
        "spec": {
            "podSelector": {"matchLabels": labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": labels(name)}}],
                    "ports": [{"protocol": "TCP", "port": spec.fabric.port}],
                },
                {  # scrapers, lookups and routers' subscribers: from anywhere
                    "ports": [
                        {"protocol": "TCP", "port": port}
                        for port in [METRICS_PORT, *(p["port"] for p in _event_ports(spec, "port"))]
                    ]
                },
            ],
        },
    }


def agent_account(name: str) -> str:
    return f"kvfabric-{name}-agent"


def agent_rbac(namespace: str, name: str, uid: str) -> list[Body]:
    """The agents' service account, allowed to read EndpointSlices (their peers) and nothing else."""
    meta = _meta(namespace, name, uid, "-agent")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": meta["name"], "namespace": namespace}],
        },
    ]


def issues_certificates(spec: KVCachePoolSpec) -> bool:
    """The operator makes the agents' certificates (a sharing pool that names no tlsSecret)."""
    f = spec.fabric
    return sharing(spec) and f is not None and f.tls_secret is None and f.issue_certificates


def runs_valkey(spec: KVCachePoolSpec) -> bool:
    """The operator runs the pool's Valkey (``spec.fabric.valkey``)."""
    return sharing(spec) and spec.fabric is not None and spec.fabric.valkey is not None


def valkey_name(name: str) -> str:
    """The Valkey the operator runs for pool ``name``: its StatefulSet, Service, NetworkPolicy
    and password Secret."""
    return f"kvfabric-{name}-valkey"


def operator_secrets(
    namespace: str, name: str, uid: str, spec: KVCachePoolSpec
) -> list[tuple[str, Callable[[], Body]]]:
    """The Secrets the operator makes for the pool, (name, maker) each: made once and kept
    (:func:`kvfabric.operator.reconcile.ensure_secrets`), never among the applied children."""
    out: list[tuple[str, Callable[[], Body]]] = []
    f = spec.fabric
    if f is not None and issues_certificates(spec):
        tls = f.tls_secret_name(name)
        assert tls is not None
        out.append((tls, lambda: _issued_tls_secret(namespace, name, uid)))
    if runs_valkey(spec):
        out.append((valkey_name(name), lambda: _valkey_password_secret(namespace, name, uid)))
    return out


def issued_tls_secret(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body | None:
    """The Secret of the agents' operator-issued certificates, or None (none to issue)."""
    return _issued_tls_secret(namespace, name, uid) if issues_certificates(spec) else None


def _issued_tls_secret(namespace: str, name: str, uid: str) -> Body:
    cert, key, ca = pool_certificates(f"{namespace}.{name}")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(namespace, name, uid, "-fabric-tls"),
        "type": "kubernetes.io/tls",
        "data": {
            k: base64.b64encode(v).decode() for k, v in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca))
        },
    }


VALKEY_PORT = 6379


def valkey_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvfabric-valkey", "kvfabric.io/pool": name}


def valkey_password_secret(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> Body | None:
    """The password of the Valkey the operator runs for the pool, and the agents' URL with it;
    None when it runs none."""
    return _valkey_password_secret(namespace, name, uid) if runs_valkey(spec) else None


def _valkey_password_secret(namespace: str, name: str, uid: str) -> Body:
    password = secrets.token_urlsafe(32)
    host = f"{valkey_name(name)}.{namespace}.svc"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(namespace, name, uid, "-valkey"),
        "type": "Opaque",
        "stringData": {"password": password, "url": f"valkey://:{password}@{host}:{VALKEY_PORT}/0"},
    }


def valkey_objects(namespace: str, name: str, uid: str, spec: KVCachePoolSpec, image: str) -> list[Body]:
    """A Valkey for the pool's block index: one replica without persistence (agents publish again
    into an empty one), its Service, and a NetworkPolicy that admits only the pool's agents."""
    assert spec.fabric is not None and spec.fabric.valkey is not None
    v = spec.fabric.valkey
    memory = parse_bytes(v.memory)
    meta = {**_meta(namespace, name, uid, "-valkey"), "labels": valkey_labels(name)}
    password = {"secretKeyRef": {"name": meta["name"], "key": "password"}}
    container: Body = {
        "name": "valkey",
        "image": v.image or image,
        "command": ["valkey-server"],
        "args": [
            "--port",
            str(VALKEY_PORT),
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/data",
            "--requirepass",
            "$(VALKEY_PASSWORD)",
            "--maxmemory",
            str(memory * 4 // 5),
            "--maxmemory-policy",
            "allkeys-lru",
        ],
        "env": [{"name": "VALKEY_PASSWORD", "valueFrom": password}],
        "ports": [{"name": "valkey", "containerPort": VALKEY_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "valkey"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "valkey"}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": "250m", "memory": str(memory)},
            "limits": {"memory": str(memory)},
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": restricted_container({"drop": ["ALL"]}),
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": meta["name"],
            "replicas": 1,
            "selector": {"matchLabels": valkey_labels(name)},
            "template": {
                "metadata": {"labels": valkey_labels(name)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": valkey_labels(name),
            "ports": [{"name": "valkey", "port": VALKEY_PORT, "targetPort": "valkey", "protocol": "TCP"}],
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": valkey_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": labels(name)}}],
                    "ports": [{"protocol": "TCP", "port": VALKEY_PORT}],
                }
            ],
        },
    }
    return [statefulset, svc, policy]


def children(
    namespace: str,
    name: str,
    uid: str,
    spec: KVCachePoolSpec,
    agent_image: str,
    valkey_image: str = DEFAULT_VALKEY_IMAGE,
) -> list[Body]:
    """Everything the operator applies for one pool, in apply order (its Secrets are not among
    them: see :func:`operator_secrets`)."""
    out = [configmap(namespace, name, uid, spec)]
    if sharing(spec):
        out += agent_rbac(namespace, name, uid)
    if runs_valkey(spec):
        out += valkey_objects(namespace, name, uid, spec, valkey_image)
    out += [daemonset(namespace, name, uid, spec, agent_image), service(namespace, name, uid, spec)]
    if sharing(spec):
        out.append(network_policy(namespace, name, uid, spec))
    return out
