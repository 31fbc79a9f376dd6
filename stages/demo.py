"""`./run.sh demo`: the whole pipeline on the built-in data, on this machine, compared across methods.

    ./run.sh demo [--out runs/demo] [--teacher_steps 300] [--student_steps 300] [--seeds 10 20 30 40 50] ...

1. prepare the built-in instruction data (train + validation) and its test set, with the built-in tokenizer;
2. train a small teacher with SFT (no pretrained teacher can be downloaded here);
3. cache the teacher's features once: the mapped layers and its final hidden state (exact logits for KD);
4. distil a student with each method from that one cache: SFT, KD, KD+CKA, KD+projection MSE,
   KD+Procrustes, KD+FG (same seed, data order, steps and schedule for all);
5. evaluate the teacher, the untrained student and every student with ROUGE-L (sampling, one pass per seed);
6. print the comparison and write OUT/report.md.

Every step skips work already done in OUT, so a killed demo picks up where it stopped. Each stage runs as
its own process, exactly as `./run.sh <stage>` would run it; the commands are printed.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import save_config, stage_main
from pipeline.errors import ConfigError, GeokdError
from pipeline.geometry import FEATURE_LOSSES

# A method is `sft`, `kd`, or `kd_<feature loss>` (KD plus a loss of pipeline.geometry's registry); all students
# share every other setting.
METHODS = ["sft", "kd", "kd_cka", "kd_proj_mse", "kd_procrustes", "kd_fg"]
KD_ALPHA = 0.5


def method_settings(name: str) -> tuple[float, str]:
    """(alpha, feature loss) of a method name."""
    if name == "sft":
        return 0.0, "none"
    if name == "kd":
        return KD_ALPHA, "none"
    loss = name.removeprefix("kd_")
    if not name.startswith("kd_") or loss not in FEATURE_LOSSES:
        raise ConfigError(f"--methods {name!r}: choose sft, kd or kd_<loss> with <loss> one of "
                          f"{', '.join(FEATURE_LOSSES)}")
    return KD_ALPHA, loss


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "everything the demo writes goes here"})
    teacher: str = field(default="preset:tiny-teacher", metadata={"help": "teacher architecture to train by SFT"})
    student: str = field(default="preset:tiny-student", metadata={"help": "student architecture"})
    tokenizer: str = field(default="builtin-tiny")
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    teacher_steps: int = 300
    student_steps: int = 300
    micro_batch_size: int = 16
    teacher_lr: float = 1e-3
    student_lr: float = 1e-3
    beta: float = field(default=1.0, metadata={"help": "feature-loss weight b"})
    ds_config: str = "ds_configs/auto.json"
    nproc: int = field(default=1, metadata={"help": "ranks per training run (torchrun on this machine)"})
    eval_samples: int = field(default=100, metadata={"help": "test prompts scored (0: all 300)"})
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    max_new_tokens: int = field(default=64, metadata={
        "help": "generation budget: built-in answers are <= 23 tokens, so MiniLLM's 256 only lets a poor model "
                "ramble longer"})
    seed: int = 0


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


def train_args(cfg: DemoConfig, out: Path, data: Path, model: str, steps: int, lr: float) -> list[str]:
    return ["stages.train", "--data", str(data), "--student", model, "--out", str(out),
            "--ds_config", cfg.ds_config, "--max_steps", str(steps), "--micro_batch_size", str(cfg.micro_batch_size),
            "--lr", str(lr), "--seed", str(cfg.seed), "--nproc", str(cfg.nproc), "--checkpoint_every", "100",
            "--eval_samples", "200"]


def save_untrained_student(cfg: DemoConfig, data: Path, out: Path) -> None:
    """The student at initialisation, saved as a model dir so it is scored like every other model."""
    if (out / "config.json").exists():
        return
    from pipeline.data.prepared import PreparedData
    from pipeline.models import load_model

    tok = PreparedData(data).tokenizer()
    load_model(cfg.student, tokenizer=tok, seed=cfg.seed).save_pretrained(out)
    tok.save_pretrained(out)


def validation_geometry(run_dir: Path) -> dict:
    """The last validation record of a training run (loss and D_P / D_FG / D_CKA when features were given)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    valid = [r for r in rows if r.get("split") == "valid"]
    if not valid:
        return {}
    last = valid[-1]
    summary = {"ce": last.get("ce")}
    for name in ("D_P", "D_FG", "D_CKA"):  # logged per layer pair as D_P/s1_t2 ...: average the pairs
        per_pair = [v for k, v in last.items() if k.startswith(name + "/")]
        summary[name] = sum(per_pair) / len(per_pair) if per_pair else None
    return summary


def write_report(cfg: DemoConfig, out: Path, layers: list[int], wall: float) -> str:
    scores_md = (out / "eval" / "scores.md").read_text().strip()
    lines = [
        "# geokd demo: distillation methods compared on the built-in data", "",
        f"Teacher `{cfg.teacher}` trained by SFT for {cfg.teacher_steps} steps; students `{cfg.student}` trained "
        f"{cfg.student_steps} steps each from one feature cache (teacher hidden states {layers} + final). "
        f"ROUGE-L F x100 on {cfg.eval_samples or 300} held-out built-in prompts (column `records`), sampling (top_k=0, top_p=1, T=1, "
        f"no_repeat_ngram_size=6), mean ± std over seeds {cfg.seeds}.", "",
        scores_md, "",
        "## Validation (end of training)", "",
        "| student | valid CE | D_P | D_FG | D_CKA |", "|---|---|---|---|---|",
    ]
    for name in cfg.methods:
        v = validation_geometry(out / "students" / name)
        cells = [v.get(k) for k in ("ce", "D_P", "D_FG", "D_CKA")]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
    lines += [
        "", "D_* are averaged over the mapped layer pairs, between the student's and the teacher's features on the "
        "validation split (lower is closer geometry).", "",
        "![ROUGE-L by model](eval/scores.png)", "",
        f"TensorBoard: `tensorboard --logdir {out}` (teacher/tb, students/*/tb, eval/tensorboard).",
        f"Per-sample generations: `{out}/eval/`. Whole demo: {wall / 60:.1f} min.",
    ]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report


def run(cfg: DemoConfig) -> None:
    from pipeline.models import model_shape

    # Checked before anything is written: a typo costs seconds, not a teacher's training.
    settings = {name: method_settings(name) for name in cfg.methods}
    model_shape(cfg.teacher, "teacher")
    model_shape(cfg.student, "student")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    log = out / "demo.log"
    started = time.time()
    # One compute thread per process: these models are too small to gain from a second thread, and a second
    # thread beside DataLoader workers or another rank oversubscribes the cores (measured: 54 ms/step with one
    # thread, 0.8 s/step with two on this 2-core machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print("[demo] 1/6 prepare the built-in data")
    data, test = out / "data", out / "data_test"
    run_step(["stages.prepare", "--data", "builtin", "--out", str(data), "--tokenizer", cfg.tokenizer,
               "--valid_size", "200"], log)
    run_step(["stages.prepare", "--data", "builtin:test", "--split", "test", "--out", str(test),
               "--tokenizer", cfg.tokenizer], log)

    print("[demo] 2/6 train the teacher (SFT)")
    teacher = out / "teacher"
    if not (teacher / "model" / "config.json").exists():
        resume = ["--resume"] if (teacher / "checkpoints").exists() else []
        run_step(train_args(cfg, teacher, data, cfg.teacher, cfg.teacher_steps, cfg.teacher_lr)
                  + ["--mode", "sft"] + resume, log)

    print("[demo] 3/6 cache the teacher's features once")
    from pipeline.models import layer_map
    from pipeline.train.objective import mapped_teacher_layers

    # The layers of the students' default layer map: what every distillation run will read.
    layers = mapped_teacher_layers(layer_map(model_shape(cfg.student, "student")[1],
                                             model_shape(str(teacher / "model"), "teacher")[1]))
    features = {}
    for split in ("train", "valid"):
        features[split] = out / "features" / split
        run_step(["stages.cache", "--data", str(data), "--split", split, "--teacher", str(teacher / "model"),
                   "--out", str(features[split]), "--layers", *map(str, layers), "--final", "--dtype", "fp32"], log)

    print(f"[demo] 4/6 distil a student with each method: {', '.join(cfg.methods)}")
    for name in cfg.methods:
        run_dir = out / "students" / name
        if (run_dir / "model" / "config.json").exists():
            print(f"[demo] {name}: done already")
            continue
        alpha, loss = settings[name]
        args = train_args(cfg, run_dir, data, cfg.student, cfg.student_steps, cfg.student_lr)
        args += ["--mode", "sft"] if name == "sft" else [
            "--mode", "distill", "--features", str(features["train"]), "--valid_features", str(features["valid"]),
            "--alpha", str(alpha), "--loss", loss, "--beta", str(cfg.beta)]
        if (run_dir / "checkpoints").exists():
            args.append("--resume")
        run_step(args, log)

    print("[demo] 5/6 evaluate with ROUGE-L")
    init = out / "student_init"
    save_untrained_student(cfg, data, init)
    models = [str(teacher / "model"), str(init)] + [str(out / "students" / n / "model") for n in cfg.methods]
    run_step(["stages.eval", "--models", *models, "--names", "teacher", "student_init", *cfg.methods, "--benchmarks", str(test / "test" / "records.jsonl"), "--field_map", "output=references",
               "--max_samples", str(cfg.eval_samples), "--max_new_tokens", str(cfg.max_new_tokens), "--seeds", *map(str, cfg.seeds), "--out", str(out / "eval")],
              log)

    print("[demo] 6/6 report")
    report = write_report(cfg, out, layers, time.time() - started)
    print("\n" + report)
    print(f"[demo] wrote {out / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("demo", DemoConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
