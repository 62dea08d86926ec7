"""The packages' import graph, read from the source: the product never needs the development package.

``worker/`` is all the worker image installs, so no module of it may import
``devstack``, ``bench``, ``chaos`` or ``tests``; ``devstack`` stands on the
product alone (the benchmark and the fault scenarios build on it, not the
other way); and no package has an import cycle (function-level imports
included: they are cycles all the same, only deferred).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "devstack", "bench", "chaos")
DEVELOPMENT = ("devstack", "bench", "chaos", "tests")


def imports_of(path: Path) -> set[str]:
    """Every module name a file imports, at any depth, ``from x import y`` counted as ``x`` and ``x.y``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def module_graph() -> dict[str, set[str]]:
    files = {
        ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
        for package in PACKAGES
        for f in (REPO / package).rglob("*.py")
    }
    return {name: {dep for dep in imports_of(f) if dep in files and dep != name} for name, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_cycles_are_found_where_there_are_some() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_packages_have_no_import_cycle() -> None:
    graph = module_graph()
    assert {"worker.cli", "devstack.stack", "bench.runs", "chaos.harness"} <= graph.keys()
    assert cycles(graph) == []


@pytest.mark.parametrize(("package", "allowed"), [("worker", ()), ("devstack", ("devstack",))])
def test_worker_and_devstack_import_nothing_built_on_them(package: str, allowed: tuple[str, ...]) -> None:
    for path in (REPO / package).rglob("*.py"):
        wrong = sorted(n for n in imports_of(path) if n.split(".")[0] in DEVELOPMENT and n.split(".")[0] not in allowed)
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"
