"""Training-step cost of distillation over SFT, for the same student and DeepSpeed engine.

    .venv/bin/python bench/train_step.py [--work runs/bench_train] [--student 256x4] [--teacher 768x12]
        [--layers 6 12] [--student_layers 2 4] [--ds_config ds_configs/auto.json] [--steps 6] [--warmup 2]
        [--modes sft plain_sft sft_before procrustes procrustes_topk online plain_online ...]

--student / --teacher: a model dir, preset:NAME, or WIDTHxLAYERS (an OPT of that shape with ffn = 4 x width,
64-wide heads and random weights, saved under --work). The defaults keep a CPU run to minutes: the teacher has
OPT-125M's shape, the student about 1/8 of its parameters (the GPT-2 vocabulary's embedding included), close
to DESIGN's 1.3B -> 125M ratio.

Modes, each in a fresh process (so its peak memory is its own), all on the same batches (same seed):
  sft          cross-entropy only
  procrustes   stored teacher features: 2 Procrustes layer pairs + KD from the stored final hidden state
  fg           the same with the feature Gram distance
  procrustes_topk  the same with KD from the stored top-32 log-probabilities instead of exact logits
  kd_only / procrustes_only   the two parts of `procrustes` alone (optional, to see where the cost is)
  online       a frozen teacher forward every step (2 Procrustes pairs + KD from its logits), MiniLLM-style
  plain_sft / plain_online / plain_procrustes_topk   the same runs in bench/plain_loop.py: plain PyTorch with
               fused AdamW and no engine, the reference a hand-written loop sets
  sft_before / online_before   geokd with the engine choices it made before `auto`: ZeRO-2 on one rank,
               activation checkpointing on, single-tensor AdamW
  kd_online    online teacher, KD only (no feature loss); trl_gkd: the same through TRL's GKDTrainer (forward KL,
               no on-policy generation), where `pip install trl` was done; plain_kd_online: plain PyTorch
The step time is the training loop's own (`step_s` in metrics.jsonl: data wait, forward, backward, optimizer
step, all micro-batches), median over the steps after the warm-up; the modes run --repeats times interleaved
and the table takes each mode's best run (a shared machine only ever adds time). Peak memory: the process's max RSS on a
CPU, torch.cuda.max_memory_allocated on a GPU. Data: Dolly (../shared/data/instruct) prepared with the GPT-2
tokenizer and cut to --max_len tokens; the teacher is random-weight (its speed does not depend on its values).
Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GEOKD_SHARED_DATA") or ROOT.parent / "shared/data/instruct")
MODES = {
    "sft": ["--mode", "sft"],
    "procrustes": ["--mode", "distill", "--loss", "procrustes", "--alpha", "0.5", "--beta", "1.0"],
    "fg": ["--mode", "distill", "--loss", "fg", "--alpha", "0.5", "--beta", "1.0"],
    "procrustes_topk": ["--mode", "distill", "--loss", "procrustes", "--alpha", "0.5", "--beta", "1.0",
                        "--kd", "topk"],
    "kd_only": ["--mode", "distill", "--loss", "none", "--alpha", "0.5"],
    "procrustes_only": ["--mode", "distill", "--loss", "procrustes", "--alpha", "0", "--beta", "1.0"],
    "online": ["--mode", "distill", "--loss", "procrustes", "--alpha", "0.5", "--beta", "1.0",
               "--teacher_mode", "online"],
}
MODES["kd_online"] = ["--mode", "distill", "--loss", "none", "--alpha", "0.5", "--teacher_mode", "online"]
# The same runs through bench/plain_loop.py: plain PyTorch, fused AdamW, no engine, no activation checkpointing.
PLAIN = {"plain_sft": "sft", "plain_online": "online", "plain_procrustes_topk": "procrustes_topk",
         "plain_kd_online": "kd_online"}
# TRL's GKDTrainer (bench/trl_gkd.py; only where trl is installed): online KD from the teacher's full logits.
TRL = {"trl_gkd": "kd_online"}
# geokd with the engine choices of before (ZeRO-2 on one rank, activation checkpointing, single-tensor AdamW).
BEFORE = {"sft_before": "sft", "online_before": "online"}


def run(cmd: list[str], threads: int = 0) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout


def shaped_model(spec: str, work: Path, prep: Path) -> str:
    """`WIDTHxLAYERS` -> a saved random OPT of that shape (vocabulary from the prepared data); else `spec`."""
    if "x" not in spec or spec.startswith("preset:") or Path(spec).exists():
        return spec
    width, layers = (int(v) for v in spec.split("x"))
    out = work / f"opt-{spec}"
    if not (out / "config.json").is_file():
        from transformers import OPTForCausalLM

        from pipeline.data.prepared import PreparedData
        from pipeline.models import preset_config

        tok = PreparedData(prep).tokenizer()
        cfg = preset_config("opt-125m", len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        cfg.update(dict(hidden_size=width, word_embed_proj_dim=width, num_hidden_layers=layers,
                        ffn_dim=4 * width, num_attention_heads=max(1, width // 64)))
        OPTForCausalLM(cfg).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def synthetic_records(path: Path, n: int, max_len: int) -> Path:
    """n instruction records of about max_len GPT-2 tokens (half prompt, half response): for machines without
    ../shared/data (a lent GPU). Step time depends on lengths, not on the words."""
    words = ("the model reads a long instruction about distillation and answers with a long and careful response "
             "that keeps every token busy").split()
    with open(path, "w") as f:
        for i in range(n):
            text = lambda k: " ".join(words[(i + j) % len(words)] for j in range(k))  # noqa: E731
            f.write(json.dumps({"instruction": text(max_len // 2), "output": text(max_len)}) + "\n")
    return path


def before_ds_config(work: Path) -> str:
    """ds_configs/zero2.json with the single-tensor AdamW: what a one-rank run got before the auto choices."""
    path = work / "zero2_unfused.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"]["params"]["fused"] = False
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def child(argv: list[str]) -> None:
    """One mode's training run in this process; prints its step times and peak memory as JSON."""
    import torch

    from pipeline.config import parse_config
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import read_metrics
    from stages.train import train as run_training
    from pipeline.train.setup import setup

    cfg = parse_config(TrainConfig, argv)
    r = setup(cfg)
    run_training(r)
    steps = read_metrics(cfg.out)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps({"step_s": [steps[s]["step_s"] for s in sorted(steps)], "peak_bytes": peak,
                                  "tokens_per_s": [steps[s]["tokens_per_s"] for s in sorted(steps)],
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench_train")
    ap.add_argument("--student", default="256x4")
    ap.add_argument("--teacher", default="768x12")
    ap.add_argument("--layers", type=int, nargs=2, default=[6, 12], help="teacher layers of the 2 pairs")
    ap.add_argument("--student_layers", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--ds_config", default="ds_configs/auto.json")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max_len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--micro_batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (1: least sensitive to "
                    "other jobs on a shared machine)")
    ap.add_argument("--repeats", type=int, default=2, help="run the list of modes this many times, interleaved")
    ap.add_argument("--modes", nargs="+", default=["sft", "procrustes", "fg", "online"],
                    choices=list(MODES) + list(PLAIN) + list(BEFORE) + list(TRL))
    ap.add_argument("--source", choices=["dolly", "synthetic"], default="dolly",
                    help="Dolly's train split from ../shared/data, or synthetic records of --max_len tokens (also "
                         "used when Dolly is not there)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    prep = work / "prep"
    if not (prep / "manifest.json").is_file():
        source = SHARED / "dolly_train_part1.jsonl"
        if args.source == "synthetic" or not source.is_file():
            source = synthetic_records(work / "synthetic.jsonl", args.samples, args.max_len)
        run([py, "-m", "stages.prepare", "--data", str(source), "--out", str(prep), "--tokenizer", "builtin-gpt2",
             "--max_len", str(args.max_len), "--max_prompt_len", str(args.max_len * 3 // 4),
             "--limit", str(args.samples)])
    args.student, args.teacher = (shaped_model(spec, work, prep) for spec in (args.student, args.teacher))
    feat = work / f"features-top32-{Path(args.teacher).name.replace(':', '_')}-{'-'.join(map(str, args.layers))}"
    if not (feat / "manifest.json").is_file():
        run([py, "-m", "stages.cache", "--data", str(prep), "--teacher", args.teacher, "--out", str(feat),
             "--layers", *map(str, args.layers), "--final", "--topk_logits", "32", "--quant", "none",
             "--progress", "false"])
    pairs = [f"{s}:{t}" for s, t in zip(args.student_layers, args.layers)]
    results: dict[str, dict] = {}
    for rep in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every mode alike
        for mode in args.modes:
            out = work / f"run_{mode}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            base_mode = PLAIN.get(mode) or BEFORE.get(mode) or TRL.get(mode) or mode
            script = (ROOT / "bench" / "plain_loop.py" if mode in PLAIN else ROOT / "bench" / "trl_gkd.py"
                      if mode in TRL else Path(__file__).resolve())
            ds_config = before_ds_config(work) if mode in BEFORE else args.ds_config
            cmd = [py, str(script), *([] if mode in PLAIN or mode in TRL else ["--child"]), "--data", str(prep),
                   "--student", args.student, "--out", str(out), "--ds_config", ds_config,
                   "--precision", args.precision, "--max_steps", str(args.warmup + args.steps),
                   "--micro_batch_size", str(args.micro_batch_size), "--valid_split", "", "--checkpoint_every", "0",
                   "--progress", "false", "--layer_map", *pairs, *MODES[base_mode]]
            if mode in BEFORE:
                cmd += ["--activation_checkpointing", "true"]
            if base_mode != "sft":
                online = base_mode in ("online", "kd_online")
                cmd += ["--teacher", args.teacher] if online else ["--features", str(feat)]
            line = next(x for x in run(cmd, args.threads).splitlines() if x.startswith("RESULT "))
            res = json.loads(line[len("RESULT "):])
            median = statistics.median(res["step_s"][args.warmup:])
            print(f"[bench] repeat {rep}: {mode}: {median * 1e3:.0f} ms/step", file=sys.stderr)
            agg = results.setdefault(mode, {"medians": [], "tokens_per_s": [], "peak_bytes": 0})
            agg["medians"].append(median)
            agg["tokens_per_s"].append(statistics.median(res["tokens_per_s"][args.warmup:]))
            agg["peak_bytes"] = max(agg["peak_bytes"], res["peak_bytes"])
            agg["device"] = res["device"]

    base = min(results["sft"]["medians"]) if "sft" in results else None
    device = next(iter(results.values()))["device"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, device {device}, "
          f"{args.threads} thread(s); student {args.student}, teacher {args.teacher}, pairs {' '.join(pairs)}, "
          f"{args.ds_config}, micro-batch {args.micro_batch_size} x <= {args.max_len} tokens; per run the median of "
          f"{args.steps} steps after {args.warmup} warm-up, {args.repeats} interleaved runs per mode\n")
    print("| mode | ms/step (best run) | runs (ms) | x SFT | tokens/s | peak memory (MB) |\n|---|---|---|---|---|---|")
    for mode, res in results.items():
        t = min(res["medians"])
        runs = " / ".join(f"{m * 1e3:.0f}" for m in res["medians"])
        ratio = f"{t / base:.2f}" if base else "-"
        print(f"| {mode} | {t * 1e3:.0f} | {runs} | {ratio} | {max(res['tokens_per_s']):.0f} | "
              f"{res['peak_bytes'] / 2**20:.0f} |")
    best = {mode: min(res["medians"]) for mode, res in results.items()}
    pairs_of = ([(m, p) for p, m in PLAIN.items()] + [(b, m) for b, m in BEFORE.items()]
                + [(m, t) for t, m in TRL.items()])
    lines = [f"{a} / {b}: {best[a] / best[b]:.2f}" for a, b in pairs_of if a in best and b in best]
    if lines:
        print("\nratios (best runs): " + "; ".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "best_s": best, "ratios": lines,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
