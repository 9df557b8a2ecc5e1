"""lm-eval's own command line, with the ``anllm`` model registered and the paper's QA tasks offline.

    python -m anllm.lm_eval --model anllm --model_args pretrained=CKPT,mode=anchor --tasks arc_easy

Why this exists: lm-eval 0.4 finds a model name only if the module that registers it has been
imported, so ``lm_eval --model anllm`` fails ("anllm" is registered by importing
:mod:`anllm.eval.lm_eval_model`). This entry point imports that module and then runs lm-eval's own
CLI (its argument parsing, errors, output files and table) on the arguments unchanged, except:

* ``--data_dir DIR`` (ours, removed before lm-eval sees the arguments; else ``$ANLLM_DATA_DIR``,
  else ``../shared/data`` from the working directory or beside the repository): where the staged
  QA files are. ``--data_dir none`` keeps lm-eval's hub definitions.
* When ``--tasks`` names any of the paper's eight QA tasks (:data:`anllm.eval.tasks.QA_TASKS`) and
  no ``--include_path`` is given, the same offline task YAMLs that ``evaluate.py suite=qa`` uses
  (lm-eval's own YAML with the data swapped for ``DIR/qa``; :func:`anllm.eval.tasks.task_spec`)
  are written to a temporary directory passed as ``--include_path`` (it takes precedence over
  lm-eval's hub definitions of the same names), and ``HF_DATASETS_OFFLINE`` defaults to 1. Other
  tasks are lm-eval's.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

PROG = "python -m anllm.lm_eval"
_REPO_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _pop_data_dir(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--data_dir X`` / ``--data_dir=X``, and the value (None if absent)."""
    out, value, it = [], None, iter(argv)
    for a in it:
        if a == "--data_dir":
            value = next(it, None)
            if value is None:
                _fail("argument --data_dir: expected one argument")
        elif a.startswith("--data_dir="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, value


def _fail(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def resolve_data_dir(value: str | None) -> Path | None:
    """The staged data directory, or None for lm-eval's hub definitions."""
    if value is None:
        value = os.environ.get("ANLLM_DATA_DIR")
    if value is not None:
        if value.strip().lower() in ("", "none"):
            return None
        path = Path(value).expanduser()
        if not path.is_dir():
            _fail(f"--data_dir {value} does not exist (pass --data_dir ../shared/data, or --data_dir none for "
                  "lm-eval's hub tasks).")
        return path.resolve()
    for path in (Path("../shared/data"), _REPO_DATA):
        if (path / "qa").is_dir():
            return path.resolve()
    return None


def _requested(args: Any) -> tuple[list[str], str | None, int]:
    """(tasks, include_path, num_fewshot) from the parsed arguments and any ``--config`` YAML."""
    tasks, include = getattr(args, "tasks", None), getattr(args, "include_path", None)
    shots = getattr(args, "num_fewshot", None)
    if getattr(args, "config", None):
        import yaml

        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError):
            cfg = {}  # lm-eval reports a bad config file itself
        if isinstance(cfg, dict):
            tasks, include = tasks or cfg.get("tasks"), include or cfg.get("include_path")
            shots = shots if shots is not None else cfg.get("num_fewshot")
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [t.strip() for task in tasks or [] if isinstance(task, str) for t in task.split(",")]
    return names, include, int(shots or 0)


def add_local_tasks(args: Any, data_dir: Path | None, work_dir: Path) -> list[str]:
    """Point ``args.include_path`` at offline definitions of the requested QA tasks (see the module
    docstring); returns the task names written (none: ``args`` unchanged)."""
    from anllm.eval.tasks import QA_TASKS, task_spec

    if not hasattr(args, "include_path"):  # a subcommand without tasks (``ls``)
        return []
    tasks, include, shots = _requested(args)
    local = [t for t in dict.fromkeys(tasks) if t in QA_TASKS]
    if include or not local or data_dir is None:
        return []
    for name in local:
        try:
            task_spec(name, "local", data_dir, shots, work_dir)
        except (OSError, ValueError) as e:
            _fail(f"{e} Here: --data_dir none for lm-eval's hub tasks, or --include_path with your own.")
    args.include_path = str(work_dir)
    # The task data are local JSON files: keep `datasets` off the network (it is imported after this,
    # so the setting takes effect). Model loading follows the user's HF_HUB_OFFLINE.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    print(f"{PROG}: {', '.join(local)}: offline task definitions for {data_dir / 'qa'} "
          f"(--include_path {work_dir})", file=sys.stderr)
    return local


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``) with the ``anllm`` model registered."""
    argv, data_value = _pop_data_dir(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [PROG, *argv]  # lm-eval's parser reads sys.argv
    with tempfile.TemporaryDirectory(prefix="anllm_lm_eval_tasks_") as tmp:
        try:
            from lm_eval._cli import HarnessCLI  # lm-eval with subcommands (run, ls, validate), e.g. 0.4.13
        except ImportError:  # older lm-eval: cli_evaluate(args) (not tested here)
            from lm_eval.__main__ import cli_evaluate, parse_eval_args, setup_parser

            args = parse_eval_args(setup_parser())
            add_local_tasks(args, resolve_data_dir(data_value), Path(tmp))
            import anllm.eval.lm_eval_model  # noqa: F401 - registers the lm-eval model "anllm"

            cli_evaluate(args)
            return
        from lm_eval.utils import setup_logging

        setup_logging()  # as lm_eval.__main__.cli_evaluate does
        parser = HarnessCLI()
        args = parser.parse_args()  # lm-eval's own parsing: --help and bad arguments exit here
        add_local_tasks(args, resolve_data_dir(data_value), Path(tmp))
        import anllm.eval.lm_eval_model  # noqa: F401 - registers the lm-eval model "anllm"

        parser.execute(args)
