"""pagoda.cluster.config: the app-argument contract between serve configs and build_app."""
from __future__ import annotations

import re

import pytest

from pagoda.cluster.config import (
    APP_KEYS,
    MODEL_KEYS,
    AppConfig,
    ModelDeployment,
    parse_app_args,
)


def test_empty_args_serve_the_default_model():
    config = parse_app_args({})
    assert isinstance(config, AppConfig)
    [model] = config.models
    assert model.model == "default" and model.name == "default"
    assert model.tensor_parallel_size == 1 and model.autoscaling
    assert config.api_key_env is None and config.route_prefix == "/"
    assert parse_app_args(None) == config


def test_list_form_with_several_models():
    config = parse_app_args({
        "models": [
            {"model": "/models/llama-70b", "served_model_name": "llama-70b", "tensor_parallel_size": 4,
             "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
             "engine_args": {"max_model_len": 8192, "dtype": "bfloat16"}},
            {"model": "default", "num_replicas": 2, "num_gpus_per_worker": 0},
        ],
        "api_key_env": "PAGODA_API_KEY",
        "route_prefix": "/",
        "max_request_body_bytes": 1024,
    })
    big, small = config.models
    assert big.name == "llama-70b" and big.num_gpus_per_replica == 4
    assert big.engine_args == {"max_model_len": 8192, "dtype": "bfloat16"}
    assert (big.min_replicas, big.max_replicas, big.target_ongoing_requests) == (1, 4, 16.0)
    assert not small.autoscaling and small.num_replicas == 2 and small.num_gpus_per_replica == 0
    assert config.api_key_env == "PAGODA_API_KEY" and config.max_request_body_bytes == 1024


def test_serve_run_shorthand_coerces_strings():
    # What `serve run pagoda.cluster.app:build_app model=default tensor_parallel_size=2 ...` passes.
    config = parse_app_args({
        "model": "default", "tensor_parallel_size": "2", "min_replicas": "0", "max_replicas": "3",
        "target_ongoing_requests": "8.5", "num_gpus_per_worker": "0", "served_model_name": "null",
        "engine_args.enable_prefix_caching": "true", "engine_args.max_model_len": "4096",
        "engine_args.dtype": "float16", "engine_args.gpu_memory_utilization": "0.8",
        "api_key_env": "MY_KEY", "max_request_body_bytes": "2048",
    })
    [model] = config.models
    assert model.tensor_parallel_size == 2 and isinstance(model.tensor_parallel_size, int)
    assert (model.min_replicas, model.max_replicas) == (0, 3)
    assert model.target_ongoing_requests == 8.5 and model.num_gpus_per_worker == 0
    assert model.served_model_name is None
    assert model.engine_args == {"enable_prefix_caching": True, "max_model_len": 4096,
                                 "dtype": "float16", "gpu_memory_utilization": 0.8}
    assert config.api_key_env == "MY_KEY" and config.max_request_body_bytes == 2048


def test_shorthand_engine_args_as_json_string_and_bool_strings():
    config = parse_app_args({"engine_args": '{"max_num_seqs": 64, "enable_prefix_caching": false}',
                             "num_replicas": "1"})
    assert config.models[0].engine_args == {"max_num_seqs": 64, "enable_prefix_caching": False}
    with pytest.raises(ValueError, match="engine_args='not json' is not a JSON object"):
        parse_app_args({"engine_args": "not json"})


def test_models_given_as_json_string():
    config = parse_app_args({"models": '[{"model": "a"}, {"model": "b", "tensor_parallel_size": 2}]'})
    assert [m.name for m in config.models] == ["a", "b"]


@pytest.mark.parametrize("args", [
    {"modle": "default"},
    {"model": "default", "tp": "2", "replicas": 3},
])
def test_unknown_shorthand_keys_are_named_with_the_accepted_ones(args):
    unknown = sorted(set(args) - MODEL_KEYS - APP_KEYS)
    with pytest.raises(ValueError) as excinfo:
        parse_app_args(args)
    message = str(excinfo.value)
    assert str(unknown) in message
    for accepted in ("tensor_parallel_size", "min_replicas", "api_key_env", "models"):
        assert accepted in message


def test_unknown_key_inside_a_model_entry():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in models\[1\]: \['tensor_parallel'\]; "
                                         r"accepted: .*tensor_parallel_size"):
        parse_app_args({"models": [{"model": "a"}, {"model": "b", "tensor_parallel": 2}]})


def test_model_option_beside_models_list_is_rejected():
    with pytest.raises(ValueError, match=r"\['tensor_parallel_size'\] given at the top level"):
        parse_app_args({"models": [{"model": "a"}], "tensor_parallel_size": 2})


@pytest.mark.parametrize("args, fragment", [
    ({"tensor_parallel_size": 0}, "models[0].tensor_parallel_size: Input should be greater than or equal to 1 (got 0)"),
    ({"tensor_parallel_size": "two"}, "models[0].tensor_parallel_size: Input should be a valid integer"),
    ({"max_replicas": 0}, "models[0].max_replicas: Input should be greater than or equal to 1 (got 0)"),
    ({"min_replicas": -1}, "models[0].min_replicas"),
    ({"target_ongoing_requests": 0}, "models[0].target_ongoing_requests: Input should be greater than 0 (got 0)"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas=3 is greater than max_replicas=2"),
    ({"num_replicas": 2, "max_replicas": 4}, "num_replicas=2 (a fixed count) cannot be combined with max_replicas=4"),
    ({"target_ongoing_requests": 64, "max_ongoing_requests": 32}, "target_ongoing_requests=64.0 exceeds max_ongoing_requests=32"),
    ({"engine_args": {"tensor_parallel_size": 2}}, "engine_args must not repeat model-level options ['tensor_parallel_size']"),
    ({"api_key_env": "sk-abc123"}, "api_key_env='sk-abc123' is not an environment variable name"),
    ({"route_prefix": "v1"}, "route_prefix='v1' must start with '/'"),
    ({"max_request_body_bytes": 0}, "max_request_body_bytes: Input should be greater than or equal to 1 (got 0)"),
])
def test_bad_values_are_named(args, fragment):
    with pytest.raises(ValueError) as excinfo:
        parse_app_args(args)
    assert fragment in str(excinfo.value)


def test_served_names_must_be_unique():
    with pytest.raises(ValueError, match=r"served model names must be unique, but \['m'\]"):
        parse_app_args({"models": [{"model": "/a", "served_model_name": "m"}, {"model": "m"}]})
    # The same weights twice is fine under different names.
    parse_app_args({"models": [{"model": "/a"}, {"model": "/a", "served_model_name": "a-2"}]})


@pytest.mark.parametrize("args", [[], "model=default", 3, {1: "x"}, {"models": []}])
def test_malformed_args(args):
    with pytest.raises(ValueError):
        parse_app_args(args)


def test_errors_are_value_errors_not_pydantic_internals():
    with pytest.raises(ValueError) as excinfo:
        parse_app_args({"tensor_parallel_size": 0})
    assert type(excinfo.value) is ValueError
    assert "pydantic" not in str(excinfo.value) and "errors.pydantic.dev" not in str(excinfo.value)


def test_config_module_does_not_import_ray():
    # The chart tests and the CLI validate args without a cluster; importing Ray costs seconds.
    import pagoda.cluster.config as config_module

    source = open(config_module.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+ray\b", source, re.MULTILINE)


def test_model_keys_are_the_documented_contract():
    assert MODEL_KEYS == {
        "model", "served_model_name", "tensor_parallel_size", "distributed_executor_backend", "num_replicas",
        "min_replicas",
        "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
        "max_ongoing_requests", "max_queued_requests", "engine_args", "num_gpus_per_worker",
        "num_cpus_per_worker",
    }
    assert APP_KEYS == {"api_key_env", "max_request_body_bytes", "route_prefix", "ingress_replicas", "console", "chat"}
    assert ModelDeployment().max_ongoing_requests >= ModelDeployment().target_ongoing_requests
