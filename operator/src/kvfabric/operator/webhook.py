"""The pod-mutating admission webhook (kopf), around the pure :mod:`kvfabric.operator.mutation`.

Registered with ``ignore_failures=True``: the webhook configuration says ``failurePolicy:
Ignore``, so a webhook that is down never blocks pod creation.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kvfabric.operator.mutation import mutate
from kvfabric.operator.spec import GROUP, PLURAL, VERSION, KVCachePoolSpec

log = logging.getLogger(__name__)


def _pool_spec(namespace: str, name: str) -> KVCachePoolSpec | None:
    try:
        obj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    try:
        return KVCachePoolSpec.model_validate(obj.get("spec", {}))
    except ValidationError:
        return None


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.mutate("pods", operation="CREATE", id="kvfabric-inject", ignore_failures=True, registry=registry)
    def inject(body: kopf.Body, patch: kopf.Patch, namespace: str | None, **_: Any) -> None:
        pod = dict(body)
        pool = (pod.get("metadata") or {}).get("annotations", {}).get("kvfabric.io/pool")
        if not pool:
            return
        ns = namespace or (pod.get("metadata") or {}).get("namespace") or "default"
        new, why = mutate(pod, ns, _pool_spec(ns, pool))
        if why:
            log.warning("pod not injected", extra={"namespace": ns, "pool": pool, "reason": why})

        def apply(target: kopf.RawBody) -> None:
            target["metadata"]["annotations"] = new["metadata"]["annotations"]
            target["spec"] = new["spec"]

        patch.fns.append(apply)

    _ = inject
