"""The console's backend on the standalone server: `RollingStats` (last-minute latencies, bounded,
on an injected clock), `GET /v1/cluster/status` (shape, auth, numbers that move after a completion),
and the page's files (`/`, `/console/*`: content types, public, no way out of the static folder,
404 with --disable-console while the status endpoint stays)."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagoda.engine.entrypoints.cli_args import add_chat_flags, server_settings_from
from pagoda.engine.entrypoints.console.routes import STATIC_DIR, static_file
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.rolling_stats import RollingStats

from .server_helpers import MODEL_NAME

API_KEY = "console-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- RollingStats --------------------------------------------------------------------------------------
def test_rolling_quantiles_counts_and_rate_over_the_window():
    clock = Clock()
    stats = RollingStats(window_s=60.0, clock=clock)
    assert stats.snapshot().ttft_ms.count == 0 and stats.snapshot().ttft_ms.p50 is None
    for value in range(1, 101):                      # 1..100 ms
        stats.add_ttft(value / 1000.0)
    stats.add_tokens(600)
    clock.now += 30.0
    stats.add_itl(0.010)
    snapshot = stats.snapshot()
    assert snapshot.ttft_ms.count == 100
    assert snapshot.ttft_ms.p50 == pytest.approx(50.0) and snapshot.ttft_ms.p99 == pytest.approx(99.0)
    assert snapshot.itl_ms.count == 1 and snapshot.itl_ms.p50 == pytest.approx(10.0)
    assert snapshot.generation_tokens_per_s == pytest.approx(600 / 30.0)    # up 30 s: 30 s of history
    clock.now += 31.0                                # the TTFT samples and the tokens are now > 60 s old
    snapshot = stats.snapshot()
    assert snapshot.ttft_ms.count == 0 and snapshot.ttft_ms.p99 is None
    assert snapshot.itl_ms.count == 1 and snapshot.generation_tokens_per_s == 0.0
    clock.now += 60.0
    assert stats.snapshot().itl_ms.count == 0 and stats.num_kept_samples() == 0


def test_rolling_memory_is_bounded_and_quantiles_stay_close():
    clock = Clock()
    stats = RollingStats(window_s=10.0, samples_per_bucket=50, clock=clock)
    for second in range(30):
        for i in range(1000):                        # 1000 ITL samples a second, uniform over 0..999 ms
            stats.add_itl(i / 1000.0)
        clock.now += 1.0
    snapshot = stats.snapshot()
    assert snapshot.itl_ms.count == 10_000                     # exact count over the 10 s window
    assert stats.num_kept_samples() <= 11 * 50                 # at most window/bucket + 1 buckets of 50
    assert snapshot.itl_ms.p50 == pytest.approx(500.0, abs=120.0)
    assert snapshot.itl_ms.p99 == pytest.approx(990.0, abs=60.0)


def test_rolling_rejects_bad_settings():
    with pytest.raises(ValueError, match="window_s"):
        RollingStats(window_s=0)
    with pytest.raises(ValueError, match="samples_per_bucket"):
        RollingStats(samples_per_bucket=0)


# -- the status document -------------------------------------------------------------------------------
def _request(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                     timeout=60) as http:
            return await http.request(method, path, **kwargs)

    return asyncio.run(send())


@pytest.fixture(scope="module")
def console_app(inprocess_engine):
    return build_app(inprocess_engine, ServerSettings(api_key=API_KEY))


def test_status_document_shape_and_numbers_move_after_a_completion(console_app):
    before = _request(console_app, "GET", "/v1/cluster/status", headers=AUTH)
    assert before.status_code == 200, before.text
    assert before.headers["cache-control"] == "no-store"
    document = before.json()
    assert document["object"] == "cluster.status" and document["mode"] == "standalone"
    assert document["window_s"] == 60 and document["time"] > 1.7e9
    [model] = document["models"]
    assert model["name"] == MODEL_NAME and model["max_model_len"] > 0
    assert model["replicas"] == {"current": 1, "target": 1, "min": 1, "max": 1}
    [entry] = model["replica_stats"]
    assert set(entry) == {"replica", "state", "running", "waiting", "kv_cache_usage", "prefix_cache_hit_rate",
                          "num_preemptions", "generation_tokens_total", "requests_finished_total",
                          "generation_tokens_per_s", "ttft_ms", "itl_ms"}
    assert entry["replica"] == "standalone" and entry["state"] == "running"
    assert (entry["running"], entry["waiting"]) == (0, 0) and 0.0 <= entry["kv_cache_usage"] <= 1.0

    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    completion = _request(console_app, "POST", "/v1/completions", json=body, headers=AUTH)
    assert completion.status_code == 200, completion.text
    after = _request(console_app, "GET", "/v1/cluster/status", headers=AUTH).json()["models"][0]["replica_stats"][0]
    assert after["requests_finished_total"] == entry["requests_finished_total"] + 1
    assert after["generation_tokens_total"] == entry["generation_tokens_total"] + 8
    assert after["ttft_ms"]["count"] == entry["ttft_ms"]["count"] + 1 and after["ttft_ms"]["p50"] > 0
    # 8 tokens: the first, then at most 7 gaps (outputs ready together are one gap)
    assert 1 <= after["itl_ms"]["count"] - entry["itl_ms"]["count"] <= 7
    assert after["generation_tokens_per_s"] > 0 and after["ttft_ms"]["p99"] >= after["ttft_ms"]["p50"]
    assert (after["running"], after["waiting"]) == (0, 0)


def test_status_needs_the_key_like_inference_routes(console_app):
    assert _request(console_app, "GET", "/v1/cluster/status").status_code == 401
    wrong = _request(console_app, "GET", "/v1/cluster/status", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


# -- the page's files ----------------------------------------------------------------------------------
def test_the_page_and_its_files_are_public_with_their_content_types(console_app):
    index = _request(console_app, "GET", "/")                    # no key: the page asks for it
    assert index.status_code == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.content == (STATIC_DIR / "index.html").read_bytes()
    assert index.headers["x-content-type-options"] == "nosniff"
    expected = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8"}
    files = [path for path in STATIC_DIR.iterdir() if path.suffix in expected]
    assert files
    for path in files:
        response = _request(console_app, "GET", f"/console/{path.name}")
        assert response.status_code == 200, path.name
        assert response.headers["content-type"] == expected[path.suffix]
        assert response.content == path.read_bytes()
    assert _request(console_app, "GET", "/console/no-such-file.js").status_code == 404
    assert _request(console_app, "GET", "/console/").status_code == 404
    assert _request(console_app, "POST", "/").status_code == 405


def _raw_get(app: Any, path: str) -> tuple[int, bytes]:
    """GET with the path exactly as a server hands it to the app (percent-decoded, never normalized:
    an HTTP client would collapse the `..` before sending)."""
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:                  # the client stays connected until the response is done
            await asyncio.Event().wait()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode("latin-1", "replace"), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"app")], "client": ("127.0.0.1", 1), "server": ("app", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", ["/console/../routes.py", "/console/../../settings.py", "/console/../status.py",
                                  "/console//etc/passwd", "/console/..\\routes.py", "/console/\x00index.html",
                                  "/console/static/../../routes.py"])
def test_no_file_outside_the_static_folder(console_app, path):
    status, body = _raw_get(console_app, path)
    assert status == 404, (path, status)
    assert b"import " not in body and b"root:" not in body
    assert _raw_get(console_app, "/console/index.html")[0] == 200     # the same way in does serve files


def test_static_file_resolution_refuses_links_out_of_the_folder(tmp_path: Path):
    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<p>page</p>")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert static_file("/", root) == (root / "index.html").resolve()
    assert static_file("/console/index.html", root) == (root / "index.html").resolve()
    assert static_file("/console/link.txt", root) is None
    assert static_file("/console/../secret.txt", root) is None
    assert static_file("/console/" + str(tmp_path / "secret.txt"), root) is None
    assert static_file("/other", root) is None


def test_disable_console_turns_the_page_off_but_not_the_status(inprocess_engine):
    parser = argparse.ArgumentParser()
    for flag, default in (("--host", "127.0.0.1"), ("--port", 8000), ("--api-key", API_KEY),
                          ("--allowed-origins", []), ("--max-request-body-bytes", 1 << 20),
                          ("--shutdown-timeout", 30.0), ("--grpc-port", None), ("--uvicorn-log-level", "info")):
        parser.add_argument(flag, default=default)
    add_chat_flags(parser)
    settings = server_settings_from(parser.parse_args(["--disable-console"]))
    assert settings.disable_console and not server_settings_from(parser.parse_args([])).disable_console
    app = build_app(inprocess_engine, settings)
    assert _request(app, "GET", "/", headers=AUTH).status_code == 404
    assert _request(app, "GET", "/console/index.html", headers=AUTH).status_code == 404
    assert _request(app, "GET", "/").status_code == 401           # no page: the guard's rule applies
    status = _request(app, "GET", "/v1/cluster/status", headers=AUTH)
    assert status.status_code == 200 and status.json()["mode"] == "standalone"
