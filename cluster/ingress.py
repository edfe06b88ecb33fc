"""The HTTP ingress deployment: the OpenAI app of `build_app`, over a `ClusterEngineClient`.

Serve builds the ASGI app after the constructor (`@serve.ingress()` with `__serve_build_asgi_app__`),
so the app wraps the client that holds this replica's handles to the model deployments. The same
routes, errors, authentication and streaming as the standalone server; the replica label on
/metrics, `status()` (for `pagoda status`) and the console's document of every replica
(`GET /v1/cluster/status`, with Serve's replica counts from `ServeView`) are what the cluster adds.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional

from fastapi import FastAPI
from ray import serve
from starlette.middleware import Middleware

from pagoda.engine.entrypoints.openai.api_server import build_app as build_openai_app
from pagoda.engine.entrypoints.settings import ServerSettings

from .client import ClusterEngineClient, DeploymentView, ModelRoute, RequestScopeMiddleware
from .config import AppConfig

logger = logging.getLogger(__name__)


def build_ingress_app(client: ClusterEngineClient, settings: ServerSettings) -> FastAPI:
    """`build_app`'s FastAPI app plus the request-scope middleware, innermost (inside the guard)."""
    app = build_openai_app(client, settings, cluster_status=client.cluster_status)
    # NOTE: add_middleware would make it outermost, ahead of the API-key and body-size guard;
    # appending puts it last in the user stack, i.e. just around the routes. The stack is built on
    # the first request, after this.
    app.user_middleware.append(Middleware(RequestScopeMiddleware, client=client))
    return app


@serve.ingress()
class Ingress:
    async def __init__(self, app_config: dict[str, Any], replicas: dict[str, Any],
                       deployment_names: dict[str, str]) -> None:
        """replicas: served model name -> handle of its deployment (Serve turns the bound
        deployments passed by `app.build_app` into handles)."""
        config = AppConfig.model_validate(app_config)
        api_key = None
        if config.api_key_env is not None:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env={config.api_key_env!r}, but that environment variable is not set "
                                 "(or empty) on this node")
        routes = [ModelRoute(model, deployment_names[model.name], replicas[model.name]) for model in config.models]
        app_name = serve.get_replica_context().app_name
        self.client = ClusterEngineClient(routes, app_name=app_name, serve_view=ServeView(app_name))
        self.settings = ServerSettings(api_key=api_key, max_request_body_bytes=config.max_request_body_bytes,
                                       disable_console=not config.console, **config.chat)
        # Fetch each always-on model's tokenizer now, not on its first request (this also starts
        # the handle's router, so `status()` and /metrics see the replicas from the start).
        self._warm_up = [asyncio.ensure_future(self._describe(route)) for route in routes
                         if (route.deployment.num_replicas or route.deployment.min_replicas) > 0]
        await self.client.open_channel()

    @staticmethod
    async def _describe(route: ModelRoute) -> None:
        try:
            await route.ready()
        except Exception:  # noqa: BLE001 - the first request tries again
            logger.warning("could not describe model %r yet", route.name, exc_info=True)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self.client, self.settings)

    async def status(self) -> list[dict[str, Any]]:
        """One row per model replica (what `pagoda status` prints)."""
        return self.client.status()


class ServeView:
    """Serve's target replica count and replica states of this app's deployments, from the controller.

    The console polls every second or two from each open page, and the controller's answer covers
    every application: one fetch at a time, its answer kept for `ttl_s`. Serve's autoscaler
    changes its target every few seconds at most, so the counts lag by `ttl_s` at worst.
    """

    def __init__(self, app_name: str, ttl_s: float = 5.0) -> None:
        self.app_name = app_name
        self.ttl_s = ttl_s
        self._controller: Optional[Any] = None
        self._views: dict[str, DeploymentView] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, DeploymentView]:
        async with self._lock:
            if time.monotonic() - self._fetched_at > self.ttl_s:
                if self._controller is None:
                    # NOTE: a blocking lookup in Ray's GCS, once: off the event loop
                    self._controller = await asyncio.to_thread(_serve_controller)
                details = await self._controller.get_serve_instance_details.remote()
                self._views = deployment_views(details, self.app_name)
                self._fetched_at = time.monotonic()
            return self._views


def deployment_views(details: dict[str, Any], app_name: str) -> dict[str, DeploymentView]:
    """Deployment name -> its view, from the controller's `get_serve_instance_details()` dict."""
    application = (details.get("applications") or {}).get(app_name) or {}
    views = {}
    for name, deployment in (application.get("deployments") or {}).items():
        states = {str(replica["replica_id"]): _state_name(replica["state"])
                  for replica in deployment.get("replicas", [])}
        views[name] = DeploymentView(target=int(deployment.get("target_num_replicas", len(states))),
                                     replica_states=states)
    return views


def _state_name(state: Any) -> str:
    """ReplicaState enum or its string -> 'RUNNING', 'STARTING', ..."""
    return str(getattr(state, "value", state))


def _serve_controller() -> Any:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
