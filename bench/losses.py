"""Forward+backward time of each feature loss at n tokens, beside Procrustes through plain svdvals and the
fp32-product versions that geometry.py used before its float64 math.

    .venv/bin/python bench/losses.py [--n 4096] [--shapes 768x2048 2048x5120] [--reps 3] [--device cpu|cuda]

Prints a markdown table (median ms over reps after a warm-up, and each time over FG's) for BENCHMARKS.md.
All losses of one shape are timed in the same run, so the ratios hold even on a noisy machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.geometry import (  # noqa: E402
    ProjectionMSE,
    cka_distance,
    feature_gram_distance,
    normalize_features,
    nuclear_norm,
    procrustes_distance,
)


def procrustes_svdvals(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The slow reference: autograd straight through torch.linalg.svdvals."""
    rs, rt = normalize_features(student), normalize_features(teacher.detach())
    return 2.0 - 2.0 * torch.linalg.svdvals(rs.T @ rt).sum()


def _normalize_fp32(x: torch.Tensor) -> torch.Tensor:
    r = x.float() - x.float().mean(0, keepdim=True)
    return r / torch.linalg.matrix_norm(r)


def fg_fp32(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FG with fp32 products, as geometry.py computed it before its float64 math (inexact at this n): the cost
    that float64 adds."""
    rs, rt = _normalize_fp32(student), _normalize_fp32(teacher.detach())
    return (rt.T @ rt).square().sum() + (rs.T @ rs).square().sum() - 2 * (rs.T @ rt).square().sum()


def procrustes_fp32_products(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Procrustes with fp32 normalization and R_s^T R_t (the nuclear norm still float64 eigh), as before."""
    rs, rt = _normalize_fp32(student), _normalize_fp32(teacher.detach())
    return 2.0 - 2.0 * nuclear_norm(rs.T @ rt, "eigh")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, student: torch.Tensor, teacher: torch.Tensor, reps: int) -> float:
    device = student.device
    times = []
    for i in range(reps + 1):
        x = student.detach().clone().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        fn(x, teacher).backward()
        sync(device)
        if i > 0:  # the first call warms up kernels and allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--shapes", nargs="+", default=["768x2048", "2048x5120"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device} ({machine}), torch {torch.__version__}, n={args.n}, median of {args.reps}\n")
    print("| d_s x d_t | loss | fwd+bwd ms | x FG |")
    print("|---|---|---|---|")
    for shape in args.shapes:
        ds, dt = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device="cpu").manual_seed(0)
        student = torch.randn(args.n, ds, generator=gen).to(device)
        teacher = torch.randn(args.n, dt, generator=gen).to(device)
        proj = ProjectionMSE(ds, dt).to(device)
        losses = {
            "FG": feature_gram_distance,
            "FG (fp32 products, previous)": fg_fp32,
            "CKA": cka_distance,
            "projection MSE": proj,
            "Procrustes (eigh, fp64)": lambda s, t: procrustes_distance(s, t, method="eigh"),
            "Procrustes (eigh, fp32 products, previous)": procrustes_fp32_products,
            "Procrustes (Newton-Schulz to convergence)": lambda s, t: procrustes_distance(s, t, method="newton_schulz"),
            "Procrustes (svdvals)": procrustes_svdvals,
        }
        results = {name: time_fwd_bwd(fn, student, teacher, args.reps) for name, fn in losses.items()}
        for name, ms in results.items():
            print(f"| {ds}x{dt} | {name} | {ms:.1f} | {ms / results['FG']:.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
