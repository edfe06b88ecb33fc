"""Fixtures shared by the deployment tests: repository paths, the KubeRay CRD schema, the chart.

The KubeRay RayService CRD is test data in `tests/deploy/data/` (upstream, commit and licence in
that folder's README.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE_CRD = Path(__file__).resolve().parent / "data" / "ray.io_rayservices.yaml"
CHART_DIR = ROOT / "helm" / "pagoda"
DEPLOY_DIR = ROOT / "deploy"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY_DIR


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def rayservice_validator():
    """A jsonschema validator for RayService objects, from the CRD's served storage version.

    NOTE: the API server prunes unknown fields of a CRD object silently (and `kubectl apply
    --validate=strict` rejects them), so a misspelt key in the chart would simply vanish. The
    validator closes every object schema that lists its properties, turning such a key into a
    test failure instead.
    """
    jsonschema = pytest.importorskip("jsonschema")
    if not RAYSERVICE_CRD.is_file():
        pytest.fail(f"KubeRay RayService CRD not found at {RAYSERVICE_CRD} (see tests/deploy/data/README.md)")
    # The CRD is 1 MB of YAML: the C loader reads it in a quarter of the time.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=loader)  # noqa: S506 - a safe loader
    served = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    assert len(served) == 1, [v["name"] for v in crd["spec"]["versions"]]
    schema = _close_objects(served[0]["schema"]["openAPIV3Schema"])
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_cls(schema)


def _close_objects(node: Any) -> Any:
    if isinstance(node, dict):
        node = {key: _close_objects(value) for key, value in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_close_objects(item) for item in node]
    return node


@pytest.fixture(scope="session")
def render_chart():
    """render_chart(values) -> list of manifests (dicts) that `helm template` would print."""
    helm_python = pytest.importorskip("helm_python")
    chart = helm_python.Chart.load(str(CHART_DIR))

    def render(values: dict | None = None, name: str = "llm", namespace: str = "serving") -> list[dict]:
        rendered = chart.render(values or {}, name=name, namespace=namespace)
        manifests = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return manifests

    render.chart = chart
    return render
