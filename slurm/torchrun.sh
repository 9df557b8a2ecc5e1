#!/usr/bin/env bash
# One torchrun per node, started by `srun --ntasks-per-node=1` from the sbatch scripts in this folder.
# The rendezvous comes from the SLURM environment: the first host of the allocation is the c10d
# endpoint, the job id is the rendezvous id, SLURM_NNODES the node count. Every argument is passed
# to train.py as a Hydra override.
#
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT     rendezvous port (default: 29500 + job id mod 1000)
#   ANLLM_REPO      repository root (default: this script's parent folder)
set -euo pipefail

REPO="${ANLLM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${SLURM_JOB_ID:?run this from an sbatch script (it needs the SLURM environment)}"
NNODES="${SLURM_NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')"  # awk reads all: no SIGPIPE under pipefail
MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TOKENIZERS_PARALLELISM=false
cd "$REPO"
echo "[$(hostname)] node ${SLURM_NODEID:-0}/${NNODES}, ${GPUS_PER_NODE} GPUs, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv_id="$SLURM_JOB_ID" \
  --max_restarts=0 \
  train.py "$@"
