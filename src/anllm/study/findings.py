"""Facts computed from the study's numbers: targets met or missed, and who wins, only past two standard errors."""

from __future__ import annotations

import math
from typing import Any

from .titles import arm_title, method_title, set_title, tail_title

RATIO_TARGET = 1.25


def ratio_to_full(a: dict[str, Any], m: str, i: int = -1) -> float | None:
    if m not in a["ppl"] or "full" not in a["ppl"]:
        return None
    return a["ppl"][m][i] / a["ppl"]["full"][i]


def accuracy_verdict(anchor: float, window: float, reads: int) -> str:
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
        r = ratio_to_full(a, "anchor")
        verdict = "met" if r <= RATIO_TARGET else f"missed by {r - RATIO_TARGET:.2f}"
        out.append(f"{arm_title(arm)} after {a['tokens'][-1]:,} tokens: anchor/full PPL = {r:.2f} (target ≤ "
                   f"{RATIO_TARGET}: {verdict}); at step 0 it was {ratio_to_full(a, 'anchor', 0):.1f}.")
    for arm, a in s["arms"].items():
        if "anchor" not in a["ppl"] or len(a["tokens"]) < 2:
            continue
        an, se, st = a["ppl"]["anchor"][-1], (a["ppl"].get("sentence") or [None])[-1], (a["ppl"].get("streamingllm") or [None])[-1]
        parts = [f"{arm_title(arm)}: anchor PPL {an:.2f}"]
        if se is not None:
            parts.append(f"{'below' if an < se else 'NOT below'} the sentence-only control ({se:.2f})")
        if st is not None:
            parts.append(f"{'better' if an < st else 'worse'} than StreamingLLM at the same cache ({st:.2f})")
        sq = (a["ppl"].get("streamingllm_q") or [None])[-1]
        if sq is not None:  # Evidence II's second definition of equal cache
            parts.append(f"{'better' if an < sq else 'worse'} than {method_title('streamingllm_q')} ({sq:.2f}; "
                         "learning-curve set, no standard error)")
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
            out.append(f"Recall at k ≥ 10, {arm_title(arm)}: anchor {100 * an:.1f}% vs {method_title(base)} "
                       f"{100 * st:.1f}% ({accuracy_verdict(an, st, reads)}; chance {100 / s['num_choices']:.0f}%).")
    out += evidence_findings(s)
    return out


def paired_difference(final_rows: dict[str, Any], base: str, tail: bool = False) -> tuple[float, float] | None:
    """Mean and s.e. of the per-document log-PPL difference base − anchor (positive: anchors better)."""
    key = "per_doc_nll_tail" if tail else "per_doc_nll"
    return paired_change((final_rows.get(base) or {}).get(key), (final_rows.get("anchor") or {}).get(key))


def paired_change(after: list[float | None] | None, before: list[float | None] | None) -> tuple[float, float] | None:
    """Mean and s.e. of per-document ``after − before`` (None where the document counts differ)."""
    if not after or not before or len(after) != len(before):
        return None
    return mean_se([x - y for x, y in zip(after, before) if x is not None and y is not None])


def mean_se(diffs: list[float]) -> tuple[float, float] | None:
    """Mean of paired per-document differences and its standard error (None below two documents)."""
    if len(diffs) < 2:
        return None
    m = sum(diffs) / len(diffs)
    return m, math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def lever_effects(s: dict[str, Any]) -> list[dict[str, Any]]:
    """What a lever did, for every pair of arms where one adds levers to the other: the same exp, and the
    second arm's ``uses`` (sweeps: ``window``, ``distill``) and own overrides both contain the first's, one of
    them more (one lever alone, ``window + distill`` together, or an added override such as
    ``trainer.distill.teacher=self``); on every final set both have, paired over the set's documents (the
    same held-out documents, tokenised the same way, for arms of one exp):

    - ``anchor`` (and every other reading both arms have: ``full``, ``streamingllm_q``, ...): mean over
      documents of log-PPL(reading) with the lever − without (negative: the lever made that reading
      better), so a margin that moves can be told apart: the anchors got better, or the window worse;
    - ``margin_<base>``: the change in the margin over a window, (log-PPL(base) − log-PPL(anchor)) with
      the lever − the same without (positive: the lever moved the anchors towards beating ``base``).

    Each value is ``(mean, standard error)`` or None where a document count does not match."""
    arms, final = s.get("arms") or {}, s.get("final") or {}
    out = []
    for without, a in arms.items():
        for with_, b in arms.items():
            ua, ub = set(a.get("uses") or []), set(b.get("uses") or [])
            oa, ob = set(a.get("own_overrides") or []), set(b.get("own_overrides") or [])
            if (without not in final or with_ not in final or a.get("exp") != b.get("exp")
                    or not (ua <= ub and oa <= ob) or (ua, oa) == (ub, ob)):
                continue
            # two or more: the levers together; sweeps by name, then the overrides the second arm adds
            lever = " + ".join([u for u in b.get("uses") or [] if u not in ua] +
                               [o for o in b.get("own_overrides") or [] if o not in oa])
            for name, ra in final[without].items():
                rb = final[with_].get(name)
                if rb is None or "anchor" not in ra or "anchor" not in rb:
                    continue
                row: dict[str, Any] = {"lever": lever, "without": without, "with": with_, "set": name}
                row.update({m: paired_change(_nll(rb[m]), _nll(ra[m])) for m in ra if m in rb})
                for base in ("streamingllm_q", "streamingllm"):
                    if base in ra and base in rb:
                        row[f"margin_{base}"] = paired_change(_nll(rb[base], rb["anchor"]), _nll(ra[base], ra["anchor"]))
                out.append(row)
    return out


def _nll(row: dict[str, Any], minus: dict[str, Any] | None = None) -> list[float | None] | None:
    """A reading's per-document NLL, or its margin over ``minus`` (row − minus) per document."""
    v = row.get("per_doc_nll")
    if minus is None:
        return v
    m = minus.get("per_doc_nll")
    if not v or not m or len(v) != len(m):
        return None
    return [None if x is None or y is None else x - y for x, y in zip(v, m)]


def change_verdict(d: tuple[float, float] | None, up: str, down: str) -> str:
    """``+x.x% ± y.y (word)``: ``up`` past +2 s.e., ``down`` past −2 s.e., else no clear change."""
    if d is None:
        return "–"
    m, se = d
    word = up if m > 2 * se else (down if -m > 2 * se else "no clear change")
    return f"{100 * m:+.1f}% ± {100 * se:.1f} ({word})"


def paired_verdict(d: tuple[float, float] | None) -> str:
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
                    d = paired_difference(rows, base, tail)
                    if d is None:
                        continue
                    where = f" {tail_title(s, name)}" if tail else ""
                    out.append(f"{arm_title(arm)}, {set_title(s, name)}{where}: log-PPL({method_title(base)}) − log-PPL(anchor) = "
                               f"{paired_verdict(d)} over {len(rows['anchor']['per_doc_nll'])} documents.")
    ratios = {arm: rows["l1024"]["anchor"]["ppl"] / rows["l1024"]["full"]["ppl"]
              for arm, rows in s.get("final", {}).items() if "l1024" in rows and {"anchor", "full"} <= set(rows["l1024"])}
    if ratios:
        best = min(ratios, key=ratios.get)
        verdict = "met" if ratios[best] <= 1.15 else f"missed by {ratios[best] - 1.15:.2f}"
        out.append(f"Best arm by anchor/full PPL (1,024 tokens): {arm_title(best)} at {ratios[best]:.3f} "
                   f"(target ≤ 1.15: {verdict}).")
    for arm, tasks in s.get("longrange", {}).items():
        for task, methods in tasks.items():
            if "anchor" not in methods:
                continue
            for base in ("streamingllm_q", "streamingllm"):
                if base not in methods:
                    continue
                a = pooled_accuracy(methods["anchor"])
                b = pooled_accuracy(methods[base])
                out.append(f"{task}, {arm_title(arm)}: anchor {100 * a[0]:.1f}% vs {method_title(base)} "
                           f"{100 * b[0]:.1f}% over {a[1]} items ({accuracy_verdict(a[0], b[0], a[1])}).")
    out += lever_findings(s)
    for arm, a in s["arms"].items():
        d = a.get("distill")
        if d and d.get("step_cost_ratio"):
            out.append(f"{arm_title(arm)}: distillation made a training step {d['step_cost_ratio']:.2f}× the plain "
                       f"step on this machine (teacher forward + KL {d['teacher_plus_kl_s']:.0f} s of {d['train_runtime_s']:.0f} s).")
    return out


def lever_findings(s: dict[str, Any]) -> list[str]:
    """One statement per lever effect (:func:`lever_effects`), with its 2-s.e. verdicts."""
    return [f"{e['lever']} ({arm_title(e['without'])} → {arm_title(e['with'])}), {set_title(s, e['set'])}: anchor log-PPL "
            f"{change_verdict(e['anchor'], 'worse', 'better')}, {method_title('streamingllm_q')} log-PPL "
            f"{change_verdict(e.get('streamingllm_q'), 'worse', 'better')}, full-attention log-PPL "
            f"{change_verdict(e.get('full'), 'worse', 'better')}; margin over {method_title('streamingllm_q')} "
            f"{change_verdict(e.get('margin_streamingllm_q'), 'towards the anchors', 'towards the window')}."
            for e in lever_effects(s)]


def pooled_accuracy(cells: list[dict[str, Any]]) -> tuple[float, int]:
    """Accuracy pooled over a task's cells (lengths, depths) and the number of items."""
    n = sum(c["n"] for c in cells)
    return (sum(c["acc"] * c["n"] for c in cells) / n if n else 0.0), n
