"""What the study has measured (``results.json``) and what it reads back from its training runs.

:class:`Results` is the on-disk schema of ``<report_dir>/results.json``: a resumed study loads it, so
its fields and their meaning must not change under a running study. The readers below look at a
training run's own files (its summary and checkpoint markers), which is how the study knows what is
finished without a database of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY = "anllm_train_summary.json"  # written by anllm.train.runner when a run ends


@dataclass
class Results:
    """What the study has measured so far (the report is written from this)."""

    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    chosen: str | None = None
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    recall: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    qa: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Evidence II: named sweeps of arm options (window, distillation weight) and their winners,
    # the final equal-cache perplexity sets per arm, and the long-range tasks.
    sweeps: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    final: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    longrange: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # stage key (``arms/<arm>``, ``final/<arm>/<set>``, ``recall/<arm>``, ``sweep-window/w64`` ...) ->
    # the settings it was measured with; a stage recorded with the same settings is not run again.
    done: dict[str, Any] = field(default_factory=dict)


def finished(out: Path, steps: int | None) -> bool:
    """The run's summary exists (and, when given, it reached ``steps``)."""
    summary = out / SUMMARY
    if not summary.is_file():
        return False
    return steps is None or int(json.loads(summary.read_text()).get("global_step", -1)) >= steps


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the run's complete checkpoints, oldest first."""
    from ..train.checkpoints import checkpoint_dirs, is_complete

    return [(step, p) for step, p in checkpoint_dirs(out) if is_complete(p)]


def tokens_seen(path: Path) -> int:
    """Tokens trained at a checkpoint (its completion marker) or at the end of a run (its summary)."""
    from ..train.checkpoints import MARKER

    for name, key in ((MARKER, "num_input_tokens_seen"), (SUMMARY, "num_input_tokens_seen")):
        f = path / name
        if f.is_file():
            return int(json.loads(f.read_text()).get(key) or 0)
    return 0
