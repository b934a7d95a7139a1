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


# The package's parts, bottom first: a module imports only from its own part or the ones below
# (lazy imports included). The vocabulary every part speaks sits at the bottom, the command on top.
LAYERS = (
    ("evomerge", "evomerge.errors", "evomerge.recipe", "evomerge.baselines", "evomerge.config",
     "evomerge.config_docs", "evomerge.mergekit_evolve"),
    ("evomerge.merge", "evomerge.spaces", "evomerge.optim", "evomerge.zoo"),
    ("evomerge.workers",),
    ("evomerge.results",),
    ("evomerge.learn",),
    ("evomerge.search",),
    ("evomerge.cli",),
)  # fmt: skip


def layer_of(module: str) -> int:
    """The layer of the longest declared part `module` belongs to."""
    best, found = -1, None
    for level, parts in enumerate(LAYERS):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and len(part) > best:
                best, found = len(part), level
    assert found is not None, f"{module} belongs to no declared part: add it to LAYERS"
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file."""
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
    return graph


def test_the_package_has_no_import_cycles():
    """Imports run downwards between the package's modules, lazy and type-only ones included (a
    lazy import may spare a heavy dependency, never hide a cycle)."""
    assert_acyclic(import_graph())


def test_imports_follow_the_declared_layers():
    """Each part imports only from itself and the parts below it: neither the workers nor the
    results reach into learning or the search; only the command line sees everything."""
    upward = [
        f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
        for name, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_product_imports_no_test_tooling():
    for file in PACKAGE.rglob("*.py"):
        for module, _ in _imports(file):
            assert not module.startswith("tests"), f"{file} imports {module}"
    assert not (PACKAGE / "testing.py").exists() and not (PACKAGE / "mutations.py").exists()


# What a function may import lazily, and why: a dependency whose import costs time a command that
# never uses it should not pay (measured with `python -X importtime`), or an optional one.
LAZY_DEPENDENCIES = {
    "torch": "~1.2 s; status, export checks and config commands never need it",
    "transformers": "~2 s to its model classes; only paths that load a model or tokenizer",
    "accelerate": "~1.2 s; only a live model spread over devices",
    "lm_eval": "~0.9 s; only scoring and task checks",
    "ray": "~0.4 s; only the Ray pool and its workers",
    "mlflow": "~1.4 s; only runs with `tracking:`",
    "pymoo": "~0.12 s; only Pareto sorting and hypervolume, not every status line",
    "gguf": "optional: only reading a GGUF file",
}
# in-package lazy imports: each command imports only what it runs (`evomerge status` starts in
# about a second, without torch); status reads a learned merge's summary from the merge package
# (which loads torch) only for a recipe that names a coefficient file; scoring loads its lm-eval
# model (torch, transformers, lm-eval's HF backend) only when it scores, not to read tasks
LAZY_MODULES = {
    "evomerge.cli": ("evomerge.",),
    "evomerge.results.status": ("evomerge.merge.",),
    "evomerge.workers.scoring": ("evomerge.workers.shared_context",),
}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of imports under `if TYPE_CHECKING:` (never executed)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def test_lazy_imports_spare_a_declared_heavy_dependency():
    """An import inside a function hides a module's dependencies from its reader; one is kept only
    where it spares a dependency named above, with its reason."""
    unexplained = []
    for file in PACKAGE.rglob("*.py"):
        name = _module_name(file)
        tree = ast.parse(file.read_text())
        top = {id(n) for n in tree.body}
        for stmt in tree.body:  # a module-level try/if (an optional import) is still top level
            if isinstance(stmt, (ast.Try, ast.If)):
                top |= {id(n) for n in ast.walk(stmt)}
        top |= _type_checking_only(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            modules = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            for module in modules:
                root = (module or "").split(".")[0]
                if root in LAZY_DEPENDENCIES or module.startswith(LAZY_MODULES.get(name, ("-",))):
                    continue
                unexplained.append(f"{file.relative_to(PACKAGE.parent)}:{node.lineno} {module}")
    assert not unexplained, "lazy imports with no declared reason:\n" + "\n".join(unexplained)
