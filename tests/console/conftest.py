"""Fixtures of the console tests: one headless Chromium per session, the screenshot folder, and a real
`pagoda serve default --standalone` server on CPU.

Without Chromium the browser tests fail, saying how to install it: a silent skip would let CI pass
without ever opening the page. `PAGODA_SKIP_BROWSER_TESTS=1` skips them on purpose. This folder is a
package so that its conftest does not collide with other folders' `conftest` modules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from entrypoints.server_helpers import ServerProcess

from .browser import SKIP_ENV, BrowserPaths, ConsolePage, find_browser, skip_requested, start_chromium
from .console_server import start_default_server

ARTIFACTS_ENV = "PAGODA_TEST_ARTIFACTS"


@pytest.fixture(scope="session")
def browser_paths() -> BrowserPaths:
    if skip_requested():
        pytest.skip(f"browser tests skipped: {SKIP_ENV}=1")
    found = find_browser()
    if isinstance(found, str):
        pytest.fail(found, pytrace=False)
    return found


@pytest.fixture(scope="session")
def chromium(browser_paths):
    driver = start_chromium(browser_paths)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    """Where screenshots go: $PAGODA_TEST_ARTIFACTS (CI keeps it), else the session's tmp dir."""
    configured = os.environ.get(ARTIFACTS_ENV)
    directory = Path(configured) if configured else tmp_path_factory.getbasetemp() / "console-screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def page_factory(chromium, artifacts_dir, request) -> Iterator:
    """`page_factory(url)` -> a ConsolePage on the shared browser; a failed test leaves a screenshot."""
    pages: list[ConsolePage] = []

    def make(base_url: str) -> ConsolePage:
        # a fresh origin state per test: the API key lives in sessionStorage
        chromium.get("about:blank")
        chromium.delete_all_cookies()
        page = ConsolePage(chromium, base_url, artifacts_dir)
        pages.append(page)
        return page

    yield make
    report = getattr(request.node, "rep_call", None)
    if pages and report is not None and report.failed:
        pages[-1].screenshot(f"{request.node.name}-failure")
    for page in pages:
        try:
            page.driver.execute_script("window.sessionStorage.clear(); window.localStorage.clear();")
        except Exception:  # noqa: BLE001 - about:blank has no storage
            pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def console_server(browser_paths, tmp_path_factory) -> Iterator[ServerProcess]:
    """The default model, standalone, no API key (started after the browser check: no wasted start-up)."""
    server = start_default_server(tmp_path_factory.mktemp("console-logs"))
    yield server
    server.stop()
