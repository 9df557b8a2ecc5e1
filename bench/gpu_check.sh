#!/usr/bin/env bash
# The GPU check on a lent GPU node, in one command from the repository root (carry .whl/ along):
#
#     bash bench/gpu_check.sh            # writes $OUT/gpu_check.json and $OUT/gpu_check.log
#     bash bench/gpu_check.sh --quick    # (extra arguments go to bench/gpu_check.py)
#
# The node has its own torch (CUDA) but transformers 5.x; .whl/ holds the pure-Python/abi3 wheels of our
# pinned transformers 4.57.x and what it needs there (tokenizers, huggingface-hub<1, requests & co.),
# installed into /tmp/site in front of the node's packages. anllm runs from src/ (PYTHONPATH).
# bench/gpu_check.py keeps to its --budget-s (330 s) and rewrites the JSON after every section, so the
# timeout below only guards against a hang; it is well inside one 8-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import sys, torch, transformers, anllm; print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__, '| anllm', anllm.__file__)"
timeout -k 10 420 python3 bench/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
