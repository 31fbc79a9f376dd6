"""The architecture holds: imports only go down the layers, and no module imports itself back.

    stages/                one module per step; may import eval/ and pipeline/, never another stage (demo and
                           study run stages as processes)
    eval/                  may import pipeline/
    pipeline/experiments/  runs of several stages (demo, study); runs stages as processes, never imports them
    pipeline/train/        may import pipeline/features/ and everything below
    pipeline/features/     may import pipeline/models/, pipeline/data/, pipeline/geometry/ and the core
    pipeline/models/       model loading, sources, layer-subset students, the frozen teacher: the core only
    pipeline/data/         the core only
    pipeline/geometry/     the distances and the token rule: the core only
    CORE                   an explicit list (errors, io, runtime, config): imports only the core

A module of pipeline/ that is neither in CORE nor in one of the packages has no place: the test says so, so a new
module is placed on purpose. Imports inside functions count too: deferring an import does not change who depends
on whom. A string naming a stage module (`"stages.train"`) is a dependency as well: only pipeline/experiments/ may
run stages, and only ones that exist.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import ROOT

PACKAGES = ("pipeline", "stages", "eval")
MAX_LINES = 400
CORE = ("pipeline", "pipeline.errors", "pipeline.io", "pipeline.runtime", "pipeline.config")

# A module's layer; a module may import its own layer or any lower one (core is the lowest).
LAYERS = ["pipeline.core", "pipeline.geometry", "pipeline.data", "pipeline.models", "pipeline.features",
          "pipeline.train", "pipeline.experiments", "eval", "stages"]
STAGE_NAME = re.compile(r"^stages\.[a-z_]+$")


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> str:
    if module in CORE:
        return "pipeline.core"
    parts = module.split(".")
    layer = ".".join(parts[:2]) if parts[0] == "pipeline" else parts[0]
    return layer if layer in LAYERS else f"no layer ({module})"


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


def stages_named_in(path: Path) -> set[str]:
    """Stage modules a file names in a string: the steps it runs as processes."""
    return {node.value for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and STAGE_NAME.match(node.value)}


def _is_bare_package(path: Path) -> bool:
    """An __init__ with nothing but a docstring: imported on the way to its modules, not a dependency by itself."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {m: imports_of(p, modules) for m, p in modules.items()}
    return {m: {d for d in deps if d != m and not _is_bare_package(modules[d])} for m, deps in graph.items()}


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


def test_every_module_has_a_place_and_only_experiments_run_stages():
    modules = project_modules()
    unplaced = sorted(m for m in modules if layer_of(m) not in LAYERS)
    assert not unplaced, f"modules with no layer (put each in a package of pipeline/, or in CORE): {unplaced}"
    runs = {m: stages_named_in(p) for m, p in modules.items()}
    wrong = [f"{m} runs {s}" for m, named in runs.items() for s in sorted(named)
             if layer_of(m) not in ("pipeline.experiments", "stages") or s not in modules]
    assert not wrong, "stages run outside experiments/ and stages/, or unknown:\n  " + "\n  ".join(wrong)
    assert {"stages.prepare", "stages.cache"} <= runs["pipeline.experiments.steps"]
    assert {"stages.train", "stages.eval"} <= runs["stages.study"]


def test_the_steps_command_lines_parse_under_their_stages_configs(monkeypatch, tmp_path):
    """What pipeline/experiments/steps.py passes to each stage is an option of that stage (a renamed option
    fails here, not in the middle of a study)."""
    from eval.config import EvalConfig
    from pipeline.config import parse_config
    from pipeline.data.config import PrepareConfig
    from pipeline.experiments import steps
    from pipeline.features.config import CacheConfig
    from pipeline.train.config import TrainConfig

    calls: list[list[str]] = []
    monkeypatch.setattr(steps, "run_step", lambda args, log: calls.append(args))
    steps.prepare_builtin(tmp_path, "builtin-tiny", tmp_path / "log")
    for name, vocab in (("teacher", 1000), ("large_vocab", 262_144)):  # exact KD, then top-k (default_kd_source)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"vocab_size": {vocab}}}')
        features = steps.cache_for(tmp_path / "data", tmp_path / name, [2, 4], tmp_path / name, tmp_path / "log")
    configs = {"stages.prepare": PrepareConfig, "stages.cache": CacheConfig, "stages.eval": EvalConfig}
    assert [c[0] for c in calls] == ["stages.prepare"] * 2 + ["stages.cache"] * 4
    assert "--final" in calls[2] and calls[4][calls[4].index("--topk_logits") + 1] == "64"
    for args in calls:
        parse_config(configs[args[0]], args[1:])
    base = ["--data", "d", "--student", "s", "--out", "o"]
    for method in steps.DEFAULT_METHODS:
        parse_config(TrainConfig, base + steps.method_args(method, features, {"beta": "0.5"})).check()


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
    assert layer_of("pipeline.train.loop") == "pipeline.train" and layer_of("pipeline.io") == "pipeline.core"
    assert layer_of("pipeline.geometry") == "pipeline.geometry" and layer_of("pipeline.newthing") != "pipeline.core"
    assert "pipeline.models" in graph["stages.analyze"]  # a package with code in its __init__ is a dependency


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they do): {long}"


def test_every_stage_follows_the_one_contract():
    """Each stage: a `main(argv)` that goes through `pipeline.config.stage_main` with a config dataclass that has
    its own `check()` (every option checked before any work); no config checks itself in `__post_init__`."""
    import dataclasses
    import importlib

    problems = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"stages.{path.stem}")
        main = next((n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)
                     and n.name == "main"), None)
        calls = [c for c in ast.walk(main) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "stage_main"] \
            if main else []
        if not calls or not isinstance(calls[0].args[1], ast.Name):
            problems.append(f"{path.name}: no main(argv) calling stage_main(NAME, Config, recipe, argv)")
            continue
        config = getattr(module, calls[0].args[1].id)
        if not dataclasses.is_dataclass(config) or "check" not in vars(config):
            problems.append(f"{path.name}: {config.__name__} is not a dataclass with its own check()")
    for module, path in project_modules().items():
        if "__post_init__" in path.read_text():
            problems.append(f"{module}: __post_init__ (checks belong in check(), which stage_main calls)")
    assert not problems, "\n".join(problems)
