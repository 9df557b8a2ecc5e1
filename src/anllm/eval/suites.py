"""The suite interface: how ``evaluate.py`` finds, runs and resumes evaluation suites.

A *suite* (``qa``, ``translation``, ``ppl``) is a set of named *tasks*. The runner
(:mod:`anllm.eval.runner`) loads the model once, then for every selected task calls the suite's
``run_task`` and saves the returned rows to ``<output_dir>/tasks/<suite>/<task>.json`` as soon as the
task finishes. A task that raises is recorded as an error row and the others go on; a re-run with the
same ``output_dir`` skips tasks whose results are already saved (``resume=true``).

Suites are registered by import path, so one suite's missing optional dependency (e.g. COMET) does
not break the others: the module is imported only when that suite is selected.

Rows are flat dicts; :mod:`anllm.eval.report` turns them into one JSON per run plus Markdown/CSV
tables shaped like the paper's. Required keys: ``suite``, ``task``, ``method``. Well-known optional
keys (report columns, in this order when present): see :data:`anllm.eval.report.COLUMNS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from omegaconf import DictConfig


class TaskInputError(Exception):
    """A task computed what it could (``rows``), but the rest needs the user to fix their setup (e.g.
    COMET's environment is missing: ``make install``). The runner saves and reports the rows, marks
    the task for a retry on the next run, then ``evaluate.py`` exits with code 2 and this message."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass
class ModelBundle:
    """Everything a suite needs about the model under evaluation (loaded once per run)."""

    model: Any  # a transformers causal LM, eval mode, on ``device``
    tokenizer: Any
    checkpoint: str
    device: str = "cpu"
    # Anchor settings as a dict (mode, anchor_token_ids, anchor_token, ...), or None for a plain model.
    anchor: dict[str, Any] | None = None
    # Where the anchor settings came from: "checkpoint" (saved with the model), "override"
    # (``anchors=ep|ac`` on the command line; untrained anchors: a mechanics check) or None.
    anchor_source: str | None = None
    notes: list[str] = field(default_factory=list)  # shown under the report tables

    @property
    def anchor_mode(self) -> str:
        """'ac', 'ep' or 'none'."""
        return (self.anchor or {}).get("mode", "none")

    @property
    def has_anchors(self) -> bool:
        return self.anchor_mode != "none"


class TaskFn(Protocol):
    def __call__(self, bundle: ModelBundle, cfg: DictConfig, task: str, out_dir: Path) -> list[dict[str, Any]]:
        """Evaluate one task; return report rows (one per method/variant). ``out_dir`` is this task's
        private directory (per-example files, plots); ``cfg`` is the whole run config (suite options
        under ``cfg.<suite>``)."""
        ...


@dataclass(frozen=True)
class Suite:
    """A suite: its tasks and how to run one of them."""

    name: str
    tasks: tuple[str, ...]  # every task name it knows
    default_tasks: tuple[str, ...]  # what ``tasks=null`` runs
    run_task: TaskFn
    describe: str = ""
    # Optional: validate the config before the model loads (raise ValueError/FileNotFoundError naming the fix).
    check: Callable[[DictConfig], None] | None = None


# name -> "module:attribute" of a ``Suite`` (imported lazily).
SUITES: dict[str, str] = {
    "qa": "anllm.eval.qa:SUITE",
    "translation": "anllm.eval.translation:SUITE",
    "ppl": "anllm.eval.perplexity:SUITE",
    "recall": "anllm.eval.recall:SUITE",
    "longrange": "anllm.eval.longrange:SUITE",
}
SUITE_ORDER = ("qa", "translation", "ppl", "recall", "longrange")


def register_suite(name: str, target: str) -> None:
    """Add a suite (e.g. from a plugin) as ``"module:attribute"``."""
    SUITES[name] = target


def load_suite(name: str) -> Suite:
    """Import and return a registered suite, with a clear error for unknown names."""
    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}: choose one of {sorted(SUITES)} or 'all'.")
    module_name, _, attr = SUITES[name].partition(":")
    module = importlib.import_module(module_name)
    suite = getattr(module, attr)
    if not isinstance(suite, Suite):
        raise TypeError(f"{SUITES[name]} is not an anllm.eval.suites.Suite")
    return suite


def selected_suites(suite: str | list[str]) -> list[str]:
    """``suite=all`` -> every registered suite in report order; otherwise a validated list."""
    names = [suite] if isinstance(suite, str) else list(suite)
    if names == ["all"]:
        return [n for n in SUITE_ORDER if n in SUITES] + [n for n in SUITES if n not in SUITE_ORDER]
    for n in names:
        if n not in SUITES:
            raise ValueError(f"Unknown suite {n!r}: choose one of {sorted(SUITES)} or 'all'.")
    return names

