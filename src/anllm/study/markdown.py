"""The study's ``README.md``: tables, figures and the computed findings, from ``summary.json``'s content."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from .findings import (
    change_verdict, findings, lever_effects, paired_difference, paired_verdict, pooled_accuracy, ratio_to_full,
)
from .titles import PPL_ORDER, arm_title, method_title, past_training, tail_title


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("–" when missing)."""
    return _f(None if x is None else 100 * x, "{:.1f}")


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], text: int = 1) -> list[str]:
    """A markdown table: the first ``text`` columns left-aligned, the numbers right-aligned."""
    align = "|" + "---|" * text + "---:|" * (len(columns) - text)
    return [_cells(columns), align] + [_cells(r) for r in rows]


def _cells(values: Sequence[Any]) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


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
        L += ["## Sweep (AnLLM-AC, short runs)", ""]
        L += _table(["candidate", "settings", "steps", "tokens", "PPL full", "PPL anchor", "anchor/full"], [
            [name + (" **(chosen)**" if name == s["chosen"] else ""), f"`{' '.join(r['overrides'])}`", r["steps"],
             f"{r['tokens']:,}", _f(r["ppl_full"]), _f(r["ppl_anchor"]), _f(r["ppl_anchor"] / r["ppl_full"])]
            for name, r in s["sweep"].items()], text=2)
        L.append("")
    if s["arms"]:
        L += ["## Learning curves (held-out perplexity)", ""]
        if "learning_curves.png" in figures:
            L += ["![learning curves](learning_curves.png)", ""]
        rows = []
        for arm, a in s["arms"].items():
            for i, t in enumerate(a["tokens"]):
                last = i == len(a["tokens"]) - 1
                rows.append([arm_title(arm), f"{t:,}", *(_f(a["ppl"][m][i]) if m in a["ppl"] else "–" for m in PPL_ORDER),
                             _f(ratio_to_full(a, "anchor", i)), _pct(a["c_red"] if last else None),
                             _f(a["budget"] if last else None, "{:.1f}")])
        L += _table(["arm", "tokens", *(method_title(m) for m in PPL_ORDER), "anchor/full", "C⇓ %", "budget"], rows)
        L += ["", "C⇓: 1 − kept/seen keys/values of the anchor cache after each document. Budget: mean keys per "
              "token given to the equal-cache baselines (the anchor cache's peak per document).", ""]
        pending = [arm_title(a) for a, v in s["arms"].items() if v["status"] == "pending"]
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
        rows = []
        for arm, rec in s["recall"].items():
            for m, d in rec.items():
                acc = dict(zip(d["k"], d["acc"]))
                rows.append([arm_title(arm), method_title(m), *(_f(100 * acc[k], "{:.0f}") if k in acc else "–" for k in ks),
                             _pct(d["c_red"][-1])])
        L += _table(["arm", "method", *(f"k={k}" for k in ks), "C⇓ % (k=max)"], rows, text=2) + [""]
    if s["qa"]:
        L += [f"## QA ({s['qa_shots']}-shot)", ""]
        L += _table(["arm", "task", "method", "acc", "acc_norm", "C⇓ %", "n"], [
            [arm_title(arm), task, m, _pct(r["acc"]), _pct(r.get("acc_norm")), _pct(r.get("c_red")), r.get("n") or "–"]
            for arm, tasks in s["qa"].items() for task, methods in tasks.items() for m, r in methods.items()], text=3)
        L += ["", "StreamingLLM here is the QA suite's compress-once baseline (prefill, then keep sinks + the most recent "
              "tokens up to the anchor cache's size), the way KV-press methods are used.", ""]
    facts = findings(s)
    L += ["## Findings (computed)", ""] + ([f"- {f}" for f in facts] or ["- (no finished arm yet)"]) + [""]
    conclusion = out / "conclusion.md"
    if conclusion.is_file():
        L += ["## Conclusion", "", conclusion.read_text(encoding="utf-8").strip(), ""]
    else:
        L += ["## Conclusion", "", "(pending: the study has not finished)", ""]
    L += ["## Timings (seconds, measured by the study)", ""]
    L += _table(["stage", "s"], [[k, f"{v:.0f}"] for k, v in s["timings_s"].items()]) + [""]
    return "\n".join(L)


def option_sweeps_md(s: dict[str, Any]) -> list[str]:
    L: list[str] = []
    for name, cands in (s.get("sweeps") or {}).items():
        if not cands:
            continue
        L += [f"## Sweep: {name} (short runs of AC + sinks)", "",
              "The winner has the lowest log PPL(anchor) − log PPL(StreamingLLM, same keys per query): the margin over a "
              "window at equal attention cost, not anchor PPL alone (a bigger window always lowers that). A control is run "
              "and reported the same way but never chosen.", ""]
        rows = []
        for cand, r in cands.items():
            mark = " **(chosen)**" if s.get("choices", {}).get(name) == cand else " (control)" if r.get("control") else ""
            rows.append([cand + mark, f"`{' '.join(r['overrides'])}`", f"{r['tokens']:,}", _f(r.get("ppl_full")),
                         _f(r.get("ppl_anchor")), _f(r.get("ppl_streamingllm_q")), _f(r.get("margin"), "{:+.3f}"),
                         _f(r.get("mean_kv"), "{:.1f}"), _f(r.get("max_kv"), "{:.1f}")])
        L += _table(["candidate", "settings", "tokens", "PPL full", "PPL anchor", "StreamingLLM (same keys/query)", "margin",
                     "mean keys", "peak keys"], rows, text=2) + [""]
    return L


def final_md(s: dict[str, Any]) -> list[str]:
    final = s.get("final") or {}
    if not final:
        return []
    L = ["## Held-out perplexity at equal cache (final checkpoints)", "",
         "Mean keys: keys a token attends, averaged over the document's tokens; peak keys: the most any token attends. "
         "Δ vs anchor: mean over documents of log-PPL(method) − log-PPL(anchor) ± its standard error (positive: the "
         "anchor reading is better; a win needs more than 2 s.e.).", ""]
    beyond = [f"{name} ({n:,} tokens)" for name in s.get("final_sets") or {} if (n := past_training(s, name))]
    if beyond:
        L += [f"The arms trained on blocks of {s['block_size']:,} tokens, so {', '.join(beyond)} measure"
              f"{'s' if len(beyond) == 1 else ''} how the trained cache extrapolates past the length it learned.", ""]
    table = []
    for arm, sets in final.items():
        for name, rows in sets.items():
            for m in PPL_ORDER:
                if m not in rows:
                    continue
                r = rows[m]
                d = paired_verdict(paired_difference(rows, m)) if m != "anchor" else "–"
                dt = paired_verdict(paired_difference(rows, m, tail=True)) if m != "anchor" and r.get("ppl_tail") else "–"
                table.append([arm_title(arm), name, method_title(m), _f(r["ppl"]), _f(r.get("ppl_tail")),
                              _f(r.get("mean_kv"), "{:.1f}"), _f(r.get("peak_kv"), "{:.1f}"), d, dt])
    tail = tail_title(s)
    L += _table(["arm", "set", "method", "PPL", f"PPL {tail}", "mean keys", "peak keys", "Δ vs anchor",
                 f"Δ {tail}"], table, text=3) + [""]
    return L + levers_md(s) + offsets_md(final)


def levers_md(s: dict[str, Any]) -> list[str]:
    """Which lever moved what: arms where one adds levers to the other, paired over the same documents."""
    effects = lever_effects(s)
    if not effects:
        return []
    rows = [[e["lever"], f"{arm_title(e['without'])} → {arm_title(e['with'])}", e["set"],
             change_verdict(e["anchor"], "worse", "better"),
             change_verdict(e.get("streamingllm_q"), "worse", "better"), change_verdict(e.get("full"), "worse", "better"),
             change_verdict(e.get("margin_streamingllm_q"), "towards the anchors", "towards the window"),
             change_verdict(e.get("margin_streamingllm"), "towards the anchors", "towards the window")] for e in effects]
    return ["### Which lever moved what", "",
            "Arms where one adds a lever (or both) to the other, on the same held-out documents: the change the lever made to the anchor "
            "reading's log-PPL (negative: better), to the same model's window reading at equal keys per query and to its "
            "full attention (a margin can move because the anchors got better or because the window got worse; the window "
            "reading's budget is each arm's own anchor key count, so a lever that grows the anchor cache grows it too), and to "
            "the anchors' margin over a window, log-PPL(StreamingLLM) − "
            "log-PPL(anchor) (positive: towards the anchors winning), mean over documents ± standard error of the "
            "per-document differences; a change needs more than 2 s.e.", ""] + \
        _table(["lever", "arms", "set", "Δ anchor log-PPL", f"Δ {method_title('streamingllm_q')} log-PPL", "Δ full log-PPL",
                f"Δ margin, {method_title('streamingllm_q')}",
                f"Δ margin, {method_title('streamingllm')}"], rows, text=3) + [""]


def offsets_md(final: dict[str, Any]) -> list[str]:
    """Where in a sentence the readings part: Δ NLL (method − anchor) by tokens after the last anchor."""
    table, edges = [], None
    for arm, sets in final.items():
        for name, rows in sets.items():
            for m in PPL_ORDER:
                r = rows.get(m) or {}
                if m == "anchor" or not r.get("offset_dnll_vs_anchor"):
                    continue
                edges = r["offset_bins"]
                cells = ["–" if d is None else f"{d:+.3f}" + ("" if se is None else f" ± {se:.3f}")
                         for d, se in zip(r["offset_dnll_vs_anchor"], r["offset_dnll_se"])]
                table.append([arm_title(arm), name, method_title(m), *cells])
    if not table:
        return []
    heads = [f"{a}" if b == a + 1 else f"{a}–{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    return ["### Where in a sentence the readings part", "",
            "Mean over documents of the NLL difference in nats (method − anchor) of the tokens that come 1, 2–4, … tokens after "
            "the last anchor (1: the first token of a sentence, which sees only earlier anchors, sinks and the window "
            "under the AnSAN rule) ± its standard error; positive: the anchor reading predicts those tokens better.", ""] + \
        _table(["arm", "set", "method", *(f"offset {h}" for h in heads)], table, text=3) + [""]


def longrange_md(s: dict[str, Any]) -> list[str]:
    lr = s.get("longrange") or {}
    if not lr:
        return []
    lengths = sorted({c["length"] for arm in lr.values() for t in arm.values() for cells in t.values() for c in cells})
    L = ["## Long-range tasks (passkey, multi-key needle, variable tracking)", "",
         "Teacher-forced exact match (greedy decoding would produce the answer); passkey pooled over depths 10–90%. "
         "± binomial standard error.", ""]
    rows = []
    for arm, tasks in lr.items():
        for task, methods in tasks.items():
            for m, cells in methods.items():
                vals = []
                for n in lengths:
                    acc, k = pooled_accuracy([c for c in cells if c["length"] == n])
                    vals.append("–" if not k else f"{100 * acc:.0f} ± {100 * math.sqrt(acc * (1 - acc) / k):.0f}")
                rows.append([arm_title(arm), task, method_title(m), *vals])
    return L + _table(["arm", "task", "method", *(f"{n:,} tokens" for n in lengths)], rows, text=3) + [""]
