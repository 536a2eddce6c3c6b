"""``kvfabric-operator``: runs the reconciler (kopf), the pod webhook (HTTPS) and operator metrics.

Settings: :class:`kvfabric.operator.settings.OperatorSettings` (environment variables set by the
Helm chart, or flags; ``kvfabric-operator --help`` lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

import kopf
from prometheus_client import start_http_server

from kvfabric.operator import reconcile, webhook
from kvfabric.operator.certs import ServingCert
from kvfabric.operator.settings import OperatorSettings, load
from kvfabric.operator.webhook import publish_ca_bundle

log = logging.getLogger(__name__)


def build(settings: OperatorSettings) -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings]:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    reconcile.register(
        registry,
        reconcile.AgentImages(settings.agent_image, settings.agent_cuda_image, settings.valkey_image),
        settings.resync_seconds,
    )
    return registry, kopf.OperatorSettings()


# How long a newly published caBundle is given to reach every apiserver (its informers) before
# the certificate it adds is served.
PROPAGATION_S = 2.0


async def keep_certificate(cert: ServingCert, settings: OperatorSettings) -> None:
    """Rotates or reloads the serving certificate and keeps the chart's webhook configuration
    trusting it (a ``helm upgrade`` that re-renders it without the caBundle is repaired too).
    A rotated certificate is published beside the old one first and served only afterwards."""
    published = -PROPAGATION_S
    while True:
        try:
            rotated = cert.rotate_if_due()
            bundle = cert.ca_bundle()
            name = settings.webhook_configuration
            if bundle is not None and name and await asyncio.to_thread(publish_ca_bundle, name, bundle):
                published = time.monotonic()
                log.info("webhook caBundle published", extra={"rotated": rotated})
            if cert.changed() and time.monotonic() - published >= PROPAGATION_S:
                cert.reload()
                log.info("webhook certificate reloaded")
        except Exception as exc:  # the API or the files may be briefly unavailable: try again
            log.warning("webhook certificate check failed", extra={"error": str(exc)})
        await asyncio.sleep(
            min(settings.webhook_check_seconds, PROPAGATION_S)
            if cert.changed()
            else settings.webhook_check_seconds
        )


async def run(settings: OperatorSettings) -> None:
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    cert = ServingCert(settings.webhook_hosts(), settings.webhook_cert_days, settings.webhook_cert_dir)
    try:
        hook = webhook.server(
            settings.webhook_port, str(cert.certfile), str(cert.keyfile), agent_image=settings.agent_image
        )
        cert.context = hook.config.ssl
        # kopf owns SIGTERM/SIGINT; uvicorn must not swallow them, and stops when kopf has stopped.
        hook.capture_signals = contextlib.nullcontext
        registry, kopf_settings = build(settings)
        watched = settings.namespaces

        async def operator() -> None:
            try:
                await kopf.operator(
                    registry=registry,
                    settings=kopf_settings,
                    standalone=True,
                    clusterwide=not watched,
                    namespaces=watched,
                    liveness_endpoint=(
                        f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
                    ),
                )
            finally:
                hook.should_exit = True

        keeper = asyncio.create_task(keep_certificate(cert, settings))
        try:
            await asyncio.gather(hook.serve(), operator())
        finally:
            keeper.cancel()
    finally:
        cert.close()  # the self-signed private key is removed on exit


def main(argv: list[str] | None = None) -> int:
    settings = load(argv)  # --help exits here, before any connection
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_http_server(settings.metrics_port)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
