"""`pagoda serve` (the Ray path) and `pagoda status`.

    pagoda serve [MODEL] [--num-replicas N | --min-replicas A --max-replicas B] [-tp T] [--address ADDR]
    pagoda serve --config serve.yaml          # several models: a Serve config file or bare app args
    pagoda status [--address ADDR]            # replicas, queue depth, KV usage, prefix-cache hit rate

`serve` joins the Ray cluster at --address, else the one running on this machine, else starts a local
one; deploys `app.build_app` as the Serve application --app-name; serves HTTP on --host:--port until
Ctrl-C or SIGTERM, then deletes the application (and stops Ray if it started it).

The engine CLI (engine/entrypoints/cli.py) owns the parser: it calls `add_serve_flags` and
`add_status_command` and hands `serve` its parsed flags. Nothing here imports Ray at module level, so
`pagoda generate` does not pay for it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import DEFAULT_MODEL, parse_app_args

logger = logging.getLogger("pagoda.cluster")

IMPORT_PATH = "pagoda.cluster.app:build_app"
DEFAULT_APP_NAME = "pagoda"
# EngineArgs fields that are model-level options of a deployment, never engine_args.
_MODEL_LEVEL = frozenset({"model", "served_model_name", "tensor_parallel_size", "distributed_executor_backend"})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (without --standalone)")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (default: the one running here, else start a local one)")
    group.add_argument("--config", default=None, help="a Serve config file or a YAML of app args (several models)")
    group.add_argument("--app-name", default=DEFAULT_APP_NAME, help="the Serve application's name")
    group.add_argument("--route-prefix", default=None, help="where the API is mounted (default /)")
    group.add_argument("--num-replicas", type=int, default=None, help="a fixed replica count (no autoscaling)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling floor")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="waiting + running requests per replica the autoscaler steers towards")
    group.add_argument("--num-gpus-per-worker", type=float, default=None,
                       help="GPUs per tensor-parallel worker (default: 1 if the cluster has GPUs, else 0)")
    group.add_argument("--num-cpus-per-worker", type=float, default=None)
    group.add_argument("--ingress-replicas", type=int, default=None,
                       help="HTTP ingress replicas (each formats ~10k streamed events/s; default 1)")


def add_status_command(commands: Any) -> None:
    status_parser = commands.add_parser("status", help="replicas, queue depth, KV usage, prefix-cache hit rate")
    status_parser.add_argument("--address", default=None, help="Ray cluster (default: the one running here)")
    status_parser.add_argument("--app-name", default=DEFAULT_APP_NAME)
    status_parser.set_defaults(handler=status)


# -- pagoda serve ----------------------------------------------------------------------------------
def app_args_from_flags(args: argparse.Namespace, has_gpus: bool) -> dict[str, Any]:
    """The app args (list form) for `pagoda serve MODEL ...` flags; pure, so testable without Ray."""
    from pagoda.engine.config import EngineArgs
    from pagoda.engine.entrypoints.auth import API_KEY_ENV
    from pagoda.engine.entrypoints.cli_args import engine_args_from

    engine_args = engine_args_from(args)
    defaults = EngineArgs()
    changed = {field.name: getattr(engine_args, field.name) for field in dataclasses.fields(EngineArgs)
               if field.name not in _MODEL_LEVEL and getattr(engine_args, field.name) != getattr(defaults, field.name)}
    model: dict[str, Any] = {"model": args.model or DEFAULT_MODEL, "tensor_parallel_size": args.tensor_parallel_size,
                             "engine_args": changed}
    if args.served_model_name:
        model["served_model_name"] = args.served_model_name
    if getattr(args, "distributed_executor_backend", None):
        model["distributed_executor_backend"] = args.distributed_executor_backend
    for flag in ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus_per_worker",
                 "max_queued_requests"):
        if getattr(args, flag, None) is not None:
            model[flag] = getattr(args, flag)
    if args.num_gpus_per_worker is not None:
        model["num_gpus_per_worker"] = args.num_gpus_per_worker
    else:
        model["num_gpus_per_worker"] = 1.0 if has_gpus and args.device != "cpu" else 0.0
    app: dict[str, Any] = {"models": [model], "max_request_body_bytes": args.max_request_body_bytes}
    if args.api_key:
        app["api_key_env"] = API_KEY_ENV
    if args.route_prefix:
        app["route_prefix"] = args.route_prefix
    if getattr(args, "ingress_replicas", None) is not None:
        app["ingress_replicas"] = args.ingress_replicas
    return app


def app_args_from_file(path: str, app_name: str) -> tuple[dict[str, Any], str, str]:
    """(app args, application name, route prefix) from a Serve config or a bare app-args YAML."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        raise ValueError(f"--config {path}: expected a YAML mapping, got {type(document).__name__}")
    if "applications" not in document:
        return document, app_name, str(document.get("route_prefix", "/"))
    applications = [a for a in document["applications"] or [] if a.get("import_path") == IMPORT_PATH]
    if len(applications) > 1:
        applications = [a for a in applications if a.get("name") == app_name]
    if len(applications) != 1:
        raise ValueError(f"--config {path}: expected one application with import_path {IMPORT_PATH!r}"
                         f"{' named ' + repr(app_name) if app_name != DEFAULT_APP_NAME else ''}, "
                         f"found {len(applications)}")
    [application] = applications
    args = application.get("args") or {}
    return args, application.get("name", app_name), application.get("route_prefix", args.get("route_prefix", "/"))


def serve(args: argparse.Namespace) -> int:
    """The engine CLI's hook for `pagoda serve` without --standalone."""
    import ray
    from ray import serve as ray_serve

    from pagoda.engine.entrypoints.auth import API_KEY_ENV

    from .app import build_app

    if args.config and args.model_positional:
        raise ValueError(f"pass MODEL ({args.model_positional!r}) or --config ({args.config!r}), not both")
    if args.api_key:
        # NOTE: a local cluster started below inherits this process's environment; a cluster joined
        # with --address must have the key in its nodes' environment already (see deploy/README).
        os.environ[API_KEY_ENV] = args.api_key
    started_ray = _connect(args.address)
    app_name, deployed = args.app_name, False
    try:
        if args.config:
            app_args, app_name, route_prefix = app_args_from_file(args.config, args.app_name)
        else:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            app_args = app_args_from_flags(args, has_gpus)
            app_name, route_prefix = args.app_name, args.route_prefix or "/"
        config = parse_app_args(app_args)
        if config.route_prefix != route_prefix:
            raise ValueError(f"the app's route_prefix={config.route_prefix!r} differs from the application's "
                             f"{route_prefix!r}")
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        logger.info("deploying %s (%s) as application %r", ", ".join(m.name for m in config.models),
                    "Ray cluster started here" if started_ray else "existing Ray cluster", app_name)
        deployed = True       # from here on, a stop (even Ctrl-C during the deploy) deletes the app
        ray_serve.run(build_app(app_args), name=app_name, route_prefix=route_prefix, blocking=False)
        logger.info("serving on http://%s:%d%s (Ctrl-C to stop)", args.host, args.port, route_prefix.rstrip("/"))
        _wait_for_signal()
    finally:
        _stop(app_name if deployed else None, started_ray)
    return 0


def _connect(address: Optional[str]) -> bool:
    """Joins a cluster; returns True when it had to start a local one."""
    import ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    try:
        ray.init(address="auto", logging_level=logging.WARNING)
        return False
    except ConnectionError:
        ray.init(logging_level=logging.WARNING)
        return True


def _wait_for_signal() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")


def _stop(app_name: Optional[str], started_ray: bool) -> None:
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():
        return
    try:
        if started_ray:
            ray_serve.shutdown()
        elif app_name is not None:
            ray_serve.delete(app_name)
    finally:
        if started_ray:
            ray.shutdown()


# -- pagoda status ---------------------------------------------------------------------------------
def status(args: argparse.Namespace) -> int:
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():
        ray.init(address=args.address or "auto", logging_level=logging.ERROR)
    serve_status = ray_serve.status()
    application = serve_status.applications.get(args.app_name)
    if application is None:
        print(f"no Serve application {args.app_name!r} (running: {sorted(serve_status.applications) or 'none'})",
              file=sys.stderr)
        return 1
    deployments = {name: (str(d.status.value if hasattr(d.status, 'value') else d.status),
                          {str(getattr(state, 'value', state)): count for state, count in d.replica_states.items()})
                   for name, d in application.deployments.items()}
    rows = ray_serve.get_app_handle(args.app_name).status.remote().result(timeout_s=30)
    print(format_status(args.app_name, str(getattr(application.status, "value", application.status)), deployments,
                        rows))
    return 0


def format_status(app_name: str, app_status: str, deployments: dict[str, tuple[str, dict[str, int]]],
                  rows: list[dict[str, Any]]) -> str:
    """The `pagoda status` text: deployments, then one line per model replica."""
    lines = [f"application {app_name}: {app_status}", ""]
    lines.append(f"{'DEPLOYMENT':<28} {'STATUS':<12} REPLICAS")
    for name, (deployment_status, replica_states) in sorted(deployments.items()):
        states = ", ".join(f"{count} {state}" for state, count in sorted(replica_states.items())) or "-"
        lines.append(f"{name:<28} {deployment_status:<12} {states}")
    lines += ["", f"{'MODEL':<20} {'REPLICA':<10} {'HEALTH':<9} {'WAITING':>7} {'RUNNING':>7} {'KV USE':>7} "
                  f"{'PREFIX HIT':>10} {'STEPS':>8}"]
    for row in rows:
        lines.append(f"{row['model']:<20} {row['replica']:<10} {'ok' if row['healthy'] else 'UNHEALTHY':<9} "
                     f"{row['waiting']:>7} {row['running']:>7} {row['kv_cache_usage']:>6.1%} "
                     f"{row['prefix_cache_hit_rate']:>10.1%} {row['num_steps']:>8}")
    if not rows:
        lines.append("(no replica has reported yet)")
    return "\n".join(lines)
