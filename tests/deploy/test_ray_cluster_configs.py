"""deploy/cluster-{aws,gcp}.yaml and deploy/serve.yaml, checked with the installed Ray's own
validation: `ray up`'s cluster-config schema and Ray Serve's config schema."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from pagoda.cluster.config import parse_app_args

ray = pytest.importorskip("ray")
# Ray's own modules trip pydantic's V1-style deprecation warnings on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

CLUSTER_FILES = ["cluster-aws.yaml", "cluster-gcp.yaml"]
PROVIDER_SETUP = {"aws": "boto3", "gcp": "google-api-python-client"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module", params=CLUSTER_FILES)
def cluster(request, deploy_dir):
    return request.param, _load(deploy_dir / request.param)


def _gpu_node_types(config):
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"]}


def test_cluster_config_passes_ray_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    name, raw = cluster
    # The raw file against ray-schema.json first: prepare_config would fill in defaults (and the
    # schema forbids unknown top-level keys, so a typo fails here rather than being ignored).
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    import jsonschema

    jsonschema.validate(raw, json.loads(schema_path.read_text()))
    # What `ray up` does before touching the cloud: merge defaults, then validate.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.removeprefix("cluster-").removesuffix(".yaml")


def test_head_is_cpu_only_and_workers_are_gpu_nodes(cluster):
    _, config = cluster
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    [head_start] = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-gpus=0" in head_start and "--num-cpus=0" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    gpu_types = _gpu_node_types(config)
    assert gpu_types
    for node in gpu_types.values():
        assert node["resources"]["GPU"] == 8
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]


def test_setup_installs_pagoda_with_the_tested_ray(cluster):
    name, config = cluster
    assert config["file_mounts"] == {"~/pagoda": "."}
    commands = "\n".join(config["setup_commands"])
    assert '"$HOME/pagoda[cluster]"' in commands
    assert f'"ray[serve]=={ray.__version__}"' in commands, "nodes must run the Ray the tests validated against"
    assert re.search(r'"torch==[0-9.]+" --index-url \S+/cu1[0-9]+', commands)
    provider = config["provider"]["type"]
    assert PROVIDER_SETUP[provider] in "\n".join(config["head_setup_commands"])


def test_start_commands_deploy_the_serve_config(cluster, deploy_dir):
    _, config = cluster
    deploy = [c for c in config["head_start_ray_commands"] if c.startswith("serve deploy")]
    assert deploy == ["serve deploy ~/pagoda/deploy/serve.yaml"]
    assert (deploy_dir / "serve.yaml").is_file()
    [worker_start] = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_aws_and_gcp_differ_only_in_cloud_specifics(deploy_dir):
    aws, gcp = (_load(deploy_dir / name) for name in CLUSTER_FILES)
    # Installing and starting pagoda is the same everywhere; only the machines differ.
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts",
                "rsync_exclude", "max_workers", "idle_timeout_minutes", "head_node_type"):
        assert aws[key] == gcp[key], key
    assert aws["available_node_types"].keys() == gcp["available_node_types"].keys()


def test_serve_yaml_passes_ray_serve_schema_and_the_app_contract(deploy_dir):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    serve_config = _load(deploy_dir / "serve.yaml")
    ServeDeploySchema.model_validate(serve_config)
    # Ray Serve ignores unknown keys (forward compatibility); a typo must not pass silently here.
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    [application] = serve_config["applications"]
    assert set(application) <= set(ServeApplicationSchema.model_fields)
    assert application["import_path"] == "pagoda.cluster.app:build_app"
    config = parse_app_args(application["args"])
    assert config.route_prefix == application["route_prefix"]
    assert len(config.models) >= 1
    assert any(m.tensor_parallel_size > 1 and m.autoscaling for m in config.models)


@pytest.mark.parametrize("cluster_file", CLUSTER_FILES)
def test_serve_yaml_fits_the_cluster(deploy_dir, cluster_file):
    config = parse_app_args(_load(deploy_dir / "serve.yaml")["applications"][0]["args"])
    cluster = _load(deploy_dir / cluster_file)
    [gpu_node] = _gpu_node_types(cluster).values()
    gpus_per_node = gpu_node["resources"]["GPU"]
    for model in config.models:
        # Tensor-parallel shards talk over NVLink: a replica must fit on one node.
        assert model.num_gpus_per_replica <= gpus_per_node, model.name
    peak_gpus = sum((m.num_replicas or m.max_replicas) * m.num_gpus_per_replica for m in config.models)
    assert math.ceil(peak_gpus / gpus_per_node) <= gpu_node["max_workers"]
    floor_gpus = sum((m.num_replicas or m.min_replicas) * m.num_gpus_per_replica for m in config.models)
    assert floor_gpus <= gpu_node["min_workers"] * gpus_per_node or gpu_node["min_workers"] == 0
