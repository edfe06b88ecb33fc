"""Headless Chromium through Selenium, for the console tests: finding the browser, starting it, and a
small page helper (fields, waits, screenshots).

The browser and its driver come from the system (Debian: `apt-get install chromium chromium-driver`);
both paths are passed to Selenium explicitly so that Selenium Manager never downloads anything.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

SKIP_ENV = "PAGODA_SKIP_BROWSER_TESTS"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)
INSTALL_HINT = (
    "The console tests drive a real headless Chromium. Install it and its driver "
    "(Debian/Ubuntu: `apt-get install -y --no-install-recommends chromium chromium-driver`) and the "
    "Python client (`pip install -e '.[test]'`), or set {env}=1 to skip the browser tests."
).format(env=SKIP_ENV)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class BrowserPaths:
    browser: str
    driver: str


def find_browser() -> BrowserPaths | str:
    """The Chromium binary and chromedriver on PATH, or a message saying what is missing."""
    browser = next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)
    driver = next((path for name in DRIVER_NAMES if (path := shutil.which(name))), None)
    missing = [what for what, path in (("a Chromium binary (chromium)", browser), ("chromedriver", driver))
               if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the `selenium` Python package")
    if missing:
        return f"missing {', '.join(missing)}. {INSTALL_HINT}"
    return BrowserPaths(browser, driver)


def start_chromium(paths: BrowserPaths):
    """A headless Chromium WebDriver (1280x900, so that screenshots show the whole page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths.browser
    # NOTE: --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start;
    # --disable-dev-shm-usage: containers have a small /dev/shm.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=paths.driver), options=options)


class ConsolePage:
    """The console open in the browser: CSS-selector helpers with explicit waits."""

    def __init__(self, driver, base_url: str, artifacts: Path):
        self.driver = driver
        self.base_url = base_url
        self.artifacts = artifacts

    def open(self, path: str = "/") -> None:
        self.driver.get(self.base_url + path)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """The element's text (its value for form fields), "" when it is absent."""
        return retry_stale(lambda: self._text(css))

    def _text(self, css: str) -> str:
        elements = self.find_all(css)
        if not elements:
            return ""
        element = elements[0]
        if element.tag_name in ("input", "textarea", "select"):
            return element.get_attribute("value") or ""
        return element.get_attribute("textContent") or ""

    def number(self, css: str) -> Optional[float]:
        """The first number in the element's text, None when it shows none."""
        match = NUMBER.search(self.text(css).replace(",", ""))
        return float(match.group()) if match else None

    def visible(self, css: str) -> bool:
        return retry_stale(lambda: any(element.is_displayed() for element in self.find_all(css)))

    def click(self, css: str) -> None:
        self.wait(lambda: self.visible(css), 10, f"{css} to be visible")
        self.find(css).click()

    def set(self, css: str, value: Any) -> None:
        """Sets a form field as a user would: picks an option, or retypes the text."""
        from selenium.webdriver.support.ui import Select

        element = self.find(css)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        elif element.get_attribute("type") in ("range", "hidden"):
            # a slider cannot be typed into: set it and fire the events its handlers listen to
            self.driver.execute_script(
                "arguments[0].value = arguments[1];"
                "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
                "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));", element, str(value))
        else:
            element.clear()
            element.send_keys(str(value))
        assert self.text(css) == str(value), f"{css} shows {self.text(css)!r} after setting {value!r}"

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                     f"#error shows {self.text('#error')!r}; console log: {self.console_log()}")
            time.sleep(interval_s)

    def console_log(self) -> list[str]:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")][-10:]
        except Exception:  # noqa: BLE001 - the log is a diagnostic only
            return []

    def screenshot(self, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"could not save the screenshot {path}"
        print(f"console screenshot: {path}")
        return path


def retry_stale(read: Callable[[], Any], attempts: int = 5) -> Any:
    """`read()`, again if the page replaced the element meanwhile (the dashboard re-renders its rows
    on every poll)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            return read()
        except StaleElementReferenceException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV) == "1"
