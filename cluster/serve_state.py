"""Living beside other applications on a shared Ray Serve instance: who deployed an application, whether
Serve's HTTP proxy listens where `pagoda serve` was asked to, and the URL it really serves on.

A Ray cluster holds one Serve instance: one HTTP proxy config (host, port) for all its applications,
which Serve keeps by name and route prefix. `pagoda serve` joins whatever runs there, so before it
deploys it refuses (`check_http_options`, `check_deploy`) when

    Serve's proxy listens on another port or host    changing it means restarting Serve, i.e. every app
    an application of the same name exists           Serve would replace it in place and cancel its
                                                     in-flight requests: only with an explicit --replace
    another application holds the route prefix       Serve would refuse the deploy anyway

It marks the application it deploys with its `AppOwner` (an environment variable of the ingress
replicas, which Serve reports back in the deployment's options), and on Ctrl-C deletes the
application only while that mark is still its own: after a `pagoda serve --replace` (or anyone's
redeploy) under the same name, the first process leaves the application alone.

The rules are pure functions over a `ServeState` snapshot; `read_serve_state` is the one place that
asks Ray (imported there, so the rules are testable without it).
"""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OWNER_ENV = "PAGODA_SERVE_OWNER"
_MARKER_PREFIX = "pagoda-serve"
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DELETING = "DELETING"


@dataclass(frozen=True)
class AppOwner:
    """The `pagoda serve` process that deployed an application."""

    host: str
    pid: int
    token: str
    """Random per process, so that a pid the OS hands out again is someone else."""

    @classmethod
    def this_process(cls) -> AppOwner:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8))

    def marker(self) -> str:
        return f"{_MARKER_PREFIX} host={self.host} pid={self.pid} token={self.token}"

    @classmethod
    def from_marker(cls, marker: object) -> AppOwner | None:
        """The owner a `marker()` string names; None for anything else (no mark, or not pagoda's)."""
        if not isinstance(marker, str) or not marker.startswith(_MARKER_PREFIX + " "):
            return None
        fields = dict(part.split("=", 1) for part in marker.split()[1:] if "=" in part)
        try:
            return cls(fields["host"], int(fields["pid"]), fields["token"])
        except (KeyError, ValueError):
            return None

    def actor_options(self) -> dict[str, Any]:
        """The `ray_actor_options` entry that carries the mark (merge into the ingress's options)."""
        return {"runtime_env": {"env_vars": {OWNER_ENV: self.marker()}}}

    def __str__(self) -> str:
        return f"`pagoda serve` (pid {self.pid} on {self.host})"


@dataclass(frozen=True)
class AppState:
    """One Serve application as `pagoda serve` needs to see it."""

    name: str
    route_prefix: str | None
    status: str
    owner: AppOwner | None = None


@dataclass(frozen=True)
class ServeState:
    """The Serve instance running on the cluster: its HTTP proxy config and its applications."""

    http_host: str
    http_port: int
    apps: Mapping[str, AppState] = field(default_factory=dict)
    proxy_ips: Sequence[str] = ()
    """The nodes where an HTTP proxy runs (the head node's first)."""


@dataclass(frozen=True)
class Hints:
    """How the user changes the app's name and route here: CLI flags, or the keys of a --config file."""

    rename: str = "--app-name NAME"
    reroute: str = "--route-prefix /PATH"


# -- the rules -------------------------------------------------------------------------------------
def check_http_options(serve: ServeState | None, host: str, port: int) -> None:
    """Raises ValueError when Serve already runs with its HTTP proxy somewhere `host:port` is not."""
    if serve is None:
        return
    if serve.http_port != port:
        raise ValueError(
            f"Serve already runs on this Ray cluster with its HTTP proxy on port {serve.http_port} "
            f"(host {serve.http_host}); it has one HTTP port for all its applications, so --port {port} "
            "cannot be honoured without restarting Serve, which would stop every application on it. "
            f"Pass --port {serve.http_port} to serve beside them, or use another Ray cluster (--address)")
    if not _host_covers(serve.http_host, host):
        raise ValueError(
            f"Serve already runs on this Ray cluster with its HTTP proxy on {serve.http_host}:{serve.http_port}, "
            f"which does not listen on --host {host}; the proxy's host cannot change without restarting Serve. "
            f"Pass --host {serve.http_host}, or use another Ray cluster (--address)")


def check_deploy(serve: ServeState | None, app_name: str, route_prefix: str, replace: bool,
                 hints: Hints = Hints()) -> None:
    """Raises ValueError unless deploying `app_name` at `route_prefix` leaves every other application
    as it is: the name is free (or `replace` says to take it over) and no other app has the route."""
    if serve is None:
        return
    existing = serve.apps.get(app_name)
    if existing is not None and existing.status == DELETING:
        raise ValueError(f"Serve application {app_name!r} is still being deleted; try again once it is gone")
    if existing is not None and not replace:
        who = str(existing.owner) if existing.owner is not None else "someone else (not `pagoda serve`)"
        raise ValueError(
            f"a Serve application named {app_name!r} already runs on this Ray cluster ({existing.status}, "
            f"route {existing.route_prefix}, deployed by {who}); `pagoda serve` does not replace an "
            f"application it did not create. Serve under another name with {hints.rename}, or pass "
            "--replace to replace it (which cancels its in-flight requests)")
    for other in serve.apps.values():
        if other.name != app_name and other.route_prefix == route_prefix:
            raise ValueError(
                f"route prefix {route_prefix!r} is taken by Serve application {other.name!r} on this Ray "
                f"cluster; mount this application elsewhere with {hints.reroute}")


def owned_by(serve: ServeState | None, app_name: str, owner: AppOwner) -> bool:
    """Whether `app_name` still carries `owner`'s mark (it may since have been replaced)."""
    app = serve.apps.get(app_name) if serve is not None else None
    return app is not None and app.owner == owner


def serve_url(serve: ServeState, requested_host: str, route_prefix: str, local_ip: str | None) -> str:
    """The URL the application answers on: Serve's real port, and a host the proxy listens on.

    The requested --host when the proxy listens there (on all interfaces, or on that address) on this
    machine; else the first proxy's node (e.g. the head node of a cluster joined over ray://).
    """
    proxy_here = local_ip is None or not serve.proxy_ips or local_ip in serve.proxy_ips
    if serve.http_host not in _WILDCARD_HOSTS:          # the proxy listens on one address only
        host = requested_host if proxy_here and _host_covers(serve.http_host, requested_host) else serve.http_host
    elif not proxy_here:
        host = serve.proxy_ips[0]
    elif requested_host not in _WILDCARD_HOSTS:
        host = requested_host
    else:
        host = local_ip or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve.http_port}{route_prefix.rstrip('/')}"


def _host_covers(proxy_host: str, host: str) -> bool:
    """Whether a proxy listening on `proxy_host` answers requests sent to `host`."""
    if proxy_host in _WILDCARD_HOSTS or proxy_host == host:
        return True
    return proxy_host in _LOOPBACK_HOSTS and host in _LOOPBACK_HOSTS


# -- reading Ray -----------------------------------------------------------------------------------
def read_serve_state() -> ServeState | None:
    """The Serve instance of the connected Ray cluster; None when Serve is not running there."""
    # NOTE: `serve.status()` drops the HTTP options and the deployments' options; the controller's
    # details (what it answers Ray's dashboard with) have both, through the same client call.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    details = ServeInstanceDetails(**client.get_serve_details())
    apps = {name: AppState(name, app.route_prefix, str(getattr(app.status, "value", app.status)),
                           _owner_of(app.deployments.values()))
            for name, app in details.applications.items()}
    http = details.http_options
    proxy_ips = [proxy.node_ip for proxy in details.proxies.values() if proxy.node_ip]
    return ServeState(http.host if http else "0.0.0.0", http.port if http else 8000, apps, proxy_ips)


def _owner_of(deployments: Any) -> AppOwner | None:
    for deployment in deployments:
        options = deployment.deployment_config.ray_actor_options
        runtime_env = (options.get("runtime_env") if isinstance(options, Mapping)
                       else getattr(options, "runtime_env", None)) or {}
        owner = AppOwner.from_marker((runtime_env.get("env_vars") or {}).get(OWNER_ENV))
        if owner is not None:
            return owner
    return None
