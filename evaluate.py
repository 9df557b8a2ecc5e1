"""Evaluate a checkpoint: ``python evaluate.py checkpoint=DIR suite=qa data_dir=../shared/data limit=20``.

Thin Hydra entry point; the work is in :mod:`anllm.eval.runner` (options: conf/evaluate.yaml).
Bad input exits with code 2 and one line naming the fix (:mod:`anllm.cli`).
"""

import sys

import hydra
from omegaconf import DictConfig

from anllm.cli import InputError, check_group_choices, check_output_dir, fail
from anllm.eval.runner import register_resolvers, run

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as e:
        fail("evaluate.py", str(e))


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], ["protocol"])
        check_output_dir(sys.argv[1:])
    except InputError as e:
        fail("evaluate.py", str(e))
    main()
