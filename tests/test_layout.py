"""The package's shape: the merge package reads bottom-up (no import cycles, no imports hidden in
functions to dodge one), and the product never depends on test tooling."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"


def _imports(file: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every `import` / `from ... import` in `file`."""
    tree = ast.parse(file.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
    return found


def test_merge_package_has_no_cycles_and_no_lazy_imports():
    folder = PACKAGE / "merge"
    modules = {f"evomerge.merge.{f.stem}": f for f in folder.glob("*.py") if f.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        graph[name] = set()
        for module, at_top in _imports(file):
            if module in modules:
                assert at_top, f"{name} imports {module} inside a function"
                graph[name].add(module)
    assert_acyclic(graph)


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join([*trail, node])}"
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_has_no_import_cycles():
    """Imports run downwards between the package's parts, lazy ones included (a lazy import may
    spare a heavy dependency, never hide a cycle)."""
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:  # `from evomerge.merge import learned` is a module
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        # a package's own __init__ is where its submodules are reached from, not a cycle
        graph[name] = {d for d in found - {name} if not name.startswith(d + ".")}
    assert_acyclic(graph)


def test_product_imports_no_test_tooling():
    for file in PACKAGE.rglob("*.py"):
        for module, _ in _imports(file):
            assert not module.startswith("tests"), f"{file} imports {module}"
    assert not (PACKAGE / "testing.py").exists() and not (PACKAGE / "mutations.py").exists()
