"""The paper's synthetic geometry experiment: which feature loss makes a narrow student recover the teacher's
geometry?

Teacher: n vectors in d_t dimensions, each along one of k mutually orthogonal directions (random sign, jittered
length, a little isotropic noise), so vectors on different directions are (near-)orthogonal. Student: the same
n vectors in d_s < d_t dimensions, started from a random projection of the teacher (which blurs the angles), then
optimised directly (the student vectors are the parameters) under each loss: Procrustes, feature Gram (FG),
CKA, and MSE through a learned projection. Along the way every distance is tracked, with the number of the
teacher's epsilon-orthogonal pairs the student keeps.

    ./run.sh synthetic [--steps 400] [--out runs/synthetic] [--config file.yaml]

Writes curves.png (a panel per metric, a curve per loss), trajectory.csv and results.md into --out, and prints
the final table.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import save_config, stage_main
from pipeline.errors import ConfigError
from pipeline.geometry import (
    FEATURE_LOSSES,
    TokenRule,
    cka_distance,
    feature_gram_distance,
    feature_loss,
    normalize_features,
    procrustes_distance,
    procrustes_floor,
)
from pipeline.runtime import seed_everything

LOSSES = tuple(FEATURE_LOSSES)
METRICS = ("D_P", "D_FG", "D_CKA", "proj_MSE*", "orth_pairs_kept")


@dataclass
class SyntheticConfig:
    n: int = field(default=256, metadata={"help": "number of vectors (tokens)"})
    d_teacher: int = field(default=128, metadata={"help": "teacher width"})
    d_student: int = field(default=32, metadata={"help": "student width"})
    directions: int = field(default=24, metadata={"help": "orthogonal directions in the teacher (<= d_student)"})
    noise: float = field(default=0.02, metadata={"help": "isotropic noise added to teacher vectors"})
    epsilon: float = field(default=0.1, metadata={"help": "a pair is epsilon-orthogonal when |cos| < epsilon"})
    steps: int = 400
    lr: float = 0.01
    log_every: int = 10
    losses: list[str] = field(default_factory=lambda: list(LOSSES))
    massive: float = field(default=0.0, metadata={
        "help": "scale the first vector by this factor, as a real teacher's massive first token (0 = off)"})
    token_rule: str = field(default="outliers:4", metadata={"help": "rows the trained loss compares (geometry.py)"})
    seed: int = 0
    out: str = "runs/synthetic"
    sweep_directions: list[int] = field(default_factory=list, metadata={
        "help": "sweep the teacher's orthogonal directions over these values (the paper's regime goes past "
                "d_student); writes sweep.csv, sweep.png, sweep.md"})
    sweep_widths: list[int] = field(default_factory=list, metadata={"help": "student widths of the sweep"})
    sweep_seeds: list[int] = field(default_factory=list, metadata={"help": "seeds of the sweep (default: --seed)"})

    def check(self) -> None:
        for name in ("n", "d_teacher", "d_student", "directions", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.sweep_directions + self.sweep_widths) or self.lr <= 0 or self.noise < 0 \
                or self.massive < 0:
            raise ConfigError("--sweep_directions and --sweep_widths must be >= 1, --lr > 0, --noise and --massive "
                              ">= 0")
        TokenRule.parse(self.token_rule)
        for name in self.losses:
            feature_loss(name)  # an unknown name is a ConfigError listing the choices


def make_teacher(cfg: SyntheticConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher vectors [n, d_t] and each vector's direction id [n]."""
    basis, _ = torch.linalg.qr(torch.randn(cfg.d_teacher, cfg.directions, generator=gen))
    direction = torch.arange(cfg.n) % cfg.directions
    sign = torch.randint(0, 2, (cfg.n,), generator=gen).float() * 2 - 1
    length = 1.0 + 0.3 * torch.rand(cfg.n, generator=gen)
    vectors = basis.T[direction] * (sign * length)[:, None]
    vectors = vectors + cfg.noise * torch.randn(cfg.n, cfg.d_teacher, generator=gen)
    if cfg.massive:
        vectors[0] *= cfg.massive
    return vectors, direction


def orthogonal_pairs(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Boolean [n, n] (upper triangle) of pairs whose cosine is below epsilon in magnitude."""
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    return torch.triu(cos.abs() < epsilon, diagonal=1)


def best_projection_mse(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """min_W ||R_s W - R_t||^2 on normalized features (least squares): what projection MSE converges to."""
    rs, rt = normalize_features(student).double(), normalize_features(teacher).double()
    w = torch.linalg.lstsq(rs, rt).solution
    return float(((rs @ w - rt) ** 2).sum())


def measure(student: torch.Tensor, teacher: torch.Tensor, teacher_pairs: torch.Tensor, epsilon: float) -> dict:
    with torch.no_grad():
        kept = (orthogonal_pairs(student, epsilon) & teacher_pairs).sum() / teacher_pairs.sum().clamp_min(1)
        return {
            "D_P": procrustes_distance(student, teacher, squared=False).item(),
            "D_FG": feature_gram_distance(student, teacher, squared=False).item(),
            "D_CKA": cka_distance(student, teacher).item(),
            "proj_MSE*": best_projection_mse(student, teacher),
            "orth_pairs_kept": kept.item(),
        }


def optimise(loss_name: str, student0: torch.Tensor, teacher: torch.Tensor, teacher_pairs: torch.Tensor,
             cfg: SyntheticConfig) -> list[dict]:
    student = student0.clone().requires_grad_(True)
    objective = feature_loss(loss_name)
    rule = TokenRule.parse(cfg.token_rule)
    loss_params = objective.make_params(cfg.d_student, cfg.d_teacher)  # projection MSE's W, else None
    params = [student] + (list(loss_params.parameters()) if loss_params is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rows = []
    for step in range(cfg.steps + 1):
        loss = objective(student, teacher, None, loss_params, rule=rule)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rows.append({"loss": loss_name, "step": step, "objective": loss.item(),
                         **measure(student.detach(), teacher, teacher_pairs, cfg.epsilon)})
        if step < cfg.steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return rows


def write_outputs(rows: list[dict], baseline: dict, floor: float, cfg: SyntheticConfig, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trajectory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS):
        for loss_name in cfg.losses:
            curve = [r for r in rows if r["loss"] == loss_name]
            ax.plot([r["step"] for r in curve], [r[metric] for r in curve], label=loss_name)
        ax.set_title(metric)
        ax.set_xlabel("step")
        if metric != "orth_pairs_kept":
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend()
    fig.suptitle(f"student d={cfg.d_student} vs teacher d={cfg.d_teacher}, {cfg.directions} orthogonal directions, "
                 f"n={cfg.n}")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    header = "| optimised loss | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    lines.append("| (random projection, start) | " + " | ".join(f"{baseline[m]:.4f}" for m in METRICS) + " |")
    for loss_name in cfg.losses:
        final = [r for r in rows if r["loss"] == loss_name][-1]
        lines.append(f"| {loss_name} | " + " | ".join(f"{final[m]:.4f}" for m in METRICS) + " |")
    table = "\n".join(lines)
    note = (f"D_P floor for width {cfg.d_student}: {floor:.4f}. D_* are distances (not squared); proj_MSE* is the "
            f"best linear-projection MSE (least squares); orth_pairs_kept is the fraction of the teacher's "
            f"{cfg.epsilon}-orthogonal pairs that are still {cfg.epsilon}-orthogonal in the student.")
    (out / "results.md").write_text(f"# Synthetic geometry experiment\n\n{table}\n\n{note}\n\n![curves](curves.png)\n")
    save_config(cfg, out / "config.yaml")
    return f"{table}\n\n{note}"


def experiment(cfg: SyntheticConfig, verbose: bool = True) -> tuple[list[dict], dict, float]:
    """One teacher, one random-projection start, every loss optimised from it: (trajectory rows, start, floor)."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher, _ = make_teacher(cfg, gen)
    teacher_pairs = orthogonal_pairs(teacher, cfg.epsilon)
    projection = torch.randn(cfg.d_teacher, cfg.d_student, generator=gen) / math.sqrt(cfg.d_student)
    student0 = teacher @ projection
    baseline = measure(student0, teacher, teacher_pairs, cfg.epsilon)
    floor = procrustes_floor(teacher, cfg.d_student, squared=False).item()
    say = print if verbose else (lambda *a: None)
    say(f"teacher: {cfg.n} vectors, {int(teacher_pairs.sum())} {cfg.epsilon}-orthogonal pairs; "
        f"random projection keeps {baseline['orth_pairs_kept']:.1%} of them")
    rows = []
    for loss_name in cfg.losses:
        rows += optimise(loss_name, student0, teacher, teacher_pairs, cfg)
        final = rows[-1]
        say(f"  {loss_name:>10}: objective {final['objective']:.2e}, D_P {final['D_P']:.4f}, "
            f"orthogonal pairs kept {final['orth_pairs_kept']:.1%}")
    return rows, baseline, floor


def sweep(cfg: SyntheticConfig) -> str:
    """The paper's regime: teachers with fewer, as many and more orthogonal directions than the student has
    dimensions, for each student width and seed; the final metrics of every loss, mean and std over seeds."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    finals = []
    for width in cfg.sweep_widths or [cfg.d_student]:
        for directions in cfg.sweep_directions:
            for seed in cfg.sweep_seeds or [cfg.seed]:
                one = dataclasses.replace(cfg, d_student=width, directions=directions, seed=seed)
                rows, _, floor = experiment(one, verbose=False)
                for loss_name in cfg.losses:
                    final = [r for r in rows if r["loss"] == loss_name][-1]
                    finals.append({"d_student": width, "directions": directions, "seed": seed, "D_P_floor": floor,
                                   **{k: final[k] for k in ("loss", *METRICS)}})
                print(f"[synthetic] width {width}, {directions} directions, seed {seed}: " + ", ".join(
                    f"{r['loss']} {r['orth_pairs_kept']:.0%}" for r in finals[-len(cfg.losses):]), flush=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(finals[0]))
        writer.writeheader()
        writer.writerows(finals)
    table = sweep_outputs(finals, cfg, out)
    save_config(cfg, out / "config.yaml")
    return table


def sweep_outputs(finals: list[dict], cfg: SyntheticConfig, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["d_student"] for r in finals})
    shown = ("orth_pairs_kept", "D_P", "D_FG", "D_CKA")
    stat = {}
    for r in finals:
        stat.setdefault((r["d_student"], r["directions"], r["loss"]), []).append(r)
    fig, axes = plt.subplots(len(widths), len(shown), figsize=(4 * len(shown), 3.2 * len(widths)), squeeze=False)
    lines = ["| student width | directions | loss | " + " | ".join(shown) + " |", "|" + "---|" * (3 + len(shown))]
    for row, width in enumerate(widths):
        for col, metric in enumerate(shown):
            ax = axes[row][col]
            for loss_name in cfg.losses:
                xs = sorted({d for (w, d, name) in stat if w == width and name == loss_name})
                values = [np.array([r[metric] for r in stat[width, d, loss_name]]) for d in xs]
                mean, std = np.array([v.mean() for v in values]), np.array([v.std() for v in values])
                ax.plot(xs, mean, marker="o", label=loss_name)
                ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
            ax.axvline(width, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{metric}, student width {width}")
            ax.set_xlabel("teacher's orthogonal directions")
        for (w, d, name), group in sorted(stat.items()):
            if w == width:
                lines.append(f"| {w} | {d} | {name} | " + " | ".join(
                    f"{np.mean([r[m] for r in group]):.3f} ± {np.std([r[m] for r in group]):.3f}" for m in shown)
                    + " |")
    axes[0][0].legend()
    fig.suptitle(f"n={cfg.n}, teacher width {cfg.d_teacher}, {len(cfg.sweep_seeds or [cfg.seed])} seeds "
                 f"(mean ± std); dashed: the student's width")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    table = "\n".join(lines)
    (out / "sweep.md").write_text(f"# Synthetic sweep\n\n{table}\n\n![sweep](sweep.png)\n")
    return table


def run(cfg: SyntheticConfig) -> str:
    if cfg.directions > cfg.d_student:
        print(f"note: {cfg.directions} directions exceed the student width {cfg.d_student}: full recovery is "
              "impossible, the D_P floor below says by how much")
    if cfg.sweep_directions:
        return sweep(cfg)
    started = time.time()
    rows, baseline, floor = experiment(cfg)
    out = Path(cfg.out)
    table = write_outputs(rows, baseline, floor, cfg, out)
    print(f"\n{table}\n\nwrote {out / 'curves.png'}, {out / 'trajectory.csv'}, {out / 'results.md'} "
          f"in {time.time() - started:.1f}s")
    return table


def main(argv: list[str] | None = None) -> int:
    return stage_main("synthetic", SyntheticConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
