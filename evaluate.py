"""Evaluate a checkpoint: ``python evaluate.py checkpoint=DIR suite=qa data_dir=../shared/data limit=20``.

Thin Hydra entry point; the work is in :mod:`anllm.eval.runner` (options: conf/evaluate.yaml).
The config is typed (:mod:`anllm.schema`) and checked before Hydra starts the run: bad input exits
with code 2 and one line naming the fix (:mod:`anllm.cli`).
"""

import sys

import hydra
from omegaconf import DictConfig

from anllm.cli import InputError, check_command_line, check_group_choices, check_output_dir, fail
from anllm.eval.runner import preflight, register_resolvers, run
from anllm.schema import CONF_DIR

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as e:
        fail("evaluate.py", str(e))


def check(argv: list[str]) -> None:
    """The command line's config, composed and checked (types, paths, the suites' checks) before Hydra
    creates anything (raises :class:`InputError`); then the output directory is created."""
    check_group_choices(argv, ["protocol"])
    check_command_line("evaluate", argv, preflight)
    check_output_dir(argv)


if __name__ == "__main__":
    try:
        check(sys.argv[1:])
    except InputError as e:
        fail("evaluate.py", str(e))
    main()
