"""deploy/grafana-dashboard.json: one panel family per pagoda: metric, per replica, sound PromQL."""
from __future__ import annotations

import json
import re

import pytest

# The metric names the engine exports (Prometheus exposition, prometheus_client adds `_total`
# to counters); every one must be charted.
GAUGES = {"pagoda:num_requests_running", "pagoda:num_requests_waiting", "pagoda:kv_cache_usage_perc"}
COUNTERS = {"pagoda:prefix_cache_queries", "pagoda:prefix_cache_hits", "pagoda:num_preemptions",
            "pagoda:prompt_tokens", "pagoda:generation_tokens", "pagoda:request_success"}
HISTOGRAMS = {"pagoda:time_to_first_token_seconds", "pagoda:inter_token_latency_seconds",
              "pagoda:e2e_request_latency_seconds", "pagoda:request_queue_time_seconds"}
METRIC = re.compile(r"pagoda:[a-z0-9_]+")


@pytest.fixture(scope="module")
def dashboard(deploy_dir):
    return json.loads((deploy_dir / "grafana-dashboard.json").read_text())


def _panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(dashboard):
    return [t["expr"] for panel in _panels(dashboard) for t in panel["targets"]]


def test_every_metric_is_charted_in_its_proper_form(dashboard):
    used = {name for expr in _exprs(dashboard) for name in METRIC.findall(expr)}
    expected = (GAUGES | {f"{c}_total" for c in COUNTERS} | {f"{h}_bucket" for h in HISTOGRAMS})
    assert expected <= used, f"not charted: {sorted(expected - used)}"
    unknown = used - expected
    assert not unknown, f"not metrics pagoda exports: {sorted(unknown)}"


def test_counters_are_rated_and_histograms_are_percentiles(dashboard):
    for expr in _exprs(dashboard):
        for name in METRIC.findall(expr):
            if name.endswith("_total"):
                assert re.search(rf"rate\({re.escape(name)}\{{", expr), expr
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in expr and "by (le," in expr, expr
    quantiles = {float(q) for expr in _exprs(dashboard) for q in re.findall(r"histogram_quantile\(([\d.]+)", expr)}
    assert {0.5, 0.9, 0.99} <= quantiles


def test_series_are_per_replica_and_filtered_by_the_variables(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model_name", "instance"} <= variables
    for expr in _exprs(dashboard):
        assert re.search(r"by \([^)]*\bmodel_name\b[^)]*\binstance\b", expr), expr
        assert 'model_name=~"$model_name"' in expr and 'instance=~"$instance"' in expr, expr


def test_promql_is_balanced(dashboard):
    for expr in _exprs(dashboard):
        stripped = re.sub(r'"[^"]*"', '""', expr)
        for open_, close in ("()", "{}", "[]"):
            depth = 0
            for char in stripped:
                depth += (char == open_) - (char == close)
                assert depth >= 0, expr
            assert depth == 0, expr


def test_dashboard_structure(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["gridPos"]["w"] <= 24 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    titles = " ".join(p["title"].lower() for p in _panels(dashboard))
    for topic in ("tokens", "time to first token", "inter-token", "queue depth", "kv cache", "prefix cache", "preemption"):
        assert topic in titles, topic
