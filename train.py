"""Continual pretraining / SFT of anchor-based LLMs: ``python train.py +exp=anllm_ac``.

Thin Hydra entry point; everything else lives in :mod:`anllm.train`. Config groups are in conf/
(exp, scale, model, data, deepspeed, launcher, protocol); see conf/train.yaml and experiments/recipes/.
Bad input exits with code 2 and one line naming the fix (:mod:`anllm.cli`).
"""

import sys

import hydra
from omegaconf import DictConfig

GROUPS = ("exp", "scale", "model", "data", "deepspeed", "launcher", "protocol")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from anllm.cli import fail
    from anllm.train import ConfigError, run

    try:
        run(cfg)
    except ConfigError as e:  # a config mistake: one clear line, not a traceback
        fail("train.py", str(e), kind="config error")


if __name__ == "__main__":
    from anllm.cli import InputError, check_group_choices, check_output_dir, fail

    try:
        check_group_choices(sys.argv[1:], GROUPS)
        check_output_dir(sys.argv[1:])
    except InputError as e:
        fail("train.py", str(e), kind="config error")
    main()
