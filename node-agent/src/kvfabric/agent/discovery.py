"""Who the pool's agents are, from the EndpointSlices of the agents' headless Service.

The block index (Valkey) says which address holds a block; this says which addresses are agents
of the pool at all. With ``--fabric-peers-service`` an agent pulls only from addresses listed
there (ready endpoints, the Service's ``fabric`` port): a holder address that is not a member of
the pool now (a stale index entry, a pod that left, an entry written by something else that can
reach Valkey) is a miss, not a connection. Until the first list succeeds no peer is admitted
(when in doubt, miss); after that a failing apiserver keeps the last list.

It lists with the pod's service-account token (the operator's Role grants exactly ``get``,
``list`` and ``watch`` on ``endpointslices``), every ``interval_s`` seconds, by plain HTTPS: the
agent carries no Kubernetes client. ``discovery.k8s.io/v1`` first, ``v1beta1`` (Kubernetes 1.20)
when the server has no v1.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
VERSIONS = ("v1", "v1beta1")


def members(slices: Iterable[Mapping[str, Any]], port_name: str) -> frozenset[str]:
    """``host:port`` of every ready endpoint of ``slices`` on the port named ``port_name``."""
    out: set[str] = set()
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("name") == port_name), None)
        if not isinstance(port, int):
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:  # unset means ready
                continue
            out.update(f"{a}:{port}" for a in ep.get("addresses") or [])
    return frozenset(out)


@dataclass(frozen=True)
class KubeAPI:
    """Where the apiserver is and how this pod proves who it is."""

    url: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def in_cluster(cls, url: str | None, token_file: Path | None, ca_file: Path | None) -> KubeAPI:
        if url is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host or not port:
                raise ValueError("not in a pod (no KUBERNETES_SERVICE_HOST): set --fabric-kube-api")
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(url.rstrip("/"), token_file or SA_DIR / "token", ca_file or SA_DIR / "ca.crt")

    def get(self, path: str, timeout: float) -> Any:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        # read each time: projected service-account tokens are rotated by the kubelet
        token = self.token_file.read_text().strip()
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.load(resp)


def pod_namespace() -> str:
    try:
        return (SA_DIR / "namespace").read_text().strip()
    except OSError:
        raise ValueError("no service-account namespace file: set --fabric-peers-namespace") from None


class PeerDiscovery:
    """The pool's members, listed in a background thread."""

    def __init__(
        self, api: KubeAPI, namespace: str, service: str, port_name: str = "fabric", interval_s: float = 5.0
    ) -> None:
        self.api, self.namespace, self.service = api, namespace, service
        self.port_name, self.interval_s = port_name, interval_s
        #: None until a list succeeded: no peer is admitted before
        self.members: frozenset[str] | None = None
        self.version = VERSIONS[0]
        self.lists = 0
        self.failures = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admits(self, peer: str) -> bool:
        m = self.members
        return m is not None and peer in m

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvfabric-discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def list_once(self) -> frozenset[str]:
        selector = urllib.parse.quote(f"kubernetes.io/service-name={self.service}")
        for version in (self.version, *(v for v in VERSIONS if v != self.version)):
            path = f"/apis/discovery.k8s.io/{version}/namespaces/{self.namespace}/endpointslices"
            try:
                body = self.api.get(f"{path}?labelSelector={selector}", timeout=max(1.0, self.interval_s))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # this server serves another version
                    continue
                raise
            self.version = version
            return members(body.get("items") or [], self.port_name)
        raise RuntimeError("the apiserver serves no discovery.k8s.io EndpointSlices")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = self.list_once()
            except Exception as exc:  # apiserver away, token refused: keep the last list
                self.failures += 1
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("listing the pool's peers failed", extra={"error": self.error})
            else:
                if found != self.members:
                    log.info("pool members", extra={"members": sorted(found)})
                self.members, self.error = found, ""
                self.lists += 1
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, int | float | str]:
        return {
            "fabric_peers": -1 if self.members is None else len(self.members),
            "fabric_discovery_lists": self.lists,
            "fabric_discovery_failures": self.failures,
            "fabric_discovery_error": self.error,
        }
