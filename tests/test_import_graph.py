"""No import cycles inside the project's packages, lazy (function-level) imports included.

Every ``import``/``from ... import`` statement of every module of ``fimcore``,
``fimcore_adapters`` and ``reference_training`` is read with :mod:`ast` (nothing is imported),
resolved to the project module it names, and the resulting graph must have no cycle. Imports
under ``if TYPE_CHECKING:`` count too: a cycle hidden from the interpreter is still a cycle in
the design.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fimcore": ROOT / "fimcore", "fimcore_adapters": ROOT / "adapters" / "fimcore_adapters",
            "reference_training": ROOT / "reference_training"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((pkg, *parts))] = path
    return mods


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding an attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, modules)
                if dep is not None and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)  # a submodule importing its own package is not a cycle
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles found by depth-first search (one per back edge)."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_graph_walker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_project():
    graph = import_graph()
    assert len(graph) > 50 and graph["fimcore.tracker"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_of_the_adapters_or_the_reproduction():
    for mod, deps in import_graph().items():
        if mod.startswith("fimcore.") or mod == "fimcore":
            assert not {d for d in deps if not d.startswith("fimcore")} - {"fimcore"}, mod
            assert not [d for d in deps if d.startswith(("fimcore_adapters", "reference_training"))], mod
