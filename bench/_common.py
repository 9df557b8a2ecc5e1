"""Shared plumbing for the benchmarks: side-by-side timing, machine info, tables, JSON results.

Every benchmark compares candidates *in one process, interleaved*: each repeat runs every candidate
once (in rotating order), so background load and CPU frequency drift hit all of them alike. We report
medians and ratios of medians, never absolute numbers from different runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ANLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers (and to rerun them)."""
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def time_side_by_side(
    candidates: dict[str, Callable[[], Any]], warmup: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call for each candidate, interleaved (rotating order) after ``warmup`` rounds."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table when rich is installed, else plain aligned text."""
    cells = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [
            max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
            for i, h in enumerate(columns)
        ]
        print(f"\n{title}")
        print("  ".join(h.rjust(w) for h, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left")
    for h in columns:
        table.add_column(h, justify="right")
    for r in cells:
        table.add_row(*r)
    Console(width=200).print(table)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def write_results(name: str, machine: dict[str, Any], payload: dict[str, Any]) -> Path:
    """``bench/results/<name>.json`` with machine info (taken at the start of the run) first.

    ``name`` may also be a file path (it ends in ``.json`` or contains a ``/``), inside the repository or
    not: the file is written there and the path is printed as given. The file is replaced
    atomically, so a run killed while writing leaves the previous version.
    """
    as_path = name.endswith(".json") or os.sep in name or "/" in name
    path = Path(name).expanduser() if as_path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "loadavg_at_end": list(os.getloadavg())}
    text = json.dumps({"benchmark": path.stem, "machine": machine, **payload}, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"\nwrote {name if as_path else path.relative_to(REPO)}")
    return path


def setup_threads(threads: int | None) -> None:
    """Use every core by default (the lead runs the final numbers on a quiet machine)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def prose(min_chars: int, title: str = "Pride and Prejudice", first_chunk: int = 1) -> str:
    """Real English prose: consecutive ~8k-character chunks of one Gutenberg book from the shared data
    (read in place), joined until ``min_chars`` is reached."""
    path = SHARED_DATA / "pretrain_text" / "gutenberg_books.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: set ANLLM_SHARED_DATA to the shared data directory.")
    parts: list[str] = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            meta = row["meta"]
            if meta["title"] == title and meta["chunk"] >= first_chunk:
                parts.append(row["text"])
                if sum(map(len, parts)) >= min_chars:
                    return "\n\n".join(parts)
    raise SystemExit(f"Not enough text in {title!r} for {min_chars} characters.")


def load_smollm2(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M as a plain HF model (eval mode) + tokenizer that takes prompts of any length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anllm.models.smollm2 import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path, model_max_length=1_000_000)  # benchmarks slice prompts themselves
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval(), tok
