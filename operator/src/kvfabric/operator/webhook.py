"""The pod-mutating admission webhook: an HTTPS endpoint around :mod:`kvfabric.operator.mutation`.

Served by the operator process (FastAPI on uvicorn with TLS). kopf's own admission machinery is
not used: it does not pass the AdmissionRequest's namespace to handlers, and pods created by
controllers (a Deployment's ReplicaSet) carry no namespace in their object at admission.

The configuration says ``failurePolicy: Ignore`` by default, so a webhook that is down never
blocks pod creation; a pod that cannot be injected is admitted with ``kvfabric.io/skipped``.
The chart owns the MutatingWebhookConfiguration (scoped away from kube-system and the
operator's own namespace and pods); the operator only keeps its ``caBundle`` current
(:func:`publish_ca_bundle`). Pool lookups run off the event loop kopf shares, with a timeout and
a short cache, so admissions never stall the reconciler or each other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import Counter
from pydantic import ValidationError

from kvfabric.operator.mutation import POOL_ANNOTATION, json_patch, mutate, pool_ref
from kvfabric.operator.reconcile import read_pool
from kvfabric.operator.spec import KVCachePoolSpec

log = logging.getLogger(__name__)

PATH = "/kvfabric-inject"
CONFIG_NAME = "kvfabric.kvfabric.io"
Lookup = Callable[[str, str], KVCachePoolSpec | None]
LOOKUP_TIMEOUT_S = 2.0  # well inside the configuration's timeoutSeconds
ADMISSIONS = Counter(
    "kvfabric_webhook_admissions", "Pod admissions the webhook answered, by result.", ["result"]
)
for _result in ("injected", "skipped", "untouched"):
    ADMISSIONS.labels(_result)


class CachedLookup:
    """A pool lookup remembered for ``ttl`` seconds (a Deployment's replicas are admitted in a
    burst; each asks for the same pool). Only pools found are remembered: a pool created with
    its Deployment is seen by the first pod admitted after it exists; errors are not cached."""

    def __init__(self, lookup: Lookup, ttl: float = 5.0) -> None:
        self.lookup, self.ttl = lookup, ttl
        self._seen: dict[tuple[str, str], tuple[float, KVCachePoolSpec | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, namespace: str, name: str) -> KVCachePoolSpec | None:
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get((namespace, name))
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        spec = self.lookup(namespace, name)
        if spec is not None:
            with self._lock:
                self._seen[(namespace, name)] = (now, spec)
        return spec


def pool_from_api(namespace: str, name: str) -> KVCachePoolSpec | None:
    """The pool's spec, None if there is no such pool; raises if it cannot be read or is invalid."""
    obj = read_pool(namespace, name)
    if obj is None:
        return None
    try:
        return KVCachePoolSpec.model_validate(obj.get("spec", {}))
    except ValidationError as exc:
        raise ValueError(f"its spec is invalid ({exc.error_count()} errors)") from None


def review(body: dict[str, Any], lookup: Lookup, agent_image: str = "") -> tuple[dict[str, Any], str]:
    """AdmissionReview in; (AdmissionReview out, why the pod was skipped or ""). Always allowed;
    pure apart from ``lookup``."""
    request = body.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    pod = request.get("object") or {}
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    pool = ((pod.get("metadata") or {}).get("annotations") or {}).get(POOL_ANNOTATION)
    why = ""
    if pool:
        unreadable = ""
        try:
            spec = lookup(*pool_ref(pool, namespace))
        except Exception as exc:  # API unreachable, invalid spec: admit uninjected, say why
            log.warning("pool lookup failed", extra={"namespace": namespace, "pool": pool, "error": str(exc)})
            spec, unreadable = None, str(exc) or type(exc).__name__
        new, why = mutate(pod, namespace, spec, unreadable, agent_image)
        if why:
            log.warning("pod not injected", extra={"namespace": namespace, "pool": pool, "reason": why})
        ops = json_patch(pod, new)
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    out = {
        "apiVersion": body.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }
    return out, why


def skip_event(namespace: str, pod: dict[str, Any], why: str) -> dict[str, Any]:
    """A Warning event on the pod (by name, or generateName for controller-made pods)."""
    meta = pod.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "pod"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "kvfabric-not-injected-", "namespace": namespace},
        "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": namespace, "name": name},
        "reason": "KVFabricNotInjected",
        "message": why,
        "type": "Warning",
        "source": {"component": "kvfabric-webhook"},
    }


def _emit(event: dict[str, Any]) -> None:
    try:
        client.CoreV1Api().create_namespaced_event(event["metadata"]["namespace"], event)
    except Exception as exc:  # an event is best effort; admission has already been answered
        log.warning("could not record the skip event", extra={"error": str(exc)})


def _timed_out(namespace: str, name: str) -> KVCachePoolSpec | None:
    raise TimeoutError(f"pool lookup took longer than {LOOKUP_TIMEOUT_S}s")


def build_app(lookup: Lookup = pool_from_api, agent_image: str = "") -> FastAPI:
    app = FastAPI(title="kvfabric-webhook", docs_url=None, redoc_url=None, openapi_url=None)
    cached = CachedLookup(lookup)
    workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvfabric-webhook")

    @app.post(PATH)
    async def inject(request: Request) -> dict[str, Any]:
        body = await request.json()
        loop = asyncio.get_running_loop()
        try:  # the API call runs off the loop kopf shares; a slow API admits the pod uninjected
            out, why = await asyncio.wait_for(
                loop.run_in_executor(workers, review, body, cached, agent_image), LOOKUP_TIMEOUT_S
            )
        except TimeoutError:
            out, why = review(body, _timed_out, agent_image)
        patched = "patch" in out["response"]
        ADMISSIONS.labels("skipped" if why else ("injected" if patched else "untouched")).inc()
        req = body.get("request") or {}
        if why and not req.get("dryRun"):  # sideEffects: NoneOnDryRun
            event = skip_event(req.get("namespace") or "default", req.get("object") or {}, why)
            asyncio.get_running_loop().run_in_executor(None, _emit, event)  # not awaited: no delay
        return out

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    return app


# The chart's defaults (charts/kvfabric/values.yaml), for configurations made in tests.
NAMESPACE_SELECTOR = {
    "matchExpressions": [
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-node-lease"],
        },
        {"key": "kvfabric.io/webhook", "operator": "NotIn", "values": ["disabled"]},
    ]
}
OBJECT_SELECTOR = {
    "matchExpressions": [
        {"key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["kvfabric", "kvfabric-agent"]}
    ]
}


def configuration(
    client_config: dict[str, Any], failure_policy: str = "Ignore", timeout_seconds: int = 5
) -> dict[str, Any]:
    """A MutatingWebhookConfiguration for ``client_config`` (a URL or Service, with caBundle),
    scoped as the chart scopes its own."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME},
        "webhooks": [
            {
                "name": "kvfabric-inject.kvfabric.io",
                "admissionReviewVersions": ["v1", "v1beta1"],
                "sideEffects": "None",
                "failurePolicy": failure_policy,
                "timeoutSeconds": timeout_seconds,
                "clientConfig": client_config,
                "namespaceSelector": NAMESPACE_SELECTOR,
                "objectSelector": OBJECT_SELECTOR,
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
            }
        ],
    }


def publish_ca_bundle(name: str, bundle: bytes) -> bool:
    """Sets every webhook's ``caBundle`` in configuration ``name`` (the chart's) to ``bundle``;
    False when it already was. Read-modify-write with the resourceVersion (no lost update)."""
    api = client.AdmissionregistrationV1Api()
    encoded = base64.b64encode(bundle).decode()
    for _ in range(5):
        current = api.read_mutating_webhook_configuration(name)
        hooks = current.webhooks or []
        if all(h.client_config.ca_bundle == encoded for h in hooks):
            return False
        for h in hooks:
            h.client_config.ca_bundle = encoded
        try:
            api.replace_mutating_webhook_configuration(name, current)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"MutatingWebhookConfiguration {name} kept changing")


def server(
    port: int,
    certfile: str,
    keyfile: str,
    host: str = "0.0.0.0",
    lookup: Lookup = pool_from_api,
    agent_image: str = "",
) -> Any:
    """A uvicorn server for the webhook over TLS (``await s.serve()``, or ``s.run()`` in a thread);
    ``agent_image``: the operator's agent image (``perNamespace`` engines' init container)."""
    import uvicorn

    config = uvicorn.Config(
        build_app(lookup, agent_image),
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    config.load()  # makes config.ssl now, so a rotation can reload the context being served
    return uvicorn.Server(config)
