"""The architecture holds: imports only go down the layers, and no module imports itself back.

    stages/            one module per step; may import eval/ and pipeline/, never another stage
    eval/              may import pipeline/
    pipeline/train/    may import pipeline/features/, pipeline/data/ and the core
    pipeline/features/ may import pipeline/data/ and the core
    pipeline/data/     may import the core
    pipeline/*.py      the core (errors, config, io, runtime, models, geometry): imports only the core

Imports inside functions count too: deferring an import does not change who depends on whom.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "eval")
MAX_LINES = 400

# A module's layer, from its name; a module may import its own layer or any lower one (core is the lowest).
LAYERS = ["pipeline.core", "pipeline.data", "pipeline.features", "pipeline.train", "eval", "stages"]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pipeline":
        return f"pipeline.{parts[1]}" if len(parts) > 2 and parts[1] in ("data", "features", "train") else "pipeline.core"
    return parts[0]


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pipeline.data import tokenizer` counts as pipeline.data.tokenizer)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                while name not in modules and "." in name:  # `from pkg.mod import func` -> pkg.mod
                    name = name.rsplit(".", 1)[0]
                if name in modules:
                    found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {m: imports_of(p, modules) for m, p in modules.items()}
    # A package's __init__ is imported on the way to any of its modules; it is not a dependency by itself.
    return {m: {d for d in deps if d != m and not modules[d].name == "__init__.py"} for m, deps in graph.items()}


def test_imports_go_down_the_layers_only():
    wrong = []
    for module, deps in import_graph().items():
        rank = LAYERS.index(layer_of(module))
        for dep in sorted(deps):
            if LAYERS.index(layer_of(dep)) > rank:
                wrong.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})")
            elif layer_of(module) == "stages" and layer_of(dep) == "stages":
                wrong.append(f"{module} imports another stage, {dep}: stages share code through pipeline/")
    assert not wrong, "upward or sideways imports:\n  " + "\n  ".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_real_imports():
    """Guards the two tests above against passing vacuously (a parser that finds nothing finds no violation)."""
    graph = import_graph()
    assert "pipeline.features.store" in graph["stages.cache"]
    assert "pipeline.data.tokenizer" in graph["eval.runner"]
    assert layer_of("pipeline.train.loop") == "pipeline.train" and layer_of("pipeline.geometry") == "pipeline.core"


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they do): {long}"
