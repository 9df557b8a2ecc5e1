"""The study's report: ``summary.json`` (read by checks), ``README.md`` (tables, figures, conclusion), PNGs.

Written from :class:`~anllm.study.runner.Results` after every stage, so a partial study already has
a report of what it has measured. Facts that can be computed (ratios, targets met or missed, who
wins recall at long distance) are written here; the discussion of *why* lives in a hand-written
``conclusion.md`` next to the README, which is included when present.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from ..eval.methods import runnable_methods


class Study(Protocol):
    """What the report reads of a study (:class:`anllm.study.runner.Study` is one; the report does not
    import the runner, so the two never import each other)."""

    s: Any
    results: Any
    report_dir: Path
    data: dict[str, Any]

    def timings(self) -> dict[str, float]: ...

    def anchored(self, arm: str) -> bool: ...

PPL_ORDER = ("full", "anchor", "sentence", "streamingllm", "streamingllm_q", "knorm")
ARM_TITLES = {"baseline": "baseline (full attention)", "ep": "AnLLM-EP", "ac": "AnLLM-AC", "ac_sink": "AnLLM-AC + 4 sinks",
              "ac_sink_window": "AC + sinks + window", "ac_sink_distill": "AC + sinks + distillation",
              "ac_sink_window_distill": "AC + sinks + window + distillation"}
METHOD_TITLES = {"full": "full attention", "anchor": "anchor (AnchorCache)", "sentence": "sentence only (control)",
                 "streamingllm": "StreamingLLM, same peak cache", "streamingllm_q": "StreamingLLM, same keys per query",
                 "knorm": "K-norm, same cache", "ansan": "AnSAN mask (no cache)"}
STYLES = {"full": ("k", "-"), "anchor": ("tab:blue", "-"), "sentence": ("tab:gray", ":"),
          "streamingllm": ("tab:orange", "--"), "streamingllm_q": ("tab:red", "--"), "knorm": ("tab:green", "-.")}
RATIO_TARGET = 1.25


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
                     "overrides": c.get("overrides"),
                     "max_kv": (c["rows"][-1].get("anchor") or {}).get("max_kv")}
    for arm in study.s.arms:  # configured but not measured yet: same keys, empty curves
        if arm not in arms:
            methods, _ = runnable_methods(list(study.s.ppl.methods), study.anchored(arm))
            arms[arm] = {"status": "pending", "tokens": [], "steps": [], "ppl": {m: [] for m in methods}, "c_red": None,
                         "budget": None, "train_s": None, "exp": str(study.s.arm_specs[arm].exp), "overrides": None, "max_kv": None}
    recall: dict[str, Any] = {}
    order = [a for a in study.s.arms if a in r.recall] + [a for a in r.recall if a not in study.s.arms]
    for arm, rows in ((a, r.recall[a]) for a in order):  # configured arm order, not the order they ran in
        for row in rows:
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
                "per_doc_nll", "per_doc_nll_tail")} for r in rows if "ppl" in r}
                   for name, rows in sets.items()} for arm, sets in r.final.items()}
    longrange: dict[str, Any] = {}
    for arm, rows in r.longrange.items():
        for row in rows:
            if "acc" not in row:
                continue
            cell = longrange.setdefault(arm, {}).setdefault(row["task"], {}).setdefault(row["method"], [])
            cell.append({k: row.get(k) for k in ("length", "depth", "acc", "se", "n", "c_red", "budget", "mean_kv")})
    return {
        "study": str(study.s.name),
        "title": str(study.s.get("title") or "Do anchors learn? The anchor-learning study"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": command(study),
        "model": str(study.s.model),
        "block_size": int(study.s.block_size),
        "tokens_per_arm": int(study.s.tokens),
        "data": {k: v for k, v in study.data.items() if k != "base_dir"},
        "num_choices": int(study.s.recall.get("num_choices") or 4),
        "qa_shots": int(study.s.qa.num_fewshot),
        "sweep": r.sweep,
        "chosen": r.chosen,
        "arms": arms,
        "recall": recall,
        "qa": qa,
        "sweeps": r.sweeps,
        "choices": r.choices,
        "final": final,
        "longrange": longrange,
        "timings_s": timings,
        "wall_s": round(sum(timings.values()), 1),
    }


def command(study: Study) -> str:
    args = [a for a in sys.argv[1:]] if sys.argv and sys.argv[0].endswith("study.py") else [f"study={study.s.name}"]
    return ".venv/bin/python study.py " + " ".join(args) if args else "make study"


def write_report(study: Study) -> Path:
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    s = summary(study)
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    figures = plot(s, out)
    (out / "README.md").write_text(markdown(s, figures, out), encoding="utf-8")
    return out


# ---- figures ----------------------------------------------------------------------------------


def plot(s: dict[str, Any], out: Path) -> list[str]:
    """One panel per arm: learning curves (PPL vs tokens) and recall (accuracy vs distance)."""
    styles = STYLES

    def curves(ax: Any, arm: str) -> None:
        a = s["arms"][arm]
        for m in PPL_ORDER:
            if m in a["ppl"]:
                color, ls = styles[m]
                ax.plot([t / 1000 for t in a["tokens"]], a["ppl"][m], color=color, linestyle=ls, marker="o", ms=3,
                        label=METHOD_TITLES[m])
        ax.set_yscale("log")

    def recall(ax: Any, arm: str) -> None:
        for m, d in s["recall"][arm].items():
            color, ls = styles.get(m, ("tab:red", "-"))
            ax.plot(d["k"], [100 * a for a in d["acc"]], color=color, linestyle=ls, marker="o", ms=3,
                    label=METHOD_TITLES.get(m, m))
        ax.axhline(100 / s["num_choices"], color="gray", lw=0.8, ls=":")

    made = []
    for name, arms, draw, xlabel, ylabel in (
        ("learning_curves.png", [a for a, v in s["arms"].items() if v["tokens"]], curves, "tokens trained (thousands)", "held-out perplexity (log)"),
        ("recall.png", list(s["recall"]), recall, "sentences between fact and question (k)", "recall accuracy %"),
    ):
        if arms:
            _panels(out / name, arms, draw, xlabel, ylabel)
            made.append(name)
    return made


def _panels(path: Path, arms: list[str], draw: Any, xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        draw(ax, arm)
        ax.set_title(ARM_TITLES.get(arm, arm))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(ylabel)
    # One legend for the whole figure, every line named (a panel may lack some lines, e.g. the
    # baseline arm has no anchor reading): the union of the panels' labels, in drawing order.
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(handles) <= 4 else 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- markdown ---------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(a: dict[str, Any], m: str, i: int = -1) -> float | None:
    if m not in a["ppl"] or "full" not in a["ppl"]:
        return None
    return a["ppl"][m][i] / a["ppl"]["full"][i]


def _verdict(anchor: float, window: float, reads: int) -> str:
    """Who wins, only past two standard errors of the difference (two accuracies over ``reads`` items each):
    at 100 items a few points either way near chance is noise, and the report must not call it a win."""
    se = math.sqrt((anchor * (1 - anchor) + window * (1 - window)) / max(reads, 1))
    if anchor - window > 2 * se:
        return "anchors win"
    if window - anchor > 2 * se:
        return "anchors lose"
    return f"no clear difference: |Δ| ≤ 2 s.e. = {200 * se:.1f} points; anchors do not win"


def findings(s: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (targets of the study issue included)."""
    out = []
    for arm in ("ac", "ac_sink"):  # the target is set for AC; the sink variant is the same model family
        a = s["arms"].get(arm)
        if not a or len(a["tokens"]) < 2:
            continue
        r = _ratio(a, "anchor")
        verdict = "met" if r <= RATIO_TARGET else f"missed by {r - RATIO_TARGET:.2f}"
        out.append(f"{ARM_TITLES[arm]} after {a['tokens'][-1]:,} tokens: anchor/full PPL = {r:.2f} (target ≤ "
                   f"{RATIO_TARGET}: {verdict}); at step 0 it was {_ratio(a, 'anchor', 0):.1f}.")
    for arm, a in s["arms"].items():
        if "anchor" not in a["ppl"] or len(a["tokens"]) < 2:
            continue
        an, se, st = a["ppl"]["anchor"][-1], (a["ppl"].get("sentence") or [None])[-1], (a["ppl"].get("streamingllm") or [None])[-1]
        parts = [f"{ARM_TITLES.get(arm, arm)}: anchor PPL {an:.2f}"]
        if se is not None:
            parts.append(f"{'below' if an < se else 'NOT below'} the sentence-only control ({se:.2f})")
        if st is not None:
            parts.append(f"{'better' if an < st else 'worse'} than StreamingLLM at the same cache ({st:.2f})")
        out.append(", ".join(parts) + ".")
    for arm, rec in s["recall"].items():
        if "anchor" not in rec:
            continue
        far = [i for i, k in enumerate(rec["anchor"]["k"]) if k >= 10]
        for base in ("streamingllm", "streamingllm_q"):
            if base not in rec or not far:
                continue
            an = sum(rec["anchor"]["acc"][i] for i in far) / len(far)
            st = sum(rec[base]["acc"][i] for i in far) / len(far)
            reads = rec["anchor"]["n"] * len(far)
            out.append(f"Recall at k ≥ 10, {ARM_TITLES.get(arm, arm)}: anchor {100 * an:.1f}% vs {METHOD_TITLES[base]} "
                       f"{100 * st:.1f}% ({_verdict(an, st, reads)}; chance {100 / s['num_choices']:.0f}%).")
    out += evidence_findings(s)
    return out


def _paired(final_rows: dict[str, Any], base: str, tail: bool = False) -> tuple[float, float] | None:
    """Mean and s.e. of the per-document log-PPL difference base − anchor (positive: anchors better)."""
    key = "per_doc_nll_tail" if tail else "per_doc_nll"
    a, b = (final_rows.get("anchor") or {}).get(key), (final_rows.get(base) or {}).get(key)
    if not a or not b or len(a) != len(b):
        return None
    diffs = [y - x for x, y in zip(a, b) if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    m = sum(diffs) / len(diffs)
    return m, math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def _beats(d: tuple[float, float] | None) -> str:
    if d is None:
        return "–"
    m, se = d
    word = "anchors win" if m > 2 * se else ("anchors lose" if -m > 2 * se else "no clear difference")
    return f"{100 * m:+.1f}% ± {100 * se:.1f} ({word})"


def evidence_findings(s: dict[str, Any]) -> list[str]:
    """The Evidence II targets (issue #15), computed: equal-cache PPL both ways with 2-s.e. verdicts,
    the best arm's anchor/full ratio, long-range tasks, the cost of each lever."""
    out = []
    for arm, sets in s.get("final", {}).items():
        for name, rows in sets.items():
            for base in ("streamingllm_q", "streamingllm"):
                for tail in (False, True):
                    d = _paired(rows, base, tail)
                    if d is None:
                        continue
                    where = " after position 2,048" if tail else ""
                    out.append(f"{ARM_TITLES.get(arm, arm)}, {name}{where}: log-PPL({METHOD_TITLES[base]}) − log-PPL(anchor) = "
                               f"{_beats(d)} over {len(rows['anchor']['per_doc_nll'])} documents.")
    ratios = {arm: rows["l1024"]["anchor"]["ppl"] / rows["l1024"]["full"]["ppl"]
              for arm, rows in s.get("final", {}).items() if "l1024" in rows and "anchor" in rows["l1024"]}
    if ratios:
        best = min(ratios, key=ratios.get)
        verdict = "met" if ratios[best] <= 1.15 else f"missed by {ratios[best] - 1.15:.2f}"
        out.append(f"Best arm by anchor/full PPL (1,024 tokens): {ARM_TITLES.get(best, best)} at {ratios[best]:.3f} "
                   f"(target ≤ 1.15: {verdict}).")
    for arm, tasks in s.get("longrange", {}).items():
        for task, methods in tasks.items():
            if "anchor" not in methods:
                continue
            for base in ("streamingllm_q", "streamingllm"):
                if base not in methods:
                    continue
                a = _pool(methods["anchor"])
                b = _pool(methods[base])
                out.append(f"{task}, {ARM_TITLES.get(arm, arm)}: anchor {100 * a[0]:.1f}% vs {METHOD_TITLES[base]} "
                           f"{100 * b[0]:.1f}% over {a[1]} items ({_verdict(a[0], b[0], a[1])}).")
    for arm, a in s["arms"].items():
        d = a.get("distill")
        if d and d.get("step_cost_ratio"):
            out.append(f"{ARM_TITLES.get(arm, arm)}: distillation made a training step {d['step_cost_ratio']:.2f}× the plain "
                       f"step on this machine (teacher forward + KL {d['teacher_plus_kl_s']:.0f} s of {d['train_runtime_s']:.0f} s).")
    return out


def _pool(cells: list[dict[str, Any]]) -> tuple[float, int]:
    """Accuracy pooled over a task's cells (lengths, depths) and the number of items."""
    n = sum(c["n"] for c in cells)
    return (sum(c["acc"] * c["n"] for c in cells) / n if n else 0.0), n


def markdown(s: dict[str, Any], figures: list[str], out: Path) -> str:
    L = [
        f"# {s.get('title') or 'Do anchors learn? The anchor-learning study'}",
        "",
        "Continual pretraining of the same model with several attention arms on the same data, token budget, seed and "
        "optimiser settings, evaluated on documents that training never saw: does AnSAN training make the anchors "
        "carry their sentences, and where does that beat training-free cache compression at the **same cache**?",
        "",
        f"- **Command**: `{s['command']}` (resumes where it stopped; `make study` runs the CPU study)",
        f"- **Machine**: {s['machine']}",
        f"- **Date**: {s['date']}; compute so far {s['wall_s'] / 3600:.2f} h (training + evaluation, measured by the study)",
        f"- **Model**: {s['model']}; block {s['block_size']} tokens; {s['tokens_per_arm']:,} tokens per arm",
        f"- **Data**: `{', '.join(s['data']['paths'])}` minus a fixed held-out split: "
        f"{', '.join('`' + p + '`' for p in s['data'].get('holdout_paths') or []) or 'no whole file'} held out entirely "
        f"plus {100 * float(s['data'].get('holdout_fraction') or 0):g}% of the other documents (`anllm.data.split`); "
        "every evaluation below reads only held-out documents.",
        "- **Equal cache**, two ways: *same peak cache* — StreamingLLM (4 sinks + recent window) and K-norm "
        "(lowest-norm keys per layer and head) let every token attend at most the anchor cache's peak for that "
        "document/item (what a fixed-memory deployment faces); *same keys per query* — StreamingLLM gives each token "
        "exactly as many keys as the anchor reading lets it attend (equal attention cost and mean memory) "
        "(`anllm.eval.baselines`). *Sentence only* hides earlier anchors, so *sentence − anchor* is what the anchors carry.",
        "",
    ]
    L += option_sweeps_md(s) + final_md(s) + longrange_md(s)
    if s["sweep"]:
        L += ["## Sweep (AnLLM-AC, short runs)", "",
              "| candidate | settings | steps | tokens | PPL full | PPL anchor | anchor/full |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in s["sweep"].items():
            mark = " **(chosen)**" if name == s["chosen"] else ""
            L.append(f"| {name}{mark} | `{' '.join(r['overrides'])}` | {r['steps']} | {r['tokens']:,} | {r['ppl_full']:.2f} | "
                     f"{r['ppl_anchor']:.2f} | {r['ppl_anchor'] / r['ppl_full']:.2f} |")
        L.append("")
    if s["arms"]:
        L += ["## Learning curves (held-out perplexity)", ""]
        if "learning_curves.png" in figures:
            L += ["![learning curves](learning_curves.png)", ""]
        L += ["| arm | tokens | " + " | ".join(METHOD_TITLES[m] for m in PPL_ORDER) + " | anchor/full | C⇓ % | budget |",
              "|---|---:|" + "---:|" * (len(PPL_ORDER) + 3)]
        for arm, a in s["arms"].items():
            for i, t in enumerate(a["tokens"]):
                vals = [_f(a["ppl"][m][i]) if m in a["ppl"] else "–" for m in PPL_ORDER]
                last = i == len(a["tokens"]) - 1
                L.append(f"| {ARM_TITLES.get(arm, arm)} | {t:,} | " + " | ".join(vals) + f" | {_f(_ratio(a, 'anchor', i))} | "
                         f"{_f(a['c_red'] * 100 if last and a['c_red'] is not None else None, '{:.1f}')} | {_f(a['budget'] if last else None, '{:.1f}')} |")
        L += ["", "C⇓: 1 − kept/seen keys/values of the anchor cache after each document. Budget: mean keys per "
              "token given to the equal-cache baselines (the anchor cache's peak per document).", ""]
        pending = [ARM_TITLES.get(a, a) for a, v in s["arms"].items() if v["status"] == "pending"]
        if pending:
            L += [f"Not trained yet: {', '.join(pending)} (the study resumes with the same command).", ""]
    if s["recall"]:
        L += ["## Long-range recall", "",
              "A fact sentence in held-out prose (“Maria's favourite colour is green.”), then k filler sentences, then "
              f"the cue “Maria's favourite colour is”; accuracy = the right value ranked first among {s['num_choices']} "
              f"(chance {100 / s['num_choices']:.0f}%).", ""]
        if "recall.png" in figures:
            L += ["![recall](recall.png)", ""]
        ks = sorted({k for arm in s["recall"].values() for m in arm.values() for k in m["k"]})
        L += ["| arm | method | " + " | ".join(f"k={k}" for k in ks) + " | C⇓ % (k=max) |", "|---|---|" + "---:|" * (len(ks) + 1)]
        for arm, rec in s["recall"].items():
            for m, d in rec.items():
                acc = dict(zip(d["k"], d["acc"]))
                L.append(f"| {ARM_TITLES.get(arm, arm)} | {METHOD_TITLES.get(m, m)} | " + " | ".join(_f(100 * acc[k], '{:.0f}') if k in acc else "–" for k in ks)
                         + f" | {_f(100 * d['c_red'][-1], '{:.1f}')} |")
        L.append("")
    if s["qa"]:
        L += [f"## QA ({s['qa_shots']}-shot)", "", "| arm | task | method | acc | acc_norm | C⇓ % | n |", "|---|---|---|---:|---:|---:|---:|"]
        for arm, tasks in s["qa"].items():
            for task, methods in tasks.items():
                for m, r in methods.items():
                    L.append(f"| {ARM_TITLES.get(arm, arm)} | {task} | {m} | {_f(100 * r['acc'] if r['acc'] is not None else None, '{:.1f}')} | "
                             f"{_f(100 * r['acc_norm'] if r.get('acc_norm') is not None else None, '{:.1f}')} | "
                             f"{_f(100 * r['c_red'] if r.get('c_red') is not None else None, '{:.1f}')} | {r.get('n') or '–'} |")
        L += ["", "StreamingLLM here is the QA suite's compress-once baseline (prefill, then keep sinks + the most recent "
              "tokens up to the anchor cache's size), the way KV-press methods are used.", ""]
    facts = findings(s)
    L += ["## Findings (computed)", ""] + ([f"- {f}" for f in facts] or ["- (no finished arm yet)"]) + [""]
    conclusion = out / "conclusion.md"
    if conclusion.is_file():
        L += ["## Conclusion", "", conclusion.read_text(encoding="utf-8").strip(), ""]
    else:
        L += ["## Conclusion", "", "(pending: the study has not finished)", ""]
    L += ["## Timings (seconds, measured by the study)", "", "| stage | s |", "|---|---:|"]
    L += [f"| {k} | {v:.0f} |" for k, v in s["timings_s"].items()] + [""]
    return "\n".join(L)


def option_sweeps_md(s: dict[str, Any]) -> list[str]:
    L: list[str] = []
    for name, cands in (s.get("sweeps") or {}).items():
        if not cands:
            continue
        L += [f"## Sweep: {name} (short runs of AC + sinks)", "",
              "The winner has the lowest log PPL(anchor) − log PPL(StreamingLLM, same keys per query): the margin over a "
              "window at equal attention cost, not anchor PPL alone (a bigger window always lowers that).", "",
              "| candidate | settings | tokens | PPL full | PPL anchor | StreamingLLM (same keys/query) | margin | mean keys | peak keys |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cand, r in cands.items():
            mark = " **(chosen)**" if s.get("choices", {}).get(name) == cand else ""
            L.append(f"| {cand}{mark} | `{' '.join(r['overrides'])}` | {r['tokens']:,} | {_f(r.get('ppl_full'))} | "
                     f"{_f(r.get('ppl_anchor'))} | {_f(r.get('ppl_streamingllm_q'))} | {_f(r.get('margin'), '{:+.3f}')} | "
                     f"{_f(r.get('mean_kv'), '{:.1f}')} | {_f(r.get('max_kv'), '{:.1f}')} |")
        L.append("")
    return L


def final_md(s: dict[str, Any]) -> list[str]:
    final = s.get("final") or {}
    if not final:
        return []
    L = ["## Held-out perplexity at equal cache (final checkpoints)", "",
         "Mean keys: keys a token attends, averaged over the document's tokens; peak keys: the most any token attends. "
         "Δ vs anchor: mean over documents of log-PPL(method) − log-PPL(anchor) ± its standard error (positive: the "
         "anchor reading is better; a win needs more than 2 s.e.).", "",
         "| arm | set | method | PPL | PPL after 2,048 | mean keys | peak keys | Δ vs anchor | Δ after 2,048 |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for arm, sets in final.items():
        for name, rows in sets.items():
            for m in PPL_ORDER:
                if m not in rows:
                    continue
                r = rows[m]
                d = _beats(_paired(rows, m)) if m != "anchor" else "–"
                dt = _beats(_paired(rows, m, tail=True)) if m != "anchor" and r.get("ppl_tail") else "–"
                L.append(f"| {ARM_TITLES.get(arm, arm)} | {name} | {METHOD_TITLES.get(m, m)} | {_f(r['ppl'])} | "
                         f"{_f(r.get('ppl_tail'))} | {_f(r.get('mean_kv'), '{:.1f}')} | {_f(r.get('peak_kv'), '{:.1f}')} | {d} | {dt} |")
    L.append("")
    return L


def longrange_md(s: dict[str, Any]) -> list[str]:
    lr = s.get("longrange") or {}
    if not lr:
        return []
    lengths = sorted({c["length"] for arm in lr.values() for t in arm.values() for cells in t.values() for c in cells})
    L = ["## Long-range tasks (passkey, multi-key needle, variable tracking)", "",
         "Teacher-forced exact match (greedy decoding would produce the answer); passkey pooled over depths 10–90%. "
         "± binomial standard error.", "",
         "| arm | task | method | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |", "|---|---|---|" + "---:|" * len(lengths)]
    for arm, tasks in lr.items():
        for task, methods in tasks.items():
            for m, cells in methods.items():
                vals = []
                for n in lengths:
                    acc, k = _pool([c for c in cells if c["length"] == n])
                    vals.append("–" if not k else f"{100 * acc:.0f} ± {100 * math.sqrt(acc * (1 - acc) / k):.0f}")
                L.append(f"| {ARM_TITLES.get(arm, arm)} | {task} | {METHOD_TITLES.get(m, m)} | " + " | ".join(vals) + " |")
    L.append("")
    return L
