"""Without Chromium the console tests must say how to install it (they fail rather than skip), and the
browser is started with the system's driver only."""
from __future__ import annotations

import pytest

from .browser import SKIP_ENV, BrowserPaths, find_browser, skip_requested


def test_a_missing_browser_is_reported_with_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    message = find_browser()
    assert isinstance(message, str)
    assert "chromium" in message and "chromedriver" in message
    assert "apt-get install -y --no-install-recommends chromium chromium-driver" in message
    assert f"{SKIP_ENV}=1" in message


def test_the_browser_and_driver_come_from_path(monkeypatch, tmp_path):
    for name in ("chromium", "chromedriver"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    pytest.importorskip("selenium")
    assert find_browser() == BrowserPaths(str(tmp_path / "chromium"), str(tmp_path / "chromedriver"))


@pytest.mark.parametrize("value, skipped", [("1", True), ("0", False), ("", False)])
def test_only_the_explicit_variable_skips(monkeypatch, value, skipped):
    monkeypatch.setenv(SKIP_ENV, value)
    assert skip_requested() is skipped
