"""What exact logit KD costs against top-k KD, by vocabulary size (BENCHMARKS.md: "Exact or top-k KD").

    python bench/kd_vocab.py [--tokens 512] [--repeats 5] [--k 64]

For each (vocabulary, width) -- OPT/GPT-2 50,272 x 768, SmolLM2 49,152 x 576, Llama 3 128,256 x 2048 scaled to
width 640, Gemma 3 262,144 x 640 -- and N response tokens, one process, one thread, the modes interleaved and
each keeping its best of --repeats: forward + backward of what every run pays at those tokens (the student's LM
head and cross-entropy), then of the same plus exact KD (teacher logits = stored final state @ the teacher's head,
KL over the whole vocabulary, as pipeline/train/objective.py computes it) or plus top-k KD (k stored
log-probabilities). Also the bytes exact KD holds beyond top-k: the teacher's head (float32) and its [N, V]
float32 logits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.models.teacher import LMHead  # noqa: E402
from pipeline.train.objective import kd_loss  # noqa: E402
from pipeline.train.targets import TeacherTargets  # noqa: E402

SHAPES = {"OPT / GPT-2": (50_272, 768), "SmolLM2": (49_152, 576), "Llama 3 vocabulary": (128_256, 640),
          "Gemma 3": (262_144, 640)}


def step(mode: str, hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets,
         predict: torch.Tensor) -> float:
    t0 = time.perf_counter()
    h = hidden.detach().requires_grad_(True)
    logits = h @ head.T
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss = F.nll_loss(log_probs, labels)
    if mode != "ce":
        loss = 0.5 * loss + 0.5 * kd_loss(logits, predict, teacher, "final" if mode == "exact" else "topk", 1.0,
                                          log_probs)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, report = args.tokens, {}
    for name, (v, d) in SHAPES.items():
        head = torch.randn(v, d, generator=g) * d**-0.5
        hidden = torch.randn(n, d, generator=g)
        final = torch.randn(1, n + 1, d, generator=g)
        t_logp = torch.log_softmax(final[0, :-1] @ head.T, dim=-1)
        values, ids = t_logp.topk(args.k, dim=-1)
        teacher = TeacherTargets(final=final, head=LMHead(head), topk_values=torch.cat([values, values[:1]])[None],
                                 topk_indices=torch.cat([ids, ids[:1]])[None].int())
        predict = torch.ones(1, n, dtype=torch.bool)
        labels = torch.randint(0, v, (n,), generator=g)
        best = {m: float("inf") for m in ("ce", "exact", "topk")}
        for _ in range(args.repeats):
            for m in best:
                best[m] = min(best[m], step(m, hidden, head, labels, teacher, predict))
        report[name] = {"vocab": v, "width": d, "tokens": n, "seconds": best,
                        "head_bytes_fp32": v * d * 4, "teacher_logits_bytes": n * v * 4}
        print(f"{name:20s} V {v:7,} d {d}: head + CE {best['ce']:.3f} s; + exact KD {best['exact'] / best['ce']:.2f}x"
              f", + top-{args.k} KD {best['topk'] / best['ce']:.2f}x; exact KD holds a {v * d * 4 / 2**20:,.0f} MiB "
              f"head and {n * v * 4 / 2**20:,.0f} MiB of teacher logits", flush=True)
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs/kd_vocab.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
