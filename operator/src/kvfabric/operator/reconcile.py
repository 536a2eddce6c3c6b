"""kopf handlers reconciling ``KVCachePool`` objects into their agents.

Handlers are registered into a registry passed in (never kopf's global one), so importing this
module has no side effects and tests can run several operators.

    kopf run -m kvfabric.operator.main        # production entry point (registers into the default registry)

A spec the model rejects, or a pool name that cannot name its children, sets
``ConfigValid=False`` with the reason and an event; nothing is applied and nothing is retried
until the spec changes (no crash loop). Children are applied idempotently (create, else replace)
and owned by the pool, so deleting the pool garbage-collects them. They are re-applied every
``resync_seconds`` and at once when the DaemonSet is deleted, so hand-made drift does not last.
Pool status follows the DaemonSet's rollout.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from kvfabric.operator.manifests import DEFAULT_VALKEY_IMAGE, children, invalid_name, operator_secrets
from kvfabric.operator.spec import GROUP, PLURAL, VERSION, KVCachePoolSpec

log = logging.getLogger(__name__)
POOL_LABEL = "kvfabric.io/pool"
# Operator metrics (the default registry, served by kvfabric-operator on :9401/metrics).
RECONCILES = Counter("kvfabric_operator_reconciles", "Pool reconciliations, by result.", ["result"])
AGENTS = Gauge(
    "kvfabric_operator_agents", "Agents of a pool, from its DaemonSet.", ["pool_namespace", "pool", "state"]
)
for _result in ("applied", "invalid_spec", "resynced"):
    RECONCILES.labels(_result)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
        "observedGeneration": generation,
    }


def _merge_conditions(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_type = {c["type"]: c for c in old}
    for c in new:
        prev = by_type.get(c["type"])
        if prev is not None and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        by_type[c["type"]] = c
    return list(by_type.values())


def read_pool(namespace: str, name: str) -> dict[str, Any] | None:
    """The pool object, or None when it does not exist (e.g. being deleted)."""
    try:
        obj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(obj)


def update_status(
    namespace: str, name: str, conditions: list[dict[str, Any]], fields: dict[str, Any] | None = None
) -> None:
    """Merges ``conditions`` (by type) and ``fields`` into the pool's status with optimistic
    concurrency: two writers (the reconciler, the DaemonSet follower) never drop each other's
    conditions, which a plain merge patch would (it replaces the whole list)."""
    api = client.CustomObjectsApi()
    for _ in range(10):
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        status = dict(obj.get("status") or {})
        status.update(fields or {})
        status["conditions"] = _merge_conditions(list(status.get("conditions", [])), conditions)
        obj["status"] = status
        try:
            api.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, obj)
            return
        except ApiException as exc:
            if exc.status != 409:  # 409: someone wrote in between; read again
                raise
    raise kopf.TemporaryError("pool status kept changing under us", delay=5)


def _apply(body: dict[str, Any]) -> None:
    """Create, or replace when it exists (idempotent)."""
    kind, ns, name = body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]
    core, apps, net = client.CoreV1Api(), client.AppsV1Api(), client.NetworkingV1Api()
    rbac = client.RbacAuthorizationV1Api()
    create, replace = {
        "ConfigMap": (core.create_namespaced_config_map, core.replace_namespaced_config_map),
        "Service": (core.create_namespaced_service, core.patch_namespaced_service),
        # patched, not replaced: the token controller adds the account's secrets to it
        "ServiceAccount": (core.create_namespaced_service_account, core.patch_namespaced_service_account),
        "Role": (rbac.create_namespaced_role, rbac.replace_namespaced_role),
        "RoleBinding": (rbac.create_namespaced_role_binding, rbac.replace_namespaced_role_binding),
        "DaemonSet": (apps.create_namespaced_daemon_set, apps.replace_namespaced_daemon_set),
        "StatefulSet": (apps.create_namespaced_stateful_set, apps.replace_namespaced_stateful_set),
        "NetworkPolicy": (net.create_namespaced_network_policy, net.replace_namespaced_network_policy),
    }[kind]
    try:
        create(ns, body)
    except ApiException as exc:
        if exc.status != 409:
            raise kopf.TemporaryError(f"creating {kind} {name}: {exc.reason}", delay=10) from exc
        replace(name, ns, body)


def ensure_secrets(namespace: str, name: str, uid: str, spec: KVCachePoolSpec) -> None:
    """Creates the operator-made Secrets the pool needs (agent certificates, its Valkey's
    password) unless they exist: they are kept (a new CA or password on every reconcile would
    split running agents from new ones). A pool that needs none costs no API call."""
    core = client.CoreV1Api()
    for secret_name, make in operator_secrets(namespace, name, uid, spec):
        try:
            core.read_namespaced_secret(secret_name, namespace)
            continue
        except ApiException as exc:
            if exc.status != 404:
                raise kopf.TemporaryError(f"reading Secret {secret_name}: {exc.reason}", delay=10) from exc
        try:
            core.create_namespaced_secret(namespace, make())
        except ApiException as exc:
            if exc.status != 409:  # 409: another reconcile made it first; that one stands
                raise kopf.TemporaryError(f"creating Secret {secret_name}: {exc.reason}", delay=10) from exc


def pool_status(
    ds_status: dict[str, Any] | None, generation: int, capacity_bytes: int, ds_generation: int = 0
) -> dict[str, Any]:
    """Pool status from its DaemonSet's status (pure; unit-tested). Agents count as ready only
    once the DaemonSet controller has seen its latest spec and every agent runs it."""
    st = ds_status or {}
    desired = int(st.get("desiredNumberScheduled") or 0)
    ready = int(st.get("numberReady") or 0)
    rolled = (
        int(st.get("observedGeneration") or 0) >= ds_generation
        and int(st.get("updatedNumberScheduled") or 0) >= desired
    )
    if not rolled:
        ready = min(ready, int(st.get("updatedNumberScheduled") or 0))
    all_ready = desired > 0 and ready == desired and rolled
    conditions = [
        _condition(
            "Ready",
            all_ready,
            "AgentsReady" if all_ready else ("NoNodes" if desired == 0 else "AgentsStarting"),
            f"{ready}/{desired} agents ready",
            generation,
        ),
        _condition(
            "Degraded",
            0 < ready < desired,
            "SomeAgentsNotReady" if 0 < ready < desired else "None",
            f"{desired - ready} of {desired} agent(s) not ready" if ready < desired else "all agents ready",
            generation,
        ),
    ]
    return {
        "nodesDesired": desired,
        "nodesReady": ready,
        "capacity": str(ready * capacity_bytes),
        "conditions": conditions,
    }


class AgentImages(NamedTuple):
    """The operator's agent images, for pools that do not pin ``spec.image``, and the Valkey
    image of pools whose Valkey it runs."""

    cpu: str
    cuda: str
    valkey: str = DEFAULT_VALKEY_IMAGE


class Plan(NamedTuple):
    """What :func:`validate` makes of a pool: its children and its parsed spec, or why not."""

    objects: list[dict[str, Any]]
    why: str = ""
    spec: KVCachePoolSpec | None = None


def validate(namespace: str, name: str, uid: str, spec: Mapping[str, Any], images: AgentImages) -> Plan:
    """The children to apply, or (``why``) why the pool cannot be reconciled."""
    why = invalid_name(name)
    if why:
        return Plan([], why)
    try:
        # The spec model and the agent's own settings model (via the manifests) both decide:
        # a size the CRD pattern allows may still be below the agent's minimum pool.
        model = KVCachePoolSpec.model_validate(dict(spec))
        agent_image = images.cuda if model.cuda else images.cpu
        return Plan(children(namespace, name, uid, model, agent_image, images.valkey), spec=model)
    except ValidationError as exc:
        return Plan([], "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


def apply_pool(namespace: str, name: str, uid: str, plan: Plan) -> None:
    """Applies a valid pool's children (from :func:`validate`), its Secrets first: the pods
    mount them."""
    assert plan.spec is not None and not plan.why
    ensure_secrets(namespace, name, uid, plan.spec)
    for child in plan.objects:
        _apply(child)


def resync_all(images: AgentImages, namespaces: list[str]) -> int:
    """Re-applies every valid pool's children (in ``namespaces``, or all); how many pools."""
    api = client.CustomObjectsApi()
    if namespaces:
        pools = [
            p
            for ns in namespaces
            for p in api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        ]
    else:
        pools = list(api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"])
    done = 0
    for pool in pools:
        meta = pool["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        plan = validate(meta["namespace"], meta["name"], meta["uid"], pool.get("spec") or {}, images)
        if plan.why:
            continue
        try:
            apply_pool(meta["namespace"], meta["name"], meta["uid"], plan)
        except kopf.TemporaryError as exc:  # one pool's failure does not stop the others'
            log.warning("resync of a pool failed", extra={"pool": meta["name"], "error": str(exc)})
            continue
        done += 1
    RECONCILES.labels("resynced").inc(done)
    return done


async def _resync_forever(images: AgentImages, every: float, namespaces: list[str]) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(resync_all, images, namespaces)
        except Exception as exc:  # the API may be briefly unreachable: the next round retries
            log.warning("resync failed", extra={"error": str(exc)})


def register(
    registry: kopf.OperatorRegistry,
    images: AgentImages,
    resync_seconds: float = 60.0,
    namespaces: list[str] | None = None,
) -> None:
    """Registers the pool handlers into ``registry``; pools that do not pin ``spec.image`` run
    one of ``images``; every ``resync_seconds`` the pools of ``namespaces`` (empty: all) are
    re-applied."""
    namespaces = list(namespaces or [])

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    def reconcile(
        body: kopf.Body,
        spec: kopf.Spec,
        name: str,
        namespace: str | None,
        uid: str,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        assert namespace is not None  # a namespaced resource
        generation = int(body.metadata.get("generation") or 0)
        plan = validate(namespace, name, uid, spec, images)
        why = plan.why
        if why:
            update_status(
                namespace,
                name,
                [_condition("ConfigValid", False, "InvalidSpec", why, generation)],
                {"observedGeneration": generation},
            )
            kopf.warn(body, reason="InvalidSpec", message=why)
            RECONCILES.labels("invalid_spec").inc()
            return
        apply_pool(namespace, name, uid, plan)
        update_status(
            namespace,
            name,
            [_condition("ConfigValid", True, "Applied", "agents' objects applied", generation)],
            {"observedGeneration": generation},
        )
        RECONCILES.labels("applied").inc()
        kopf.info(body, reason="Reconciled", message=f"applied the agents' objects for {name}")

    # Drift correction is a plain background loop, not a kopf timer: kopf puts a finalizer on
    # every object with a timer, and a pool would then hang in deletion once the operator is gone
    # (helm uninstall leaves the pools).
    @kopf.on.startup(registry=registry)
    async def start_resync(memo: kopf.Memo, **_: Any) -> None:
        memo["resync"] = asyncio.create_task(_resync_forever(images, resync_seconds, namespaces))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task is not None:
            task.cancel()

    @kopf.on.event("apps", "v1", "daemonsets", labels={POOL_LABEL: kopf.PRESENT}, registry=registry)
    def follow_daemonset(
        body: kopf.Body, namespace: str | None, labels: Mapping[str, str], type: str, **_: Any
    ) -> None:
        if namespace is None:
            return
        pool = labels[POOL_LABEL]
        obj = read_pool(namespace, pool)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return  # the pool is being deleted; its children follow by garbage collection
        if type == "DELETED":  # deleted by hand: put the agents back now, not at the next resync
            plan = validate(namespace, pool, obj["metadata"]["uid"], obj["spec"], images)
            if not plan.why:
                apply_pool(namespace, pool, obj["metadata"]["uid"], plan)
            return
        try:
            size = KVCachePoolSpec.model_validate(obj["spec"]).memory.size
        except ValidationError:
            return
        from kvfabric.agent.settings import parse_bytes

        status = pool_status(
            dict(body.get("status") or {}),
            int(obj["metadata"].get("generation") or 0),
            parse_bytes(size),
            int(body.metadata.get("generation") or 0),
        )
        conditions = status.pop("conditions")
        AGENTS.labels(namespace, pool, "desired").set(status["nodesDesired"])
        AGENTS.labels(namespace, pool, "ready").set(status["nodesReady"])
        update_status(namespace, pool, conditions, status)

    _ = (reconcile, start_resync, stop_resync, follow_daemonset)
