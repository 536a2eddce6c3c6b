"""The CRD is generated from the spec model, and validates what the model validates."""

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kvfabric.operator.crd import crd, render
from kvfabric.operator.spec import KVCachePoolSpec

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "kvcachepools.kvfabric.io.yaml"


def schema() -> dict[str, Any]:
    return dict(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_committed_crd_is_the_generated_one() -> None:
    assert CRD_FILE.read_text() == render(), "run: python -m kvfabric.operator.crd > " + str(CRD_FILE)


def test_sample_pool_is_valid_for_the_crd_and_the_model() -> None:
    sample = yaml.safe_load((REPO / "manifests" / "sample-pool.yaml").read_text())
    jsonschema.validate(sample, schema())
    spec = KVCachePoolSpec.model_validate(sample["spec"])
    assert spec.memory.size == "8Gi" and spec.tenancy == "shared" and not spec.cuda


@pytest.mark.parametrize(
    "spec",
    [
        {},  # memory is required
        {"memory": {"size": "lots"}},
        {"memory": {"size": "8Gi"}, "tenancy": "everyone"},
        {"memory": {"size": "8Gi"}, "nvme": {"path": "", "size": "1Ti"}},
        {"memory": {"size": "8Gi"}, "tolerations": [{"effect": "Sometimes"}]},
    ],
)
def test_invalid_specs_are_rejected_by_both(spec: dict[str, Any]) -> None:
    body = {"apiVersion": "kvfabric.io/v1alpha1", "kind": "KVCachePool", "metadata": {}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, schema())
    with pytest.raises(ValueError):
        KVCachePoolSpec.model_validate(spec)


def test_schema_is_structural() -> None:
    """Kubernetes' rules for v1 CRDs: every node typed, no $ref, no properties beside
    additionalProperties, nullable instead of null types."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node and "anyOf" not in node, path
            if "properties" in node or "items" in node:
                assert "type" in node, path
            assert not ("properties" in node and "additionalProperties" in node), path
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(schema(), "openAPIV3Schema")


def test_committed_contract_is_the_generated_one() -> None:
    from kvfabric.operator.contract import render as render_contract

    doc = REPO / "docs" / "kvcachepool.md"
    assert doc.read_text() == render_contract(), "run: python -m kvfabric.operator.contract > " + str(doc)
    assert "`spec.memory.size`" in doc.read_text() and "required" in doc.read_text()
