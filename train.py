"""Continual pretraining / SFT of anchor-based LLMs: ``python train.py +exp=anllm_ac``.

Thin Hydra entry point; everything else lives in :mod:`anllm.train`. Config groups are in conf/ (src/anllm/conf)
(exp, scale, model, data, deepspeed, launcher, protocol); see conf/train.yaml and experiments/recipes/.
The config is typed (:mod:`anllm.schema`) and checked before Hydra starts the run: bad input exits
with code 2 and one line naming the key and the fix, with nothing written (:mod:`anllm.cli`).
"""

import sys

import hydra
from omegaconf import DictConfig

from anllm.schema import CONF_DIR  # the configs ship inside the package (conf/ here is a link to them)

GROUPS = ("exp", "scale", "model", "data", "deepspeed", "launcher", "protocol")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from anllm.cli import fail
    from anllm.train import ConfigError, run

    try:
        run(cfg)
    except ConfigError as e:  # a config mistake: one clear line, not a traceback
        fail("train.py", str(e), kind="config error")


def check(argv: list[str]) -> None:
    """The command line's config, composed and validated before Hydra creates anything (raises
    :class:`anllm.cli.InputError`); then the output directory is created (Hydra writes into it)."""
    from anllm.cli import check_command_line, check_group_choices, check_output_dir
    from anllm.train import validate

    check_group_choices(argv, GROUPS)
    check_command_line("train", argv, validate)
    check_output_dir(argv)


if __name__ == "__main__":
    from anllm.cli import InputError, fail

    try:
        check(sys.argv[1:])
    except InputError as e:
        fail("train.py", str(e), kind="config error")
    main()
