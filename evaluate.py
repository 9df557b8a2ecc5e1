"""Evaluate a checkpoint: ``python evaluate.py checkpoint=DIR suite=qa data_dir=../shared/data limit=20``.

Thin Hydra entry point; the work is in :mod:`anllm.eval.runner` (options: conf/evaluate.yaml).
"""

import hydra
from omegaconf import DictConfig

from anllm.eval.runner import register_resolvers, run

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
