"""From app args to Serve options, CLI flags to app args, and the pieces of /metrics and health
(no Ray cluster: `build_app` only binds deployments)."""
from __future__ import annotations

from pathlib import Path

import subprocess
import sys

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pagoda.cluster import cli as cluster_cli
from pagoda.cluster.app import ClusterTuning, build_app, deployment_names, replica_options
from pagoda.cluster.config import ModelDeployment, parse_app_args
from pagoda.cluster.metrics import merge_expositions
from pagoda.cluster.replica import StepWatchdog, core_gets_a_process, engine_args_for
from pagoda.engine.entrypoints import cli as engine_cli
from pagoda.engine.metrics import EngineMetrics
from pagoda.engine.outputs import EngineStats

ROOT = Path(__file__).resolve().parents[2]


def test_tp1_replica_holds_its_own_gpu():
    options = replica_options(ModelDeployment(num_replicas=3, num_gpus_per_worker=1, num_cpus_per_worker=2),
                              ClusterTuning())
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert "placement_group_bundles" not in options
    assert options["max_ongoing_requests"] == 256 and options["max_queued_requests"] == -1
    router = options["request_router_config"]
    assert router.request_router_class.endswith("PrefixAwareRouter")
    assert router.request_routing_stats_period_s == ClusterTuning().routing_stats_period_s


def test_tp_replica_reserves_one_strict_pack_bundle_per_worker():
    model = ModelDeployment(tensor_parallel_size=4, min_replicas=1, max_replicas=3, target_ongoing_requests=16,
                            upscale_delay_s=5, downscale_delay_s=50, max_queued_requests=100)
    options = replica_options(model, ClusterTuning(look_back_period_s=30))
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {
        "num_cpus": 0, "num_gpus": 0, "runtime_env": {"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}}
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16.0,
                                             "upscale_delay_s": 5.0, "downscale_delay_s": 50.0,
                                             "look_back_period_s": 30}
    assert options["max_queued_requests"] == 100
    cpu_only = replica_options(ModelDeployment(tensor_parallel_size=2, num_gpus_per_worker=0), ClusterTuning())
    assert cpu_only["placement_group_bundles"] == [{"CPU": 0.5}] * 2      # CPU-only workers: half a core
    with pytest.raises(ValueError, match="bundles empty"):
        replica_options(ModelDeployment(tensor_parallel_size=2, num_gpus_per_worker=0, num_cpus_per_worker=0),
                        ClusterTuning())


def test_a_short_look_back_shortens_the_metrics_push_interval():
    options = replica_options(ModelDeployment(), ClusterTuning(look_back_period_s=2.0))
    assert options["autoscaling_config"]["metrics_interval_s"] == 0.5


def test_deployment_names_are_unique_and_serve_safe():
    config = parse_app_args({"models": [{"model": "/m/a", "served_model_name": "org/llama 3"},
                                        {"model": "/m/b", "served_model_name": "org:llama-3"}]})
    assert deployment_names(config) == {"org/llama 3": "model-org-llama-3", "org:llama-3": "model-org-llama-3-2"}


def test_engine_args_are_checked_before_any_replica_starts():
    with pytest.raises(ValueError, match=r"unknown engine_args \['max_seqs'\] for model 'default'"):
        build_app({"engine_args.max_seqs": "4"})
    with pytest.raises(ValueError, match=r"engine_args must not repeat model-level options \['distributed_executor_backend'\]"):
        build_app({"engine_args": {"distributed_executor_backend": "mp"}})
    args = engine_args_for(ModelDeployment(model="/m", served_model_name="m", tensor_parallel_size=2,
                                           engine_args={"max_model_len": 512}))
    assert (args.model, args.served_model_name, args.tensor_parallel_size, args.max_model_len,
            args.distributed_executor_backend, args.device) == ("/m", "m", 2, 512, "ray", "cuda")
    # the reserved resources pick the device; an explicit engine_args device wins
    assert engine_args_for(ModelDeployment(num_gpus_per_worker=0)).device == "cpu"
    assert engine_args_for(ModelDeployment(num_gpus_per_worker=0, engine_args={"device": "cuda"})).device == "cuda"


@pytest.mark.parametrize("deployment", [
    ModelDeployment(), ModelDeployment(num_gpus_per_worker=0), ModelDeployment(tensor_parallel_size=2),
    ModelDeployment(num_gpus_per_worker=0, engine_args={"device": "cuda"}),
    ModelDeployment(engine_args={"engine_core_process": False}),
    ModelDeployment(num_gpus_per_worker=0, engine_args={"engine_core_process": True}),
    ModelDeployment(distributed_executor_backend="mp")])
def test_replica_knows_before_importing_torch_whether_its_core_gets_a_process(deployment):
    """The constructor spawns the core process from the deployment alone, before building EngineArgs;
    both must agree (a GPU replica's core always gets a process)."""
    args = engine_args_for(deployment)
    expected = args.engine_core_process if args.engine_core_process is not None else args.device == "cuda"
    assert core_gets_a_process(deployment) is expected


def test_replica_module_imports_without_torch():
    """Serve's replica process imports this module first: it must not pull in torch or transformers,
    so that the engine core process, spawned in the constructor, imports them meanwhile."""
    code = ("import sys, pagoda.cluster.replica; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_run_can_call_the_builder_with_flat_string_args():
    # What `serve run pagoda.cluster.app:build_app model=... num_replicas=2` does (Serve's own check:
    # a builder of exactly one parameter).
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"model": "/m", "num_replicas": "2", "num_gpus_per_worker": "0", "engine_args.max_model_len": "512"})
    assert type(app).__name__ == "Application"


def test_the_deploy_serve_yaml_builds():
    application = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())["applications"][0]
    app = build_app(application["args"])
    assert type(app).__name__ == "Application"
    args, name, prefix = cluster_cli.app_args_from_file(str(ROOT / "deploy" / "serve.yaml"), "pagoda")
    assert (args, name, prefix) == (application["args"], "pagoda", "/")


def test_the_helm_charts_serve_config_builds():
    helm_python = pytest.importorskip("helm_python")
    rendered = helm_python.Chart.load(str(ROOT / "helm" / "pagoda")).render({}, name="llm", namespace="serving")
    manifests = [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
                 for doc in yaml.safe_load_all(text) if doc]
    [rayservice] = [m for m in manifests if m.get("kind") == "RayService"]
    [application] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "pagoda.cluster.app:build_app"
    assert type(build_app(application["args"])).__name__ == "Application"


def _serve_args(*argv: str):
    args = engine_cli.build_parser().parse_args(["serve", *argv])
    args.model = args.model_positional or args.model
    return args


def test_serve_flags_become_app_args():
    args = _serve_args("/models/x", "-tp", "2", "--min-replicas", "1", "--max-replicas", "4", "--max-model-len",
                       "1024", "--kv-cache-memory-bytes", "16MiB", "--max-queued-requests", "8", "--api-key", "k")
    app_args = cluster_cli.app_args_from_flags(args, has_gpus=True)
    assert app_args["models"] == [{
        "model": "/models/x", "tensor_parallel_size": 2, "min_replicas": 1, "max_replicas": 4,
        "max_queued_requests": 8, "num_gpus_per_worker": 1.0,
        "engine_args": {"max_model_len": 1024, "kv_cache_memory_bytes": 16 << 20}}]
    assert app_args["api_key_env"] == "PAGODA_API_KEY"
    config = parse_app_args(app_args)
    assert config.models[0].autoscaling and config.models[0].max_replicas == 4
    # No GPU in the cluster: CPU workers; a fixed count turns autoscaling off.
    cpu = cluster_cli.app_args_from_flags(_serve_args("default", "--num-replicas", "2"), has_gpus=False)
    [model] = parse_app_args(cpu).models
    assert model.num_gpus_per_worker == 0 and model.num_replicas == 2 and not model.autoscaling
    with pytest.raises(ValueError, match="num_replicas=2"):
        parse_app_args(cluster_cli.app_args_from_flags(
            _serve_args("default", "--num-replicas", "2", "--max-replicas", "3"), has_gpus=False))
    # where the model runs, and how many HTTP ingress replicas
    flags = cluster_cli.app_args_from_flags(_serve_args("default", "--distributed-executor-backend", "mp",
                                                        "--ingress-replicas", "3"), has_gpus=True)
    config = parse_app_args(flags)
    assert config.models[0].executor_backend == "mp" and config.ingress_replicas == 3
    with pytest.raises(ValueError, match="ingress_replicas"):
        parse_app_args({"models": [{}], "ingress_replicas": 0})


def test_the_scheduling_policy_flag_reaches_the_replicas_engine():
    [model] = parse_app_args(cluster_cli.app_args_from_flags(
        _serve_args("default", "--scheduling-policy", "priority"), has_gpus=False)).models
    assert model.engine_args == {"scheduling_policy": "priority"}
    assert engine_args_for(model).scheduling_policy == "priority"
    [model] = parse_app_args(cluster_cli.app_args_from_flags(_serve_args("default"), has_gpus=False)).models
    assert "scheduling_policy" not in model.engine_args and engine_args_for(model).scheduling_policy == "fcfs"


def test_config_file_may_hold_bare_app_args(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"model": "a"}, {"model": "b"}]}))
    args, name, prefix = cluster_cli.app_args_from_file(str(path), "mine")
    assert [m.name for m in parse_app_args(args).models] == ["a", "b"] and (name, prefix) == ("mine", "/")


def test_status_table():
    text = cluster_cli.format_status(
        "pagoda", "RUNNING", {"model-a": ("HEALTHY", {"RUNNING": 2})},
        [{"model": "a", "replica": "r1", "healthy": True, "waiting": 3, "running": 5, "kv_cache_usage": 0.25,
          "prefix_cache_hit_rate": 0.5, "num_steps": 77}])
    assert "model-a" in text and "2 RUNNING" in text
    [line] = [line for line in text.splitlines() if line.startswith("a ")]
    assert line.split() == ["a", "r1", "ok", "3", "5", "25.0%", "50.0%", "77"]
    assert "SPEC ACCEPT" not in text                      # no replica speculates: no column
    speculating = cluster_cli.format_status(
        "pagoda", "RUNNING", {"model-a": ("HEALTHY", {"RUNNING": 2})},
        [{"model": "a", "replica": "r1", "healthy": True, "waiting": 0, "running": 1, "kv_cache_usage": 0.1,
          "prefix_cache_hit_rate": 0.0, "num_steps": 9, "spec_draft_tokens": 40, "spec_accepted_tokens": 30},
         {"model": "a", "replica": "r2", "healthy": True, "waiting": 0, "running": 0, "kv_cache_usage": 0.0,
          "prefix_cache_hit_rate": 0.0, "num_steps": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}])
    assert "SPEC ACCEPT" in speculating
    r1, r2 = [line.split() for line in speculating.splitlines() if line.startswith("a ")]
    assert r1[-1] == "75.0%" and r2[-1] == "-"


def test_metrics_are_merged_with_a_replica_label():
    parts = []
    for replica, running in (("r1", 2), ("r2", 5)):
        metrics = EngineMetrics()
        metrics.record_stats("m", EngineStats(num_running=running, prefix_cache_hits=running * 16))
        parts.append(({"replica": replica}, metrics.render()))
    text = merge_expositions(parts).decode()
    assert text.count("# TYPE pagoda:num_requests_running gauge") == 1
    families = {family.name: family for family in text_string_to_metric_families(text)}
    running = {s.labels["replica"]: s.value for s in families["pagoda:num_requests_running"].samples}
    assert running == {"r1": 2.0, "r2": 5.0}
    hits = [s for s in families["pagoda:prefix_cache_hits"].samples if s.name.endswith("_total")]
    assert {(s.labels["model_name"], s.labels["replica"], s.value) for s in hits} == {("m", "r1", 32.0),
                                                                                      ("m", "r2", 80.0)}
    assert merge_expositions([]) == b""


def test_watchdog_flags_a_stuck_step_loop_only():
    watchdog = StepWatchdog(stall_timeout_s=10)
    busy = EngineStats(num_running=1, num_steps=5)
    assert watchdog.stalled_for(busy, now=0.0) is None
    assert watchdog.stalled_for(busy, now=9.0) is None
    assert watchdog.stalled_for(busy, now=11.0) == 11.0
    assert watchdog.stalled_for(EngineStats(num_running=1, num_steps=6), now=12.0) is None   # it stepped
    idle = EngineStats(num_steps=6)
    assert watchdog.stalled_for(idle, now=100.0) is None          # no work: no steps expected
    assert watchdog.stalled_for(EngineStats(num_waiting=1, num_steps=6), now=105.0) is None
    assert watchdog.stalled_for(EngineStats(num_waiting=1, num_steps=6), now=111.0) == 11.0


def test_executor_backend_defaults_and_refusals():
    # one GPU: the model runs in the replica's engine core (or a worker process under it, 'mp');
    # TP > 1: Ray worker actors
    assert engine_args_for(ModelDeployment()).distributed_executor_backend == "uni"
    assert engine_args_for(ModelDeployment(distributed_executor_backend="mp")).distributed_executor_backend == "mp"
    assert engine_args_for(ModelDeployment(tensor_parallel_size=2)).distributed_executor_backend == "ray"
    with pytest.raises(ValueError, match=r"distributed_executor_backend='mp' with tensor_parallel_size=2"):
        ModelDeployment(tensor_parallel_size=2, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match=r"distributed_executor_backend='ray' with tensor_parallel_size=1"):
        ModelDeployment(distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        ModelDeployment(distributed_executor_backend="threads")
