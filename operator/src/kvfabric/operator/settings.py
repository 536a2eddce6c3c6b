"""Settings of ``kvfabric-operator``: environment variables (set by the Helm chart) or flags.

One model is the source of truth for both, and for ``kvfabric-operator --help``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvfabric.operator import __version__

ENV_PREFIX = "KVFABRIC_"


class OperatorSettings(BaseSettings):
    """What the operator needs to know about its cluster. Every field: default and why."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    operator_namespaces: str = Field(
        default="", description="Comma-separated namespaces whose pools are reconciled; empty: all."
    )
    pod_namespace: str = Field(
        default="kvfabric",
        validation_alias="POD_NAMESPACE",
        description="The operator's own namespace (the downward API's metadata.namespace).",
    )
    agent_image: str = Field(
        default=f"kvfabric/agent:{__version__}",
        min_length=1,
        description="Agent image of pools that do not pin spec.image; the chart's agent.image, "
        "which defaults to the operator's version so agents follow operator upgrades.",
    )
    agent_cuda_image: str = Field(
        default=f"kvfabric/agent:{__version__}-cuda",
        min_length=1,
        description="Agent image of cuda pools that do not pin spec.image (CuPy and the CUDA "
        "libraries it needs; the chart's agent.image with -cuda appended).",
    )
    valkey_image: str = Field(
        default=f"kvfabric/valkey:{__version__}",
        min_length=1,
        description="Image of the Valkey the operator runs for pools with spec.fabric.valkey that "
        "name no image (the chart's valkey.image).",
    )
    resync_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Every pool's ConfigMap, DaemonSet and Service are re-applied this often, so "
        "a child deleted or edited by hand is restored (a deleted DaemonSet at once).",
    )
    webhook_port: int = Field(default=9443, ge=1, le=65535, description="HTTPS port of the pod webhook.")
    webhook_host: str = Field(
        default="",
        description="Comma-separated DNS names or IPs in the self-signed serving certificate; "
        "empty: kvfabric-webhook.<namespace>.svc.",
    )
    webhook_cert_dir: str = Field(
        default="",
        description="Directory with tls.crt and tls.key (e.g. cert-manager's secret). Reloaded "
        "when they change. Empty: the operator issues and rotates a self-signed certificate.",
    )
    webhook_configuration: str = Field(
        default="",
        description="Name of the MutatingWebhookConfiguration (made by the chart) whose caBundle "
        "the operator keeps equal to its self-signed CA; empty: none is kept.",
    )
    webhook_cert_days: float = Field(
        default=90.0,
        gt=0,
        description="Lifetime of a self-signed certificate; a new one is issued when a third is "
        "left, published beside the old one in the caBundle before it is served.",
    )
    webhook_check_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often the certificate files, the certificate's age and the published "
        "caBundle are checked.",
    )
    metrics_port: int = Field(default=9401, ge=1, le=65535, description="Prometheus metrics.")
    health_port: int = Field(
        default=9402, ge=0, le=65535, description="kopf's liveness endpoint (/healthz); 0: off."
    )

    @property
    def namespaces(self) -> list[str]:
        return [n for n in self.operator_namespaces.split(",") if n]

    def webhook_hosts(self) -> list[str]:
        hosts = [h for h in self.webhook_host.split(",") if h]
        return hosts or [f"kvfabric-webhook.{self.pod_namespace}.svc", "kvfabric-webhook"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvfabric-operator",
        description="KVFabric operator: reconciles KVCachePools into agent DaemonSets and serves the "
        "pod webhook that wires annotated vLLM pods to them. Every flag can also be set in the "
        f"environment as {ENV_PREFIX}<NAME> (POD_NAMESPACE for --pod-namespace).",
    )
    for name, field in OperatorSettings.model_fields.items():
        default = "" if field.default in ("", None) else f" (default: {field.default})"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, help=f"{field.description}{default}"
        )
    return parser


def load(argv: list[str] | None = None) -> OperatorSettings:
    """Flags over environment over defaults; ``--help`` prints every setting and exits."""
    args = build_parser().parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    if "pod_namespace" in given:  # its environment name has no prefix
        given["POD_NAMESPACE"] = given.pop("pod_namespace")
    return OperatorSettings(**given)
