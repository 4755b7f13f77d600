"""The package's import graph, read from the source (every import, also those inside functions): it has
no circles, and dependencies point one way through the layer folders of LAYERS (a module may import its own
folder and the folders below it). The modules at the top (cli.py and __init__.py, whose lazy API names
modules of every layer) sit above them all."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import semla_lab

ROOT = Path(semla_lab.__file__).parent

# layer folders, bottom first; data and models form one layer
LAYERS = (("core",), ("data", "models"), ("library",), ("training",), ("evaluation",), ("workflows",))
TOP = len(LAYERS)


def level(module: str) -> int:
    folder = module.split(".")[0]
    return next((i for i, folders in enumerate(LAYERS) if folder in folders), TOP if module in ("cli", "") else -1)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that `path` imports (relative imports; `from . import x` counts as x)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            target = ".".join(p for p in base if p)
            found |= {t for t in [target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)]
                      if t in modules and t != name and t != ""}
    return found


def graph() -> dict[str, set[str]]:
    paths = [p for p in ROOT.rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_every_module_lives_in_a_layer_folder():
    assert sorted(m for m in graph() if level(m) < 0) == [], "put new modules in one of the LAYERS folders"
    assert {m.split(".")[0] for m in graph() if level(m) < TOP} == {f for fs in LAYERS for f in fs}


def test_the_package_has_no_import_circles():
    try:
        TopologicalSorter(graph()).prepare()
    except CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_imports_point_down_the_layers():
    upward = [f"{m} imports {d}, a layer above it" for m, deps in graph().items() for d in deps if level(d) > level(m)]
    assert upward == []


def test_the_checker_sees_function_level_imports_and_circles(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from . import a\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert graph() == {"a": {"b"}, "b": {"a"}}
    finally:
        ROOT = saved


def test_only_applications_read_a_users_files():
    """Reading a user's own image files (data.user_images) is an application: workflows and the CLI do it, the
    evaluation layer measures what they hand it."""
    top = LAYERS.index(("workflows",))
    readers = sorted(m for m, deps in graph().items() if "data.user_images" in deps and 0 <= level(m) < top)
    assert readers == []
