"""The house rules the code base keeps: imports point one way, no cycles, small modules.

Parsed from the source (``ast``), not imported, so a violation is found even in a module
no test happens to import. The layers, lowest first: ``randes`` (the math and the on-disk
formats) <- ``storage`` (registry, object store, workspace) <- ``migrations`` and
``flows`` (Prefect flows and the CLI) <- ``benchmarks``. A module may import its own layer
and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"randes": 0, "storage": 1, "migrations": 2, "flows": 2, "benchmarks": 3}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Project modules ``name`` imports, at any depth (function-level imports count too:
    a cycle hidden in a function body still ties the two modules together)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != name:
                yield resolved


def _resolve(target: str) -> str | None:
    """The project module ``target`` names (``pkg.mod.func`` -> ``pkg.mod``), if any."""
    parts = target.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_the_import_graph_was_read() -> None:
    # A parser that silently found nothing would pass every rule below.
    assert len(MODULES) > 50
    assert "randes.fold" in GRAPH and GRAPH["storage.workspace"]


def test_no_import_points_up_a_layer() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components: any component of two or more modules
    is a cycle (a package's ``__init__`` re-exporting its own modules is not one: a
    package importing its submodules is the one allowed back edge)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def edges(module: str) -> list[str]:
        return [t for t in GRAPH[module] if not module.startswith(t + ".")]

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_module_is_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    large = [f"{name}: {lines} lines" for name, lines in sorted(sizes.items()) if lines > MAX_LINES]
    assert not large, f"modules over {MAX_LINES} lines:\n" + "\n".join(large)
