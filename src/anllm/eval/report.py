"""Results: per-task files (saved as tasks finish, for resuming), one JSON per run, Markdown + CSV tables.

Table shapes follow the paper: QA as Table 1 (one row per method, one accuracy column per task, then
Avg, C⇓ and T⇑; one table per few-shot setting) plus a per-task detail table; other suites as long
tables (one row per task and method) with the well-known columns below, in this order.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

# column key -> (header, formatter)
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _f1(x: float) -> str:
    return f"{x:.1f}"


def _f2(x: float) -> str:
    return f"{x:.2f}"


COLUMNS: dict[str, tuple[str, Any]] = {
    "acc": ("Acc", _pct),
    "se": ("±SE", _pct),
    "acc_norm": ("AccNorm", _pct),
    "bleu": ("BLEU", _f1),
    "chrf": ("chrF", _f1),
    "comet": ("COMET", _f1),
    "ppl": ("PPL", _f2),
    "nll": ("NLL", lambda x: f"{x:.3f}"),
    "c_red": ("C⇓ %", _pct),
    "c_red_peak": ("C⇓ peak %", _pct),
    "max_kv": ("MaxKV", _f1),
    "peak_kv": ("PeakKV", _f1),
    "kv_kept": ("KV kept", str),
    "kv_total": ("KV total", str),
    "time_s": ("Time s", _f2),
    "t_up": ("T⇑", lambda x: f"{x:.2f}×"),
    "t_up_stock": ("T⇑ stock", lambda x: f"{x:.2f}×"),
    "tokens_per_s": ("tok/s", _f1),
    "agree": ("Agree %", _pct),
    "num_fewshot": ("Shots", str),
    "distance": ("k", str),
    "length": ("Len", str),
    "depth": ("Depth", lambda x: f"{x:g}"),
    "budget": ("Budget", str),
    "n": ("N", str),
}
QA_CAPTION = (
    "Acc: lm-eval `acc`. C⇓: 1 − kept/total KV entries when the choices are scored (mean over tasks). "
    "T⇑: time(full)/time(method), against our full cache whose context is prefilled once and shared by the "
    "choices; T⇑ stock: time(stock)/time(method), against lm-eval's stock per-request forward that recomputes "
    "the context for every choice (the paper's baseline). Scoring compute on the same examples, modes run "
    "batch by batch side by side after a warm-up. full = causal attention with a full cache; ansan = AnSAN mask over "
    "whole sequences (no cache); anchor = AnSAN + anchor-pruned cache (prefill once, score every choice); "
    "streamingllm/knorm and the kvpress presses (snapkv, tova, observed_attention, expected_attention, pyramidkv, "
    "...) = causal attention with the context cache compressed once (NVIDIA kvpress) to the anchor cache's size, "
    "per example. "
    "streamingllm_stream = StreamingLLM bounded from the start: every token attends at most the anchor reading's "
    "peak keys (sinks + most recent); _q: as many keys per token as under AnSAN. MaxKV: the largest cache a choice "
    "is scored against; PeakKV: the most keys held at any point while reading and scoring (compress-once "
    "baselines: the full context, prefilled before compression; streaming: the budget), means over examples. "
    "Avg only when every task has a value."
)
CAPTIONS = {
    "translation": (
        "C⇓: 1 − kept/seen keys/values at the end of each segment. C⇓ peak: 1 − MaxKV/seen, MaxKV = the largest "
        "cache held at any point of the segment (prefill chunks included): the paper's MaxKV-based definition. "
        "anchor = the source cache dropped; anchor+src = the prompt (or, with translation.src_cache=source, the "
        "source span) kept."
    ),
    "ppl": (
        "C⇓: 1 − kept/seen keys/values after each document; MaxKV: peak kept between chunks. sentence = AnSAN with "
        "earlier anchors hidden (control); streamingllm/knorm: every token attends at most Budget keys (the anchor "
        "cache's peak per document)."
    ),
    "recall": (
        "Accuracy: the fact's value ranked first among the choices, k sentences after the fact. C⇓: 1 − kept/seen "
        "keys when the value is predicted. streamingllm/knorm: every token attends at most Budget keys (the anchor "
        "reading's peak); kvpress presses (snapkv, tova, ...): the text before the cue's last token read in full, "
        "its cache compressed once to the anchor cache's size (Budget)."
    ),
    "longrange": (
        "Acc: teacher-forced exact match (every answer token the model's argmax, i.e. greedy decoding gives the "
        "answer) ± its binomial standard error. Len: context tokens N; Depth: the pass key's relative position. "
        "C⇓: 1 − kept/seen keys when the first answer token is predicted; streamingllm: every token attends at most "
        "Budget keys (the anchor reading's peak); streamingllm_q: as many keys per token as the anchor reading; "
        "kvpress presses (snapkv, tova, ...): the context read in full, its cache compressed once to the anchor "
        "cache's size at the answer (Budget)."
    ),
}
def _method_order() -> tuple[str, ...]:
    from .methods import REGISTRY

    first = ("full", "stock", "ansan", "anchor", "anchor+src", "sentence", "streamingllm", "knorm",
             "streamingllm_stream", "streamingllm_stream_q")
    return first + tuple(m.name for m in REGISTRY if m.kind == "press")  # then the kvpress presses, in registry order


METHOD_ORDER = _method_order()


# ---- per-task files ---------------------------------------------------------------------------

def fingerprint(settings: dict[str, Any]) -> str:
    """Short hash of the settings that determine a task's results (resume only when equal)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_file(output_dir: Path, suite: str, task: str) -> Path:
    return output_dir / "tasks" / suite / f"{task}.json"


def save_task(path: Path, record: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves a half file that a resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(record), indent=1))
    tmp.replace(path)


def load_task(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _clean(x: Any) -> Any:
    """JSON-safe values (NaN -> None, numpy/torch scalars -> float)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if hasattr(x, "item") and callable(x.item):
        return _clean(x.item())
    return x


# ---- tables ---------------------------------------------------------------------------------

def _method_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, (int, float)) and key in COLUMNS:
        return COLUMNS[key][1](value)
    return str(value)


class Table:
    """A titled table with raw values (for CSV) and formatted cells (for Markdown)."""

    def __init__(
        self, name: str, title: str, headers: list[str], rows: list[list[Any]], keys: list[str], caption: str = ""
    ):
        self.name, self.title, self.headers, self.rows, self.keys = name, title, headers, rows, keys
        self.caption = caption

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|")
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(k, v) for k, v in zip(self.keys, r)) + " |")
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.headers)
        for r in self.rows:
            w.writerow(["" if v is None else v for v in r])
        return buf.getvalue()


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def qa_tables(rows: list[dict[str, Any]], task_order: Iterable[str], short: dict[str, str]) -> list[Table]:
    """Paper Table 1 shape per few-shot setting, then one detail table."""
    qa = [r for r in rows if r.get("suite") == "qa"]
    if not qa:
        return []
    tables = []
    tasks = [t for t in task_order if any(r["task"] == t for r in qa)]
    for k in sorted({r.get("num_fewshot") for r in qa if r.get("method") != "error"}, key=lambda v: (v is None, v)):
        sub = [r for r in qa if r.get("num_fewshot") == k and r.get("method") != "error"]
        methods = sorted({r["method"] for r in sub}, key=_method_key)
        body = []
        for m in methods:
            found = [next((x for x in sub if x["task"] == t and x["method"] == m), None) for t in tasks]
            accs = [r["acc"] for r in found if r is not None and r.get("acc") is not None]
            avg = sum(accs) / len(accs) if accs and len(accs) == len(tasks) else None
            means = [_mean(r.get(k) for r in found if r is not None) for k in ("c_red", "t_up", "t_up_stock")]
            body.append([m] + [None if r is None else r.get("acc") for r in found] + [avg] + means)
        headers = ["Method"] + [short.get(t, t) for t in tasks] + ["Avg", "C⇓ %", "T⇑", "T⇑ stock"]
        keys = ["method"] + ["acc"] * len(tasks) + ["acc", "c_red", "t_up", "t_up_stock"]
        tables.append(Table(f"qa_{k}shot", f"QA, {k}-shot: accuracy (%), cache reduction, speed-up", headers, body, keys,
                            caption=QA_CAPTION))
    detail_keys = ["acc", "acc_norm", "c_red", "max_kv", "peak_kv", "time_s", "t_up", "t_up_stock", "agree", "n"]
    body = []
    for r in sorted(qa, key=lambda r: (r.get("num_fewshot") or 0, list(tasks).index(r["task"]) if r["task"] in tasks else 99, _method_key(r["method"]))):
        body.append([r["task"], r.get("num_fewshot"), r["method"]] + [r.get(k) for k in detail_keys] + [r.get("note") or r.get("error")])
    headers = ["Task", "Shots", "Method"] + [COLUMNS[k][0] for k in detail_keys] + ["Note"]
    tables.append(Table("qa_details", "QA per task", headers, body, ["task", "num_fewshot", "method"] + detail_keys + ["note"]))
    return tables


def long_table(suite: str, rows: list[dict[str, Any]]) -> Table | None:
    """Generic table for a suite: task, method, then every well-known column any row has."""
    sub = [r for r in rows if r.get("suite") == suite]
    if not sub:
        return None
    keys = [k for k in COLUMNS if any(r.get(k) is not None for r in sub)]
    body = [
        [r["task"], r["method"]] + [r.get(k) for k in keys] + [r.get("note") or r.get("error")]
        for r in sorted(sub, key=lambda r: (r["task"], _method_key(r["method"])))
    ]
    headers = ["Task", "Method"] + [COLUMNS[k][0] for k in keys] + ["Note"]
    return Table(suite, f"{suite}", headers, body, ["task", "method"] + keys + ["note"], caption=CAPTIONS.get(suite, ""))


def build_tables(rows: list[dict[str, Any]], suites: list[str]) -> list[Table]:
    from .tasks import QA_TASKS, PAPER_ORDER

    tables: list[Table] = []
    for s in suites:
        if s == "qa":
            tables += qa_tables(rows, PAPER_ORDER, {k: v.short for k, v in QA_TASKS.items()})
        else:
            t = long_table(s, rows)
            if t is not None:
                tables.append(t)
    return tables


def plot_qa(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy vs C⇓, one point per (task, method), one marker per method (PNG)."""
    qa = [r for r in rows if r.get("suite") == "qa" and r.get("acc") is not None and r.get("c_red") is not None]
    if not qa:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = "os^Dvx*+"
    for i, m in enumerate(sorted({r["method"] for r in qa}, key=_method_key)):
        pts = [r for r in qa if r["method"] == m]
        ax.scatter([100 * r["c_red"] for r in pts], [100 * r["acc"] for r in pts], marker=markers[i % len(markers)], label=m)
        for r in pts:
            ax.annotate(f"{r['task']}/{r.get('num_fewshot', 0)}", (100 * r["c_red"], 100 * r["acc"]), fontsize=6, alpha=0.6)
    ax.set_xlabel("KV cache reduction C⇓ (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("QA: accuracy vs cache reduction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    output_dir: Path, run_info: dict[str, Any], rows: list[dict[str, Any]], suites: list[str], notes: list[str]
) -> str:
    """Write ``results.json``, ``results.md`` and one CSV per table; return the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(rows, suites)
    errors = [r for r in rows if r.get("method") == "error"]
    md = [f"## Evaluation of `{run_info.get('checkpoint')}`", ""]
    md.append(f"Model: {run_info.get('model_desc', '')}")
    md.append("")
    for t in tables:
        md += [t.markdown(), ""]
        (output_dir / f"results_{t.name}.csv").write_text(t.csv())
    if "qa" in suites:
        try:
            png = plot_qa(rows, output_dir / "qa_acc_vs_cred.png")
        except Exception as e:  # a plot must never cost the results
            png, notes = None, notes + [f"plot failed: {e}"]
        if png is not None:
            md += [f"![accuracy vs C⇓]({png.name})", ""]
    if errors:
        md.append("Failed tasks (re-run with the same output_dir to retry only these):")
        md += [f"- {r['suite']}/{r['task']}: {r.get('error')}" for r in errors]
        md.append("")
    if notes:
        md.append("Notes:")
        md += [f"- {n}" for n in notes]
        md.append("")
    text = "\n".join(md)
    (output_dir / "results.md").write_text(text)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload = _clean({**run_info, "notes": notes, "rows": rows, "finished": stamp})
    (output_dir / "results.json").write_text(json.dumps(payload, indent=1))
    runs = output_dir / "runs"
    runs.mkdir(exist_ok=True)
    (runs / f"results-{stamp}.json").write_text(json.dumps(payload, indent=1))
    return text
