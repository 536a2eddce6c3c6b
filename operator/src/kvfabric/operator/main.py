"""``kvfabric-operator``: runs the reconciler (kopf), the pod webhook (HTTPS) and operator metrics.

Settings (environment, set by the Helm chart):

| variable | default | meaning |
|---|---|---|
| ``KVFABRIC_OPERATOR_NAMESPACES`` | all | comma-separated namespaces to watch |
| ``KVFABRIC_WEBHOOK_PORT`` | ``9443`` | HTTPS port of the admission webhook |
| ``KVFABRIC_WEBHOOK_HOST`` | ``kvfabric-webhook.<ns>.svc`` | name in the serving certificate |
| ``KVFABRIC_WEBHOOK_CERT_DIR`` | (self-signed) | ``tls.crt``/``tls.key`` (e.g. from cert-manager) |
| ``KVFABRIC_WEBHOOK_FAILURE_POLICY`` | ``Ignore`` | of the self-managed webhook configuration |
| ``KVFABRIC_METRICS_PORT`` | ``9401`` | Prometheus metrics |
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import kopf
from prometheus_client import start_http_server

from kvfabric.operator import reconcile, webhook
from kvfabric.operator.certs import self_signed

log = logging.getLogger(__name__)


def build() -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings]:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    reconcile.register(registry)
    return registry, kopf.OperatorSettings()


def webhook_tls(namespace: str) -> tuple[Path, Path, bytes | None, str]:
    """(certfile, keyfile, CA to publish or None, host): cert-manager's, else a fresh self-signed
    one (a restart rotates it; the operator republishes the caBundle)."""
    host = os.environ.get("KVFABRIC_WEBHOOK_HOST", f"kvfabric-webhook.{namespace}.svc")
    cert_dir = os.environ.get("KVFABRIC_WEBHOOK_CERT_DIR")
    if cert_dir:
        return Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key", None, host
    cert, key = self_signed([host, host.split(".")[0]])
    d = Path(tempfile.mkdtemp(prefix="kvfabric-webhook-"))
    (d / "tls.crt").write_bytes(cert)
    (d / "tls.key").write_bytes(key)
    return d / "tls.crt", d / "tls.key", cert, host


async def run(namespace: str) -> None:
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    certfile, keyfile, ca, host = webhook_tls(namespace)
    if ca is not None:  # self-managed: publish the configuration with our CA
        service = {"name": host.split(".")[0], "namespace": namespace, "path": webhook.PATH, "port": 443}
        webhook.ensure_configuration(
            webhook.configuration(
                {"service": service, "caBundle": base64.b64encode(ca).decode()},
                os.environ.get("KVFABRIC_WEBHOOK_FAILURE_POLICY", "Ignore"),
            )
        )
    hook = webhook.server(int(os.environ.get("KVFABRIC_WEBHOOK_PORT", "9443")), str(certfile), str(keyfile))
    # kopf owns SIGTERM/SIGINT; uvicorn must not swallow them, and stops when kopf has stopped.
    hook.capture_signals = contextlib.nullcontext
    watched = [n for n in os.environ.get("KVFABRIC_OPERATOR_NAMESPACES", "").split(",") if n]
    registry, settings = build()

    async def operator() -> None:
        try:
            await kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                clusterwide=not watched,
                namespaces=watched,
            )
        finally:
            hook.should_exit = True

    await asyncio.gather(hook.serve(), operator())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_http_server(int(os.environ.get("KVFABRIC_METRICS_PORT", "9401")))
    asyncio.run(run(os.environ.get("POD_NAMESPACE", "kvfabric")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
