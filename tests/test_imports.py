"""The import graph of the project's own modules: no cycle among module-level imports.

Every module under gistcache/ (and cli/, train/, eval/, which install as gistcache.cli, gistcache.train and
gistcache.eval: pyproject.toml's package-dir) is parsed with `ast`, never imported. An import counts as
module-level when it runs at import time (the module body, class bodies, top-level `try`/`if`); one inside a
function, or under `if TYPE_CHECKING:`, is deferred and listed apart. Module-level imports must form no cycle.
Deferred imports may close a cycle only where `KNOWN_DEFERRED_CYCLES` lists it, so a new one fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tiny

ROOT = tiny.ROOT
# package name -> its folder (pyproject.toml [tool.setuptools.package-dir])
PACKAGE_DIRS = {"gistcache": ROOT / "gistcache", "gistcache.cli": ROOT / "cli", "gistcache.train": ROOT / "train",
                "gistcache.eval": ROOT / "eval"}

# Cycles closed only by a deferred import (inside a function or under TYPE_CHECKING), each written from its
# smallest module name round to itself. None of them can fail at import time (the deferred edge runs after both
# modules have loaded), but each still ties two layers together, so a new one fails here; list one only with the
# issue that will remove it. Issue 25 removed the last (GistModel.from_pretrained / save_pretrained importing the
# run folder code that built GistModels: the loading and saving of a GistModel now live in gistcache.model).
KNOWN_DEFERRED_CYCLES: set[tuple[str, ...]] = set()


def _module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "pretrained" in rel.parts or "__pycache__" in rel.parts:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import statement, deferred) for every import in the module."""
    found = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, deferred))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), deferred)
            else:
                visit(child, deferred)

    visit(tree, False)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The project modules an import statement loads (a name that is a submodule counts as that submodule)."""
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if (target := known(alias.name)) is not None:
                out.add(target)
        return out
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            out.add(f"{source}.{alias.name}")
        elif (target := known(source)) is not None:
            out.add(target)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, deferred edges) between the project's modules."""
    files = _module_files()
    names = set(files)
    eager: dict[str, set[str]] = {m: set() for m in files}
    deferred: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, is_deferred in _imports(tree):
            for target in _targets(module, path.name == "__init__.py", node, names) - {module}:
                (deferred if is_deferred else eager)[module].add(target)
    for module in files:
        deferred[module] -= eager[module]
    return eager, deferred


def cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle, each as a tuple starting at its smallest module (small graphs: plain DFS)."""
    found = set()
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    found.add(tuple(path))
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return found


def test_the_graph_sees_the_project():
    eager, deferred = import_graph()
    assert "gistcache.cache" in eager and "gistcache.cli.main" in eager and "gistcache.train.loop" in eager
    assert "gistcache.cache" in eager["gistcache"]  # gistcache/__init__.py re-exports load_cache


def test_no_cycle_among_module_level_imports():
    eager, _ = import_graph()
    assert sorted(cycles(eager)) == []


def test_deferred_imports_close_only_the_known_cycles():
    eager, deferred = import_graph()
    both = {m: eager[m] | deferred[m] for m in eager}
    assert sorted(cycles(both)) == sorted(KNOWN_DEFERRED_CYCLES)


def folder_of(module: str) -> str | None:
    """The layer a module belongs to: its top-level module or folder under gistcache (gistcache.model.load ->
    gistcache.model, gistcache.config -> gistcache.config, gistcache.eval.gpu_bench.cli -> gistcache.eval); None
    for the package root, which re-exports the public names from every layer."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else None


def folder_graph() -> dict[str, set[str]]:
    """Edges between layers: every import (deferred ones too) of a module in one layer from a module in another."""
    eager, deferred = import_graph()
    edges: dict[str, set[str]] = {}
    for module in eager:
        source = folder_of(module)
        for target in map(folder_of, eager[module] | deferred[module]):
            if source is not None and target is not None and target != source:
                edges.setdefault(source, set()).add(target)
    return edges


def test_no_cycle_between_folders():
    """Layers import one way. A module's folder counts as the module: importing gistcache.run.layout runs
    gistcache/run/__init__.py first, so a folder importing one that imports it back can fail at import time even
    when no two modules import each other."""
    assert sorted(cycles(folder_graph())) == []


def test_the_run_folder_code_never_imports_the_model():
    """gistcache.model reads and writes run folders (from_pretrained / save_pretrained); gistcache.run is the folder
    alone, below it."""
    edges = folder_graph()
    assert "gistcache.run" in edges["gistcache.model"]
    assert "gistcache.model" not in edges.get("gistcache.run", set())


def test_the_walk_tells_module_level_from_deferred_imports():
    """A small module: the kinds of import this test tells apart, and a cycle it must find."""
    tree = ast.parse("import gistcache.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gistcache.b\n"
                     "class C:\n    import gistcache.c\n"
                     "def f():\n    import gistcache.d\ntry:\n    import gistcache.e\nexcept ImportError:\n    pass\n")
    kinds = {node.names[0].name: deferred for node, deferred in _imports(tree) if node.names[0].name != "TYPE_CHECKING"}
    assert kinds == {"gistcache.a": False, "gistcache.b": True, "gistcache.c": False, "gistcache.d": True,
                     "gistcache.e": False}
    names = {"gistcache", "gistcache.cache", "gistcache.cache.format"}
    assert _targets("gistcache.store", False, ast.parse("from gistcache.cache import format, GistCache").body[0],
                    names) == {"gistcache.cache.format", "gistcache.cache"}
    assert _targets("gistcache.cache", True, ast.parse("from .format import SEAL").body[0], names) == {
        "gistcache.cache.format"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    modules = ("gistcache", "gistcache.masks", "gistcache.model.load", "gistcache.eval.gpu_bench.cli")
    assert [folder_of(m) for m in modules] == [None, "gistcache.masks", "gistcache.model", "gistcache.eval"]


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists its packages by name: a package folder left out would be missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in _module_files().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)
