# Shared by the paper-run sbatch scripts (sourced, not run). Submit them from the repository root.
#   LLAMA2_7B / LLAMA2_13B  local HF checkpoint dirs (default: the hub ids, which need HF access)
#   RPJ_DIR                 a local copy of RedPajama-Data-1T-Sample (*.jsonl): exactly one epoch, cached
#                           preprocessing. Unset: stream from the hub for MAX_STEPS optimizer steps.
#   MAX_STEPS               streaming only; default 1661 = one epoch of the paper protocol: ~850k documents,
#                           one per row (protocol=paper: no packing), 512 rows per step (32 GPUs x 1 x 16)
#   EXTRA                   more Hydra overrides, e.g. EXTRA="trainer.save_steps=200"
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p slurm-logs
if [[ -n "${RPJ_DIR:-}" ]]; then
  PRETRAIN_DATA=(data=jsonl "data.paths=[${RPJ_DIR}/*.jsonl]" preprocessing.num_proc=32)
else
  PRETRAIN_DATA=(data=redpajama_sample "trainer.max_steps=${MAX_STEPS:-1661}")
fi
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
run_paper() { srun --ntasks-per-node=1 bash slurm/torchrun.sh "$@" trainer.dataloader_num_workers=4 "${EXTRA_ARGS[@]}"; }
