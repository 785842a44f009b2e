"""The packages' layering, read from the source (every import statement, function-local ones included):
`dpal` at the bottom; `runtime` (start-up, distributed set-up, durable writes, CLI plumbing) on it; `formats` and
`kernels` on both; the two stages on top, side by side; no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dpal", "runtime", "formats", "kernels", "cache_teacher", "train_student", "acceptance")
# The project packages each package may import besides itself (third-party imports are not restricted).
ALLOWED = {
    "dpal": set(),
    "runtime": {"dpal"},
    "formats": {"dpal", "runtime"},
    "kernels": {"dpal", "runtime"},
    "cache_teacher": {"dpal", "runtime", "formats", "kernels"},
    "train_student": {"dpal", "runtime", "formats", "kernels"},
    "acceptance": set(PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The project modules `module` imports anywhere in its file: `from pkg import sub` names module pkg.sub
    when that is a module, else pkg; relative imports are resolved against the module's package."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


GRAPH = {module: _imported(module, path) - {module} for module, path in MODULES.items()}


def test_every_package_imports_only_the_layers_below_it():
    wrong = sorted(f"{module} imports {target}" for module, targets in GRAPH.items() for target in targets
                   if target.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]})
    assert not wrong, wrong


def test_no_import_cycle_between_modules():
    edges = {module: {target for target in targets if target in MODULES} for module, targets in GRAPH.items()}
    state: dict[str, str] = {}  # module -> "open" while on the depth-first path, "done" after

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":  # back to a module on the current path
                return path[path.index(target):] + [target]
            if target not in state and (found := cycle_from(target, path + [target])):
                return found
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            found = cycle_from(module, [module])
            assert found is None, " -> ".join(found)


def test_the_parser_sees_function_local_imports():
    """Guard for the checks above: an import inside a function body counts as an edge."""
    assert "train_student.train" in GRAPH["train_student.__main__"]  # imported inside main()
    assert "dpal.students" in GRAPH["dpal"]  # dpal/__init__.py imports it lazily, in __getattr__
