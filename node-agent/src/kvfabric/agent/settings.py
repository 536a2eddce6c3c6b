"""The agent's settings: one typed model, from flags or ``KVFABRIC_*`` environment variables.

Precedence: command-line flag > environment > default. Validated once at start; an invalid
value stops the agent with a message naming the key. The operator renders the same model
into the agent's ConfigMap, so this class is the single source of truth for agent settings.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KVFABRIC_"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> int:
    """``"2GiB"`` -> 2147483648; plain integers are bytes. SI (GB) and IEC (GiB) both accepted."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GiB")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size (examples: 512MiB, 2GiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


ByteSize = Annotated[int, BeforeValidator(parse_bytes)]


class AgentSettings(BaseSettings):
    """Settings of one node agent. Every field: unit, default, and why."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    pool_size: ByteSize = Field(
        default=2 * 1024**3,
        ge=16 * 1024**2,
        description="Bytes of shared memory the pool owns (e.g. 2GiB). Reserved up front with "
        "fallocate so an undersized /dev/shm fails at start, not with SIGBUS later.",
    )
    pool_path: Path = Field(
        default=Path("/dev/shm/kvfabric-pool"),
        description="File backing the pool; engines map it. Put it on a hugetlbfs mount for "
        "huge pages. Removed on clean exit; a stale one from a crashed agent is replaced.",
    )
    pool_files: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Files the pool is kept in (<pool-path>, <pool-path>.1, ...), mapped back to "
        "back: faulting pages into one tmpfs file does not scale across threads, into several "
        "it does (a 64 GiB CUDA pool pins in a third of the time with 16). 0: 16 for --cuda "
        "pools of 16 GiB or more, else 1. Shared tenancy only.",
    )
    arena_size: ByteSize = Field(
        default=64 * 1024**2,
        ge=1024**2,
        description="Bytes per arena. The pool is cut into arenas, each serving one layout "
        "(namespace), so several models share a pool without fragmenting it.",
    )
    huge_pages: bool = Field(
        default=False,
        description="Ask the kernel for transparent huge pages on the pool (madvise); "
        "best effort, logged when refused.",
    )
    prefault: bool = Field(
        default=True,
        description="Touch every pool page in the background at start, so first saves do not pay "
        "for the kernel zeroing pages.",
    )
    cuda: bool = Field(
        default=False,
        description="Serve GPU engines: pin the whole pool for CUDA at start (in parallel "
        "threads; see cuda_ready_bytes) and copy their blocks over CUDA IPC. Needs CuPy "
        "(kvfabric-agent[gpu]).",
    )
    pin_threads: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Threads that reserve the pool and, with --cuda, populate and register it.",
    )
    cuda_ready_bytes: ByteSize = Field(
        default=4 * 1024**3,
        ge=0,
        description="With --cuda: report ready once this much of the pool is pinned; the rest is "
        "pinned while the agent serves, its arenas lent as they are pinned (the pool fills from "
        "the pinned part first). 0: the whole pool before ready.",
    )
    cuda_dma_saves: bool = Field(
        default=True,
        description="With --cuda: copy an engine's fragmented saves with the copy engines only "
        "(one batched copy per block and layer segment) instead of a gather kernel in the agent's "
        "CUDA context, which time-slices the GPU with the engine while its next prefill runs. "
        "Needs a driver with cuMemcpyBatchAsync (CUDA 12.8+) and segments of 32 KiB or more "
        "(an 8B model's are; MLA's 18 KiB are not); otherwise kernels gather.",
    )
    cuda_dma_loads: bool = Field(
        default=False,
        description="With --cuda: the same for loads (copy-engine-only scatter into the engine's "
        "blocks). Off by default: a load is on its request's critical path, and staged it moves "
        "0.94-0.96x of the H2D ceiling against 0.54x as one copy per block and segment (H200: a "
        "10k-token load of an 8B model 24.7 against 39.8 ms); on, the agent's kernels stay off "
        "the GPU while other engines sharing it compute.",
    )
    socket: Path = Field(
        default=Path("/run/kvfabric/agent.sock"),
        description="Unix socket engines connect to (mode 0660).",
    )
    http_host: str = Field(default="127.0.0.1", description="Admin HTTP bind address.")
    http_port: int = Field(
        default=9400, ge=0, le=65535, description="Admin HTTP port (/healthz, /metrics); 0 picks one."
    )
    max_frame_bytes: ByteSize = Field(
        default=64 * 1024**2,
        ge=4096,
        description="Largest request frame accepted; bigger ones close the connection.",
    )
    max_buffered_bytes: ByteSize = Field(
        default=256 * 1024**2,
        ge=4096,
        description="Bytes of request frames being received at once, all connections together; a "
        "frame that would pass it closes its connection ('busy'), so partial frames cannot hold "
        "the agent's memory.",
    )
    max_sessions: int = Field(
        default=1024, ge=1, description="Concurrent engine sessions before new ones are refused."
    )
    max_sessions_per_tenant: int = Field(
        default=256,
        ge=1,
        description="Concurrent sessions of one tenant (isolated tenancy), or of one peer uid (shared).",
    )
    start_wait_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Seconds the agent waits at start for room for its pool (engines that still "
        "map a crashed agent's pool release it once they find it gone), answering 'busy' meanwhile.",
    )
    hello_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds a new connection has to say hello before it is closed (connections "
        "without a session count against --max-sessions meanwhile).",
    )
    write_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds a reply may wait for a client that stopped reading; then the session "
        "is closed and its leases and reservations dropped.",
    )
    session_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of the pool one session may hold reserved (saves in flight), and as "
        "much again leased (loads in flight), at once.",
    )
    max_namespaces: int = Field(default=1024, ge=1, description="Namespaces (model layouts) per tenant.")
    tenancy: str = Field(
        default="shared",
        description="'shared': every engine that can reach the socket is one trust domain (one "
        "pool file all CPU engines map). 'isolated': the agent decides each session's tenant (from "
        "the tenant socket it came through, else its peer uid); a tenant sees, leases and maps only "
        "its own blocks, and CPU engines get their tenant's own pool file by descriptor passing.",
    )
    tenant_socket_dir: Path | None = Field(
        default=None,
        description="Isolated tenancy: serve one socket per tenant at DIR/<tenant>/agent.sock for "
        "every subdirectory DIR/<tenant> (checked every second; under Kubernetes one per pod "
        "namespace, each mounted only into that namespace's pods).",
    )
    tenant_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Fraction of the pool one tenant may hold (isolated tenancy); under pressure "
        "the tenant holding most gives arenas up first.",
    )
    nvme_path: Path | None = Field(
        default=None,
        description="Directory of the NVMe tier (a local disk; off when unset). Committed blocks are "
        "also written there behind the engines' backs; a lookup that misses the pool finds them "
        "there, and the agent reads them back into the pool. It survives agent restarts and host "
        "reboots; every block is checksummed and a damaged one is dropped, never served.",
    )
    nvme_size: ByteSize | None = Field(
        default=None,
        ge=64 * 1024**2,
        description="Bytes of disk the NVMe tier may fill (e.g. 500GiB); needed with --nvme-path. "
        "The least recently used blocks go first.",
    )
    nvme_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Threads that write blocks to the NVMe tier and, as many again, read them back.",
    )
    nvme_queue_blocks: int = Field(
        default=4096,
        ge=1,
        description="Blocks waiting to be written to the NVMe tier, and as many waiting to be read; "
        "past it writes are dropped (counted) and lookups do not start reads, so the disk never "
        "holds the engines back.",
    )
    nvme_read_deadline_ms: int = Field(
        default=500,
        ge=1,
        le=60_000,
        description="A read of the NVMe tier that has not started this long after the lookup that "
        "asked for it is skipped (counted): engines stop waiting for it before then (the "
        "connector's promote_wait_ms).",
    )
    fabric_valkey: str | None = Field(
        default=None,
        description="Valkey URL (valkey://host:port/0, valkeys:// for TLS, user and password in the "
        "URL) of the pool's block index: with it and --fabric-listen the agent publishes what it "
        "holds and pulls blocks other agents of the pool hold (off when unset).",
    )
    fabric_pool: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="The pool's name in the block index (agents of one pool share it).",
    )
    fabric_listen: str | None = Field(
        default=None,
        pattern=r"^[^\s:]+:[0-9]{1,5}$",
        description="host:port the agent serves its peers' pull requests on (TCP).",
    )
    fabric_advertise: str | None = Field(
        default=None,
        pattern=r"^[^\s:]+:[0-9]{1,5}$",
        description="host:port peers reach this agent at (default: --fabric-listen).",
    )
    fabric_tls_cert: Path | None = Field(
        default=None, description="This agent's certificate for mutual TLS with its peers (PEM)."
    )
    fabric_tls_key: Path | None = Field(default=None, description="Its private key (PEM).")
    fabric_tls_ca: Path | None = Field(
        default=None,
        description="The pool's CA (PEM): only peers whose certificate it signed are served or asked.",
    )
    fabric_pull_deadline_ms: int = Field(
        default=1000,
        ge=10,
        le=60_000,
        description="A pull from a peer not done this long after the lookup that started it is "
        "given up (the engine recomputes; its slots are quarantined a while).",
    )
    fabric_transport: str = Field(
        default="auto",
        description="How blocks move between agents: 'stream' (their bytes on the agents' TCP "
        "connection, encrypted with it under --fabric-tls-*), 'nixl' (NIXL over UCX: RDMA where "
        "NICs exist), or 'auto' (nixl when an RDMA port is active and --fabric-ucx-tls is not "
        "'tcp', else stream: UCX's TCP path is slower than plain sockets).",
    )
    fabric_ucx_tls: str = Field(
        default="tcp",
        description="UCX transports for block transfers (UCX_TLS): 'tcp', or e.g. 'rc,tcp' where "
        "RDMA NICs exist. Without a pin, agents in two network namespaces of one host would use "
        "shared memory instead of the network.",
    )
    fabric_peers_service: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="The agents' headless Service: with it the agent pulls only from addresses its "
        "EndpointSlices list as ready (port 'fabric'), read with the pod's service account "
        "(the operator sets it).",
    )
    fabric_peers_namespace: str | None = Field(
        default=None,
        description="That Service's namespace (default: the pod's, from its service account).",
    )
    fabric_kube_api: str | None = Field(
        default=None,
        pattern=r"^https://\S+$",
        description="The apiserver for --fabric-peers-service (default: in-cluster, from "
        "KUBERNETES_SERVICE_HOST and _PORT).",
    )
    fabric_kube_token_file: Path | None = Field(
        default=None, description="Bearer token file for it (default: the pod's service-account token)."
    )
    fabric_kube_ca_file: Path | None = Field(
        default=None, description="CA of its certificate (default: the service account's ca.crt)."
    )
    kv_events_endpoint: str | None = Field(
        default=None,
        pattern=r"^(tcp|ipc)://\S+$",
        description="ZMQ PUB endpoint the agent publishes vLLM-schema KV events on (msgpack "
        "KVEventBatch: BlockStored, BlockRemoved, AllBlocksCleared): bound when a wildcard "
        "(tcp://*:5557), else connected to a subscriber that binds, as vLLM's --kv-events-config "
        "does, so KV-aware routers consume it unchanged (off when unset).",
    )
    kv_events_replay_endpoint: str | None = Field(
        default=None,
        pattern=r"^(tcp|ipc)://\S+$",
        description="ZMQ ROUTER endpoint (always bound) serving missed batches from a sequence "
        "number on (vLLM's replay protocol), e.g. tcp://*:5558.",
    )
    kv_events_topic: str = Field(
        default="kv@{node}@{model}",
        max_length=256,
        description="Topic of each batch; {node} and {model} are replaced by --node-name and the "
        "served model name the engines registered (llm-d's subscriber reads kv@<pod>@<model>).",
    )
    kv_events_buffer_batches: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Batches kept for replay."
    )
    node_name: str = Field(
        default="",
        max_length=253,
        description="This node's name in KV events and prefix lookups (the operator sets it from "
        "the pod's spec.nodeName; default: the host name).",
    )
    log_format: str = Field(default="text", description="'text' or 'json' log lines.")
    log_level: str = Field(default="INFO", description="Python logging level name.")

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return v

    @field_validator("fabric_transport")
    @classmethod
    def _fabric_transport(cls, v: str) -> str:
        if v not in ("auto", "stream", "nixl"):
            raise ValueError("must be 'auto', 'stream' or 'nixl'")
        return v

    @field_validator("tenancy")
    @classmethod
    def _tenancy(cls, v: str) -> str:
        if v not in ("shared", "isolated"):
            raise ValueError("must be 'shared' or 'isolated'")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v

    @model_validator(mode="after")
    def _nvme(self) -> AgentSettings:
        if (self.nvme_path is None) != (self.nvme_size is None):
            raise ValueError("nvme_path and nvme_size go together (set both, or neither)")
        return self

    @property
    def pool_parts(self) -> int:
        """How many files the pool is kept in (``pool_files``, its default resolved)."""
        if self.pool_files:
            return self.pool_files
        return 16 if self.cuda and self.pool_size >= 16 << 30 else 1

    @model_validator(mode="after")
    def _pool_files(self) -> AgentSettings:
        if self.pool_files > 1 and self.tenancy == "isolated":
            raise ValueError("pool_files serves shared tenancy only (isolated pools are per-tenant files)")
        return self

    @model_validator(mode="after")
    def _fabric(self) -> AgentSettings:
        if (self.fabric_valkey is None) != (self.fabric_listen is None):
            raise ValueError("fabric_valkey and fabric_listen go together (set both, or neither)")
        tls = (self.fabric_tls_cert, self.fabric_tls_key, self.fabric_tls_ca)
        if any(tls) and not all(tls):
            raise ValueError("fabric_tls_cert, fabric_tls_key and fabric_tls_ca go together")
        if self.fabric_valkey is not None and self.tenancy == "isolated":
            raise ValueError("the fabric serves shared tenancy only (isolated pools are per-tenant files)")
        if self.fabric_peers_service is not None and self.fabric_valkey is None:
            raise ValueError("fabric_peers_service needs the fabric (fabric_valkey and fabric_listen)")
        return self

    @model_validator(mode="after")
    def _events(self) -> AgentSettings:
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise ValueError("kv_events_replay_endpoint needs kv_events_endpoint")
        if self.kv_events_endpoint is not None and self.tenancy == "isolated":
            # events name cached prefixes (their token ids): under isolated tenancy they would
            # tell one tenant what another's prompts were
            raise ValueError("KV events serve shared tenancy only (they carry cached token ids)")
        return self

    def to_env(self) -> dict[str, str]:
        """The ``KVFABRIC_*`` variables that reproduce these settings (used by the operator)."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue  # unset (the default)
            out[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


class SettingsError(ValueError):
    """Invalid settings; the message names every offending key."""


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "settings"
        lines.append(f"{key} ({ENV_PREFIX}{key.upper()} / --{key.replace('_', '-')}): {err['msg']}")
    return "invalid agent settings:\n  " + "\n  ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvfabric-agent",
        description="KVFabric node agent: a shared KV-cache pool for vLLM engines on this node. "
        f"Every flag can also be set as {ENV_PREFIX}<NAME> in the environment.",
    )
    for name, field in AgentSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)
    return parser


def load_settings(argv: list[str] | None = None) -> AgentSettings:
    """Parses flags over the environment; raises :class:`SettingsError` naming bad keys."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
