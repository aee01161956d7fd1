"""The house rules, read from the source: the core imports no plugin, a plugin family imports no other
family, the model never imports training, and no module imports itself back through others (imports
inside functions count; imports under ``if TYPE_CHECKING:`` never run and do not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"blipkit": ROOT / "blipkit", "blipkit.plugins": ROOT / "plugins"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, in functions and classes, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit(branch)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at run time. ``from package import name`` points at the
    submodule ``package.name`` when there is one, else at the package."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["blipkit", "plugins"] and len(parts) > 2 else None


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_the_core_imports_no_plugin() -> None:
    graph = import_graph()
    leaks = [(m, t) for m, targets in graph.items() if _family(m) is None for t in targets if _family(t) is not None]
    assert leaks == []


def test_plugin_families_import_no_other_family() -> None:
    graph = import_graph()
    crossing = [(m, t) for m, targets in graph.items() for t in targets
                if _family(m) and _family(t) and _family(m) != _family(t)]
    assert crossing == []


def test_the_model_never_imports_training() -> None:
    graph = import_graph()
    assert [(m, t) for m, targets in graph.items() if m.startswith("blipkit.model")
            for t in targets if t.startswith("blipkit.train")] == []


def test_the_checks_see_what_they_should() -> None:
    """The graph holds what the rules look for: function-level imports, relative imports, plugin edges."""
    graph = import_graph()
    assert "blipkit.model.build" in graph["blipkit"]  # imported inside load()
    assert "blipkit.plugin_manager" in graph["blipkit.config"]  # imported inside functions
    assert "blipkit.plugins.bridges.qformer.layers" in graph["blipkit.plugins.bridges.qformer.objectives"]  # relative
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
