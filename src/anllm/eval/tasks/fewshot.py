"""Turn the fixed OLMES 5-shot prefixes back into documents of each task's own schema.

Why documents and not the prefix string: lm-eval then renders the demonstrations with the task's own
``doc_to_text``/``doc_to_target`` and few-shot delimiter, so 0-shot and 5-shot prompts have lm-eval's
format for that task (OLMES's own format differs for PIQA and OpenBookQA, e.g. "Goal:").
Each parser recovers the fields that lm-eval's template reads; for WinoGrande and HellaSwag any split
point renders the same demonstration text, since lm-eval joins the parts with one space.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

MAX_LOCAL_SHOTS = 5
_QA = re.compile(r"(?:Question|Goal): (?P<q>.*)\nAnswer: (?P<a>.*)", re.S)
_BOOLQ = re.compile(r"(?P<p>.*)\nQuestion: (?P<q>.*?)\??\nAnswer: (?P<a>yes|no)", re.S)


def _match(rx: re.Pattern[str], block: str, task: str) -> re.Match[str]:
    m = rx.fullmatch(block)
    if m is None:
        raise ValueError(f"Unexpected OLMES demonstration format for {task}: {block[:120]!r}")
    return m


def _arc(block: str, i: int, task: str) -> dict[str, Any]:
    m = _match(_QA, block, task)
    return {"id": f"olmes-{i}", "question": m["q"], "choices": {"text": [m["a"]], "label": ["A"]}, "answerKey": "A"}


def _obqa(block: str, i: int, task: str) -> dict[str, Any]:
    m = _match(_QA, block, task)
    return {"id": f"olmes-{i}", "question_stem": m["q"], "choices": {"text": [m["a"]], "label": ["A"]}, "answerKey": "A"}


def _piqa(block: str, i: int, task: str) -> dict[str, Any]:
    m = _match(_QA, block, task)
    return {"goal": m["q"], "sol1": m["a"], "sol2": m["a"], "label": 0}


def _sciq(block: str, i: int, task: str) -> dict[str, Any]:
    m = _match(_QA, block, task)
    d = {f"distractor{k}": "" for k in (1, 2, 3)}
    return {"question": m["q"], **d, "correct_answer": m["a"], "support": ""}


def _boolq(block: str, i: int, task: str) -> dict[str, Any]:
    m = _match(_BOOLQ, block, task)
    return {"passage": m["p"], "question": m["q"], "answer": m["a"] == "yes"}


def _hellaswag(block: str, i: int, task: str) -> dict[str, Any]:
    label, sep, rest = block.partition(": ")
    if not sep or " " not in rest:
        raise ValueError(f"Unexpected OLMES demonstration format for {task}: {block[:120]!r}")
    ctx, ending = rest.rsplit(" ", 1)
    return {"activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "endings": [ending], "label": "0"}


def _winogrande(block: str, i: int, task: str) -> dict[str, Any]:
    first, sep, rest = block.partition(" ")
    if not sep:
        raise ValueError(f"Unexpected OLMES demonstration format for {task}: {block[:120]!r}")
    return {"sentence": "_ " + rest, "option1": first, "option2": first, "answer": "1"}


PARSERS: dict[str, Callable[[str, int, str], dict[str, Any]]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _obqa,
    "piqa": _piqa,
    "sciq": _sciq,
    "boolq": _boolq,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
}


def fewshot_docs(task: str, prefixes_file: str | Path) -> list[dict[str, Any]]:
    """The OLMES demonstrations of ``task`` as documents in lm-eval's schema for that task."""
    path = Path(prefixes_file)
    if not path.is_file():
        raise FileNotFoundError(f"Few-shot needs {path} (shared/data/qa/olmes_5shot_prefixes.json); check data_dir.")
    entry = json.loads(path.read_text()).get(task)
    if entry is None:
        raise ValueError(f"{path} has no few-shot prefix for {task!r}.")
    blocks = [b for b in entry["fewshot_prefix"].split("\n\n") if b.strip()]
    if len(blocks) != entry.get("num_shots", MAX_LOCAL_SHOTS):
        raise ValueError(f"Expected {entry.get('num_shots')} demonstrations for {task}, found {len(blocks)}.")
    return [PARSERS[task](b, i, task) for i, b in enumerate(blocks)]


def write_fewshot_docs(task: str, prefixes_file: str | Path, work_dir: Path) -> Path:
    out = work_dir / f"{task}_fewshot.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in fewshot_docs(task, prefixes_file)))
    return out
