"""The study's ``summary.json``: every measured number in one document (the report and checks read it)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..eval.methods import runnable_methods

if TYPE_CHECKING:
    from .report import Study


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def summary(study: Study) -> dict[str, Any]:
    r = study.results
    arms = {}
    for arm, c in r.arms.items():
        arms[arm] = {"status": "done", "tokens": c["tokens"], "steps": c["steps"], "ppl": c["ppl"], "c_red": c.get("c_red"),
                     "distill": c.get("distill"),
                     "budget": c.get("budget"), "train_s": c.get("train_s"), "exp": c.get("exp"),
                     "overrides": c.get("overrides"), **_levers(study, arm),
                     "max_kv": (c["rows"][-1].get("anchor") or {}).get("max_kv")}
    for arm in study.settings.arms:  # configured but not measured yet: same keys, empty curves
        if arm not in arms:
            methods, _ = runnable_methods(list(study.settings.ppl.methods), study.anchored(arm))
            arms[arm] = {"status": "pending", "tokens": [], "steps": [], "ppl": {m: [] for m in methods}, "c_red": None,
                         "budget": None, "train_s": None, "exp": str(study.settings.arm_specs[arm].exp), "overrides": None,
                         **_levers(study, arm), "max_kv": None}
    recall: dict[str, Any] = {}
    order = [a for a in study.settings.arms if a in r.recall] + [a for a in r.recall if a not in study.settings.arms]
    for arm, rows in ((a, r.recall[a]) for a in order):  # configured arm order, not the order they ran in
        for row in sorted(rows, key=lambda x: _rank(x["method"])):  # the report's method order, not the run order
            m = recall.setdefault(arm, {}).setdefault(row["method"], {"k": [], "acc": [], "c_red": [], "budget": [], "n": row["n"]})
            m["k"].append(row["distance"])
            m["acc"].append(row["acc"])
            m["c_red"].append(row["c_red"])
            m["budget"].append(row["budget"])
    qa: dict[str, Any] = {}
    for arm, rows in r.qa.items():
        for row in rows:
            if row.get("method") == "error" or "acc" not in row:
                continue
            qa.setdefault(arm, {}).setdefault(row["task"], {})[row["method"]] = {
                k: row.get(k) for k in ("acc", "acc_norm", "c_red", "max_kv", "n", "num_fewshot")}
    timings = study.timings()
    final = {arm: {name: {r["method"]: {k: r.get(k) for k in (
                "ppl", "ppl_tail", "mean_kv", "peak_kv", "max_kv", "c_red", "n", "dlogppl_vs_anchor", "dlogppl_se", "tokens_tail",
                "per_doc_nll", "per_doc_nll_tail", "offset_bins", "offset_tokens", "offset_nll", "offset_dnll_vs_anchor",
                "offset_dnll_se") if k in r or not k.startswith("offset")} for r in rows if "ppl" in r}
                   for name, rows in sets.items()} for arm, sets in r.final.items()}
    longrange: dict[str, Any] = {}
    for arm, rows in r.longrange.items():
        for row in rows:
            if "acc" not in row:
                continue
            cell = longrange.setdefault(arm, {}).setdefault(row["task"], {}).setdefault(row["method"], [])
            cell.append({k: row.get(k) for k in ("length", "depth", "acc", "se", "n", "c_red", "budget", "mean_kv")})
    return {
        "study": str(study.settings.name),
        "title": str(study.settings.get("title") or "Do anchors learn? The anchor-learning study"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": command(study),
        "model": str(study.settings.model),
        "block_size": int(study.settings.block_size),
        "tokens_per_arm": int(study.settings.tokens),
        "data": {k: v for k, v in study.data.items() if k != "base_dir"},
        "num_choices": int(study.settings.recall.get("num_choices") or 4),
        "qa_shots": int(study.settings.qa.num_fewshot),
        "sweep": r.sweep,
        "chosen": r.chosen,
        "arms": arms,
        "recall": recall,
        "qa": qa,
        "sweeps": r.sweeps,
        "choices": r.choices,
        "final": final,
        "final_sets": final_sets(study),
        "longrange": longrange,
        "timings_s": timings,
        "wall_s": round(sum(timings.values()), 1),
    }


def _levers(study: Study, arm: str) -> dict[str, Any]:
    """The arm's own overrides and the sweeps it ``uses`` (which arms differ by one lever; None: not configured)."""
    spec = study.settings.arm_specs.get(arm)
    if spec is None:
        return {"own_overrides": None, "uses": None}
    return {"own_overrides": list(spec.overrides or []), "uses": list(spec.get("uses") or [])}


def _rank(method: str) -> int:
    from .titles import PPL_ORDER

    return PPL_ORDER.index(method) if method in PPL_ORDER else len(PPL_ORDER)


def command(study: Study) -> str:
    args = [a for a in sys.argv[1:]] if sys.argv and sys.argv[0].endswith("study.py") else [f"study={study.settings.name}"]
    return ".venv/bin/python study.py " + " ".join(args) if args else "make study"


def final_sets(study: Study) -> dict[str, dict[str, Any]]:
    """Each final set's length, size and tail start, so the report can say which sets read past the
    training block (how the trained cache extrapolates) and where each tail starts."""
    return {str(name): {"max_tokens": int(f.max_tokens), "num_documents": int(f.num_documents),
                        "tail_from": int(f.tail_from) if f.get("tail_from") else None}
            for name, f in (study.settings.get("final") or {}).items()}
