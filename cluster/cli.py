"""`pagoda serve` (the Ray path) and `pagoda status`.

    pagoda serve [MODEL] [--num-replicas N | --min-replicas A --max-replicas B] [-tp T] [--address ADDR]
    pagoda serve --config serve.yaml          # several models: a Serve config file or bare app args
    pagoda status [--address ADDR]            # replicas, queue depth, KV usage, prefix-cache hit rate

`serve` joins the Ray cluster at --address, else the one running on this machine, else starts a local
one; deploys `app.build_app` as the Serve application --app-name; serves HTTP on --host:--port until
Ctrl-C or SIGTERM, then deletes the application (and stops Ray if it started it).

A joined cluster is shared: other people's applications run on it, under one Serve HTTP proxy.
`serve` therefore deploys only once nothing else would change (`serve_state`): the proxy already
listens on --port, no application of that name exists (unless --replace), no other application holds
the route; and only once the app fits the cluster (`capacity`), since Serve waits forever, without a
word, for replicas it cannot place. On the way out it deletes the application only while it still
carries this process's mark, and waits for that a few seconds at most.

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
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from pagoda.engine.entrypoints.settings import CHAT_SETTINGS

from .capacity import app_demands, check_capacity, read_cluster_resources
from .config import DEFAULT_MODEL, AppConfig, parse_app_args
from .serve_state import (DELETING, AppOwner, Hints, ServeState, check_deploy, check_http_options, owned_by,
                          read_serve_state, serve_url)

logger = logging.getLogger("pagoda.cluster")

IMPORT_PATH = "pagoda.cluster.app:build_app"
DEFAULT_APP_NAME = "pagoda"
# On Ctrl-C, how long to wait for Serve to delete the application before exiting anyway (Serve
# finishes the deletion on its own, letting in-flight requests drain).
STOP_WAIT_S = 10.0
# How long a deploy waits for an application of the same name (or route) that Serve is deleting.
DELETING_WAIT_S = 60.0
# EngineArgs fields that are model-level options of a deployment, never engine_args.
_MODEL_LEVEL = frozenset({"model", "served_model_name", "tensor_parallel_size", "distributed_executor_backend"})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (without --standalone)")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (default: the one running here, else start a local one)")
    group.add_argument("--config", default=None, help="a Serve config file or a YAML of app args (several models)")
    group.add_argument("--app-name", default=DEFAULT_APP_NAME,
                       help="the Serve application's name (an existing one of that name is left alone, "
                            "see --replace)")
    group.add_argument("--replace", action="store_true",
                       help="replace an existing Serve application of the same name, though this process did not "
                            "deploy it (its in-flight requests are cancelled)")
    group.add_argument("--wait-for-nodes", action="store_true",
                       help="deploy even if the app does not fit the cluster's nodes, and wait for nodes to join "
                            "(default: fail, unless Ray's autoscaler launches nodes here)")
    group.add_argument("--route-prefix", default=None, help="where the API is mounted (default /)")
    group.add_argument("--num-replicas", type=int, default=None, help="a fixed replica count (no autoscaling)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling floor")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="waiting + running requests per replica the autoscaler steers towards")
    group.add_argument("--num-gpus-per-worker", type=float, default=None,
                       help="GPUs per tensor-parallel worker (default: 1 if the cluster has GPUs, else 0)")
    group.add_argument("--num-cpus-per-worker", type=float, default=None,
                       help="CPUs reserved per tensor-parallel worker (default: 1 with a GPU, 0.5 without)")
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
    if getattr(args, "disable_console", False):
        app["console"] = False
    chat = {name: getattr(args, name) for name in CHAT_SETTINGS if getattr(args, name, None) not in (None, False)}
    if chat:
        app["chat"] = chat
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
    """The engine CLI's hook for `pagoda serve` without --standalone.

    Invariants: nothing on the cluster changes until every check has passed (Serve's HTTP port and
    host, the application's name and route, the capacity); from the deploy on, every way out deletes
    the application if it still carries this process's mark, and takes at most STOP_WAIT_S for it.
    """
    import ray
    from ray import serve as ray_serve

    from pagoda.engine.entrypoints.auth import API_KEY_ENV

    from .app import ClusterTuning, build_application

    if args.config and args.model_positional:
        raise ValueError(f"pass MODEL ({args.model_positional!r}) or --config ({args.config!r}), not both")
    if args.api_key:
        # NOTE: a local cluster started below inherits this process's environment; a cluster joined
        # with --address must have the key in its nodes' environment already (see deploy/README).
        os.environ[API_KEY_ENV] = args.api_key
    started_ray = _connect(args.address)
    # SIGTERM stops like Ctrl-C, also during the deploy. NOTE: set after ray.init, which installs a
    # handler that prints a stack trace on SIGTERM; this one replaces it.
    signal.signal(signal.SIGTERM, _interrupt)
    owner, tuning = AppOwner.this_process(), ClusterTuning()
    app_name, deployed = args.app_name, False
    try:
        if args.config:
            app_args, app_name, route_prefix = app_args_from_file(args.config, args.app_name)
            hints = _config_hints(args.config)
        else:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            app_args = app_args_from_flags(args, has_gpus)
            app_name, route_prefix, hints = args.app_name, args.route_prefix or "/", Hints()
        config = parse_app_args(app_args)
        if config.route_prefix != route_prefix:
            raise ValueError(f"the app's route_prefix={config.route_prefix!r} differs from the application's "
                             f"{route_prefix!r}")
        serve_state = _wait_while_deleting(app_name, route_prefix)
        check_http_options(serve_state, args.host, args.port)
        check_deploy(serve_state, app_name, route_prefix, args.replace, hints)
        if serve_state is None and (started_ray or _head_node_is_here()):
            _check_port_free(args.host, args.port)
        _check_capacity(config, tuning.ingress_num_cpus, app_name, args.wait_for_nodes, as_flags=not args.config)
        if serve_state is None:
            ray_serve.start(http_options={"host": args.host, "port": args.port})
        elif app_name in serve_state.apps:
            logger.warning("replacing Serve application %r (deployed by %s), as --replace asks", app_name,
                           serve_state.apps[app_name].owner or "someone else")
        logger.info("deploying %s (%s) as application %r", ", ".join(m.name for m in config.models),
                    "Ray cluster started here" if started_ray else "existing Ray cluster", app_name)
        deployed = True       # from here on, a stop (even Ctrl-C during the deploy) deletes the app
        ray_serve.run(build_application(app_args, tuning, owner), name=app_name, route_prefix=route_prefix)
        url = serve_url(read_serve_state() or ServeState(args.host, args.port), args.host, route_prefix,
                        ray.util.get_node_ip_address())
        logger.info("serving on %s (Ctrl-C to stop)", url)
        _wait_for_signal()
    finally:
        _stop(app_name if deployed else None, owner, started_ray)
    return 0


def _config_hints(path: str) -> Hints:
    """A Serve config names its application and route itself; a bare app-args file takes --app-name."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if isinstance(document, dict) and "applications" in document:
        return Hints(rename=f"another `name` in {path}", reroute=f"another `route_prefix` in {path}")
    return Hints(rename="--app-name NAME", reroute=f"another `route_prefix` in {path}")


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


def _wait_while_deleting(app_name: str, route_prefix: str) -> ServeState | None:
    """Serve's state, once no application of this name or route is still being deleted (a previous
    `pagoda serve` that just stopped) or DELETING_WAIT_S have passed."""
    deadline = time.monotonic() + DELETING_WAIT_S
    while True:
        state = read_serve_state()
        leaving = sorted(app.name for app in (state.apps.values() if state else ())
                         if app.status == DELETING and (app.name == app_name or app.route_prefix == route_prefix))
        if not leaving or time.monotonic() > deadline:
            return state
        logger.info("waiting for Serve to finish deleting %s", ", ".join(map(repr, leaving)))
        time.sleep(1.0)


def _head_node_is_here() -> bool:
    """Whether Serve's proxy would start on this machine (it always runs on the head node)."""
    import ray

    here = ray.util.get_node_ip_address()
    return any(node.get("Alive") and "node:__internal_head__" in node.get("Resources", {})
               and node.get("NodeManagerAddress") == here for node in ray.nodes())


def _check_port_free(host: str, port: int) -> None:
    """Serve's proxy is about to listen on host:port here: fail now, by name, if something else does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"--port {port}: {host}:{port} is not free on this machine ({error.strerror}; "
                             "another server, or another Ray cluster's Serve, listens there); pass a free "
                             "--port") from None


def _check_capacity(config: AppConfig, ingress_num_cpus: float, app_name: str, wait_for_nodes: bool,
                    as_flags: bool) -> None:
    """Fails (ValueError) when the app can never be placed on the cluster as it is; warns when it fits
    only later (resources held by others, nodes an autoscaler may add) or in part (max_replicas)."""
    cluster = read_cluster_resources(wait_for_nodes)
    report = check_capacity(app_demands(config, ingress_num_cpus), cluster)
    for warning in report.warnings:
        logger.warning("application %r: %s", app_name, warning)
    if report.fits:
        return
    reason = f"application {app_name!r} cannot be scheduled on this Ray cluster: {report.unschedulable}"
    if cluster.can_add_nodes:
        logger.warning("%s; waiting for nodes to join (--wait-for-nodes, or Ray's autoscaler)", reason)
        return
    raise ValueError(f"{reason}. No autoscaler adds nodes to this cluster, so Serve would wait forever: change "
                     f"{report.options_text(as_flags)}, or pass --wait-for-nodes if nodes will join")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_for_signal() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")


def _stop(app_name: str | None, owner: AppOwner, started_ray: bool) -> None:
    """Deletes `app_name` if it still carries `owner`'s mark, waiting STOP_WAIT_S at most; stops Ray if
    this process started it (which ends every application on that cluster)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        if app_name is not None:
            _delete_if_owned(app_name, owner)
        if started_ray:
            others = sorted(set((read_serve_state() or ServeState("", 0)).apps) - {app_name})
            if others:
                logger.warning("stopping the Ray cluster this process started, and with it the applications "
                               "others deployed on it: %s", ", ".join(map(repr, others)))
    finally:
        if started_ray:
            ray.shutdown()


def _delete_if_owned(app_name: str, owner: AppOwner) -> None:
    from ray import serve as ray_serve

    state = read_serve_state()
    if not owned_by(state, app_name, owner):
        if state is not None and app_name in state.apps:
            logger.warning("leaving Serve application %r alone: it was replaced since, by %s", app_name,
                           state.apps[app_name].owner or "someone else")
        return
    # NOTE: the mark is read just before the delete; a replace landing in between is deleted too.
    # Serve offers no compare-and-delete, and the window is one controller round trip.
    ray_serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + STOP_WAIT_S
    while app_name in ray_serve.status().applications:
        if time.monotonic() > deadline:
            logger.warning("Serve is still deleting application %r; it finishes on its own", app_name)
            return
        time.sleep(0.25)
    logger.info("deleted Serve application %r", app_name)


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
    # the speculative-decoding column only where some replica verified drafts
    speculating = any(row.get("spec_draft_tokens") for row in rows)
    lines += ["", f"{'MODEL':<20} {'REPLICA':<10} {'HEALTH':<9} {'WAITING':>7} {'RUNNING':>7} {'KV USE':>7} "
                  f"{'PREFIX HIT':>10} {'STEPS':>8}" + (f" {'SPEC ACCEPT':>11}" if speculating else "")]
    for row in rows:
        line = (f"{row['model']:<20} {row['replica']:<10} {'ok' if row['healthy'] else 'UNHEALTHY':<9} "
                f"{row['waiting']:>7} {row['running']:>7} {row['kv_cache_usage']:>6.1%} "
                f"{row['prefix_cache_hit_rate']:>10.1%} {row['num_steps']:>8}")
        if speculating:
            drafts = row.get("spec_draft_tokens") or 0
            line += f" {row.get('spec_accepted_tokens', 0) / drafts:>11.1%}" if drafts else f" {'-':>11}"
        lines.append(line)
    if not rows:
        lines.append("(no replica has reported yet)")
    return "\n".join(lines)
