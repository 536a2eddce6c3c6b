"""The pod-mutating admission webhook: an HTTPS endpoint around :mod:`kvfabric.operator.mutation`.

Served by the operator process (FastAPI on uvicorn with TLS). kopf's own admission machinery is
not used: it does not pass the AdmissionRequest's namespace to handlers, and pods created by
controllers (a Deployment's ReplicaSet) carry no namespace in their object at admission.

The configuration says ``failurePolicy: Ignore`` by default, so a webhook that is down never
blocks pod creation; a pod that cannot be injected is admitted with ``kvfabric.io/skipped``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kvfabric.operator.mutation import POOL_ANNOTATION, json_patch, mutate, pool_ref
from kvfabric.operator.reconcile import read_pool
from kvfabric.operator.spec import KVCachePoolSpec

log = logging.getLogger(__name__)

PATH = "/kvfabric-inject"
CONFIG_NAME = "kvfabric.kvfabric.io"
Lookup = Callable[[str, str], KVCachePoolSpec | None]


def pool_from_api(namespace: str, name: str) -> KVCachePoolSpec | None:
    """The pool's spec, None if there is no such pool; raises if it cannot be read or is invalid."""
    obj = read_pool(namespace, name)
    if obj is None:
        return None
    try:
        return KVCachePoolSpec.model_validate(obj.get("spec", {}))
    except ValidationError as exc:
        raise ValueError(f"its spec is invalid ({exc.error_count()} errors)") from None


def review(body: dict[str, Any], lookup: Lookup) -> tuple[dict[str, Any], str]:
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
        new, why = mutate(pod, namespace, spec, unreadable)
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


def build_app(lookup: Lookup = pool_from_api) -> FastAPI:
    app = FastAPI(title="kvfabric-webhook", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post(PATH)
    async def inject(request: Request) -> dict[str, Any]:
        body = await request.json()
        out, why = review(body, lookup)
        if why:
            req = body.get("request") or {}
            event = skip_event(req.get("namespace") or "default", req.get("object") or {}, why)
            asyncio.get_running_loop().run_in_executor(None, _emit, event)  # not awaited: no delay
        return out

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    return app


def configuration(
    client_config: dict[str, Any], failure_policy: str = "Ignore", timeout_seconds: int = 5
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration for ``client_config`` (a URL or Service, with caBundle)."""
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


def ensure_configuration(body: dict[str, Any]) -> None:
    """Creates or replaces the webhook configuration (the operator keeps its caBundle current)."""
    api = client.AdmissionregistrationV1Api()
    try:
        api.create_mutating_webhook_configuration(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = api.read_mutating_webhook_configuration(body["metadata"]["name"])
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": current.metadata.resource_version},
        }
        api.replace_mutating_webhook_configuration(body["metadata"]["name"], body)


def server(
    port: int, certfile: str, keyfile: str, host: str = "0.0.0.0", lookup: Lookup = pool_from_api
) -> Any:
    """A uvicorn server for the webhook over TLS (``await s.serve()``, or ``s.run()`` in a thread)."""
    import uvicorn

    config = uvicorn.Config(
        build_app(lookup),
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    return uvicorn.Server(config)
