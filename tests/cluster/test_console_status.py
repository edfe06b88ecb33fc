"""The console's `GET /v1/cluster/status` on the Ray ingress, without a Ray cluster: a real `LLMReplica`
(in-process engine) makes the report, fake routers hand the ingress that report as several
replicas' (as Serve's controller broadcasts them), and a fake Serve view gives targets and replica
states. Checked: every replica of a model is listed, numbers come through the report, a replica
whose report went stale is "unhealthy" with null numbers, Serve's counts and the config's min/max."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import pytest

from pagoda.cluster.client import ClusterEngineClient, DeploymentView, ModelRoute
from pagoda.cluster.config import AppConfig, ModelDeployment
from pagoda.cluster.ingress import build_ingress_app, deployment_views
from pagoda.cluster.replica import LLMReplica
from pagoda.cluster.routing_policy import register_router
from pagoda.cluster.wire import ReplicaReport
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.sampling_params import SamplingParams

API_KEY = "k"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class FakeRouter:
    """What `router_for` finds in the ingress process: the latest report of each replica."""

    def __init__(self, reports: list[ReplicaReport]) -> None:
        self.reports_list = reports

    def reports(self) -> list[ReplicaReport]:
        return list(self.reports_list)


@pytest.fixture(scope="module")
def report(tiny_model) -> ReplicaReport:
    """A real replica's report after one 6-token completion."""
    replica = LLMReplica({"model": str(tiny_model), "served_model_name": "tiny", "num_gpus_per_worker": 0,
                          "engine_args": {"kv_cache_memory_bytes": 16 << 20, "device": "cpu"}})

    async def complete_then_report() -> ReplicaReport:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        async for _ in replica.engine.generate("Once upon a time", params, "r1"):
            pass
        return await replica.report()

    try:
        yield asyncio.run(complete_then_report())
    finally:
        replica.engine.shutdown()


def _app(reports: dict[str, list[ReplicaReport]], app_name: str, serve_view: Any = None,
         settings: ServerSettings | None = None) -> tuple[Any, list[FakeRouter]]:
    deployments = {"tiny": ModelDeployment(model="x", served_model_name="tiny", min_replicas=1, max_replicas=4),
                   "other": ModelDeployment(model="x", served_model_name="other", num_replicas=2)}
    routes = [ModelRoute(deployments[name], f"model-{name}", handle=None) for name in ("tiny", "other")]
    routers = [FakeRouter(reports.get(name, [])) for name in ("tiny", "other")]
    for name, router in zip(("tiny", "other"), routers):
        register_router(app_name, f"model-{name}", router)
    client = ClusterEngineClient(routes, app_name=app_name, token_channels=False, serve_view=serve_view)
    return build_ingress_app(client, settings or ServerSettings(api_key=API_KEY)), routers


def _get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as http:
            return await http.get(path, headers=headers)

    return asyncio.run(send())


def _as(report: ReplicaReport, replica_id: str, **changes: Any) -> ReplicaReport:
    """The report as another replica's, after a trip through the controller's routing stats."""
    again = ReplicaReport.from_routing_stats(report.to_routing_stats())
    return dataclasses.replace(again, replica_id=replica_id, **changes)


def test_the_report_carries_the_replicas_console_entry(report):
    entry = report.console
    assert entry["state"] == "running" and entry["replica"] == report.replica_id
    assert entry["requests_finished_total"] == 1 and entry["generation_tokens_total"] == 6
    assert entry["ttft_ms"]["count"] == 1 and entry["ttft_ms"]["p50"] is not None
    assert entry["itl_ms"]["count"] >= 1 and entry["generation_tokens_per_s"] > 0
    assert ReplicaReport.from_routing_stats(report.to_routing_stats()).console == entry


def test_two_replicas_listed_and_a_stale_one_unhealthy(report):
    now = time.time()
    fresh = [_as(report, "b-replica", reported_at=now), _as(report, "a-replica", reported_at=now)]
    stale = _as(report, "c-replica", reported_at=now - 120)
    views = {"model-tiny": DeploymentView(target=4, replica_states={
        "a-replica": "RUNNING", "b-replica": "RUNNING", "c-replica": "RUNNING", "d-replica": "STARTING"})}

    async def serve_view() -> dict[str, DeploymentView]:
        return views

    app, _routers = _app({"tiny": fresh + [stale]}, "console-two", serve_view)
    assert _get(app, "/v1/cluster/status").status_code == 401
    response = _get(app, "/v1/cluster/status", AUTH)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["object"] == "cluster.status" and document["mode"] == "ray" and document["window_s"] == 60
    tiny, other = document["models"]
    assert (tiny["name"], other["name"]) == ("tiny", "other")
    assert tiny["replicas"] == {"current": 3, "target": 4, "min": 1, "max": 4}
    by_id = {entry["replica"]: entry for entry in tiny["replica_stats"]}
    assert list(by_id) == ["a-replica", "b-replica", "c-replica", "d-replica"]
    for replica in ("a-replica", "b-replica"):
        entry = by_id[replica]
        assert entry["state"] == "running" and entry["generation_tokens_total"] == 6
        assert entry["requests_finished_total"] == 1 and entry["ttft_ms"]["count"] == 1
    stale_entry = by_id["c-replica"]
    assert stale_entry["state"] == "unhealthy"
    assert all(stale_entry[key] is None for key in ("running", "waiting", "kv_cache_usage", "ttft_ms", "itl_ms",
                                                    "generation_tokens_per_s"))
    assert by_id["d-replica"]["state"] == "starting" and by_id["d-replica"]["running"] is None
    # no Serve view for "other" (nothing reported, fixed 2 replicas)
    assert other["replicas"] == {"current": 0, "target": 0, "min": 2, "max": 2} and other["replica_stats"] == []


def test_without_serves_view_the_counts_come_from_the_reports(report):
    now = time.time()
    unhealthy = _as(report, "b", reported_at=now, healthy=False)

    async def failing_view() -> dict[str, DeploymentView]:
        raise ConnectionError("controller unreachable")

    for view in (None, failing_view):
        app, _routers = _app({"tiny": [_as(report, "a", reported_at=now), unhealthy]}, "console-fallback", view)
        tiny = _get(app, "/v1/cluster/status", AUTH).json()["models"][0]
        assert tiny["replicas"] == {"current": 2, "target": 2, "min": 1, "max": 4}
        states = {entry["replica"]: entry["state"] for entry in tiny["replica_stats"]}
        assert states == {"a": "running", "b": "unhealthy"}
        # a replica that says it is unhealthy but answered keeps its numbers
        assert tiny["replica_stats"][1]["generation_tokens_total"] == 6


def test_a_report_without_a_console_entry_still_lists_counters(report):
    old = _as(report, "old", reported_at=time.time(), console=None)
    app, _routers = _app({"tiny": [old]}, "console-old")
    [entry] = _get(app, "/v1/cluster/status", AUTH).json()["models"][0]["replica_stats"]
    assert entry["state"] == "running" and entry["generation_tokens_total"] == 6 and entry["ttft_ms"] is None


def test_the_ingress_serves_the_page_unless_disabled(report):
    app, _routers = _app({}, "console-page")
    page = _get(app, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # --disable-console reaches the ingress as the app config's `console: false`
    config = AppConfig(models=[{"model": "x"}], console=False)
    app, _routers = _app({}, "console-off", settings=ServerSettings(api_key=API_KEY,
                                                                    disable_console=not config.console))
    assert _get(app, "/", AUTH).status_code == 404
    assert _get(app, "/v1/cluster/status", AUTH).status_code == 200


def test_deployment_views_from_the_controllers_details():
    details = {"applications": {
        "app": {"deployments": {"model-tiny": {"target_num_replicas": 3, "replicas": [
            {"replica_id": "r1", "state": "RUNNING"}, {"replica_id": "r2", "state": "STARTING"}]}}},
        "another": {"deployments": {"model-x": {"target_num_replicas": 9, "replicas": []}}}}}
    views = deployment_views(details, "app")
    assert views == {"model-tiny": DeploymentView(target=3, replica_states={"r1": "RUNNING", "r2": "STARTING"})}
    assert deployment_views(details, "missing") == {}


def test_disable_console_flag_reaches_the_ray_app_config():
    from pagoda.cluster import cli as cluster_cli
    from pagoda.cluster.config import parse_app_args
    from pagoda.engine.entrypoints import cli as engine_cli

    def app_args(*argv: str) -> dict[str, Any]:
        args = engine_cli.build_parser().parse_args(["serve", "/models/x", *argv])
        args.model = args.model_positional
        return cluster_cli.app_args_from_flags(args, has_gpus=False)

    off = app_args("--disable-console")
    assert off["console"] is False and "chat" not in off
    assert parse_app_args(off).console is False
    assert "console" not in app_args() and parse_app_args(app_args()).console is True
