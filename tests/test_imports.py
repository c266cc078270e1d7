"""The import graph of labkit, read with ast: no cycles, imports run down the layers, nothing outside labkit/cli
imports labkit.cli.

An edge is any import of a labkit module: `import` and `from ... import` at module level or inside a function,
`importlib.import_module("labkit.x")` / `__import__` with a literal, a "labkit.x:Name" string (a lazily
resolved backend) and a string that is exactly the name of a labkit module (a command table, `python -m`).
Layers, lowest first: device, checks < kernels < model < engine < lab < serving, speculative, quant, parallel
< bench < cli. Technique packages of one layer may import each other (without cycles), but none imports
labkit.serving's app or server modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "labkit"
RANKS = {"device": 0, "checks": 0, "kernels": 1, "model": 2, "engine": 3, "lab": 4, "serving": 5, "speculative": 5,
         "quant": 5, "parallel": 5, "bench": 6, "cli": 7}
TECHNIQUES = ("serving", "speculative", "quant", "parallel")
SERVING_APP = ("labkit.serving.app", "labkit.serving.server")  # the HTTP app and its server: never a technique's
CLI = "labkit.cli"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package under `root`: dotted name -> file (a package is its __init__.py)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The labkit module a dotted name refers to: itself, else its longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imported_names(node: ast.AST, source: str, is_package: bool) -> list[str]:
    """The dotted names one ast node imports: a module, or for `from m import a` both m.a and m."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        module = _absolute(node, source, is_package)
        return [f"{module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(f"{PACKAGE}."):
        name, _, attribute = node.value.partition(":")
        if name.replace(".", "").replace("_", "").isalnum() and (attribute.isidentifier() or not attribute):
            return [name]
    return []


def import_edges(root: Path = ROOT, package: str = PACKAGE) -> list[Edge]:
    """Every edge between two modules of the package (self-imports left out), in file order."""
    modules = module_names(root, package)
    edges = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = _imported_names(node, source, is_package)
            if isinstance(node, ast.Constant) and names and names[0] not in modules:
                continue  # a string that only starts like a module name (prose, a file name)
            for name in names:
                target = _resolve(name, modules)
                if target and target != source and target != package:
                    edges.append(Edge(source, target, f"{path.relative_to(root)}:{node.lineno}"))
    return list(dict.fromkeys(edges))


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The edges inside each strongly connected component of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append([e for e in edges if e.source in component and e.target in component])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_edges(edges: list[Edge]) -> list[Edge]:
    """Edges to a higher layer, and edges from a technique package to serving's app or server."""
    bad = []
    for e in edges:
        source, target = _layer(e.source), _layer(e.target)
        if source not in RANKS or target not in RANKS:
            bad.append(e)  # a package with no layer: give it one above
        elif RANKS[target] > RANKS[source]:
            bad.append(e)
        elif source in TECHNIQUES and source != "serving" and e.target.startswith(SERVING_APP):
            bad.append(e)
    return bad


def cli_edges(edges: list[Edge]) -> list[Edge]:
    """Edges into labkit.cli from a module outside it."""
    inside = lambda name: name == CLI or name.startswith(CLI + ".")  # noqa: E731
    return [e for e in edges if inside(e.target) and not inside(e.source)]


def _listing(edges: list[Edge]) -> str:
    return "\n  " + "\n  ".join(map(str, edges))


# -- the rules on labkit -------------------------------------------------------------------------------------
EDGES = import_edges()


def test_the_graph_is_read():
    sources = {e.source for e in EDGES}
    assert {"labkit.cli.main", "labkit.engine.engine", "labkit.bench.decode"} <= sources
    assert len(module_names(ROOT)) > 40


def test_no_import_cycles():
    found = cycles(EDGES)
    assert not found, "import cycles:" + "".join(_listing(c) for c in found)


def test_imports_run_down_the_layers():
    bad = upward_edges(EDGES)
    assert not bad, "imports that run upward (device, checks < kernels < model < engine < lab < serving, " \
                    "speculative, quant, parallel < bench < cli), or into serving's app:" + _listing(bad)


def test_nothing_outside_cli_imports_cli():
    bad = cli_edges(EDGES)
    assert not bad, "modules outside labkit/cli that import it:" + _listing(bad)


# -- the checker itself, on a made-up package ----------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> list[Edge]:
    for name, text in files.items():
        path = tmp_path / "labkit" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_edges(tmp_path)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    edges = _package(tmp_path, {
        "__init__.py": "",
        "engine/__init__.py": "",
        "engine/core.py": "def f():\n    from labkit.lab import results\n",
        "lab/__init__.py": "from . import results\n",
        "lab/results.py": "import importlib\nimportlib.import_module('labkit.bench.run')\n",
        "model/__init__.py": "",
        "model/llama.py": "BACKENDS = {'triton': 'labkit.kernels.backend:Kernels'}\n",
        "kernels/__init__.py": "",
        "kernels/backend.py": "from labkit.model.llama import BACKENDS\n",
        "bench/__init__.py": "",
        "bench/run.py": "CMD = ['-m', 'labkit.cli']\nDOC = 'labkit.engine is where the loop lives'\n",
        "cli/__init__.py": "from labkit.cli.main import main\n",
        "cli/main.py": "from labkit.engine.core import f\n",
        "quant/__init__.py": "", "quant/bench.py": "from labkit.serving.server import app\n",
        "serving/__init__.py": "", "serving/server.py": "app = None\n",
    })
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {("labkit.engine.core", "labkit.lab.results"), ("labkit.lab", "labkit.lab.results"),
                     ("labkit.lab.results", "labkit.bench.run"), ("labkit.model.llama", "labkit.kernels.backend"),
                     ("labkit.kernels.backend", "labkit.model.llama"), ("labkit.bench.run", "labkit.cli"),
                     ("labkit.cli", "labkit.cli.main"), ("labkit.cli.main", "labkit.engine.core"),
                     ("labkit.quant.bench", "labkit.serving.server")}
    assert all(":" in e.where for e in edges)
    found = cycles(edges)
    assert sorted(len(c) for c in found) == [2, 5]  # model <-> kernels; engine -> lab -> bench -> cli -> engine
    assert {(e.source, e.target) for e in upward_edges(edges)} == {
        ("labkit.engine.core", "labkit.lab.results"), ("labkit.lab.results", "labkit.bench.run"),
        ("labkit.kernels.backend", "labkit.model.llama"), ("labkit.bench.run", "labkit.cli"),
        ("labkit.quant.bench", "labkit.serving.server")}
    assert [(e.source, e.target) for e in cli_edges(edges)] == [("labkit.bench.run", "labkit.cli")]
    assert "labkit.bench.run -> labkit.cli (labkit/bench/run.py:1)" in _listing(cli_edges(edges))


def test_same_layer_techniques_may_import_each_other(tmp_path):
    edges = _package(tmp_path, {
        "__init__.py": "", "quant/__init__.py": "", "speculative/__init__.py": "", "serving/__init__.py": "",
        "quant/bench.py": "from labkit.speculative import proposers\n", "speculative/proposers.py": "",
        "speculative/bench.py": "from labkit.serving import loadgen\n", "serving/loadgen.py": "",
    })
    assert len(edges) == 2 and not upward_edges(edges) and not cycles(edges) and not cli_edges(edges)
