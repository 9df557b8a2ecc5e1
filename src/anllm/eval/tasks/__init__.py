"""The paper's eight QA tasks as lm-eval tasks: from the HF hub, or offline from ``data_dir/qa``.

Offline tasks are lm-eval *custom task YAMLs* written at run time: each ``include``s lm-eval's own
installed YAML for that task name (so prompts, choices, preprocessing such as HellaSwag's and
WinoGrande's partial scoring, and metrics are lm-eval's, not a copy) and only swaps the data source
for ``dataset_path: json`` + ``data_files`` pointing at the staged original files. Few-shot
demonstrations come from ``qa/olmes_5shot_prefixes.json`` (the train splits are not staged): the
fixed OLMES demonstrations are turned back into documents of each task's own schema and rendered by
lm-eval's own few-shot code (``sampler: first_n``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fewshot import MAX_LOCAL_SHOTS, write_fewshot_docs


@dataclass(frozen=True)
class QATask:
    name: str  # lm-eval task name
    short: str  # the paper's column name
    yaml: str  # lm-eval's YAML, relative to lm_eval/tasks
    local_split: str  # the staged split evaluated offline ("test" where lm-eval uses test)
    hub_split: str  # the split lm-eval evaluates from the hub
    overrides: dict[str, Any] = field(default_factory=dict)  # offline only (field names of the staged files)
    note: str = ""


QA_TASKS: dict[str, QATask] = {
    t.name: t
    for t in (
        QATask("openbookqa", "OBQA", "openbookqa/openbookqa.yaml", "test", "test"),
        QATask("winogrande", "WG", "winogrande/default.yaml", "validation", "validation"),
        QATask("arc_easy", "ARC-e", "arc/arc_easy.yaml", "test", "test"),
        QATask("arc_challenge", "ARC-c", "arc/arc_challenge.yaml", "test", "test"),
        QATask("piqa", "PIQA", "piqa/piqa.yaml", "validation", "validation"),
        QATask("hellaswag", "HS", "hellaswag/hellaswag.yaml", "validation", "validation"),
        QATask(
            "sciq", "SciQ", "sciq/sciq.yaml", "validation", "test",
            note="SciQ test split not staged: offline runs use the validation split (lm-eval uses test)",
        ),
        # The staged BoolQ (HF "boolq") has a bool `answer`; lm-eval's super_glue copy has int `label`.
        QATask(
            "boolq", "BoolQ", "super_glue/boolq/default.yaml", "validation", "validation",
            overrides={"doc_to_target": "{{ 1 if answer else 0 }}"},
        ),
    )
}
PAPER_ORDER = tuple(QA_TASKS)


def lm_eval_task_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def get_task(name: str) -> QATask:
    if name not in QA_TASKS:
        raise ValueError(f"Unknown QA task {name!r}: choose from {list(QA_TASKS)}.")
    return QA_TASKS[name]


def installed_yaml(task: QATask) -> Path:
    path = lm_eval_task_dir() / task.yaml
    if not path.is_file():
        raise FileNotFoundError(
            f"lm-eval's task file for {task.name!r} is missing at {path}: this lm-eval version lays out its "
            "tasks differently; update anllm.eval.tasks.QA_TASKS."
        )
    return path


def local_data_file(task: QATask, data_dir: str | Path) -> Path:
    """The staged file a local task reads, with a clear error naming the fix."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} does not exist: pass data_dir=../shared/data (or source=hub).")
    path = root / "qa" / task.name / f"{task.local_split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"Task {task.name!r} needs {path} (see shared/data/SOURCES.md section 5). Check data_dir={str(data_dir)!r}."
        )
    return path


def task_spec(name: str, source: str, data_dir: str | Path | None, num_fewshot: int, work_dir: Path) -> str:
    """Path of the lm-eval YAML to load for ``name`` (``source`` is ``local`` or ``hub``)."""
    task = get_task(name)
    base = installed_yaml(task)
    if source == "hub":
        return str(base)
    if source != "local":
        raise ValueError(f"Unknown QA source {source!r}: choose 'local', 'hub' or 'auto'.")
    if data_dir is None:
        raise ValueError("Offline QA tasks need data_dir (e.g. data_dir=../shared/data), or use qa.source=hub.")
    data = local_data_file(task, data_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "include": str(base),
        "task": task.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.local_split: str(data.resolve())}},
        "training_split": None,
        "validation_split": "validation" if task.local_split == "validation" else None,
        "test_split": "test" if task.local_split == "test" else None,
        **task.overrides,
    }
    if num_fewshot > 0:
        if num_fewshot > MAX_LOCAL_SHOTS:
            raise ValueError(
                f"Offline few-shot has only the {MAX_LOCAL_SHOTS} OLMES demonstrations per task "
                f"(qa/olmes_5shot_prefixes.json); num_fewshot={num_fewshot} needs the hub's train split (qa.source=hub)."
            )
        shots = write_fewshot_docs(task.name, Path(data_dir) / "qa" / "olmes_5shot_prefixes.json", work_dir)
        spec["dataset_kwargs"]["data_files"]["train"] = str(shots.resolve())
        spec["fewshot_split"] = "train"
        spec["fewshot_config"] = {"sampler": "first_n"}
    out = work_dir / f"{task.name}_{num_fewshot}shot.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(out)


def load_task(name: str, source: str, data_dir: str | Path | None, num_fewshot: int, work_dir: Path) -> Any:
    """The lm-eval ``Task`` object for ``name`` (for inspection and tests; runs use the spec path)."""
    from lm_eval.tasks import TaskManager

    spec = task_spec(name, source, data_dir, num_fewshot, work_dir)
    task = TaskManager(include_defaults=False).load([spec])["tasks"][name]
    if num_fewshot:
        task.set_config(key="num_fewshot", value=num_fewshot)
    return task
