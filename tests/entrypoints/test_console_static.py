"""The console page's static files: present, self-contained (no CDN), and consistent with each other.

The browser tests drive the page by element id, so index.html must hold every id they use, and
console.js must only look up ids the page has (a typo there is a silent null at run time). Every
form control has a label. `node --check` catches syntax errors when node is installed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[2] / "engine" / "entrypoints" / "console" / "static"

# the ids the browser tests rely on
REQUIRED_IDS = [
    "tab-playground", "tab-dashboard", "model", "mode", "system", "prompt", "temperature", "top-p",
    "max-tokens", "seed", "stop", "schema", "send", "stop-button", "output", "ttft", "tps",
    "copy-curl", "copy-python", "copied", "api-key", "api-key-save", "error", "dashboard",
    "last-refresh", "chart-tps", "chart-queue", "chart-kv", "chart-ttft",
]
# the class names of the cells of each replica row (built by console.js)
REPLICA_CELL_CLASSES = ["state", "running", "waiting", "kv", "tps", "ttft", "itl"]


class _Page(HTMLParser):
    """Collects ids (in order, duplicates kept), label targets, form controls, and asset links."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.label_for: set[str] = set()
        self.controls: list[str] = []
        self.tags: dict[str, str] = {}
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self.options: dict[str, list[str]] = {}
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.append(a["id"])
            self.tags[a["id"]] = tag
        if tag == "label" and a.get("for"):
            self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea"):
            self.controls.append(a.get("id", f"<{tag} without id>"))
        if tag == "select":
            self._select = a.get("id")
            self.options[self._select or ""] = []
        if tag == "option" and self._select is not None:
            self.options[self._select].append(a.get("value", ""))
        if tag == "script" and "src" in a:
            self.scripts.append(a["src"])
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


@pytest.fixture(scope="module")
def page() -> _Page:
    parser = _Page()
    parser.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def script() -> str:
    return (STATIC / "console.js").read_text(encoding="utf-8")


def test_the_three_files_exist() -> None:
    for name in ("index.html", "console.js", "console.css"):
        assert (STATIC / name).is_file(), name
        assert (STATIC / name).stat().st_size > 0, name


def test_index_loads_the_assets_by_their_console_paths_and_nothing_external(page: _Page) -> None:
    assert page.scripts == ["/console/console.js"]
    assert page.stylesheets == ["/console/console.css"]
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not load remote files"


def test_every_id_the_browser_tests_use_is_there_once(page: _Page) -> None:
    missing = [i for i in REQUIRED_IDS if i not in page.ids]
    assert not missing, f"missing ids: {missing}"
    duplicates = sorted({i for i in page.ids if page.ids.count(i) > 1})
    assert not duplicates, f"duplicate ids: {duplicates}"
    for chart in ("chart-tps", "chart-queue", "chart-kv", "chart-ttft"):
        assert page.tags[chart] == "canvas", chart
    assert page.options["mode"] == ["chat", "completion"]
    assert page.tags["copied"] in ("textarea", "pre")


def test_every_form_control_has_a_label(page: _Page) -> None:
    unlabelled = [c for c in page.controls if c not in page.label_for]
    assert not unlabelled, f"controls without a <label for>: {unlabelled}"
    dangling = sorted(page.label_for - set(page.ids))
    assert not dangling, f"labels for missing ids: {dangling}"


def test_the_script_only_looks_up_ids_the_page_has(page: _Page, script: str) -> None:
    looked_up = set(re.findall(r"""\$\(\s*["']([\w-]+)["']\s*\)""", script))
    assert looked_up, "console.js looks up no element by id"
    unknown = sorted(looked_up - set(page.ids))
    assert not unknown, f"console.js looks up ids index.html lacks: {unknown}"
    # the tab switch builds its ids from the panel names
    for panel in ("playground", "dashboard"):
        assert panel in page.ids and f"tab-{panel}" in page.ids


def test_replica_rows_carry_the_id_and_cell_classes(script: str) -> None:
    assert "dataset.replica" in script
    columns = re.search(r"const COLUMNS = \[(.*?)\n\];", script, re.S)
    assert columns is not None, "console.js has no COLUMNS table"
    classes = re.findall(r'\[\s*"([\w-]+)",', columns.group(1))
    missing = [c for c in REPLICA_CELL_CLASSES if c not in classes]
    assert not missing, f"replica cells lack classes: {missing}"


def test_the_script_uses_the_api_routes_of_the_contract(script: str) -> None:
    for route in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/cluster/status"):
        assert f'"{route}"' in script, route
    assert "$PAGODA_API_KEY" in script
    assert "sessionStorage" in script


def test_the_script_parses() -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: the syntax check of console.js needs it")
    result = subprocess.run([node, "--check", str(STATIC / "console.js")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
