"""The layout tells the truth: two peer stages on one core. treg_core imports neither stage, the stages
never import each other, and no module imports itself back through others. Imports inside functions
count too: a lazy import is still a dependency."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("treg_core", "treg_data", "treg_train")
FORBIDDEN = {"treg_core": {"treg_data", "treg_train"}, "treg_data": {"treg_train"}, "treg_train": {"treg_data"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each treg module -> the treg modules it imports."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            graph[module_name(path)] = found
    return {name: {m for m in found if m in graph} for name, found in graph.items()}


def test_the_packages_are_found():
    graph = imports()
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert "treg_core.contract" in graph and "treg_train.step" in graph


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_place_allows(package):
    wrong = [(name, target) for name, targets in imports().items() if name.split(".")[0] == package
             for target in targets if target.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, f"{package} must not import {sorted(FORBIDDEN[package])}: {wrong}"


def test_no_import_cycle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
