"""The top-level folders install only as `pagoda.*`: none of them shadows an installed package of the
same name when the repository root is on `sys.path` (`python -c` or `python -m` run from the root).

transformers imports the PyPI package `kernels` while it loads; a regular package in our `kernels/`
would be found first and break it. Each check runs a fresh interpreter in the repository root, as a
user typing the command there would.
"""
from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def python_in_repo_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_console_files_are_package_data():
    """Every file of the console's static folder matches a package-data pattern, so the wheel carries
    it (the folder is found as a namespace package by setup.py's discovery, without an __init__)."""
    tomllib = pytest.importorskip("tomllib")          # Python 3.11+
    static = REPO / "engine" / "entrypoints" / "console" / "static"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = "pagoda.engine.entrypoints.console.static"
    allowed = patterns.get("*", []) + patterns.get(package, [])
    files = [path for path in static.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    assert any(path.name == "index.html" for path in files)
    missing = [str(path.relative_to(static)) for path in files
               if not any(fnmatch.fnmatch(path.name, pattern) for pattern in allowed)]
    assert not missing, f"console files outside package-data: {missing}"


def test_transformers_and_pagoda_import_from_the_repository_root():
    result = python_in_repo_root(
        "import sys; assert sys.path[0] == '', sys.path[:2]\n"
        "import transformers.activations, pagoda.engine, pagoda.kernels.attention, pagoda.cluster\n"
        "from pagoda.engine import LLM, SamplingParams\n"
        "print('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_our_kernels_folder_never_wins_over_an_installed_kernels_package():
    result = python_in_repo_root(
        "import kernels\n"
        "print(getattr(kernels, '__file__', None))")
    assert result.returncode == 0, result.stderr[-2000:]
    location = result.stdout.splitlines()[0]
    if location != "None":          # an installed `kernels`: it must be that one, not our folder
        assert not Path(location).resolve().is_relative_to((REPO / "kernels").resolve()), location
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace package"


@pytest.mark.parametrize("folder", ["engine", "cluster"])
def test_engine_and_cluster_refuse_to_load_under_a_bare_name(folder):
    result = python_in_repo_root(f"import {folder}")
    assert result.returncode != 0
    assert f"'{folder}' is not a package: this folder installs as pagoda.{folder}" in result.stderr
