"""Judge quantized stores by the students they train (BENCHMARKS.md, "A quantized feature store").

    python bench/quant_students.py DIR [--steps 100] [--lr 3e-4] [--seeds 0 1 2 3] [--lanes 2] [--stores ...]

DIR holds `dolly/` (prepared), `student_init/` (a layer cut of the teacher), `bf16_valid/` (the exact features of
the valid split) and one train store per name (`bf16/`, `int8/`, ...: `./run.sh cache` with and without --quant).
Each store trains the same KD+Procrustes students (same seeds, data order and steps: only the stored targets
differ); every student is validated against the exact bf16 features. Prints per store the mean and 95% CI of the
final validation CE and D_P, and the per-seed paired differences against bf16 of CE, D_P, D_FG and CKA distance
(each averaged over the two mapped layer pairs). Runs `lanes` training processes
at once, one thread each; finished runs are kept, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.experiments.stats import mean_ci, paired_t  # noqa: E402
from pipeline.experiments.steps import validation_geometry  # noqa: E402


def train(d: Path, store: str, seed: int, steps: int, lr: float) -> tuple[str, int, float]:
    out = d / "students" / f"{store}_s{seed}"
    if (out / "model" / "config.json").is_file():
        return store, seed, 0.0
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "stages.train", "--data", str(d / "dolly"), "--student", str(d / "student_init"),
            "--mode", "distill", "--features", str(d / store), "--valid_features", str(d / "bf16_valid"),
            "--loss", "procrustes", "--layer_map", "2:10", "3:20", "--alpha", "0.5", "--beta", "1.0",
            "--max_steps", str(steps), "--micro_batch_size", "8", "--lr", str(lr), "--seed", str(seed),
            "--eval_samples", "100", "--eval_every", str(steps), "--num_workers", "0", "--progress", "false",
            "--checkpoint_every", "0", "--out", str(out)]
    log = d / "students" / f"{store}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return store, seed, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--stores", nargs="+", default=["bf16", "int8", "int8rot", "int4rot"])
    a = p.parse_args()
    jobs = [(s, k) for k in a.seeds for s in a.stores]
    with ThreadPoolExecutor(a.lanes) as pool:
        for store, seed, wall in pool.map(lambda j: train(a.dir, j[0], j[1], a.steps, a.lr), jobs):
            print(f"[quant_students] {store} seed {seed}: {wall:.0f} s", flush=True)
    res = {s: [validation_geometry(a.dir / "students" / f"{s}_s{k}") for k in a.seeds] for s in a.stores}
    summary = {}
    keys = ("ce", "D_P", "D_FG", "D_CKA")
    print("| store | bytes/token (features) | valid CE | D_P vs exact features | " +
          " | ".join(f"{k} - bf16 (paired)" for k in keys) + " |\n|" + " --- |" * (4 + len(keys)))
    for s in a.stores:
        m = json.loads((a.dir / s / "manifest.json").read_text())
        b = sum(v for k, v in m["stats"]["bytes_per_token"].items() if k.startswith(("feat.", "scale.")))
        row: dict = {"bytes_per_token": b}
        cells = []
        for key in keys:
            vals = [r[key] for r in res[s]]
            diffs = [x - r[key] for x, r in zip(vals, res["bf16"])]
            est = mean_ci(diffs)
            row[key] = {**mean_ci(vals).dict(), "seeds": vals}
            row[f"{key}_vs_bf16"] = {**est.dict(), "t_p": paired_t(diffs) if s != "bf16" else None}
            cells.append("-" if s == "bf16" else f"{est.mean:+.5f} [{est.low:+.5f}, {est.high:+.5f}], "
                                                  f"p={paired_t(diffs):.2f}")
        summary[s] = row
        c, d = mean_ci([r["ce"] for r in res[s]]), mean_ci([r["D_P"] for r in res[s]])
        print(f"| {s} | {b:.0f} | {c.mean:.4f} [{c.low:.4f}, {c.high:.4f}] | {d.mean:.4f} [{d.low:.4f}, "
              f"{d.high:.4f}] | " + " | ".join(cells) + " |")
    (a.dir / "students.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
