"""The one benchmark to run first whenever a GPU is at hand; `--smoke` runs the same code on tiny shapes (CI).

    bash bench/gpu_suite.sh OUT_DIR            on a GPU machine (installs .whl/ if present, then this)
    python bench/gpu_suite.py --out DIR [--smoke] [--sections losses train cache eval]

Writes DIR/gpu_suite.json (every number) and DIR/gpu_suite.md (the tables for BENCHMARKS.md), after each section,
so a run cut short keeps what it finished. Sections (each its own budget; a failing section is recorded, not
fatal):
  losses  fwd+bwd time of every feature loss and nuclear-norm method at (d_s, d_t) = (768, 2048) and
          (2048, 5120), n = 4096, on fp32, TF32 and bf16 inputs, and each one's value and gradient error against
          a float64 SVD reference;
  train   bench/train_step.py at OPT-1.3B -> OPT-125M shapes, bf16, micro-batch 8 x 512 (synthetic records of that
          length): SFT, stored features with exact and top-k KD, online teacher, the plain-PyTorch references,
          and SFT under ZeRO-2; peak memory per mode;
  cache   bench/cache.py with an OPT-1.3B-shaped teacher: cache stage throughput against forward-only;
  eval    generation tokens/s at batch 1 and 16 (bench/eval_speed.py).
DESIGN.md section 4 holds the H100 anchors to compare with.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.geometry import (  # noqa: E402
    ProjectionMSE, cka_distance, feature_gram_distance, procrustes_distance,
)

FULL = {"losses": {"n": 4096, "shapes": [(768, 2048), (2048, 5120)], "reps": 5},
        "train": {"student": "768x12", "teacher": "2048x24", "layers": ["12", "24"], "student_layers": ["6", "12"],
                  "micro_batch_size": "8", "max_len": "512", "samples": "128", "steps": "8", "warmup": "3"},
        "cache": {"teacher": "preset:opt-1.3b", "layers": ["12", "24"], "max_tokens": "100000", "reps": "2"},
        "eval": {"samples": "32", "new_tokens": "64", "batch_sizes": ["1", "16"]}}
SMOKE = {"losses": {"n": 256, "shapes": [(16, 48)], "reps": 1},
         "train": {"student": "64x2", "teacher": "128x4", "layers": ["2", "4"], "student_layers": ["1", "2"],
                   "micro_batch_size": "2", "max_len": "32", "samples": "8", "steps": "1", "warmup": "1",
                   # one mode of each kind: stored features, online teacher, and the plain-PyTorch reference
                   "modes": ["sft", "plain_sft", "procrustes", "online"]},
         "cache": {"teacher": "preset:tiny-teacher", "layers": ["2", "4"], "max_tokens": "2000", "reps": "1"},
         "eval": {"samples": "2", "new_tokens": "4", "batch_sizes": ["1", "2"]}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reference(name: str, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None
              ) -> tuple[float, torch.Tensor]:
    """(value, gradient) from the definitions in float64, sharing no code with pipeline/geometry/__init__.py."""
    s = student.detach().double().requires_grad_(True)

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0, keepdim=True)
        return x / x.norm()

    rs, rt = norm(s), norm(teacher.detach().double())
    if name.startswith("procrustes"):
        value = 2 - 2 * torch.linalg.svdvals(rs.T @ rt).sum()
    elif name == "fg":
        value = (rt.T @ rt).square().sum() + (rs.T @ rs).square().sum() - 2 * (rs.T @ rt).square().sum()
    elif name == "cka":
        value = 1 - (rs.T @ rt).square().sum() / ((rs.T @ rs).norm() * (rt.T @ rt).norm())
    else:
        value = (rs @ weight.double().T - rt).square().sum()
    value.backward()
    return float(value.detach()), s.grad


def time_loss(fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor, reps: int
              ) -> tuple[float, float, torch.Tensor]:
    """(median fwd+bwd ms, value, gradient) after one warm-up call."""
    times, value, grad = [], 0.0, None
    for i in range(reps + 1):
        x = student.detach().clone().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        out = fn(x)
        out.backward()
        sync()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
        value, grad = float(out.detach()), x.grad
    return statistics.median(times), value, grad


def losses_section(cfg: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for ds, dt in cfg["shapes"]:
        # LM-like: a power-law teacher spectrum and a student that partly follows it.
        energy = torch.arange(1, dt + 1, dtype=torch.float64) ** -1.0
        q, _ = torch.linalg.qr(torch.randn(dt, dt, generator=g, dtype=torch.float64))
        teacher64 = (torch.randn(cfg["n"], dt, generator=g, dtype=torch.float64) * energy.sqrt()) @ q.T
        mix = torch.randn(dt, ds, generator=g, dtype=torch.float64) / dt**0.5
        student64 = teacher64 @ mix + 0.1 * torch.randn(cfg["n"], ds, generator=g, dtype=torch.float64)
        proj = ProjectionMSE(ds, dt).to(device)
        losses = {
            "procrustes (auto)": lambda x, t: procrustes_distance(x, t),
            "procrustes (eigh)": lambda x, t: procrustes_distance(x, t, method="eigh"),
            "procrustes (newton_schulz)": lambda x, t: procrustes_distance(x, t, method="newton_schulz"),
            "procrustes (svd)": lambda x, t: procrustes_distance(x, t, method="svd"),
            "fg": feature_gram_distance, "cka": cka_distance, "proj_mse": lambda x, t: proj(x, t),
        }
        refs: dict[tuple[torch.dtype, str], tuple[float, torch.Tensor]] = {}
        for input_dtype in ("fp32", "tf32", "bf16"):
            dtype = torch.bfloat16 if input_dtype == "bf16" else torch.float32
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = input_dtype == "tf32"
            student, teacher = student64.to(device, dtype), teacher64.to(device, dtype)
            for name, fn in losses.items():
                key = name.split(" ")[0]
                if (dtype, key) not in refs:  # fp32 and TF32 runs get the same inputs, hence the same reference
                    refs[dtype, key] = reference(key, student, teacher,
                                                 proj.proj.weight.detach() if key == "proj_mse" else None)
                ref_value, ref_grad = refs[dtype, key]
                ms, value, grad = time_loss(lambda x, fn=fn: fn(x, teacher), student, cfg["reps"])
                grad_err = float((grad.double() - ref_grad).norm() / ref_grad.norm())
                rows.append({"d_s": ds, "d_t": dt, "n": cfg["n"], "inputs": input_dtype, "loss": name, "ms": ms,
                             "value": value, "value_rel_err": abs(value - ref_value) / abs(ref_value),
                             "grad_rel_err": grad_err})
                print(f"[losses] {ds}x{dt} {input_dtype} {name}: {ms:.2f} ms, value err {rows[-1]['value_rel_err']:.1e}"
                      f", grad err {grad_err:.1e}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def run_script(args: list[str], timeout: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def train_section(cfg: dict[str, Any], work: Path, timeout: int) -> dict[str, Any]:
    common = ["--student", cfg["student"], "--teacher", cfg["teacher"], "--layers", *cfg["layers"],
              "--student_layers", *cfg["student_layers"], "--micro_batch_size", cfg["micro_batch_size"],
              "--max_len", cfg["max_len"], "--samples", cfg["samples"], "--steps", cfg["steps"], "--warmup",
              cfg["warmup"], "--repeats", "1", "--source", "synthetic", "--work", str(work / "train")]
    out = {}
    runs = [("auto", "ds_configs/auto.json", cfg.get("modes", ["sft", "plain_sft", "procrustes", "procrustes_topk",
                                                                "online", "plain_online"])),
            ("zero2", "ds_configs/zero2.json", ["sft"])]
    for label, ds_config, modes in runs:
        path = work / f"train_{label}.json"
        text = run_script(["bench/train_step.py", *common, "--ds_config", ds_config, "--modes", *modes,
                           "--json", str(path)], timeout)
        out[label] = {"table": text, **json.loads(path.read_text())}
        print(text, flush=True)
    return out


def cache_section(cfg: dict[str, Any], work: Path, timeout: int) -> dict[str, Any]:
    prep = work / "cache_prep"
    if not (prep / "manifest.json").is_file():
        run_script(["-m", "stages.prepare", "--data", "builtin", "--out", str(prep), "--tokenizer", "builtin-gpt2"],
                   timeout)
    text = run_script(["bench/cache.py", "--data", str(prep), "--teacher", cfg["teacher"], "--layers", *cfg["layers"],
                       "--max_tokens", cfg["max_tokens"], "--reps", cfg["reps"], "--lowrank_k",
                       "--work", str(work / "cache")], timeout)
    print(text, flush=True)
    return {"table": text}


def eval_section(cfg: dict[str, Any], student: Path, timeout: int) -> dict[str, Any]:
    """Generation speed of the train section's student (OPT-125M's shape) when it was built, else a small OPT."""
    model = ["--model", str(student)] if (student / "config.json").is_file() else []
    text = run_script(["bench/eval_speed.py", "--samples", cfg["samples"], "--new-tokens", cfg["new_tokens"],
                       "--batch-sizes", *cfg["batch_sizes"], "--builtin", *model], timeout)
    print(text, flush=True)
    return {"table": text}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU suite: {results['machine']}", "", f"{results['started']}; {results['torch']}", ""]
    if "losses" in results["sections"]:
        lines += ["## Feature losses (fwd+bwd ms; relative error of value and gradient vs float64 SVD)", "",
                  "| d_s x d_t | inputs | loss | ms | value err | grad err |", "|---|---|---|---|---|---|"]
        for r in results["sections"]["losses"]:
            lines.append(f"| {r['d_s']}x{r['d_t']} | {r['inputs']} | {r['loss']} | {r['ms']:.2f} | "
                         f"{r['value_rel_err']:.1e} | {r['grad_rel_err']:.1e} |")
        lines.append("")
    for name in ("train", "cache", "eval"):
        section = results["sections"].get(name)
        if section:
            lines += [f"## {name}", ""]
            tables = [section["table"]] if "table" in section else [f"### {k}\n\n{v['table']}" for k, v in
                                                                     section.items()]
            lines += tables + [""]
    for name, err in results["errors"].items():
        lines += [f"## {name}: failed", "", "```", err[-1500:], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: the suite's code path in seconds, on a CPU")
    ap.add_argument("--sections", nargs="+", default=["losses", "train", "cache", "eval"])
    ap.add_argument("--timeout", type=int, default=480, help="seconds per benchmark script")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU"
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "smoke": args.smoke,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}, "errors": {},
                               "seconds": {}}
    runners = {"losses": lambda: losses_section(cfg["losses"], device),
               "train": lambda: train_section(cfg["train"], work, args.timeout),
               "cache": lambda: cache_section(cfg["cache"], work, args.timeout),
               "eval": lambda: eval_section(cfg["eval"], work / "train" / f"opt-{cfg['train']['student']}",
                                            args.timeout)}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            results["sections"][name] = runners[name]()
        except Exception as e:  # one section's failure must not cost the others' numbers
            results["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[gpu_suite] {name} failed: {e}", file=sys.stderr, flush=True)
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        (out / "gpu_suite.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_suite.md").write_text(markdown(results))
    print(f"[gpu_suite] wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}: "
          + ", ".join(f"{k} {v} s" for k, v in results["seconds"].items()))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
