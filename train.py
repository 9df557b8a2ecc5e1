"""Continual pretraining / SFT of anchor-based LLMs: ``python train.py +exp=anllm_ac``.

Thin Hydra entry point; everything else lives in :mod:`anllm.train`. Config groups are in conf/
(exp, scale, model, data, deepspeed, launcher); see conf/train.yaml and experiments/recipes/.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from anllm.train import ConfigError, run

    try:
        run(cfg)
    except ConfigError as e:  # a config mistake: one clear line, not a traceback
        print(f"train.py: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
