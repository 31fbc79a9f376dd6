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

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import save_config, stage_main
from pipeline.errors import ConfigError
from pipeline.experiments.steps import (
    DEFAULT_METHODS, cache_for, default_teacher_layers, method_args, method_settings,
    prepare_builtin, run_step, train_step, validation_geometry,
)
from pipeline.train.config import check_train_steps

# All students share every setting but their method (pipeline/experiments/steps.py: sft, kd, kd_<feature loss>).
METHODS = DEFAULT_METHODS
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

    def check(self) -> None:
        """Before anything is written: a typo costs seconds, not a teacher's training."""
        from pipeline.models import model_shape

        for name in self.methods:
            method_settings(name)
        model_shape(self.teacher, "teacher")
        model_shape(self.student, "student")
        if self.teacher_steps < 1 or self.student_steps < 1:  # train would read 0 as "one epoch"
            raise ConfigError("--teacher_steps and --student_steps must be >= 1")
        if not self.seeds or self.eval_samples < 0 or self.max_new_tokens < 1:
            raise ConfigError("--seeds needs at least one sampling seed, --eval_samples >= 0 and --max_new_tokens >= 1")
        stores = {"train": Path("-"), "valid": Path("-")}
        check_train_steps([train_args(self, Path("-"), Path("-"), self.teacher, self.teacher_steps, self.teacher_lr)]
                          + [train_args(self, Path("-"), Path("-"), self.student, self.student_steps, self.student_lr)
                             + method_args(name, stores, {"beta": str(self.beta)}) for name in self.methods])


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


def write_report(cfg: DemoConfig, out: Path, layers: list[int], wall: float) -> str:
    scores_md = (out / "eval" / "scores.md").read_text().strip()
    lines = [
        "# geokd demo: distillation methods compared on the built-in data", "",
        f"Teacher `{cfg.teacher}` trained by SFT for {cfg.teacher_steps} steps; students `{cfg.student}` trained "
        f"{cfg.student_steps} steps each from one feature cache (teacher hidden states {layers} + final). "
        f"ROUGE-L F x100 on {cfg.eval_samples or 300} held-out built-in prompts (column `records`), sampling "
        f"(top_k=0, top_p=1, T=1, no_repeat_ngram_size=6), mean ± std over seeds {cfg.seeds}.", "",
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
    data, test = prepare_builtin(out, cfg.tokenizer, log)

    print("[demo] 2/6 train the teacher (SFT)")
    teacher = out / "teacher"
    train_step(train_args(cfg, teacher, data, cfg.teacher, cfg.teacher_steps, cfg.teacher_lr) + ["--mode", "sft"],
               teacher, log)

    print("[demo] 3/6 cache the teacher's features once")
    layers = default_teacher_layers(cfg.student, str(teacher / "model"))
    features = cache_for(data, teacher / "model", layers, out / "features", log)

    print(f"[demo] 4/6 distil a student with each method: {', '.join(cfg.methods)}")
    for name in cfg.methods:
        run_dir = out / "students" / name
        args = train_args(cfg, run_dir, data, cfg.student, cfg.student_steps, cfg.student_lr)
        train_step(args + method_args(name, features, {"beta": str(cfg.beta)}), run_dir, log)

    print("[demo] 5/6 evaluate with ROUGE-L")
    init = out / "student_init"
    save_untrained_student(cfg, data, init)
    models = [str(teacher / "model"), str(init)] + [str(out / "students" / n / "model") for n in cfg.methods]
    run_step(["stages.eval", "--models", *models, "--names", "teacher", "student_init", *cfg.methods,
              "--benchmarks", str(test / "test" / "records.jsonl"), "--field_map", "output=references",
              "--max_samples", str(cfg.eval_samples), "--max_new_tokens", str(cfg.max_new_tokens),
              "--seeds", *map(str, cfg.seeds), "--out", str(out / "eval")], log)

    print("[demo] 6/6 report")
    report = write_report(cfg, out, layers, time.time() - started)
    print("\n" + report)
    print(f"[demo] wrote {out / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("demo", DemoConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
