"""The floor plan's rules that the import linter cannot see: no private name is used across modules,
and a compile folder's file names are spelled only in compile/artifacts.py."""
import ast
from pathlib import Path

from conftest import REPO

from quantune_edge.compile import artifacts

PACKAGE = REPO / "quantune_edge"
LAYOUT_NAMES = {v for k, v in vars(artifacts).items() if k.isupper() and isinstance(v, str) and "." in v}


def _sources(*folders: Path):
    for folder in folders:
        yield from sorted(folder.rglob("*.py"))


def _private_uses(path: Path) -> list[str]:
    """``from quantune_edge.x import _name`` and ``module._name`` on a quantune_edge module imported by name."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quantune_edge"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name}")
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    found = [use for path in _sources(PACKAGE, REPO / "benchmarks") for use in _private_uses(path)]
    assert not found, found


def test_a_compile_folders_file_names_are_spelled_only_in_artifacts():
    assert {"compile.json", "model_int8.tflite", "model_mixed.tflite", "tune.json", "analysis.json"} <= LAYOUT_NAMES
    found = []
    for path in _sources(PACKAGE, REPO / "benchmarks"):
        if path == Path(artifacts.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} spells {node.value!r}")
    assert not found, found


def test_every_import_of_the_package_resolves_including_those_inside_functions():
    """Heavy imports sit inside functions, where only a call would find a name that moved."""
    import importlib

    missing = []
    for path in _sources(PACKAGE, REPO / "benchmarks", REPO / "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "quantune_edge":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing
