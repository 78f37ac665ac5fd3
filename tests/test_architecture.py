"""Import rules between kiln's packages, read from the source with `ast` (nothing is imported).

(a) Kernels are leaves: no module under kiln/kernels/ imports kiln.layers, kiln.models, kiln.engine,
    kiln.core, kiln.worker or kiln.entrypoints, wherever the import statement sits (module top, inside
    a function, under `if TYPE_CHECKING:`). Kernels take tensors and plain parameters.
(b) The package-level import graph has no cycle: one node per subpackage or top-level module of kiln
    (kiln.layers, kiln.config, ...), an edge kiln.X → kiln.Y for every import statement anywhere in
    kiln.X that names kiln.Y. The root package `kiln` is no node: its __init__ is the public facade
    (it re-exports kiln.entrypoints.llm.LLM), which every import of a submodule runs anyway.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

KILN = Path(__file__).resolve().parents[1] / "kiln"
FORBIDDEN_IN_KERNELS = ("kiln.layers", "kiln.models", "kiln.engine", "kiln.core", "kiln.worker", "kiln.entrypoints")

def module_name(path: Path) -> str:
    parts = path.relative_to(KILN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) for every import in `source` (the text of `module`), at any depth;
    relative imports resolved, and for `from P import n` both P and P.n (n may be a submodule)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, name
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"


def file_imports(path: Path) -> Iterator[tuple[int, str]]:
    return imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")


def top_level_units() -> set[str]:
    """kiln.X for every subpackage and top-level module of kiln."""
    units = {f"kiln.{p.name}" for p in KILN.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return units | {f"kiln.{p.stem}" for p in KILN.glob("*.py") if p.stem != "__init__"}


def unit_of(name: str, units: set[str]) -> str | None:
    parts = name.split(".")
    head = ".".join(parts[:2])
    return head if parts[0] == "kiln" and head in units else None


def package_graph() -> dict[str, set[str]]:
    units = top_level_units()
    graph: dict[str, set[str]] = {u: set() for u in units}
    for path in KILN.rglob("*.py"):
        src = unit_of(module_name(path), units)
        for _, name in file_imports(path):
            dst = unit_of(name, units)
            if src is not None and dst is not None and dst != src:
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    return ", ".join(f"{a} → {b}" for a in component for b in sorted(graph[a]) if b in component)


def test_the_import_reader_sees_nested_and_relative_imports() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kiln.layers import linear\n"
              "def f():\n    import kiln.models.llama\n    from ..engine import llm_engine\n"
              "class C:\n    def g(self):\n        from . import fused\n")
    names = {n for _, n in imported_modules(source, "kiln.kernels.decode_step")}
    assert {"kiln.layers.linear", "kiln.models.llama", "kiln.engine.llm_engine", "kiln.kernels.fused"} <= names


@pytest.mark.parametrize("path", sorted(KILN.joinpath("kernels").rglob("*.py")), ids=lambda p: p.name)
def test_kernels_import_no_higher_package(path: Path) -> None:
    bad: dict[int, str] = {}
    for line, name in file_imports(path):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_KERNELS):
            bad.setdefault(line, f"{path.name}:{line} imports {name}")
    assert not bad, ("kernels take tensors and plain parameters; move this code beside its caller: "
                     + "; ".join(bad.values()))


def test_packages_form_no_cycle_at_all() -> None:
    graph = package_graph()
    found = cycles(graph)
    assert not found, "import cycles between kiln's packages: " + " | ".join(describe(graph, c) for c in found)
