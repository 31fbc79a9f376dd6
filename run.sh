#!/usr/bin/env bash
# geokd's one entry point.
#   ./run.sh setup            create or update .venv (idempotent)
#   ./run.sh test [pytest args]    ruff, then pytest
#   ./run.sh demo [args]      the whole pipeline on the built-in data, on this machine
#   ./run.sh <stage> [args]   prepare | cache | train | eval | synthetic | study | analyze
#   ./run.sh get-model NAME --out DIR    a real pretrained model (smollm2-135m-instruct, gemma3-270m, minilm-l6) as a model dir
#   ./run.sh make-student --teacher DIR --layers 0,6,12 --out DIR   a student of the teacher's layers
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"

setup() {
    local stamp="$VENV/.geokd-setup" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "[geokd] setting up $VENV" >&2
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >&2
    # torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build on a CPU machine.
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_PIN" >&2
    "$PY" -m pip install -q -e ".[test]" >&2
    echo "$want" > "$stamp"
}

runtime_env() {
    # DeepSpeed on a machine without a GPU: its CPU accelerator, gloo, and a cache for any op it JIT-compiles.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    fi
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
    setup) setup ;;
    test)
        setup; runtime_env
        export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
        "$VENV/bin/ruff" check --quiet .   # the lint rules are in pyproject.toml
        exec "$PY" -m pytest "$@" ;;
    demo)
        setup; runtime_env
        export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
        exec "$PY" -m stages.demo "$@" ;;
    prepare|cache|train|eval|synthetic|study|analyze)
        setup; runtime_env; exec "$PY" -m "stages.$cmd" "$@" ;;
    get-model|make-student)
        setup; runtime_env
        export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
        exec "$PY" -m "stages.${cmd//-/_}" "$@" ;;
    help|-h|--help)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' ;;
    *)
        echo "unknown command '$cmd'" >&2; sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
