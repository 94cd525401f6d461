"""The import structure (ARCHITECTURE.md "Layers"): a graph with no cycle, roots nothing imports,
no module facades, no private names across modules.

The layer order itself is the import contract in pyproject.toml ([tool.importlinter]), which
scripts/test.sh checks with `lint-imports` before pytest. Both read the graph grimp builds from every
import statement, function-level ones included. By hand:

    python -m pytest -q tests/test_layers.py
"""
from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("analysis", "app", "worker")
# Composition roots: they may import anything, nothing imports them.
ROOTS = ("analysis.cli", "analysis.notebook", "worker")
# The public facade (`from analysis import ...`): only scripts, tests and notebooks import it.
FACADE = "analysis"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_the_graph_sees_function_level_imports(graph):
    # analysis.cli imports the worker pool inside a function only (keeps `headscope --help` light)
    assert graph.direct_import_exists(importer="analysis.cli", imported="worker.pool")


def test_the_package_imports_have_no_cycle(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    g = grimp.ImportGraph()
    for m in ("a", "b", "c"):
        g.add_module(m)
    g.add_import(importer="a", imported="b")
    g.add_import(importer="b", imported="c")
    assert cycles(g) == []
    g.add_import(importer="c", imported="a")
    assert cycles(g) == [["a", "b", "c"]]


def test_nothing_imports_the_composition_roots_or_the_facade(graph):
    def is_root(m):  # `python -m app` (app/__main__.py) is `headscope serve` under its old name
        return any(m == r or m.startswith(r + ".") for r in ROOTS) or m == "app.__main__"

    protected = [m for m in graph.modules if is_root(m)] + [FACADE]
    bad = sorted((importer, m) for m in protected for importer in graph.find_modules_that_directly_import(m)
                 if not is_root(importer))
    assert bad == [], "a module imports a composition root (or the analysis facade)"


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_no_module_facade_and_no_private_name_across_modules():
    problems = []
    for path, tree in _modules():
        rel = path.relative_to(ROOT)
        problems += [f"{rel}:{n.lineno} module __getattr__" for n in tree.body
                     if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                problems += [f"{rel}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert problems == []
