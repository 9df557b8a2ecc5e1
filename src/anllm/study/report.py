"""The study's report: ``summary.json`` (read by checks), ``README.md`` (tables, figures, conclusion), PNGs.

Written from :class:`~anllm.study.results.Results` after every stage, so a partial study already has
a report of what it has measured. Facts that can be computed (ratios, targets met or missed, who
wins recall at long distance) are written here; the discussion of *why* lives in a hand-written
``conclusion.md`` next to the README, which is included when present.

The parts: :mod:`.summary` (the numbers), :mod:`.figures`, :mod:`.findings` (computed facts),
:mod:`.markdown` (the README), :mod:`.titles` (names and method order, from the evaluation registry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from .figures import plot
from .markdown import markdown
from .summary import summary


class Study(Protocol):
    """What the report reads of a study (:class:`anllm.study.runner.Study` is one; the report does not
    import the runner, so the two never import each other)."""

    settings: Any  # the config's ``study`` section
    results: Any
    report_dir: Path
    data: dict[str, Any]

    def timings(self) -> dict[str, float]: ...

    def anchored(self, arm: str) -> bool: ...


def write_report(study: Study) -> Path:
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    s = summary(study)
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    figures = plot(s, out)
    (out / "README.md").write_text(markdown(s, figures, out), encoding="utf-8")
    return out
