"""`build_app(args)`: the Ray Serve application, one deployment per model plus the HTTP ingress.

    serve run pagoda.cluster.app:build_app model=default num_gpus_per_worker=0
    serve deploy deploy/serve.yaml              (import_path: pagoda.cluster.app:build_app)
    pagoda serve [MODEL] / pagoda serve --config serve.yaml

    Ingress (FastAPI, OpenAI API) ──handle──> model-<name> deployment (LLMReplica × replicas)
                                  ──handle──> model-<other> ...

How a `ModelDeployment` becomes Serve options (`replica_options`):

    num_replicas                 fixed count; else autoscaling_config: min/max_replicas,
                                 target_ongoing_requests (Serve counts a replica's in-flight requests,
                                 i.e. the engine's waiting + running), upscale/downscale delays
    tensor_parallel_size = 1     the replica actor holds {GPU: g, CPU: c} and runs the model itself
    tensor_parallel_size = t > 1 placement_group_bundles = t × {GPU: g, CPU: c}, STRICT_PACK (one node);
                                 the replica actor takes no resources in bundle 0, RayExecutor puts
                                 worker i in bundle i. A new replica asks for a whole group, so the
                                 Ray autoscaler adds a node that fits it.
    max_ongoing_requests         Serve's per-replica cap (the engine batches what it lets through)
    max_queued_requests          requests waiting at the router beyond that; more get 503 + Retry-After
    routing                      PrefixAwareRouter (routing_policy.py), fed by record_routing_stats

Knobs that are not part of the app-argument contract (`config.py`, shared with the Helm chart) live
in `ClusterTuning`: Python callers (tests, benchmarks) use `build_application(args, tuning)`; Serve
configs and the CLI get the defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .config import AppConfig, ModelDeployment, parse_app_args
from .ingress import Ingress
from .prefix_aware_router import PrefixAwareRouter
from .replica import LLMReplica, engine_args_for
from .serve_state import AppOwner

INGRESS_DEPLOYMENT = "ingress"
# Serve's default look-back (30 s) averages out bursts; it must exceed the metrics push interval.
_SERVE_METRICS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ClusterTuning:
    """Timing and sizing knobs of the Serve app (defaults suit GPU clusters; tests shorten them)."""

    routing_stats_period_s: float = 2.0
    """How often each replica reports load and cached prefixes to the routers."""
    max_load_gap: int = 16
    """Prefix/session affinity yields to load balance past this many extra in-flight requests."""
    look_back_period_s: float = 30.0
    """The window over which the autoscaler averages in-flight requests per replica."""
    stall_timeout_s: float = 300.0
    """A replica whose engine has work but no finished step for this long fails its health check."""
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 60.0
    """How long a replica being scaled down gets to finish its requests (then they are retried)."""
    ingress_num_cpus: float = 1.0
    """CPUs each ingress replica reserves (`capacity.app_demands` counts them)."""
    ingress_max_ongoing_requests: int = 4096
    """Every request passes one ingress replica; Serve's default of 5 would throttle streaming."""


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` (see `config.parse_app_args`), as Serve calls it.

    NOTE: Serve requires a builder of exactly one parameter; `build_application` takes the tuning too.
    """
    return build_application(args, ClusterTuning())


def build_application(args: dict[str, Any], tuning: ClusterTuning, owner: AppOwner | None = None) -> Application:
    """`build_app` with explicit `ClusterTuning` (tests, benchmarks), and the `pagoda serve` process
    that deploys it (`owner`: marked on the ingress replicas, see `serve_state`)."""
    config = parse_app_args(args)
    names = deployment_names(config)
    replicas = {}
    for model in config.models:
        engine_args_for(model)      # unknown engine_args fail here, before any replica starts
        deployment = serve.deployment(LLMReplica).options(name=names[model.name], **replica_options(model, tuning))
        replicas[model.name] = deployment.bind(model.model_dump(exclude_unset=True), tuning.stall_timeout_s)
    ingress_actor_options = {"num_cpus": tuning.ingress_num_cpus, **(owner.actor_options() if owner else {})}
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=config.ingress_replicas,
        max_ongoing_requests=tuning.ingress_max_ongoing_requests, ray_actor_options=ingress_actor_options)
    return ingress.bind(config.model_dump(exclude_unset=True), replicas, names)


def deployment_names(config: AppConfig) -> dict[str, str]:
    """Served model name -> a unique, Serve-safe deployment name ("model-<name>")."""
    names: dict[str, str] = {}
    for model in config.models:
        base = "model-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", model.name).strip("-") or "unnamed")
        name, suffix = base, 2
        while name in names.values():
            name, suffix = f"{base}-{suffix}", suffix + 1
        names[model.name] = name
    return names


def replica_options(model: ModelDeployment, tuning: ClusterTuning) -> dict[str, Any]:
    """The `Deployment.options(...)` of one model's replicas."""
    options: dict[str, Any] = {
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests if model.max_queued_requests is not None else -1,
        "health_check_period_s": tuning.health_check_period_s,
        "health_check_timeout_s": tuning.health_check_timeout_s,
        "graceful_shutdown_timeout_s": tuning.graceful_shutdown_timeout_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=PrefixAwareRouter,
            request_router_kwargs={"max_load_gap": tuning.max_load_gap},
            request_routing_stats_period_s=tuning.routing_stats_period_s,
            request_routing_stats_timeout_s=max(tuning.routing_stats_period_s * 5, 10.0)),
    }
    if model.autoscaling:
        autoscaling = {
            "min_replicas": model.min_replicas, "max_replicas": model.max_replicas,
            "target_ongoing_requests": model.target_ongoing_requests,
            "upscale_delay_s": model.upscale_delay_s, "downscale_delay_s": model.downscale_delay_s,
            "look_back_period_s": tuning.look_back_period_s,
        }
        if tuning.look_back_period_s <= 2 * _SERVE_METRICS_INTERVAL_S:
            # NOTE: a short look-back only helps if handles push their counts more often than that.
            autoscaling["metrics_interval_s"] = tuning.look_back_period_s / 4
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = model.num_replicas
    bundle = {"CPU": model.num_cpus_per_worker, "GPU": model.num_gpus_per_worker}
    bundle = {resource: amount for resource, amount in bundle.items() if amount > 0}
    tp = model.tensor_parallel_size
    if tp == 1:
        options["ray_actor_options"] = {"num_cpus": model.num_cpus_per_worker, "num_gpus": model.num_gpus_per_worker}
        return options
    if not bundle:
        raise ValueError(
            f"model {model.name!r}: tensor_parallel_size={tp} with num_gpus_per_worker=0 and num_cpus_per_worker=0 "
            "leaves the workers' placement-group bundles empty; give each worker a CPU or a GPU")
    # The replica (the engine's scheduler) sits in bundle 0 with no resources of its own. It must
    # still see the node's GPUs to build a CUDA engine config: Ray leaves them visible to an actor
    # that reserved none, unless told to hide them (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO).
    options["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
    if model.num_gpus_per_worker > 0:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}
    options["placement_group_bundles"] = [dict(bundle) for _ in range(tp)]
    options["placement_group_strategy"] = "STRICT_PACK"
    return options
