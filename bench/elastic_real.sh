#!/usr/bin/env bash
# Elastic resume on a real student (BENCHMARKS.md, "Resuming on another number of ranks"): SmolLM2-135M's
# 6-of-30-layer student (49.6M parameters) distilled with KD + Procrustes from the stored real features of
# bench/real_teacher.sh, 8 steps of 8 samples. Uninterrupted on one rank (grad_accum 2) against: 2 ranks (ZeRO-2)
# stopped after 4 steps and resumed on 1, and 1 rank (ZeRO-3) stopped after 4 and resumed on 2. Prints each step's
# loss, the relative differences and the conversion time.
#   bash bench/elastic_real.sh [REAL_BENCH_DIR] [OUT]   (defaults runs/real_bench, runs/elastic_real)
set -euo pipefail
cd "$(dirname "$0")/.."
RB="${1:-runs/real_bench}" OUT="${2:-runs/elastic_real}"
[[ -d "$RB/feat" && -d "$RB/student_init" ]] || { echo "run bench/real_teacher.sh first (needs $RB/feat)" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"
export OMP_NUM_THREADS=1
common=(--mode distill --data "$RB/dolly" --student "$RB/student_init" --features "$RB/feat" --alpha 0.5 --beta 1.0
        --layer_map 4:20 6:30 --loss procrustes --max_steps 8 --micro_batch_size 4 --lr 2e-4 --seed 0
        --num_workers 0 --progress false --checkpoint_every 4 --valid_split "")
./run.sh train "${common[@]}" --ds_config ds_configs/zero2.json --grad_accum 2 --out "$OUT/reference" > "$OUT/reference.log" 2>&1
./run.sh train "${common[@]}" --ds_config ds_configs/zero2.json --grad_accum 1 --nproc 2 --stop_after 4 \
    --out "$OUT/zero2_2to1" > "$OUT/zero2_2to1.a.log" 2>&1
./run.sh train "${common[@]}" --ds_config ds_configs/zero2.json --grad_accum 1 --resume \
    --out "$OUT/zero2_2to1" > "$OUT/zero2_2to1.b.log" 2>&1
./run.sh train "${common[@]}" --ds_config ds_configs/zero3.json --grad_accum 2 --stop_after 4 \
    --out "$OUT/zero3_1to2" > "$OUT/zero3_1to2.a.log" 2>&1
./run.sh train "${common[@]}" --ds_config ds_configs/zero3.json --grad_accum 2 --nproc 2 --resume \
    --out "$OUT/zero3_1to2" > "$OUT/zero3_1to2.b.log" 2>&1
grep -h "resuming\|converted" "$OUT"/*.b.log
.venv/bin/python - "$OUT" <<'PY'
import sys
from pipeline.train.loop import read_metrics
out = sys.argv[1]
ref = read_metrics(f"{out}/reference")
print("| step | uninterrupted (1 rank) | ZeRO-2 2 -> 1 | ZeRO-3 1 -> 2 |\n|---|---|---|---|")
worst = {}
for s in sorted(ref):
    row = [f"{ref[s]['loss']:.6f}"]
    for run in ("zero2_2to1", "zero3_1to2"):
        got = read_metrics(f"{out}/{run}")[s]["loss"]
        worst[run] = max(worst.get(run, 0.0), abs(got - ref[s]["loss"]) / abs(ref[s]["loss"]))
        row.append(f"{got:.6f}")
    print(f"| {s} | " + " | ".join(row) + " |")
print("max relative difference:", {k: f"{v:.1e}" for k, v in worst.items()})
PY
