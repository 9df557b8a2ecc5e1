#!/usr/bin/env bash
# One torchrun per node, started by slurm/train.sbatch (srun --ntasks-per-node=1 --cpus-per-task=N).
# The rendezvous comes from the SLURM environment: the first host of the allocation is the c10d
# endpoint, the job id is the rendezvous id, SLURM_NNODES the node count. Every argument is passed
# to train.py as a Hydra override.
#
#   GPUS_PER_NODE         processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT           rendezvous port (default: 29500 + job id mod 1000)
#   OMP_NUM_THREADS       threads per process (default: this task's CPUs / GPUS_PER_NODE)
#   TORCH_EXTENSIONS_DIR  where DeepSpeed builds ops just in time (default: node-local, per job start)
#   PYTHON                the interpreter (default: the repository's .venv/bin/python)
#   ANLLM_REPO            repository root (default: this script's parent folder)
#
# SIGUSR1 (forwarded by srun from slurm/train.sbatch near the time limit) goes on to the training
# processes, which then save a checkpoint at the end of the optimizer step and exit. torchrun itself
# ignores it: its default action would kill torchrun, and torchrun's --signals-to-handle would stop
# the workers instead of letting them save. The training processes install their own handler over
# the inherited "ignore" (anllm.train.preemption).
set -euo pipefail

REPO="${ANLLM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${SLURM_JOB_ID:?run this from slurm/train.sbatch (it needs the SLURM environment)}"
NNODES="${SLURM_NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')"  # awk reads all: no SIGPIPE under pipefail
MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

CPUS="${SLURM_CPUS_PER_TASK:-$(nproc)}"
THREADS=$((CPUS / GPUS_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}"
export TOKENIZERS_PARALLELISM=false
# DeepSpeed ops that were not built at install (DS_BUILD_OPS=0; CPU Adam for deepspeed=zero3_offload)
# are compiled at first use into TORCH_EXTENSIONS_DIR. Its default, ~/.cache/torch_extensions, is one
# folder shared by every rank of every node and job: 32 ranks build at once, and a build killed halfway
# leaves a lock that hangs later jobs. Here it is node-local and fresh for each job start (removed at
# the end). Prebuilding the ops at install avoids the build altogether (README, "Run on a SLURM cluster").
OWN_EXTENSIONS_DIR=0
if [[ -z "${TORCH_EXTENSIONS_DIR:-}" ]]; then
  export TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}/torch_extensions_${SLURM_JOB_ID}_${SLURM_RESTART_COUNT:-0}"
  OWN_EXTENSIONS_DIR=1
fi
cd "$REPO"
echo "[$(hostname)] node ${SLURM_NODEID:-0}/${NNODES}, ${GPUS_PER_NODE} GPUs, ${CPUS} CPUs (OMP_NUM_THREADS=${OMP_NUM_THREADS}), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

AGENT=""
forward_usr1() {
  echo "[$(hostname)] SIGUSR1: the training processes save a checkpoint and stop"
  # torchrun's workers are its direct children (each in a session of its own: found by parent id).
  if [[ -n "$AGENT" ]]; then pkill -USR1 -P "$AGENT" || true; fi
}
trap forward_usr1 USR1
trap 'if [[ -n "$AGENT" ]]; then kill -TERM "$AGENT" 2>/dev/null || true; fi' TERM
(
  trap '' USR1  # ignored by torchrun, inherited by its workers until they install their handler
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv_id="$SLURM_JOB_ID" \
    --max_restarts=0 \
    train.py "$@"
) &
AGENT=$!
rc=0
while :; do
  wait "$AGENT" && rc=0 || rc=$?
  kill -0 "$AGENT" 2>/dev/null || break  # a trapped signal ended `wait` early: torchrun still runs
done
if [[ $OWN_EXTENSIONS_DIR == 1 ]]; then rm -rf "$TORCH_EXTENSIONS_DIR"; fi
exit "$rc"
