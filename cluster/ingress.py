"""The HTTP ingress deployment: the OpenAI app of `build_app`, over a `ClusterEngineClient`.

Serve builds the ASGI app after the constructor (`@serve.ingress()` with `__serve_build_asgi_app__`),
so the app wraps the client that holds this replica's handles to the model deployments. The same
routes, errors, authentication and streaming as the standalone server; the replica label on
/metrics and `status()` (for `pagoda status`) are what the cluster adds.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.middleware import Middleware

from pagoda.engine.entrypoints.openai.api_server import build_app as build_openai_app
from pagoda.engine.entrypoints.settings import ServerSettings

from .client import ClusterEngineClient, ModelRoute, RequestScopeMiddleware
from .config import AppConfig

logger = logging.getLogger(__name__)


def build_ingress_app(client: ClusterEngineClient, settings: ServerSettings) -> FastAPI:
    """`build_app`'s FastAPI app plus the request-scope middleware, innermost (inside the guard)."""
    app = build_openai_app(client, settings)
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
        self.client = ClusterEngineClient(routes, app_name=serve.get_replica_context().app_name)
        self.settings = ServerSettings(api_key=api_key, max_request_body_bytes=config.max_request_body_bytes,
                                       **config.chat)
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
