"""Print the markdown tables of experiments/field/README.md from the evaluate.py outputs.

    python experiments/field/make_tables.py outputs/field/w32-qa outputs/field/w32-recall
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def paired(pred_file: Path, method: str, ref: str = "anchor") -> tuple[float, float] | None:
    """Accuracy of ``method`` minus ``ref`` on the same items (points) and its standard error."""
    if not pred_file.is_file():
        return None
    diffs = []
    for line in pred_file.read_text().splitlines():
        p = json.loads(line)
        if method not in p or ref not in p:
            return None
        diffs.append(float(p[method]["pred"] == p["target"]) - float(p[ref]["pred"] == p["target"]))
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return 100 * mean, 100 * math.sqrt(var / n)


def qa_table(out_dir: Path) -> str:
    lines = []
    for path in sorted((out_dir / "tasks" / "qa").glob("*.json")):
        d = json.loads(path.read_text())
        if d.get("status") not in (None, "done", "ok", "complete"):
            continue
        lines += [f"**{d['task']}** ({d['rows'][0]['num_fewshot']}-shot, {d['rows'][0]['n']} items, "
                  f"split {d['rows'][0]['split']})", "",
                  "| method | acc % | ± s.e. | − anchor (paired) | acc_norm % | C⇓ % | kept KV (mean) | peak KV | agrees with full | time s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        preds = out_dir / "tasks" / "qa" / d["task"] / f"predictions_{d['rows'][0]['num_fewshot']}shot.jsonl"
        for r in d["rows"]:
            se = 100 * math.sqrt(r["acc"] * (1 - r["acc"]) / r["n"])
            agree = "" if r.get("agree") is None else f"{100 * r['agree']:.1f}"
            pd = paired(preds, r["method"]) if r["method"] != "anchor" else None
            delta = "" if pd is None else f"{pd[0]:+.1f} ± {pd[1]:.1f}"
            norm = "–" if r.get("acc_norm") is None else f"{100 * r['acc_norm']:.1f}"  # BoolQ has no acc_norm
            lines.append(f"| {r['method']} | {100 * r['acc']:.1f} | {se:.1f} | {delta} | {norm} | "
                         f"{100 * r['c_red']:.1f} | {r['max_kv']:.1f} | {r['peak_kv']:.1f} | {agree} | {r['time_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def recall_table(out_dir: Path) -> str:
    files = sorted((out_dir / "tasks").rglob("*.json"))
    lines = []
    for path in files:
        d = json.loads(path.read_text())
        rows = d.get("rows") or []
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("suite", "task", "note")]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(qa_table(Path(sys.argv[1])))
    if len(sys.argv) > 2:
        print(recall_table(Path(sys.argv[2])))
