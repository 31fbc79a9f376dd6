#!/usr/bin/env bash
# The GPU suite on a bare GPU machine.
#   bash bench/gpu_suite.sh --fetch-wheels     here, on a machine with PyPI: fill .whl/ (git-ignored) with what a
#                                              bare GPU image lacks (deepspeed, datasets, rouge-score and their
#                                              pure-Python dependencies), for CPython 3.12 on x86_64
#   bash bench/gpu_suite.sh OUT_DIR [gpu_suite.py options]   there: install .whl/ into /tmp/site if it is present,
#                                              then run bench/gpu_suite.py --out OUT_DIR (under 8 minutes on an H200)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps "${target[@]}" -d .whl hjson pydantic pydantic-core annotated-types \
        typing-inspection typing-extensions datasets==5.2.0 dill multiprocess nltk
    # Published as source only: built here into pure-Python wheels.
    python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 rouge-score==0.1.2
    ls .whl; exit 0
fi
out="${1:?usage: bench/gpu_suite.sh OUT_DIR [options] | --fetch-wheels}"; shift
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the image's 9.0a breaks DeepSpeed's arch parser
exec python3 bench/gpu_suite.py --out "$out" "$@"
