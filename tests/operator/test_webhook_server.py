"""The webhook server over real TLS: pool lookups never block its event loop (which kopf shares),
a lookup that hangs admits the pod uninjected with the reason, and lookups are cached briefly."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from e2e.agent import free_port
from kvfabric.operator import webhook
from kvfabric.operator.certs import ServingCert
from kvfabric.operator.spec import KVCachePoolSpec

SPEC = KVCachePoolSpec.model_validate({"memory": {"size": "8Gi"}})
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


class Lookups:
    """A pool lookup that blocks for pool "stuck" until released, and counts calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def __call__(self, namespace: str, name: str) -> KVCachePoolSpec | None:
        self.calls.append((namespace, name))
        if name == "stuck":
            self.release.wait(60)
        return SPEC


@pytest.fixture
def served() -> Iterator[tuple[str, Lookups]]:
    lookups = Lookups()
    cert = ServingCert(["127.0.0.1"])
    port = free_port()
    server = webhook.server(port, str(cert.certfile), str(cert.keyfile), host="127.0.0.1", lookup=lookups)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"https://127.0.0.1:{port}", lookups
    finally:
        lookups.release.set()
        server.should_exit = True
        thread.join(10)
        cert.close()


def admit(url: str, pool: str, uid: str) -> tuple[dict[str, Any], str]:
    pod = {
        "metadata": {"name": uid, "annotations": {"kvfabric.io/pool": pool}},
        "spec": {"containers": [{"name": "vllm", "image": "v", "args": []}]},
    }
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "request": {"uid": uid, "namespace": "ml", "object": pod, "dryRun": True},
    }
    req = urllib.request.Request(
        url + webhook.PATH, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, context=CTX, timeout=30) as r:
        response = json.loads(r.read())["response"]
    ops = json.loads(base64.b64decode(response.get("patch", "") or b"W10=")) if "patch" in response else []
    annotations = next((o["value"] for o in ops if o["path"] == "/metadata/annotations"), {})
    return response, str(
        annotations.get("kvfabric.io/skipped") or annotations.get("kvfabric.io/injected") or ""
    )


def test_a_hanging_lookup_admits_uninjected_and_never_blocks_the_loop(served: tuple[str, Lookups]) -> None:
    url, lookups = served
    with ThreadPoolExecutor(3) as pool:
        stuck = [pool.submit(admit, url, "stuck", f"s{i}") for i in range(2)]
        # while two lookups hang, the server still answers on its event loop
        with urllib.request.urlopen(url + "/healthz", context=CTX, timeout=5) as r:
            assert r.status == 200
        for f in stuck:
            response, why = f.result(timeout=30)
            assert response["allowed"] is True
            assert "took longer" in why  # admitted with the reason, not injected
    assert not lookups.release.is_set()  # they answered while the lookups were still hanging


def test_lookups_of_one_pool_are_cached(served: tuple[str, Lookups]) -> None:
    url, lookups = served
    for i in range(3):  # a Deployment's replicas, admitted in a burst
        response, injected = admit(url, "default", f"p{i}")
        assert response["allowed"] and injected == "default"
    assert lookups.calls.count(("ml", "default")) == 1


def test_a_missing_pool_is_not_remembered() -> None:
    """A pool created with its Deployment: a lookup before it existed must not hide it."""
    pools: dict[str, KVCachePoolSpec] = {}
    cached = webhook.CachedLookup(lambda ns, name: pools.get(name), ttl=60)
    assert cached("ml", "p") is None
    pools["p"] = SPEC
    assert cached("ml", "p") is SPEC
