"""helm/pagoda: rendered with a real Helm (helm-python-sdk embeds Helm v4) for several value sets;
every RayService is checked against the KubeRay CRD, its serveConfigV2 against Ray Serve's schema
and pagoda's app-argument contract."""
from __future__ import annotations

import base64
import importlib
import inspect
import json
import re

import pytest
import yaml

from pagoda.cluster.config import APP_KEYS, AppConfig, ModelDeployment, parse_app_args

IMPORT_PATH = "pagoda.cluster.app:build_app"
# Ray's own modules trip pydantic's V1-style deprecation warnings on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

VALUE_SETS = {
    "defaults": {},
    "tp4_autoscaling": {
        "models": [{"model": "/models/llama-70b", "served_model_name": "llama-70b",
                    "tensor_parallel_size": 4, "min_replicas": 1, "max_replicas": 6,
                    "target_ongoing_requests": 24, "upscale_delay_s": 15,
                    "engine_args": {"max_model_len": 8192, "gpu_memory_utilization": 0.9}}],
        "worker": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
                   "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
                   "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]},
        "autoscaler": {"upscalingMode": "Aggressive", "idleTimeoutSeconds": 120},
    },
    "api_key_existing_secret": {"apiKey": {"existingSecret": "pagoda-keys", "secretKey": "token"}},
    "api_key_value_monitoring_service": {
        "apiKey": {"value": "s3cr3t-key"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "service": {"enabled": True, "type": "LoadBalancer"},
    },
    "two_models_packed_8_gpus": {
        "models": [{"model": "/models/a", "tensor_parallel_size": 4, "min_replicas": 0, "max_replicas": 3},
                   {"model": "/models/b", "tensor_parallel_size": 2, "num_replicas": 2}],
        "worker": {"gpusPerPod": 8, "idleTimeoutSeconds": 300},
    },
    "cpu_only": {
        "models": [{"model": "default", "num_gpus_per_worker": 0, "num_replicas": 1}],
        "worker": {"tolerations": [], "shmSize": None},
    },
}


def _by_kind(manifests, kind):
    return [m for m in manifests if m["kind"] == kind]


def _rayservice(manifests):
    [rayservice] = _by_kind(manifests, "RayService")
    return rayservice


def _head_container(rayservice):
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker_group(rayservice):
    [group] = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _worker_container(rayservice):
    return _worker_group(rayservice)["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, render_chart):
    return request.param, render_chart(VALUE_SETS[request.param])


def test_chart_lints_clean(chart_dir):
    helm_python = pytest.importorskip("helm_python")
    report = helm_python.lint(str(chart_dir), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_rayservice_matches_kuberay_crd(rendered, rayservice_validator):
    _, manifests = rendered
    rayservice = _rayservice(manifests)
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rayservice), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # KubeRay rejects RayService names that are not DNS-1035 labels or exceed 47 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rayservice["metadata"]["name"])
    assert len(rayservice["metadata"]["name"]) <= 47


def test_crd_validation_catches_misspelt_and_mistyped_fields(render_chart, rayservice_validator):
    rayservice = _rayservice(render_chart({}))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    _worker_group(rayservice)["maxReplicas"] = "4"
    messages = [e.message for e in rayservice_validator.iter_errors(rayservice)]
    assert any("readinesProbe" in m for m in messages), messages
    assert any("'4' is not of type 'integer'" in m for m in messages), messages


def test_serve_config_v2_is_a_valid_pagoda_app(rendered, chart_dir):
    pytest.importorskip("ray.serve.schema")
    name, manifests = rendered
    serve_config = yaml.safe_load(_rayservice(manifests)["spec"]["serveConfigV2"])
    _check_serve_config(serve_config)
    [application] = serve_config["applications"]
    config = parse_app_args(application["args"])
    # The models reach the app exactly as written in values: the chart adds nothing to them.
    default_models = yaml.safe_load((chart_dir / "values.yaml").read_text())["models"]
    expected = VALUE_SETS[name].get("models", default_models)
    assert application["args"]["models"] == expected
    assert [m.tensor_parallel_size for m in config.models] == [m.get("tensor_parallel_size", 1) for m in expected]


def _check_serve_config(serve_config: dict) -> None:
    """Ray Serve's own schema, plus the strictness it leaves out (it ignores unknown keys for
    forward compatibility, so a typo would be silently dropped)."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    assert set(serve_config) <= set(ServeDeploySchema.model_fields), set(serve_config)
    for application in serve_config["applications"]:
        assert set(application) <= set(ServeApplicationSchema.model_fields), set(application)
        assert application["import_path"] == IMPORT_PATH
        config = parse_app_args(application.get("args", {}))
        # AppConfig.route_prefix must equal the Serve route prefix the proxy uses.
        assert config.route_prefix == application.get("route_prefix", "/")


def test_api_key_comes_from_a_secret_never_from_values(render_chart):
    manifests = render_chart(VALUE_SETS["api_key_existing_secret"])
    rayservice = _rayservice(manifests)
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert parse_app_args(args).api_key_env == "PAGODA_API_KEY"
    assert not _by_kind(manifests, "Secret"), "existingSecret must be referenced, not created"
    for container in (_head_container(rayservice), _worker_container(rayservice)):
        [entry] = [e for e in container["env"] if e["name"] == "PAGODA_API_KEY"]
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "pagoda-keys", "key": "token"}


def test_api_key_value_creates_the_referenced_secret(render_chart):
    manifests = render_chart(VALUE_SETS["api_key_value_monitoring_service"])
    [secret] = _by_kind(manifests, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "s3cr3t-key"
    rayservice = _rayservice(manifests)
    assert "s3cr3t-key" not in json.dumps(rayservice), "the key itself must not appear in the RayService"
    for container in (_head_container(rayservice), _worker_container(rayservice)):
        [entry] = [e for e in container["env"] if e["name"] == "PAGODA_API_KEY"]
        assert entry["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_no_api_key_by_default(render_chart):
    rayservice = _rayservice(render_chart({}))
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert parse_app_args(args).api_key_env is None
    assert "env" not in _head_container(rayservice)


def test_head_takes_no_gpu_work(rendered, render_chart):
    for manifests in (rendered[1], render_chart({"head": {"rayStartParams": {"num-gpus": "2"}}})):
        rayservice = _rayservice(manifests)
        head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        resources = _head_container(rayservice)["resources"]
        assert not any("gpu" in key for part in resources.values() for key in part)


@pytest.mark.parametrize("values, gpus, min_pods, max_pods", [
    ({}, "1", 1, 2),
    (VALUE_SETS["tp4_autoscaling"], "4", 1, 6),
    # 4-GPU replicas of a (0..3) and 2-GPU replicas of b (2) packed into 8-GPU pods:
    # min = ceil(0*4/8) + ceil(2*2/8) = 1, max = ceil(3*4/8) + ceil(2*2/8) = 3.
    (VALUE_SETS["two_models_packed_8_gpus"], "8", 1, 3),
    ({"models": [{"model": "m", "tensor_parallel_size": 2}], "worker": {"minReplicas": 2, "maxReplicas": 5, "replicas": 3}},
     "2", 2, 5),
])
def test_worker_group_gpus_and_bounds_follow_the_models(render_chart, values, gpus, min_pods, max_pods):
    rayservice = _rayservice(render_chart(values))
    group = _worker_group(rayservice)
    resources = _worker_container(rayservice)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == gpus
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    assert (group["minReplicas"], group["maxReplicas"]) == (min_pods, max_pods)
    assert min_pods <= group["replicas"] <= max_pods
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_cpu_only_models_request_no_gpus(render_chart):
    rayservice = _rayservice(render_chart(VALUE_SETS["cpu_only"]))
    resources = _worker_container(rayservice)["resources"]
    assert not any("gpu" in key for part in resources.values() for key in part)


def test_replica_larger_than_a_pod_fails_to_render(render_chart):
    helm_python = pytest.importorskip("helm_python")
    with pytest.raises(helm_python.HelmRenderError, match="worker.gpusPerPod=2 is smaller than the largest model replica"):
        render_chart({"models": [{"model": "m", "tensor_parallel_size": 4}], "worker": {"gpusPerPod": 2}})
    with pytest.raises(helm_python.HelmRenderError, match="worker.replicas=9 must lie within"):
        render_chart({"worker": {"replicas": 9}})
    with pytest.raises(helm_python.HelmRenderError, match="worker.maxReplicas=1 is smaller than worker.minReplicas=3"):
        render_chart({"worker": {"minReplicas": 3, "maxReplicas": 1}})


@pytest.mark.parametrize("values, where", [
    ({"models": [{"model": "m", "tensor_parallel_size": 0}]}, "tensor_parallel_size"),
    ({"models": [{"model": "m", "tensor_paralel_size": 2}]}, "tensor_paralel_size"),
    ({"models": []}, "models"),
    ({"worker": {"gpuPerPod": 8}}, "gpuPerPod"),
    ({"apiKey": {"envVar": "not-a-var"}}, "envVar"),
])
def test_values_schema_rejects_bad_values(render_chart, values, where):
    helm_python = pytest.importorskip("helm_python")
    with pytest.raises(helm_python.HelmValuesError, match=where):
        render_chart(values)


def test_values_schema_mirrors_the_app_contract(chart_dir):
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    model_schema = schema["properties"]["models"]["items"]
    assert set(model_schema["properties"]) == set(ModelDeployment.model_fields)
    assert model_schema["additionalProperties"] is False
    assert set(schema["properties"]["app"]["properties"]) <= APP_KEYS
    # Every default value set passes both the chart schema and the Python contract.
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    AppConfig.model_validate({"models": values["models"], **values["app"]})


def test_probes_resources_and_scheduling_are_set(rendered):
    name, manifests = rendered
    rayservice = _rayservice(manifests)
    for container in (_head_container(rayservice), _worker_container(rayservice)):
        assert container["readinessProbe"]["exec"]["command"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert {"name": "serve", "containerPort": 8000} in container["ports"]
    worker_pod = _worker_group(rayservice)["template"]["spec"]
    # The serve proxy check keeps pods without a proxy out of the serve Service.
    assert "/-/healthz" in " ".join(_worker_container(rayservice)["readinessProbe"]["exec"]["command"])
    expected_selector = VALUE_SETS[name].get("worker", {}).get("nodeSelector")
    assert worker_pod.get("nodeSelector") == expected_selector
    if name == "defaults":
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker_pod["tolerations"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in worker_pod["volumes"])


def test_services_and_service_monitor_select_the_ray_pods(render_chart):
    assert not _by_kind(render_chart({}), "ServiceMonitor")
    manifests = render_chart(VALUE_SETS["api_key_value_monitoring_service"])
    rayservice = _rayservice(manifests)
    head_labels = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    worker_labels = _worker_group(rayservice)["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in _by_kind(manifests, "Service")}
    metrics_service = services["llm-pagoda-metrics"]
    assert metrics_service["spec"]["clusterIP"] == "None"
    for labels in (head_labels, worker_labels):
        assert metrics_service["spec"]["selector"].items() <= labels.items()
    api_service = services["llm-pagoda-api"]
    assert api_service["spec"]["type"] == "LoadBalancer"
    assert {k: v for k, v in api_service["spec"]["selector"].items() if k != "ray.io/serve"}.items() <= worker_labels.items()

    [monitor] = _by_kind(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    port_names = {p["name"] for p in metrics_service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    [serve_endpoint] = [e for e in monitor["spec"]["endpoints"] if e["port"] == "serve"]
    assert serve_endpoint["authorization"]["credentials"]["name"] == "llm-pagoda-api-key"


def test_notes_tell_how_to_reach_the_api(render_chart):
    notes = render_chart.chart.render({"apiKey": {"existingSecret": "keys"}}, name="llm", namespace="serving")
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert "port-forward svc/llm-pagoda-serve-svc 8000:8000" in text
    assert "/v1/completions" in text and "Authorization: Bearer" in text


def test_app_builder_is_importable_and_takes_one_args_dict():
    pytest.importorskip("ray.serve", reason="the app builder needs Ray Serve: pip install 'pagoda[cluster]'")
    module_name, attribute = IMPORT_PATH.split(":")
    build_app = getattr(importlib.import_module(module_name), attribute)
    signature = inspect.signature(build_app)
    # Ray Serve calls the builder with the application's `args` as one positional dict.
    signature.bind({"models": [{"model": "default"}]})
    required = [p for p in signature.parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(required) == 1, signature
