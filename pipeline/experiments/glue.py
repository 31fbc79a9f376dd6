"""The method study's steps on a classification task (GLUE: `./run.sh study --task cola`): the task's files
prepared with the teacher's tokenizer, the teacher fine-tuned on it (unless given fine-tuned), a student cut from
the fine-tuned teacher, the teacher's features cached once, and every student scored with the task's metric.
Each step is the command a user would type, run as its own process (pipeline/experiments/steps.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import ConfigError
from pipeline.experiments.stats import compare, mean_ci, with_holm
from pipeline.experiments.steps import run_step, train_step, validation_geometry
from pipeline.io import read_json

GLUE_TASKS = ("cola", "rte", "mrpc")
GLUE_METHODS = ["sft", "kd", "kd_pkd", "kd_cka", "kd_proj_mse", "kd_procrustes", "kd_fg"]
# The student keeps teacher layers 2, 4 and 6 (0-based 1, 3, 5: PKD's "skip" choice): student hidden state i is
# computed by the weights of the teacher layer whose output it is mapped to (i <-> 2i), and its last layer is the
# teacher's last, whose output the kept pooler and classifier were fine-tuned to read. The feature losses use the
# intermediate pairs (PKD leaves the last layer to KD, which already matches what the classifier reads).
STUDENT_LAYERS = "1,3,5"
LAYER_MAP = "1:2 2:4"


def default_glue_dir() -> str:
    shared = os.environ.get("GEOKD_SHARED_DATA")
    base = Path(shared) / "data" if shared else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return str(base / "glue")


def prepare_task(task: str, glue_dir: str, tokenizer: str, out: Path, log: Path, max_len: int,
                 limit: int = 0) -> Path:
    """GLUE's train.tsv (split train) and dev.tsv (split valid: its labelled evaluation set) of one task."""
    folder = Path(glue_dir) / task
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise ConfigError(f"--task {task}: no {folder}/train.tsv and dev.tsv (--glue_dir names the folder of the "
                          f"tasks' folders)")
    run_step(["stages.prepare", "--task", task, "--data", str(folder), "--tokenizer", tokenizer, "--out", str(out),
              "--max_len", str(max_len)] + (["--limit", str(limit)] if limit else []), log)
    return out


def is_fine_tuned(model_dir: str | Path) -> bool:
    architectures = read_json(Path(model_dir) / "config.json").get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def cut_student(teacher: Path, layers: str, out: Path, log: Path) -> Path:
    if not (out / "config.json").is_file():
        run_step(["stages.make_student", "--teacher", str(teacher), "--layers", layers, "--out", str(out)], log)
    return out


def cache_task(data: Path, teacher: Path, layers: list[int], out: Path, log: Path) -> dict[str, Path]:
    """Token features of `layers` and the class logits, for the train and valid splits. Exact fp32 stores, as the
    decoder study's: a 384-wide encoder on short sentences makes small stores, and the tables then carry no
    quantization noise."""
    features = {}
    for split in ("train", "valid"):
        features[split] = out / split
        run_step(["stages.cache", "--data", str(data), "--split", split, "--teacher", str(teacher), "--out",
                  str(features[split]), "--layers", *map(str, layers), "--dtype", "fp32", "--quant", "none",
                  "--progress", "false"], log)
    return features


def score(models: dict[str, Path], data: Path, out: Path, log: Path) -> dict:
    """Every classifier on the valid split (GLUE's dev set); scores.json and per-example predictions in `out`."""
    run_step(["stages.eval", "--data", str(data), "--split", "valid", "--models", *map(str, models.values()),
              "--names", *models, "--out", str(out)], log)
    return read_json(out / "scores.json")


def predictions(eval_out: Path, name: str) -> tuple[list[int], list[int]]:
    """(predicted, gold) class of every example, in the split's order."""
    rec = json.loads((eval_out / "predictions" / f"{name}.json").read_text())
    return rec["predictions"], rec["gold"]


def train_classifier(args: list[str], out: Path, log: Path) -> Path:
    train_step(args, out, log)
    return out / "model"


def analyse(names: list[str], seeds: list[int], reference: str, runs: dict, eval_out: Path, scores: dict,
            metric_bootstrap: Callable[..., Any]) -> dict:
    """Per method: the task's metric over training seeds; paired tests over seeds and a paired bootstrap over the
    dev examples that recomputes the metric itself (`metric_bootstrap(a, b, gold, metric)`: MCC and F1 are not
    means of per-example scores)."""
    task = scores["protocol"]["task"]
    preds, gold = {}, None
    for n in names:
        per_seed = [predictions(eval_out, f"{n}__seed{s}") for s in seeds]
        preds[n], gold = np.array([p for p, _ in per_seed]), np.array(per_seed[0][1])
    value = lambda name: scores["results"][name][task["name"]]  # noqa: E731
    per_seed_score = {n: [value(f"{n}__seed{s}")["mean"] for s in seeds] for n in names}
    methods = {}
    for n in names:
        valid = [validation_geometry(runs[n, s]) for s in seeds]
        row = {"score": mean_ci(per_seed_score[n]).dict(), "score_per_seed": per_seed_score[n]}
        for key in ("ce", "D_P", "D_FG", "D_CKA"):
            values = [v[key] for v in valid if v.get(key) is not None]
            row[key] = mean_ci(values).dict() if len(values) == len(seeds) else None
        methods[n] = row
    boot = lambda a, b: metric_bootstrap(a, b, gold, task["metric"])  # noqa: E731
    comparisons = {}
    for ref in dict.fromkeys([reference] + (["sft"] if "sft" in names else [])):
        group = with_holm([compare(n, ref, per_seed_score, preds, bootstrap=boot) for n in names if n != ref])
        comparisons[ref] = [c.dict() for c in group]
    return {"benchmark": task["name"], "metric": value(f"{names[0]}__seed{seeds[0]}")["metric"], "seeds": seeds,
            "methods": methods, "comparisons": comparisons,
            "reference_models": {k: value(k)["scores"] for k in ("teacher", "student_untrained")},
            "primary_test": "paired t-test over training seeds, Holm-corrected over the comparisons against the "
                            "same reference"}
