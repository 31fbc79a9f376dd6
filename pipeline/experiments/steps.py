"""Running the pipeline's stages as processes, for the demo and the method study: each step is the command a user
would type (printed and logged), skipped when its output is already complete, resumed when it was cut short.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import ConfigError, GeokdError
from pipeline.geometry import CLASSIFIER_LOSSES, FEATURE_LOSSES

# A method is `sft`, `kd`, or `kd_<feature loss>` (KD plus a loss of pipeline.geometry's registry).
DEFAULT_METHODS = ["sft", "kd", "kd_cka", "kd_proj_mse", "kd_procrustes", "kd_fg"]
KD_ALPHA = 0.5


def method_settings(name: str) -> tuple[float, str]:
    """(alpha, feature loss) of a method name."""
    if name == "sft":
        return 0.0, "none"
    if name == "kd":
        return KD_ALPHA, "none"
    loss = name.removeprefix("kd_")
    if not name.startswith("kd_") or loss not in {**FEATURE_LOSSES, **CLASSIFIER_LOSSES}:
        raise ConfigError(f"--methods {name!r}: choose sft, kd or kd_<loss> with <loss> one of "
                          f"{', '.join([*FEATURE_LOSSES, *CLASSIFIER_LOSSES])}")
    return KD_ALPHA, loss


def run_step(args: list[str], log: Path) -> None:
    """Run `python -m <args>` as its own process; its output goes to the console and to `log`."""
    cmd = [sys.executable, "-m", *args]
    print(f"\n$ {shlex.join(['python', '-m', *args])}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait() != 0:
            raise GeokdError(f"step failed (exit {proc.returncode}): {shlex.join(args)}; log in {log}")


def train_step(args: list[str], out: Path, log: Path) -> None:
    """A training run into `out`: skipped when its model exists, resumed when it has checkpoints."""
    if (out / "model" / "config.json").exists():
        print(f"[steps] {out}: done already")
        return
    # A run killed before its first checkpoint left metrics only: --resume starts it over, logging no step twice.
    started = (out / "checkpoints").exists() or (out / "metrics.jsonl").exists()
    run_step(args + (["--resume"] if started else []), log)


def prepare_builtin(out: Path, tokenizer: str, log: Path) -> tuple[Path, Path]:
    """The built-in data (train + 200 validation samples) and its held-out test set."""
    data, test = out / "data", out / "data_test"
    run_step(["stages.prepare", "--data", "builtin", "--out", str(data), "--tokenizer", tokenizer,
              "--valid_size", "200"], log)
    run_step(["stages.prepare", "--data", "builtin:test", "--split", "test", "--out", str(test),
              "--tokenizer", tokenizer], log)
    return data, test


def default_teacher_layers(student: str, teacher: str) -> list[int]:
    """The teacher layers the default layer map of this student and teacher reads."""
    from pipeline.models import layer_map, mapped_teacher_layers, model_shape

    return mapped_teacher_layers(layer_map(model_shape(student, "student")[1], model_shape(teacher, "teacher")[1]))


def cache_for(data: Path, teacher_dir: Path, layers: list[int], out: Path, log: Path) -> dict[str, Path]:
    """The teacher's features once, for every student: the given layers and the teacher logits KD reads (the
    final state for exact KD, or top-k log-probabilities for a large vocabulary: `default_kd_source`), for the
    train and valid splits. Exact fp32 stores (`--quant none`): the built-in experiments are tiny, and their
    reference tables should not carry the default int8 store's 0.5% of target noise."""
    from pipeline.io import read_json
    from pipeline.train.objective import DEFAULT_TOPK, default_kd_source

    source, reason = default_kd_source(int(read_json(Path(teacher_dir) / "config.json")["vocab_size"]))
    print(f"teacher logits for KD: {reason}", flush=True)
    logits = ["--final"] if source == "final" else ["--topk_logits", str(DEFAULT_TOPK)]
    features = {}
    for split in ("train", "valid"):
        features[split] = out / split
        run_step(["stages.cache", "--data", str(data), "--split", split, "--teacher", str(teacher_dir),
                  "--out", str(features[split]), "--layers", *map(str, layers), *logits, "--dtype", "fp32",
                  "--quant", "none"], log)
    return features


def method_args(name: str, features: dict[str, Path], overrides: dict[str, str] | None = None) -> list[str]:
    """The train options of a method (the stored features for every distillation method)."""
    alpha, loss = method_settings(name)
    if name == "sft":
        return ["--mode", "sft"]
    settings = {"alpha": str(alpha), "loss": loss, "beta": "1.0", **(overrides or {})}
    args = ["--mode", "distill", "--features", str(features["train"]), "--valid_features", str(features["valid"])]
    for key, value in settings.items():
        args += [f"--{key}", *value.split()]
    return args


def validation_geometry(run_dir: Path) -> dict[str, Any]:
    """The last validation record of a training run (loss and D_P / D_FG / D_CKA when features were given)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    valid = [r for r in rows if r.get("split") == "valid"]
    if not valid:
        return {}
    last = valid[-1]
    summary = {"ce": last.get("ce")}
    for name in ("D_P", "D_FG", "D_CKA"):  # logged per layer pair as D_P/s1_t2 ...: average the pairs
        per_pair = [v for k, v in last.items() if k.startswith(name + "/") and v is not None]
        summary[name] = sum(per_pair) / len(per_pair) if per_pair else None
    return summary


def per_prompt_scores(eval_out: Path, name: str, bench: str, seeds: Sequence[int]) -> list[float]:
    """A model's ROUGE-L per prompt, averaged over the sampling seeds (eval's generation files)."""
    per_seed = []
    for seed in seeds:
        rows = [json.loads(line) for line in open(eval_out / "generations" / name / bench / f"seed{seed}.jsonl")]
        per_seed.append([r["score"] for r in sorted(rows, key=lambda r: r["index"])])
    return [sum(col) / len(col) for col in zip(*per_seed)]
