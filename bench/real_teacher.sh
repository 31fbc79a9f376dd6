#!/usr/bin/env bash
# Real-teacher evidence on a 2-core CPU (BENCHMARKS.md, "A real pretrained teacher"): SmolLM2-135M-Instruct's own
# ROUGE-L on Dolly / Self-Instruct / Vicuna, and a 6-of-30-layer student distilled from it with SFT, KD,
# KD+Procrustes under the default token rule and KD+Procrustes over all tokens (same data, steps and seed).
#   bash bench/real_teacher.sh [OUT]     (default runs/real_bench; reruns skip finished steps)
# Sizes: SAMPLES training records, STEPS steps of 8, PROMPTS Dolly prompts per student, TEACHER_PROMPTS prompts per
# set for the teacher (its 135M-parameter generations run ~3x longer than the students'); override through the
# environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/real_bench}"
SAMPLES="${SAMPLES:-1200}" STEPS="${STEPS:-150}" PROMPTS="${PROMPTS:-100}" TEACHER_PROMPTS="${TEACHER_PROMPTS:-50}"
SEED="${SEED:-0}"
D="${GEOKD_SHARED_DATA:-../shared}/data/instruct"
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # two lanes of one thread each: a 2-core machine, no oversubscription
log() { echo "[real_teacher $(date +%H:%M:%S)] $*" | tee -a "$OUT/logs/steps.log"; }
step() { local name="$1"; shift; [[ -e "$OUT/.done.$name" ]] && return 0
         local t0=$SECONDS; log "start $name"; "$@" > "$OUT/logs/$name.log" 2>&1
         log "done $name in $(( SECONDS - t0 )) s"; touch "$OUT/.done.$name"; }

step get_model ./run.sh get-model smollm2-135m-instruct --out models/smollm2
[[ -d "$OUT/student_init" ]] || step make_student ./run.sh make-student --teacher models/smollm2 \
    --layers 0,6,12,18,24,29 --out "$OUT/student_init"
step prepare ./run.sh prepare --data "$D/dolly_train_part1.jsonl" --out "$OUT/dolly" --tokenizer models/smollm2 \
    --limit $(( SAMPLES + 100 )) --valid_size 100 --max_len 384 --max_prompt_len 256
OMP_NUM_THREADS=2 step cache_train ./run.sh cache --data "$OUT/dolly" --teacher models/smollm2 --out "$OUT/feat" \
    --layers 20 30 --final --quant none --progress false
OMP_NUM_THREADS=2 step cache_valid ./run.sh cache --data "$OUT/dolly" --split valid --teacher models/smollm2 \
    --out "$OUT/feat_valid" --layers 20 30 --final --quant none --progress false

common=(--data "$OUT/dolly" --student "$OUT/student_init" --max_steps "$STEPS" --micro_batch_size 8 --lr 2e-4
        --seed "$SEED" --eval_samples 100 --num_workers 0 --progress false --checkpoint_every 50)
distill=(--mode distill --features "$OUT/feat" --valid_features "$OUT/feat_valid" --alpha 0.5 --beta 1.0
         --layer_map 4:20 6:30)
train() { local name="$1"; shift; step "train_$name" ./run.sh train "${common[@]}" --out "$OUT/$name" "$@"; }
(   train sft --mode sft
    train kd_procrustes "${distill[@]}" --loss procrustes --token_rule outliers:4 ) &
lane1=$!
(   train kd "${distill[@]}" --loss none --beta 0
    train kd_procrustes_all "${distill[@]}" --loss procrustes --token_rule all ) &
lane2=$!
wait $lane1 $lane2

ev=(--seeds 10 --batch-size 16 --dtype fp32)
( step eval_teacher ./run.sh eval --models models/smollm2 --names teacher --benchmarks dolly self_inst vicuna \
      --max-samples "$TEACHER_PROMPTS" "${ev[@]}" --out "$OUT/eval_teacher"
  step eval_teacher_chat ./run.sh eval --models models/smollm2 --names teacher --benchmarks dolly \
      --max-samples "$TEACHER_PROMPTS" "${ev[@]}" --template chat --out "$OUT/eval_teacher_chat" ) &
lane1=$!
( step eval_students ./run.sh eval --models "$OUT/student_init" "$OUT/sft/model" "$OUT/kd/model" \
      "$OUT/kd_procrustes/model" "$OUT/kd_procrustes_all/model" \
      --names init sft kd kd_procrustes kd_procrustes_all --benchmarks dolly --max-samples "$PROMPTS" "${ev[@]}" \
      --out "$OUT/eval_students" ) &
lane2=$!
wait $lane1 $lane2
step report .venv/bin/python bench/real_teacher_report.py "$OUT"
log "all done: $OUT/report.md"
