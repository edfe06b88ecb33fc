"""The package's shape, checked statically: no import cycles, imports that flow one way, files small
enough to read in one sitting, and folders whose `__init__` says what they hold.

Pure `ast` over the source files: no module of pagoda is imported, so the checks take well under a
second and see every import, the lazy ones inside functions as well as the module-level ones.

    pagoda.cluster  ──>  pagoda.engine  ──>  pagoda.kernels          Ray: in pagoda.cluster only
                  <╌╌╌╌  pagoda.engine.entrypoints.cli, inside a function: the CLI hands
                         `pagoda serve` to pagoda.cluster.cli, the one import upwards

Each check is a function over a folder tree. The first tests run it on a small fake tree built to
break it, so every check is seen to fail; the last ones run it on the repository.
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("engine", "kernels", "cluster")     # folder `x/` installs as `pagoda.x`
MAX_FILE_LINES = 600
CLI = "pagoda.engine.entrypoints.cli"


class ImportEdge(NamedTuple):
    importer: str      # pagoda.* name of the importing module
    target: str        # what it imports: `pkg.name` when that is a module, else `pkg`
    path: str          # the importing file, relative to the repository root
    line: int
    lazy: bool         # inside a function: runs when called, not when the importer is imported


# -- reading the tree ------------------------------------------------------------------------------
def module_files(root: Path) -> dict[str, Path]:
    """pagoda.* module name -> file: engine/core/scheduler.py is pagoda.engine.core.scheduler and
    engine/core/__init__.py is pagoda.engine.core (kernels/ has no `__init__`: a namespace package)."""
    modules: dict[str, Path] = {}
    for top in TOP_LEVEL:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules["pagoda." + ".".join(parts)] = path
    return modules


class _ImportVisitor(ast.NodeVisitor):
    """Every import of one file: `import`, `from ... import`, and `importlib.import_module("literal")`
    (the CLI's hand-off to pagoda.cluster is one, so a string must not hide an edge)."""

    def __init__(self, module: str, is_package: bool, path: str, modules: set[str]) -> None:
        self.module, self.path, self.modules = module, path, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.function_depth = 0
        self.edges: list[ImportEdge] = []

    def _add(self, target: str, node: ast.AST) -> None:
        self.edges.append(ImportEdge(self.module, target, self.path, node.lineno, self.function_depth > 0))

    def _in_function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            # `from ..x import y` in pagoda.engine.core.a: up (level - 1) packages from pagoda.engine.core
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.modules else source, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (name == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def read_imports(root: Path) -> list[ImportEdge]:
    modules = module_files(root)
    edges: list[ImportEdge] = []
    for module, path in modules.items():
        visitor = _ImportVisitor(module, path.name == "__init__.py", str(path.relative_to(root)), set(modules))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges.extend(visitor.edges)
    return edges


def import_graph(edges: list[ImportEdge], modules: set[str]) -> dict[str, set[str]]:
    """importer -> the pagoda modules it imports. Only written imports are edges: importing
    pagoda.engine.core.a also runs pagoda.engine.core's `__init__` first, but that is not an edge
    from a to its package. A module naming itself (`from . import x` in a package that defines x) is
    not a cycle either."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for edge in edges:
        if edge.target in modules and edge.target != edge.importer:
            graph[edge.importer].add(edge.target)
    return graph


# -- the checks ------------------------------------------------------------------------------------
def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles as chains [a, b, a]: for every module on a cycle, the shortest cycle through it
    (each cycle once, rotated to start at its smallest name), so every module involved is named."""
    cycles: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        for start in sorted(component):
            cycle = _shortest_cycle(graph, start, component)
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first]))
    return [list(cycle) + [cycle[0]] for cycle in sorted(cycles)]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (recursive: the graph is a few hundred modules deep at most)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
    """Breadth-first from start back to start, inside its strongly connected component."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if succ in component and succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layering_violations(edges: list[ImportEdge]) -> list[str]:
    """Imports that flow the wrong way: Ray or pagoda.cluster from the engine or the kernels (but for
    the CLI's lazy hand-off to pagoda.cluster), or the kernels reaching up into the engine."""
    problems = []
    for edge in edges:
        below_cluster = _is_within(edge.importer, "pagoda.engine") or _is_within(edge.importer, "pagoda.kernels")
        why = None
        if below_cluster and _is_within(edge.target, "ray"):
            why = "Ray is imported only in pagoda.cluster"
        elif below_cluster and _is_within(edge.target, "pagoda.cluster"):
            if edge.importer != CLI:
                why = f"only {CLI} may import pagoda.cluster"
            elif not edge.lazy:
                why = "the CLI's hand-off to pagoda.cluster must be lazy (inside a function)"
        elif _is_within(edge.importer, "pagoda.kernels") and _is_within(edge.target, "pagoda.engine"):
            why = "the kernels sit below the engine"
        if why is not None:
            problems.append(f"{edge.path}:{edge.line}: {edge.importer} imports {edge.target} ({why})")
    return problems


def oversized_files(root: Path, limit: int = MAX_FILE_LINES) -> list[str]:
    """Every file under the package folders (code, stubs, READMEs) longer than `limit` lines."""
    problems = []
    for top in TOP_LEVEL:
        for path in sorted((root / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            data = path.read_bytes()
            lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
            if lines > limit:
                problems.append(f"{path.relative_to(root)}: {lines} lines (limit {limit})")
    return problems


def package_doc_problems(root: Path) -> list[str]:
    """Every folder of Python under engine/ and cluster/ is a package whose `__init__` docstring says
    what it holds; kernels/ has no `__init__.py` (see its README.md) and a README.md instead."""
    problems = []
    for top in ("engine", "cluster"):
        folders = [root / top] + sorted(p for p in (root / top).rglob("*") if p.is_dir())
        for folder in folders:
            if "__pycache__" in folder.parts or not any(
                    "__pycache__" not in p.parts for p in folder.rglob("*.py")):
                continue            # not Python: data, templates
            init = folder / "__init__.py"
            where = folder.relative_to(root)
            if not init.is_file():
                problems.append(f"{where}/ has no __init__.py")
            elif not (ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or "").strip():
                problems.append(f"{where}/__init__.py has no docstring saying what the folder holds")
    kernels = root / "kernels"
    for init in sorted(kernels.rglob("__init__.py")):
        problems.append(f"{init.relative_to(root)} exists: kernels/ must stay a namespace package")
    if not (kernels / "README.md").is_file():
        problems.append("kernels/README.md is missing: it says what kernels/ holds (there is no __init__)")
    return problems


# -- each check fails on a tree built to break it ----------------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_find_cycles_names_each_cycle_as_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]
    # two cycles sharing b: both named; x -> a leads in but is on no cycle
    assert find_cycles({"x": {"a"}, "a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_read_imports_resolves_what_each_statement_names(tmp_path):
    root = write_tree(tmp_path, {
        "engine/__init__.py": '"""e"""\n',
        "engine/config.py": "",
        "engine/core/__init__.py": '"""c"""\n',
        "engine/core/b.py": "",
        "engine/core/a.py": (
            "from . import b\n"                      # a module: pagoda.engine.core.b
            "from . import helper\n"                 # not a module: the package
            "from .. import config\n"
            "from ..config import EngineConfig\n"
            "import pagoda.engine.core.b as bee\n"
            "def run():\n"
            "    import ray\n"
            "    importlib.import_module('pagoda.cluster.cli')\n"
            "class A:\n"
            "    from ray import serve\n"            # a class body runs at import: not lazy
        ),
        "kernels/x.py": "from .y import f\nfrom . import y\n",
        "kernels/y.py": "",
    })
    a = "pagoda.engine.core.a"
    assert {(e.importer, e.target, e.lazy) for e in read_imports(root)} == {
        (a, "pagoda.engine.core.b", False),
        (a, "pagoda.engine.core", False),
        (a, "pagoda.engine.config", False),
        (a, "ray", True),
        (a, "pagoda.cluster.cli", True),
        (a, "ray", False),
        ("pagoda.kernels.x", "pagoda.kernels.y", False),
    }


def test_only_written_imports_of_the_package_close_a_cycle(tmp_path):
    files = {"engine/__init__.py": '"""e"""\n', "engine/core/__init__.py": '"""c"""\nfrom .a import A\n',
             "engine/core/b.py": "", "engine/core/a.py": "from .b import x\n"}
    # importing pagoda.engine.core.a runs pagoda.engine.core's __init__ first: not an edge
    root = write_tree(tmp_path / "implicit", files)
    assert find_cycles(import_graph(read_imports(root), set(module_files(root)))) == []
    # a written import of the package that imports a is a cycle
    root = write_tree(tmp_path / "written", {**files, "engine/core/a.py": "from . import helper\n"})
    assert find_cycles(import_graph(read_imports(root), set(module_files(root)))) == [
        ["pagoda.engine.core", "pagoda.engine.core.a", "pagoda.engine.core"]]


def test_a_lazy_cycle_is_a_cycle(tmp_path):
    root = write_tree(tmp_path, {
        "kernels/attention.py": "def f():\n    from .attention_cpu import g\n",
        "kernels/attention_cpu.py": "from .attention import _shared\n",
        "kernels/norm.py": "from .attention import f\n",
    })
    graph = import_graph(read_imports(root), set(module_files(root)))
    assert find_cycles(graph) == [["pagoda.kernels.attention", "pagoda.kernels.attention_cpu",
                                   "pagoda.kernels.attention"]]


def test_layering_violations_are_reported(tmp_path):
    root = write_tree(tmp_path, {
        "engine/__init__.py": '"""e"""\n',
        "engine/llm.py": "import ray.util\n",
        "engine/server.py": "def f():\n    from pagoda.cluster import app\n",
        "engine/entrypoints/__init__.py": '"""e"""\n',
        "engine/entrypoints/cli.py": (
            "import importlib\n"
            "def serve():\n"
            "    from pagoda.cluster.cli import serve\n"          # the hand-off: allowed
            "    importlib.import_module('pagoda.cluster.cli')\n"  # the same, by name: allowed
            "    import ray\n"                                   # never
            "from pagoda.cluster import cli\n"                   # at module level: never
        ),
        "kernels/k.py": "def f():\n    from ray import serve\n    import pagoda.engine.config\n",
        "cluster/__init__.py": '"""c"""\nimport ray\nfrom pagoda.engine.entrypoints import cli\n',
    })
    problems = layering_violations(read_imports(root))
    assert sorted(problems) == sorted([
        "engine/llm.py:1: pagoda.engine.llm imports ray.util (Ray is imported only in pagoda.cluster)",
        f"engine/server.py:2: pagoda.engine.server imports pagoda.cluster (only {CLI} may import pagoda.cluster)",
        f"engine/entrypoints/cli.py:5: {CLI} imports ray (Ray is imported only in pagoda.cluster)",
        (f"engine/entrypoints/cli.py:6: {CLI} imports pagoda.cluster "
         "(the CLI's hand-off to pagoda.cluster must be lazy (inside a function))"),
        "kernels/k.py:2: pagoda.kernels.k imports ray (Ray is imported only in pagoda.cluster)",
        "kernels/k.py:3: pagoda.kernels.k imports pagoda.engine.config (the kernels sit below the engine)",
    ])


def test_oversized_files_are_reported(tmp_path):
    root = write_tree(tmp_path, {
        "engine/long.py": "x = 1\n" * (MAX_FILE_LINES + 1),
        "engine/just_fits.py": "x = 1\n" * MAX_FILE_LINES,
        "cluster/notes.md": "line\n" * MAX_FILE_LINES + "no newline at the end",
        "kernels/__pycache__/big.pyc": "\n" * 5000,
    })
    assert sorted(oversized_files(root)) == [f"cluster/notes.md: {MAX_FILE_LINES + 1} lines (limit {MAX_FILE_LINES})",
                                             f"engine/long.py: {MAX_FILE_LINES + 1} lines (limit {MAX_FILE_LINES})"]


def test_package_doc_problems_are_reported(tmp_path):
    root = write_tree(tmp_path, {
        "engine/__init__.py": '"""The engine."""\n',
        "engine/worker/model_runner.py": "",                  # no __init__.py
        "engine/core/__init__.py": "from .a import A\n",       # no docstring
        "engine/layers/__init__.py": '"""  """\n',             # an empty one
        "engine/entrypoints/templates/chat.jinja": "",         # not Python: not a package
        "cluster/__init__.py": '"""The cluster."""\n',
        "kernels/__init__.py": "",
    })
    assert package_doc_problems(root) == [
        "engine/core/__init__.py has no docstring saying what the folder holds",
        "engine/layers/__init__.py has no docstring saying what the folder holds",
        "engine/worker/ has no __init__.py",
        "kernels/__init__.py exists: kernels/ must stay a namespace package",
        "kernels/README.md is missing: it says what kernels/ holds (there is no __init__)",
    ]


# -- the repository --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo_imports() -> tuple[set[str], list[ImportEdge]]:
    modules = set(module_files(REPO))
    edges = read_imports(REPO)
    # guard against a walker that silently sees nothing
    assert {"pagoda.engine", "pagoda.engine.worker.model_runner", "pagoda.kernels.attention",
            "pagoda.cluster.cli"} <= modules
    assert any(e.importer == "pagoda.engine.layers.attention" and e.target == "pagoda.kernels.attention"
               for e in edges)
    return modules, edges


def test_no_import_cycles(repo_imports):
    modules, edges = repo_imports
    graph = import_graph(edges, modules)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (lazy imports count; move what both sides need into a module " \
        "below both):\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


def test_imports_flow_one_way(repo_imports):
    problems = layering_violations(repo_imports[1])
    assert not problems, "imports against the flow cluster -> engine -> kernels:\n" + "\n".join(problems)


def test_files_stay_small():
    problems = oversized_files(REPO)
    assert not problems, "files to split (~600 lines is one sitting's read):\n" + "\n".join(problems)


def test_package_folders_say_what_they_hold():
    problems = package_doc_problems(REPO)
    assert not problems, "\n".join(problems)
