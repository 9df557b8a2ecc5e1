"""What the two command-line entry points share: the exit-code contract and up-front checks.

Contract: bad input (an unknown config option, a missing file or directory, an unreadable checkpoint,
an output directory that cannot be written) ends the program with **exit code 2** and one line
``<program>: error: <what is wrong and how to fix it>`` on stderr, before anything is written. Any
other failure is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from .errors import InputError  # noqa: F401 - the contract's error type (importers: ``anllm.cli.InputError``)
from .schema.confdir import CONF_DIR

EXIT_BAD_INPUT = 2


def fail(program: str, message: str, kind: str = "error") -> NoReturn:
    message = re.sub(r"\s*\n\s*", " ", str(message).strip())  # the contract is one line
    print(f"{program}: {kind}: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


# A sweep (``a=1,2 b=3,4``) is checked run by run, up to this many runs.
MAX_CHECKED_RUNS = 256


def check_command_line(config_name: str, argv: Sequence[str], check: Callable[[Any], None],
                       conf_dir: Path = CONF_DIR) -> None:
    """Compose the config the command line asks for, as Hydra is about to, and ``check`` it (every run
    of a sweep): a wrong type, an unknown key or a bad value is reported before Hydra creates its run
    directory or anything is loaded. Command lines that ask Hydra for something else (``--help``,
    ``--cfg job``, ...) are left to Hydra."""
    from anllm.schema import cli_overrides, compose

    runs = cli_overrides(argv)
    for overrides in (runs or [])[:MAX_CHECKED_RUNS]:
        check(compose(config_name, overrides, conf_dir=conf_dir))


def check_output_dir(argv: Sequence[str]) -> None:
    """An ``output_dir=...`` override can be created (Hydra writes its run directory inside it before
    our code runs, and would fail with a traceback)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key == "output_dir" and sep and value:
            try:
                Path(value).expanduser().mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"output_dir={value} cannot be created ({e.strerror or e}); choose a writable "
                                 "directory with output_dir=...") from None


def check_group_choices(argv: Sequence[str], groups: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """``group=option`` overrides name an existing ``conf/<group>/<option>.yaml`` (before Hydra composes,
    whose own error would exit 1 with its search path)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups or not value or value == "null":
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        if value not in options:
            raise InputError(f"{key}={value} is not a {key} option; choose one of: {', '.join(options)}.")
