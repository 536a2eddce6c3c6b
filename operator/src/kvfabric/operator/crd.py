"""Generates the ``KVCachePool`` CustomResourceDefinition from :mod:`kvfabric.operator.spec`.

    python -m kvfabric.operator.crd > crds/kvcachepools.kvfabric.io.yaml

Pydantic's JSON schema is turned into a Kubernetes *structural* schema: references inlined,
``anyOf [X, null]`` folded into ``X`` with ``nullable: true``, titles dropped.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from kvfabric.operator.spec import GROUP, KIND, PLURAL, VERSION, KVCachePoolSpec

_DROP = {"title"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1 and len(options) < len(node["anyOf"]):
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            out = _structural({**options[0], **rest}, defs)
            out["nullable"] = True
            if out.get("default", 0) is None:
                del out["default"]
            return out
    out = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue  # not allowed beside properties in a structural schema; unknown fields are pruned
        if key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "const" in out:
        out["enum"] = [out.pop("const")]
        out.setdefault("type", "string")
    return out


def spec_schema() -> dict[str, Any]:
    raw = KVCachePoolSpec.model_json_schema(by_alias=True, mode="validation")
    schema = _structural(raw, raw.get("$defs", {}))
    assert isinstance(schema, dict)
    return schema


def status_schema() -> dict[str, Any]:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Ready, ConfigValid or Degraded."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer"},
            "conditions": {"type": "array", "items": condition},
            "nodesDesired": {"type": "integer", "description": "Nodes that should run an agent."},
            "nodesReady": {"type": "integer", "description": "Nodes whose agent is ready."},
            "capacity": {"type": "string", "description": "Pool bytes across ready nodes."},
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["kvpool"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Size", "type": "string", "jsonPath": ".spec.memory.size"},
                        {"name": "NVMe", "type": "string", "jsonPath": ".spec.nvme.size"},
                        {"name": "Desired", "type": "integer", "jsonPath": ".status.nodesDesired"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.nodesReady"},
                        {
                            "name": "Status",
                            "type": "string",
                            "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kvfabric.operator.crd` from kvfabric/operator/spec.py: do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
