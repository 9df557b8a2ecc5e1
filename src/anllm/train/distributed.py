"""Process-group environment for the launchers that do not set it themselves.

``torchrun`` and the ``deepspeed`` launcher export RANK/WORLD_SIZE/MASTER_ADDR; the Trainer (via
accelerate) reads them. A job started by hydra-submitit-launcher (``launcher=slurm``) runs one task
per GPU with only submitit's job environment, so those variables are derived from it here.
"""

from __future__ import annotations

import os


def env_from_submitit() -> bool:
    """Export the torch.distributed variables inside a multi-task submitit job. True if it did."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return False
    job = str(env.job_id).split("_")[0]
    port = os.environ.get("MASTER_PORT") or str(20000 + int(job) % 20000 if job.isdigit() else 29500)
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)),
        MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=port,
    )
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
