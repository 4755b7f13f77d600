"""The package's import graph, read from the source (every import, also those inside functions): it has
no circles, and dependencies point one way through the layers of LAYERS (each module may import its own
layer and those below). LAYERS is the planned folder layout; a new module must be placed in it."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import semla_lab

ROOT = Path(semla_lab.__file__).parent

# layer -> modules, bottom first
LAYERS = {
    "core": ["errors", "runtime", "manifests", "engine", "metrics", "profiles", "retrieval", "fusion"],
    "data_models": ["split", "data", "real_data", "real_layout", "world", "world.concepts", "world.scenes",
                    "world.appearance", "world.spec", "world.generate", "world.photos", "world.pool", "sources",
                    "user_images", "clip", "segmenter", "lora"],
    "library": ["library", "fingerprints", "assets", "predictor"],
    "training": ["train"],
    "evaluation": ["methods", "experiments", "transfer", "outputs", "analysis", "plots", "domain_shift", "report_html",
                   "tuning", "beyond", "growth"],
    "pipeline": ["pipeline"],
    "studies": ["clip_variants", "scaling"],
    "cli": ["cli", ""],          # "" is semla_lab/__init__.py (its lazy API names modules of every layer)
}
LEVEL = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


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


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LEVEL)) == [], "add new modules to LAYERS"
    assert sorted(set(LEVEL) - set(graph())) == [], "LAYERS names a module that does not exist"


def test_the_package_has_no_import_circles():
    try:
        TopologicalSorter(graph()).prepare()
    except CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_imports_point_down_the_layers():
    layer = list(LAYERS)
    upward = [f"{m} ({layer[LEVEL[m]]}) imports {d} ({layer[LEVEL[d]]})"
              for m, deps in graph().items() for d in deps if LEVEL[d] > LEVEL[m]]
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
