"""The project's module-level import graph: no cycles, and `data/` and `models/` never import
each other (docs/design.md#layout-and-import-direction). Imports inside a function (lazy loads
of heavy or optional parts) are not module-level and are left out; `if TYPE_CHECKING:` imports
count, since they tie the modules together as much as any other."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("utils", "data", "models", "training")


def project_modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the packages."""
    mods = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    mods[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return mods


def module_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements at module level, also inside `if` / `try` blocks there."""
    found = []

    def visit(nodes):
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found.append(n)
            elif isinstance(n, (ast.If, ast.Try)):
                visit(n.body)
                visit(n.orelse)
                for handler in getattr(n, "handlers", []):
                    visit(handler.body)
    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:  # `from training import checkpoints` names the module training.checkpoints
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if node.module else []
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "training.stage2" in graph and "training.validation" in graph["training.stage2"]  # the graph is real
    found = cycles(graph)
    assert found == [], "modules that import each other (module level): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_data_and_models_never_import_each_other():
    graph = import_graph()
    crossing = [(a, b) for a, deps in graph.items() for b in deps
                if {a.split(".")[0], b.split(".")[0]} == {"data", "models"}]
    assert crossing == []
