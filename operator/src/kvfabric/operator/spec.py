"""``KVCachePool`` (``kvfabric.io/v1alpha1``): the spec model, source of truth for the CRD schema.

``crds/kvcachepools.kvfabric.io.yaml`` is generated from these models (``python -m
kvfabric.operator.crd``) and a test checks the committed file equals the generated one, so the
CRD, the operator and the docs cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUP = "kvfabric.io"
VERSION = "v1alpha1"
KIND = "KVCachePool"
PLURAL = "kvcachepools"

Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", description="A size such as 64Gi."),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")


class Memory(_Model):
    size: Quantity = Field(description="Pool bytes per node (the agent's --pool-size).")
    huge_pages: bool = Field(
        default=False, alias="hugePages", description="Back the pool with transparent huge pages."
    )


class Nvme(_Model):
    path: str = Field(
        min_length=1,
        pattern=r"^/",
        description="Host directory (on a local NVMe disk) under which the pool's agent keeps its "
        "tier, in <path>/<namespace>.<pool>; it survives agent restarts and node reboots.",
    )
    size: Quantity = Field(
        description="Disk bytes the tier may fill on each node (the agent's --nvme-size). The "
        "agent's memory holds the tier's index (about 350 bytes per block on disk): raise "
        "resources.memoryOverhead for tiers of millions of blocks."
    )


class Rdma(_Model):
    enabled: bool = Field(
        default=False,
        description="Pull blocks from peers over RDMA where NICs exist (with remoteSharing): the "
        "agents get IPC_LOCK (to pin memory for registration), UCX's RDMA transports (ucxTLS) and "
        "the device resource; each agent moves blocks with NIXL when it finds an active RDMA port "
        "and over TCP when not (said in its /stats).",
    )
    ucx_tls: str = Field(
        default="rc,tcp",
        alias="ucxTLS",
        pattern=r"^[a-z0-9_,]+$",
        description="UCX transports the agents' NIXL uses (UCX_TLS) when RDMA is enabled.",
    )
    resource_name: str | None = Field(
        default=None,
        alias="resourceName",
        min_length=1,
        description="The extended resource of the node's RDMA device plugin the agents request "
        "one of (e.g. rdma/rdma_shared_device_a): it gives the pod /dev/infiniband.",
    )


class SecretKey(_Model):
    name: str = Field(min_length=1, description="A Secret in the pool's namespace.")
    key: str = Field(min_length=1, description="The key in it.")


class DeployedValkey(_Model):
    """A Valkey the operator runs for the pool: one replica, no persistence (agents publish
    everything again when it restarts empty), a password of its own, reachable only from the
    pool's agents."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Its image (default: the operator's kvfabric/valkey of its version, built by "
        "scripts/k8s/build-images.sh valkey; any valkey-server image with the binary on PATH "
        "as valkey-server works).",
    )
    memory: Quantity = Field(
        default="1Gi",
        description="Its memory limit; Valkey evicts least recently used entries at 80% of it "
        "(about 160 bytes per block and namespace: 1Gi holds about 5 million).",
    )


class Fabric(_Model):
    """How the agents of a pool share blocks (``remoteSharing: true``)."""

    valkey_url: str | None = Field(
        default=None,
        alias="valkeyURL",
        pattern=r"^valkeys?://",
        description="The pool's Valkey block index (valkey://host:port/0, valkeys:// for TLS), "
        "without credentials; with them, use valkeySecret.",
    )
    valkey_secret: SecretKey | None = Field(
        default=None,
        alias="valkeySecret",
        description="A Secret key holding the Valkey URL with its credentials.",
    )
    valkey: DeployedValkey | None = Field(
        default=None,
        description="Run the pool's Valkey (a StatefulSet kvfabric-<pool>-valkey and its Service) "
        "instead of naming one with valkeyURL or valkeySecret.",
    )
    port: int = Field(default=7450, ge=1024, le=65535, description="The agents' port for each other's pulls.")
    tls_secret: str | None = Field(
        default=None,
        alias="tlsSecret",
        min_length=1,
        description="A Secret with tls.crt, tls.key and ca.crt (cert-manager's Certificate writes "
        "one): agents talk mutual TLS and accept only peers that CA signed.",
    )

    issue_certificates: bool = Field(
        default=True,
        alias="issueCertificates",
        description="Without tlsSecret: the operator makes the pool a CA of its own and one agent "
        "certificate it signs, in the Secret kvfabric-<pool>-fabric-tls (kept while the pool lives; "
        "delete it to issue new ones), so agents talk mutual TLS and refuse other pools' agents. "
        "false: the agents' transfers are plain TCP.",
    )

    @model_validator(mode="after")
    def _one_valkey(self) -> Fabric:
        if sum(x is not None for x in (self.valkey_url, self.valkey_secret, self.valkey)) != 1:
            raise ValueError("fabric needs exactly one of valkeyURL, valkeySecret and valkey")
        return self

    def tls_secret_name(self, pool: str) -> str | None:
        """The Secret the agents' certificates come from (None: no TLS)."""
        if self.tls_secret is not None:
            return self.tls_secret
        return f"kvfabric-{pool}-fabric-tls" if self.issue_certificates else None


class Routing(_Model):
    """What KV-aware routers (llm-d, Dynamo, AIBrix) read from the agents: vLLM-schema KV events
    over ZMQ (stored and removed blocks per tier, named by vLLM's own block hashes) and prefix
    lookups (``POST /v1/lookup`` on the metrics port). The agents' Service exposes the ports."""

    kv_events: bool = Field(default=True, alias="kvEvents", description="Publish KV events.")
    events_port: int = Field(
        default=5557, alias="eventsPort", ge=1024, le=65535, description="ZMQ PUB port of the KV events."
    )
    replay_port: int = Field(
        default=5558,
        alias="replayPort",
        ge=1024,
        le=65535,
        description="ZMQ ROUTER port that replays missed event batches from a sequence number.",
    )
    topic: str = Field(
        default="kv@{node}@{model}",
        max_length=256,
        description="Topic of each batch; {node} is the node's name, {model} the served model name.",
    )

    @model_validator(mode="after")
    def _ports(self) -> Routing:
        if self.events_port == self.replay_port:
            raise ValueError("eventsPort and replayPort must differ")
        return self


class Resources(_Model):
    cpu: str = Field(default="1", description="Agent CPU request and limit.")
    memory_overhead: Quantity = Field(
        default="512Mi",
        alias="memoryOverhead",
        description="Agent memory beyond the pool (the pool is counted on top).",
    )


class KVCachePoolSpec(_Model):
    """What a user declares. Defaults make ``spec: {memory: {size: 8Gi}}`` a working pool."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, alias="nodeSelector", description="Nodes that get an agent."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Agent pod tolerations.")
    memory: Memory
    nvme: Nvme | None = Field(
        default=None,
        description="Optional persistent tier on local disk: committed blocks are written there "
        "too, and hits the pool no longer holds are read back into it.",
    )
    rdma: Rdma = Field(default_factory=Rdma)
    remote_sharing: bool = Field(
        default=False,
        alias="remoteSharing",
        description="Agents of this pool publish what they hold to the pool's Valkey and pull "
        "blocks from each other (NIXL over TCP; RDMA where NICs exist). Needs fabric; shared "
        "tenancy only.",
    )
    fabric: Fabric | None = Field(
        default=None, description="The block index and the agents' port (remoteSharing)."
    )
    routing: Routing | None = Field(
        default=None,
        description="KV events and prefix lookups for KV-aware routers; shared tenancy only (they "
        "name cached prompts' tokens).",
    )
    tenancy: Literal["shared", "perNamespace"] = Field(
        default="shared",
        description="shared: the pool serves the pods of its own namespace, one trust domain (every "
        "engine maps one pool file). perNamespace: the pool may serve pods of any namespace (they "
        "name it <namespace>/<pool>), and the agent isolates namespaces: each has its own socket "
        "and pool file, sees, leases and maps only its own blocks.",
    )
    cuda: bool = Field(default=False, description="Agents serve GPU engines (pin the pool for CUDA).")
    host_ipc: bool = Field(
        default=False,
        alias="hostIPC",
        description="Agent and engine pods share the node's IPC namespace and /dev/shm, which the "
        "CUDA IPC events of layered loads need (without it GPU engines load before the forward "
        "pass instead). A security trade-off: those pods see the node's shared memory. Needs cuda.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Agent image. Unset: the operator's own agent image (the chart's agent.image, "
        "by default the operator's version, so agents follow operator upgrades); set it to pin one.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        alias="runtimeClassName",
        min_length=1,
        description="RuntimeClass of the agent pods. cuda pools default to nvidia (the NVIDIA "
        "container runtime's class, which gives the pod the node's GPUs and driver).",
    )
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _remote_sharing(self) -> KVCachePoolSpec:
        if self.remote_sharing and self.fabric is None:
            raise ValueError("remoteSharing needs fabric (valkeyURL or valkeySecret)")
        if self.remote_sharing and self.tenancy == "perNamespace":
            raise ValueError("remoteSharing serves shared tenancy only")
        if self.routing is not None and self.tenancy == "perNamespace":
            raise ValueError("routing serves shared tenancy only")
        return self

    @model_validator(mode="after")
    def _host_ipc_needs_cuda(self) -> KVCachePoolSpec:
        if self.host_ipc and not self.cuda:
            raise ValueError("hostIPC is only for GPU engines: set cuda: true as well")
        return self
