"""``kvfabric-operator``: runs the reconciler and the pod webhook (kopf) plus operator metrics.

Settings (environment, set by the Helm chart):

| variable | default | meaning |
|---|---|---|
| ``KVFABRIC_OPERATOR_NAMESPACES`` | all | comma-separated namespaces to watch |
| ``KVFABRIC_WEBHOOK_PORT`` | ``9443`` | HTTPS port of the admission webhook |
| ``KVFABRIC_WEBHOOK_HOST`` | ``kvfabric-webhook.<ns>.svc`` | name in the serving certificate |
| ``KVFABRIC_WEBHOOK_CERT_DIR`` | (self-signed) | ``tls.crt``/``tls.key`` (e.g. from cert-manager) |
| ``KVFABRIC_METRICS_PORT`` | ``9401`` | Prometheus metrics |
"""

from __future__ import annotations

import asyncio
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


def build(namespace: str) -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings]:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    reconcile.register(registry)
    webhook.register(registry)
    settings = kopf.OperatorSettings()
    port = int(os.environ.get("KVFABRIC_WEBHOOK_PORT", "9443"))
    host = os.environ.get("KVFABRIC_WEBHOOK_HOST", f"kvfabric-webhook.{namespace}.svc")
    cert_dir = os.environ.get("KVFABRIC_WEBHOOK_CERT_DIR")
    if cert_dir:  # provided (cert-manager): the chart puts its CA into the webhook configuration
        certfile, pkeyfile = Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key"
        cadata = None
    else:  # self-signed, made at every start: a restart rotates it
        cert, key = self_signed([host, host.split(".")[0]])
        d = Path(tempfile.mkdtemp(prefix="kvfabric-webhook-"))
        certfile, pkeyfile = d / "tls.crt", d / "tls.key"
        certfile.write_bytes(cert)
        pkeyfile.write_bytes(key)
        cadata = cert
    settings.admission.server = kopf.WebhookServer(
        addr="0.0.0.0", port=port, host=host, certfile=str(certfile), pkeyfile=str(pkeyfile), cadata=cadata
    )
    if not cert_dir:
        settings.admission.managed = "kvfabric.kvfabric.io"  # kopf keeps the caBundle current
    return registry, settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespace = os.environ.get("POD_NAMESPACE", "kvfabric")
    start_http_server(int(os.environ.get("KVFABRIC_METRICS_PORT", "9401")))
    watched = [n for n in os.environ.get("KVFABRIC_OPERATOR_NAMESPACES", "").split(",") if n]
    registry, settings = build(namespace)
    asyncio.run(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=not watched,
            namespaces=watched,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
