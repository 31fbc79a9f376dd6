"""`./run.sh study`: which distillation method is better, with its uncertainty: every method of a list trained
for several training seeds from one teacher cache, scored with the standard protocol, compared with paired tests.

    ./run.sh study [--quick] [--out runs/study] [--methods sft kd kd_cka kd_proj_mse kd_procrustes kd_fg]
        [--seeds 0 1 2 3 4] [--reference kd] [--grid beta=0.3,1,3] [--teacher DIR_OR_PRESET] [--student PRESET]

1. prepare the built-in data (or use --data / --test, prepared folders); 2. the teacher: --teacher DIR as given,
or a preset trained by SFT here; 3. cache its features once; 4. train every (method, grid point, training seed):
a seed changes the student's initialisation and data order, nothing else; 5. score every student (sampling
seeds averaged inside each run); 6. report: per method the mean and 95% CI over training seeds of ROUGE-L,
validation CE and D_P / D_FG / D_CKA; every method against --reference and against SFT: mean difference with
its CI, the paired t-test over training seeds (primary, Holm-corrected over the comparisons against the same
reference), Wilcoxon's signed-rank test, and a paired bootstrap over prompts (against SFT too when it ran).
OUT/report.md, OUT/forest.png, OUT/study.json. Each step is its own process; a killed study resumes where it stopped.
--grid KEY=V1,V2,...: each method whose objective uses KEY (alpha: the KD methods; beta: those with a feature
loss; layer_map: distillation methods, pairs joined by '+', e.g. layer_map=1:2+2:4,2:4; feature_rows=tokens,cls:
a classification task's feature losses but PKD's) once per value.
--task cola|rte|mrpc: the same study on a GLUE task with a BERT-family --teacher (pipeline/experiments/glue.py).
--quick only changes defaults (methods, seeds, steps, prompts, sampling seeds): an option you give is kept. Every
method name, grid key and value, seed list and model is checked before anything is prepared or trained.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.config import config_to_dict, save_config, stage_main
from pipeline.errors import ConfigError
from pipeline.models import layer_map, mapped_teacher_layers
from pipeline.experiments.stats import compare, mean_ci, with_holm
from pipeline.experiments import glue
from pipeline.experiments.glue import GLUE_METHODS, GLUE_TASKS, LAYER_MAP, STUDENT_LAYERS, default_glue_dir
from pipeline.experiments.steps import (
    DEFAULT_METHODS, cache_for, method_args, method_settings, per_prompt_scores, prepare_builtin,
    run_step, train_step, validation_geometry,
)
from pipeline.train.config import TrainConfig, check_train_steps, parse_layer_map

GRID_KEYS = {"alpha": lambda m: m != "sft", "beta": lambda m: method_settings(m)[1] != "none",
             "layer_map": lambda m: m != "sft", "feature_rows": lambda m: method_settings(m)[1] not in ("none", "pkd")}


TRAIN = {"teacher_steps": 300, "micro_batch_size": 16, "lr": 1e-3}
QUICK = {"methods": ["sft", "kd", "kd_procrustes"], "seeds": [0, 1, 2], "student_steps": 200, "eval_samples": 60,
         "sampling_seeds": [10, 20], **TRAIN}
FULL = {"methods": list(DEFAULT_METHODS), "seeds": [0, 1, 2, 3, 4], "student_steps": 300, "eval_samples": 100,
        "sampling_seeds": [10, 20, 30, 40, 50], **TRAIN}
# GLUE (--task): MiniLM-L6-sized encoders on 2 CPU cores (BENCHMARKS.md "GLUE"): the full study fine-tunes the
# teacher for 2 epochs of CoLA and trains each student for 1; --quick trains on the first 2,000 examples.
GLUE_TRAIN = {"micro_batch_size": 32, "lr": 1e-4, "eval_samples": 0, "sampling_seeds": [0]}  # no generation
GLUE_QUICK = {"methods": ["sft", "kd", "kd_procrustes"], "seeds": [0, 1], "student_steps": 60, "teacher_steps": 100,
              "limit": 2000, **GLUE_TRAIN}
GLUE_FULL = {"methods": list(GLUE_METHODS), "seeds": [0, 1, 2, 3, 4], "student_steps": 267, "teacher_steps": 534,
             "limit": 0, **GLUE_TRAIN}


def _default(name: str) -> str:
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    text = f"default {show(FULL[name])}; with --quick {show(QUICK[name])}" if name in FULL else ""
    if name in GLUE_FULL and name not in ("eval_samples", "sampling_seeds"):
        text += f"{'; ' if text else ''}--task: {show(GLUE_FULL[name])}, with --quick {show(GLUE_QUICK[name])}"
    return text


@dataclass
class StudyConfig:
    out: str = field(default="runs/study", metadata={"help": "everything the study writes goes here"})
    methods: list[str] = field(default_factory=list, metadata={
        "help": f"sft, kd or kd_<feature loss> ({_default('methods')})"})
    seeds: list[int] = field(default_factory=list, metadata={"help": f"training seeds ({_default('seeds')})"})
    reference: str = field(default="kd", metadata={"help": "every method is compared with this one (and SFT)"})
    grid: list[str] = field(default_factory=list, metadata={
        "help": "KEY=V1,V2,... (alpha, beta, layer_map, feature_rows)"})
    teacher: str = field(default="preset:tiny-teacher", metadata={
        "help": "a trained teacher model dir, or a preset to train by SFT here"})
    student: str = field(default="preset:tiny-student")
    tokenizer: str = field(default="builtin-tiny", metadata={"help": "for the built-in data"})
    data: str = field(default="", metadata={"help": "a prepared folder with train and valid (default: built-in)"})
    test: str = field(default="", metadata={"help": "a prepared folder with the test split (default: built-in)"})
    teacher_steps: Optional[int] = field(default=None, metadata={"help": _default("teacher_steps")})
    student_steps: Optional[int] = field(default=None, metadata={"help": _default("student_steps")})
    micro_batch_size: Optional[int] = field(default=None, metadata={"help": _default("micro_batch_size")})
    lr: Optional[float] = field(default=None, metadata={"help": _default("lr")})
    task: str = field(default="", metadata={
        "help": f"a GLUE task ({', '.join(GLUE_TASKS)}) from --glue_dir: distil a BERT-family encoder (--teacher DIR, "
                f"fine-tuned here unless it is a classifier already) and score with the task's metric"})
    glue_dir: str = field(default_factory=default_glue_dir, metadata={"help": "folder of the GLUE tasks' folders"})
    student_layers: str = field(default=STUDENT_LAYERS, metadata={
        "help": "--task: the teacher layers (0-based) the student keeps, cut from the fine-tuned teacher"})
    teacher_lr: float = field(default=1e-4, metadata={"help": "--task: the teacher's fine-tuning learning rate"})
    max_len: int = field(default=128, metadata={"help": "--task: tokens per example at most"})
    limit: Optional[int] = field(default=None, metadata={"help": "--task: train examples used, 0: all (" +
                                                         _default("limit") + ")"})
    eval_samples: Optional[int] = field(default=None, metadata={
        "help": f"test prompts scored, 0: all ({_default('eval_samples')})"})
    sampling_seeds: list[int] = field(default_factory=list, metadata={"help": _default("sampling_seeds")})
    max_new_tokens: int = 64
    jobs: int = field(default=1, metadata={"help": "training runs at a time (one thread each: one per core)"})
    quick: bool = field(default=False, metadata={
        "help": "a few-minute version: other defaults for --methods, --seeds, --student_steps, --eval_samples and "
                "--sampling_seeds (each option's help shows them); what you give yourself is kept, --grid too"})

    def check(self) -> None:
        """The options alone, with the defaults filled in; `plan` checks what they imply for the models."""
        resolve_defaults(self)
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds {' '.join(map(str, self.seeds))}: a study needs at least two different "
                              f"training seeds")
        if not self.sampling_seeds or len(set(self.sampling_seeds)) != len(self.sampling_seeds):
            raise ConfigError("--sampling_seeds: at least one, each once")
        # Steps are checked here because train reads --max_steps 0 as "one epoch"; --micro_batch_size and --lr are
        # checked with every other train option by plan's check_train_steps.
        for name in ("student_steps", "teacher_steps", "max_new_tokens", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise ConfigError(f"--eval_samples must be >= 0 (0: all), got {self.eval_samples}")


def resolve_defaults(cfg: StudyConfig) -> None:
    """Fill in what the user left out: --quick's values, else the full study's (a GLUE task's with --task)."""
    if cfg.task and cfg.task not in GLUE_TASKS:
        raise ConfigError(f"--task {cfg.task!r}: choose one of {', '.join(GLUE_TASKS)}")
    if cfg.task and cfg.teacher.startswith("preset:"):
        raise ConfigError("--task needs --teacher DIR, a BERT-family encoder (./run.sh get-model minilm-l6 --out DIR)")
    defaults = (GLUE_QUICK if cfg.quick else GLUE_FULL) if cfg.task else (QUICK if cfg.quick else FULL)
    for name, value in defaults.items():
        if getattr(cfg, name) in (None, []):
            setattr(cfg, name, value)



def grid_values(cfg: StudyConfig, student_layers: int, teacher_layers: int) -> dict[str, list[str]]:
    """--grid KEY=V1,V2,... checked value by value with the train options' own checks (a number in range, a layer
    map within both models' depths)."""
    grid: dict[str, list[str]] = {}
    for item in cfg.grid:
        key, sep, values = item.partition("=")
        if not sep or key not in GRID_KEYS or not values:
            raise ConfigError(f"--grid {item!r}: write KEY=V1,V2,... with KEY one of {', '.join(GRID_KEYS)}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice: give its values once, {key}=V1,V2,...")
        grid[key] = values.split(",")
        if "" in grid[key] or len(set(grid[key])) != len(grid[key]):
            raise ConfigError(f"--grid {item!r}: each value once, none empty")
        for value in grid[key]:
            try:
                if key == "layer_map":
                    layer_map(student_layers, teacher_layers, parse_layer_map(value.split("+")))
                else:
                    TrainConfig(mode="distill", data="-", student="-", out="-", features="-",
                                **{key: value if key == "feature_rows" else float(value)}).check()
            except ValueError as e:  # float('abc'), or a ConfigError of the train options' checks
                raise ConfigError(f"--grid {key}={value}: "
                                  f"{e if isinstance(e, ConfigError) else 'not a number'}") from None
    return grid


def grid_points(cfg: StudyConfig, grid: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
    """(run name, train option overrides) for every method x grid value."""
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"--methods {' '.join(cfg.methods)}: each method once")
    points = []
    for method in cfg.methods:
        method_settings(method)
        combos: list[dict[str, str]] = [{}]
        for key, values in grid.items():
            if GRID_KEYS[key](method):
                combos = [{**c, key: v.replace("+", " ")} for c in combos for v in values]
        for combo in combos:
            suffix = "".join(f"__{k}{v.replace(' ', '_').replace(':', '-')}" for k, v in combo.items())
            points.append((method + suffix, combo))
    return points


def plan(cfg: StudyConfig) -> tuple[list[tuple[str, dict[str, str]]], list[int]]:
    """Every run of the study and the teacher layers its store needs, checked against the models' configs and
    train's own options before any work (after `StudyConfig.check`)."""
    from pipeline.models import model_shape
    from pipeline.models.student_init import parse_layer_list

    # From the configs: no weights loaded. A GLUE student is cut from the fine-tuned teacher later.
    teacher_layers = model_shape(cfg.teacher, "teacher", classifier=bool(cfg.task))[1]
    student_layers = (len(parse_layer_list(cfg.student_layers, teacher_layers)) if cfg.task
                      else model_shape(cfg.student, "student")[1])
    points = grid_points(cfg, grid_values(cfg, student_layers, teacher_layers))
    if cfg.task:  # PKD's intermediate pairs, unless the grid sets a layer map
        points = [(n, o if "layer_map" in o or n == "sft" else {**o, "layer_map": LAYER_MAP}) for n, o in points]
    names = [n for n, _ in points]
    if cfg.reference not in names:
        raise ConfigError(f"--reference {cfg.reference!r} must be one of the runs ({', '.join(names)})")
    for folder, option in ((cfg.data, "data"), (cfg.test, "test")) if not cfg.task else ():
        if bool(cfg.data) != bool(cfg.test) or (folder and not (Path(folder) / "manifest.json").is_file()):
            raise ConfigError(f"--data and --test go together, each a prepared folder (--{option} {folder!r})")
    stores = {"train": Path("-"), "valid": Path("-")}
    check_train_steps([train_args(cfg, Path("-"), Path("-"), cfg.teacher, cfg.teacher_steps, 0)]
                      + [train_args(cfg, Path("-"), Path("-"), cfg.student, cfg.student_steps, 0)
                         + method_args(n.split("__")[0], stores, o) for n, o in points])
    # The store holds every teacher layer a run reads: the default map's and each --grid layer_map's.
    maps = [None] + [parse_layer_map(o["layer_map"].split()) for _, o in points if "layer_map" in o]
    layers = sorted({t for m in maps for t in mapped_teacher_layers(layer_map(student_layers, teacher_layers, m))})
    return points, layers


def run(cfg: StudyConfig) -> dict:
    if cfg.task:
        return run_glue(cfg)
    points, layers = plan(cfg)
    names = [n for n, _ in points]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "study_config.yaml")
    log, started = out / "study.log", time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread a process (see stages/demo.py)

    print("[study] 1/5 data, teacher and its features")
    data, test = (Path(cfg.data), Path(cfg.test)) if cfg.data else prepare_builtin(out, cfg.tokenizer, log)
    teacher = Path(cfg.teacher) if not cfg.teacher.startswith("preset:") else out / "teacher" / "model"
    if cfg.teacher.startswith("preset:"):
        train_step(train_args(cfg, out / "teacher", data, cfg.teacher, cfg.teacher_steps, 0) + ["--mode", "sft"],
                   out / "teacher", log)
    features = cache_for(data, teacher, layers, out / "features", log)

    print(f"[study] 2/5 {len(points)} runs x {len(cfg.seeds)} training seeds")
    runs = train_all(cfg, points, out, data, cfg.student, features, log)

    print("[study] 3/5 score every student")
    model_names = [f"{name}__seed{seed}" for name, seed in runs]
    run_step(["stages.eval", "--models", *[str(d / "model") for d in runs.values()], "--names", *model_names,
              "--benchmarks", str(test / "test" / "records.jsonl"), "--field_map", "output=references",
              "--max_samples", str(cfg.eval_samples), "--max_new_tokens", str(cfg.max_new_tokens),
              "--seeds", *map(str, cfg.sampling_seeds), "--out", str(out / "eval")], log)

    print("[study] 4/5 statistics")
    return report_study(cfg, analyse(cfg, names, runs, out / "eval"), layers, started, out)


def run_glue(cfg: StudyConfig) -> dict:
    """The study on a GLUE task: the same runs and statistics, the task's metric in place of ROUGE-L."""
    points, layers = plan(cfg)
    names, out = [n for n, _ in points], Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "study_config.yaml")
    log, started = out / "study.log", time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"[study] 1/5 {cfg.task}: data, the fine-tuned teacher, its student and its features")
    data = glue.prepare_task(cfg.task, cfg.glue_dir, cfg.teacher, out / "data", log, cfg.max_len, cfg.limit)
    teacher = Path(cfg.teacher)
    if not glue.is_fine_tuned(teacher):
        args = train_args(cfg, out / "teacher", data, cfg.teacher, cfg.teacher_steps, 0, cfg.teacher_lr)
        teacher = glue.train_classifier(args + ["--mode", "sft"], out / "teacher", log)
    student = glue.cut_student(teacher, cfg.student_layers, out / "student", log)
    features = glue.cache_task(data, teacher, layers, out / "features", log)
    print(f"[study] 2/5 {len(points)} runs x {len(cfg.seeds)} training seeds")
    runs = train_all(cfg, points, out, data, str(student), features, log)
    print("[study] 3/5 score every student, the teacher and the untrained student")
    models = {"teacher": teacher, "student_untrained": student,
              **{f"{n}__seed{s}": d / "model" for (n, s), d in runs.items()}}
    scores = glue.score(models, data, out / "eval", log)
    print("[study] 4/5 statistics")
    from eval.bootstrap import paired_metric_bootstrap

    results = glue.analyse(names, cfg.seeds, cfg.reference, runs, out / "eval", scores, paired_metric_bootstrap)
    return report_study(cfg, results, layers, started, out)


def report_study(cfg: StudyConfig, results: dict, layers: list[int], started: float, out: Path) -> dict:
    """study.json, forest.png and report.md of analysed results."""
    results.update(layers=layers, wall_s=round(time.time() - started, 1), config=config_to_dict(cfg))
    (out / "study.json").write_text(json.dumps(results, indent=2))
    print("[study] 5/5 report")
    forest_plot(results, out / "forest.png")
    report = write_report(cfg, results, out)
    print("\n" + report + f"\n[study] wrote {out / 'report.md'}, {out / 'forest.png'}, {out / 'study.json'}")
    return results


def train_all(cfg: StudyConfig, points: list, out: Path, data: Path, student: str, features: dict, log: Path
              ) -> dict[tuple[str, int], Path]:
    """Every (run, training seed), --jobs at a time (each a process of one thread; their output interleaves)."""
    runs = {(name, seed): out / "runs" / name / f"seed{seed}" for name, _ in points for seed in cfg.seeds}
    overrides = dict(points)

    def one(key: tuple[str, int]) -> None:
        (name, seed), run_dir = key, runs[key]
        args = train_args(cfg, run_dir, data, student, cfg.student_steps, seed)
        train_step(args + method_args(name.split("__")[0], features, overrides[name]), run_dir, log)

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        list(pool.map(one, runs))  # the first failure is raised here, after the runs already started end
    return runs


def train_args(cfg: StudyConfig, out: Path, data: Path, model: str, steps: int, seed: int,
               lr: float | None = None) -> list[str]:
    return ["stages.train", "--data", str(data), "--student", model, "--out", str(out), "--max_steps", str(steps),
            "--micro_batch_size", str(cfg.micro_batch_size), "--lr", str(lr or cfg.lr), "--seed", str(seed),
            "--checkpoint_every", "100", "--eval_samples", "200", "--progress", "false"]


def analyse(cfg: StudyConfig, names: list[str], runs: dict, eval_out: Path) -> dict:
    bench = "records"
    prompts = {n: np.array([per_prompt_scores(eval_out, f"{n}__seed{s}", bench, cfg.sampling_seeds)
                            for s in cfg.seeds]) for n in names}
    per_seed = {n: prompts[n].mean(axis=1).tolist() for n in names}  # ROUGE-L of each training seed
    methods = {}
    for n in names:
        valid = [validation_geometry(runs[n, s]) for s in cfg.seeds]
        row = {"rouge_l": mean_ci(per_seed[n]).dict(), "rouge_l_per_seed": per_seed[n]}
        for key in ("ce", "D_P", "D_FG", "D_CKA"):
            values = [v[key] for v in valid if v.get(key) is not None]
            row[key] = mean_ci(values).dict() if len(values) == len(cfg.seeds) else None
        methods[n] = row
    comparisons = {}
    for ref in dict.fromkeys([cfg.reference] + (["sft"] if "sft" in names else [])):
        group = with_holm([compare(n, ref, per_seed, prompts) for n in names if n != ref])
        comparisons[ref] = [c.dict() for c in group]
    return {"benchmark": bench, "seeds": cfg.seeds, "sampling_seeds": cfg.sampling_seeds, "methods": methods,
            "comparisons": comparisons, "primary_test": "paired t-test over training seeds, Holm-corrected over "
            "the comparisons against the same reference"}


def forest_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["comparisons"][next(iter(results["comparisons"]))]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    for i, c in enumerate(rows):
        d = c["difference"]
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=4,
                    color="tab:blue" if c["holm_p"] < 0.05 else "tab:gray")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_title("blue: paired t-test over training seeds, Holm-corrected p < 0.05; grey: not", fontsize=9)
    ax.set_yticks(range(len(rows)), [c["method"] for c in rows])
    ax.set_xlabel(f"{label(results)} difference vs {rows[0]['reference']} (mean over {len(results['seeds'])} "
                  f"training seeds, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(results: dict) -> str:
    return f"{results['benchmark']} {results['metric'].upper()}" if "metric" in results else "ROUGE-L"


def write_report(cfg: StudyConfig, results: dict, out: Path) -> str:
    fmt = lambda e: "-" if e is None else f"{e['mean']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"  # noqa: E731
    fmt4 = lambda e: "-" if e is None else f"{e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"  # noqa: E731
    glue_run, score = "metric" in results, "score" if "metric" in results else "rouge_l"
    setup = (f"student: teacher layers {cfg.student_layers} of the fine-tuned `{cfg.teacher}`, {cfg.student_steps} "
             f"steps; {results['benchmark']} dev set" if glue_run else
             f"{len(cfg.sampling_seeds)} sampling seeds; student `{cfg.student}`, {cfg.student_steps} steps; teacher "
             f"`{cfg.teacher}`; {cfg.eval_samples or 'all'} test prompts")
    lines = ["# geokd method study", "", f"{len(results['seeds'])} training seeds; {setup}; {label(results)} x100. "
             f"Mean [95% CI over training seeds].", ""]
    for name, sc in results.get("reference_models", {}).items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in sc.items()))
    lines += ["", f"| run | {label(results)} | valid CE | D_P | D_FG | D_CKA |", "|---|---|---|---|---|---|"]
    for n, m in results["methods"].items():
        lines.append(f"| {n} | {fmt(m[score])} | {fmt4(m['ce'])} | {fmt4(m['D_P'])} | {fmt4(m['D_FG'])} | "
                     f"{fmt4(m['D_CKA'])} |")
    for ref, rows in results["comparisons"].items():
        lines += ["", f"## Against {ref} (primary: {results['primary_test']})", "",
                  f"| run | difference [95% CI] | t-test p | Holm p | Wilcoxon p | bootstrap over "
                  f"{'examples' if glue_run else 'prompts'} [95%] | "
                  "bootstrap p |", "|---|---|---|---|---|---|---|"]
        for c in rows:
            b = c["bootstrap"]
            lines.append(f"| {c['method']} | {fmt(c['difference'])} | {c['t_p']:.3g} | {c['holm_p']:.3g} | "
                         f"{c['wilcoxon_p']:.3g} | {b['mean']:.2f} [{b['low']:.2f}, {b['high']:.2f}] | "
                         f"{c['bootstrap_p']:.3g} |".replace("| 0 |", "| < 1e-4 |"))
    unit = "dev examples (the metric recomputed on each resample)" if glue_run else "prompts"
    lines += ["", f"Wilcoxon's exact test cannot reach p < 0.05 with fewer than 6 seeds; the bootstrap resamples "
              f"{unit}, so it speaks to these, not to other training seeds.", "",
              "![differences against the reference](forest.png)"]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main("study", StudyConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
