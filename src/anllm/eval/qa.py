"""QA suite: the paper's eight multiple-choice tasks through lm-eval, in several modes at once.

Per task and few-shot setting, one :class:`MultiModeScorer` computes every mode side by side (see
:mod:`anllm.eval.scoring`); lm-eval is then run once per mode with an :class:`AnchorLM` reading that
mode's memoised scores, so accuracy metrics are lm-eval's own. Rows per mode: ``acc``/``acc_norm``
(as lm-eval reports them), ``c_red`` (C⇓ = 1 − Σ kept / Σ total KV entries at scoring time, over
every scored choice), ``max_kv`` (per example, the largest cache a choice was scored against,
averaged over examples), ``peak_kv`` (per example, the most entries the mode's cache held at any
point while reading the context and scoring a choice, averaged over examples: ``full`` the context +
continuation, ``anchor`` the anchor cache's peak, compress-once baselines the full context they
prefill before compressing, streaming baselines their budget; see :mod:`anllm.eval.scoring`),
``time_s`` and ``t_up`` (T⇑ = time(full) / time(mode)), ``agree`` (share of examples whose
predicted choice equals the reference mode's: ``ansan`` for ``anchor``, ``full`` for the rest).
Per-example predictions go to ``<task dir>/predictions_<k>shot.jsonl``.

Baselines (``qa.baselines``, anchor models only): ``streamingllm``, ``knorm`` and the kvpress
presses (``snapkv``, ``tova``, ``observed_attention`` alias ``h2o``, ``expected_attention``,
``pyramidkv``, ``streamingllm_press``, ``knorm_press``, ``keydiff``, ``lagkv``, ``curkv``, ``leverage``,
``compactor``, ``capkv``, ``noncausal_attention``, ``criticalkv``, ``random``; see
:mod:`anllm.eval.methods`) compress the prefilled context's cache once, with NVIDIA kvpress, to
the anchor cache's kept size for the same example (peak = the full context); ``streamingllm_stream``
reads context and continuation with a StreamingLLM cache bounded from the start by the anchor
reading's peak, and ``streamingllm_stream_q`` with the AnSAN rule's keys per token (equal attention
cost).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .methods import ALIASES
from .scoring import BASELINES, MODES, MultiModeScorer, Scored
from .suites import ModelBundle, Suite
from .tasks import PAPER_ORDER, QA_TASKS, get_task, task_spec

log = logging.getLogger(__name__)


def qa_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``qa`` section with defaults (so the suite also runs from a bare config in tests)."""
    defaults = {"source": "auto", "baselines": [], "num_sink_tokens": 4, "insert_anchors": True, "stock": False,
                "prefill_chunk_size": None, "ac_layout": "sentence"}
    section = cfg.get("qa") or {}
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    return {**defaults, **section}


def resolve_source(source: str, data_dir: str | None) -> str:
    """``auto``: the staged files when ``data_dir`` is given, otherwise the hub."""
    if source == "auto":
        source = "local" if data_dir else "hub"
    if source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            "QA tasks would come from the HF hub but HF_HUB_OFFLINE=1: pass data_dir=../shared/data for the "
            "offline task files."
        )
    return source


def check_config(cfg: DictConfig) -> None:
    """Fail before the model loads on bad modes, baselines, source or few-shot settings."""
    opts = qa_options(cfg)
    bad = [m for m in (cfg.get("modes") or []) if m not in MODES]
    if bad:
        raise ValueError(f"Unknown mode(s) {bad}: choose from {list(MODES)}.")
    bad = [b for b in (opts["baselines"] or []) if ALIASES.get(b, b) not in BASELINES]
    if bad:
        raise ValueError(f"Unknown baseline(s) {bad} (qa.baselines): choose from {list(BASELINES)}.")
    if opts["source"] not in ("auto", "local", "hub"):
        raise ValueError(f"qa.source={opts['source']!r}: choose auto, local or hub.")
    if any(k < 0 for k in _fewshots(cfg.get("num_fewshot"))):
        raise ValueError("num_fewshot must be >= 0.")
    resolve_source(opts["source"], cfg.get("data_dir"))


def resolve_modes(bundle: ModelBundle, modes: list[str], baselines: list[str]) -> tuple[list[str], list[str]]:
    """Modes to run for this model, and notes on what was skipped and why."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"Unknown mode(s) {bad}: choose from {list(MODES)}.")
    baselines = [ALIASES.get(b, b) for b in baselines]  # e.g. h2o -> observed_attention
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"Unknown baseline(s) {bad}: choose from {list(BASELINES)}.")
    notes = []
    if not bundle.has_anchors:
        skipped = [m for m in modes if m != "full"] + list(baselines)
        if skipped:
            notes.append(
                f"qa: no anchor settings, so only 'full' ran (skipped {', '.join(skipped)}; "
                "anchors=ep|ac applies untrained anchors as a mechanics check)"
            )
        return ["full"], notes
    run = list(dict.fromkeys(modes))
    if baselines:
        if "anchor" not in run:
            run.append("anchor")  # baselines take their budget from the anchor cache
        run += [b for b in baselines if b not in run]
    return run, notes


def _fewshots(value: Any) -> list[int]:
    if value is None:
        return [0]
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [int(v) for v in value]
    return [int(value)]


def run_task(bundle: ModelBundle, cfg: DictConfig, task: str, out_dir: Path) -> list[dict[str, Any]]:
    """Evaluate one QA task in every selected mode (and baseline) for each ``num_fewshot``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm_eval_model import AnchorLM

    opts = qa_options(cfg)
    info = get_task(task)
    source = resolve_source(opts["source"], cfg.get("data_dir"))
    modes, notes = resolve_modes(bundle, list(cfg.get("modes") or ["full"]), list(opts["baselines"] or []))
    if opts["stock"] and "stock" not in modes:
        modes.append("stock")  # lm-eval's per-request forward, timed side by side (T⇑ stock)
    for n in notes:
        if n not in bundle.notes:
            bundle.notes.append(n)
    limit = cfg.get("limit")
    # lm-eval warns on every call that it got a model object and that num_fewshot was overridden:
    # expected here, so keep its log to errors.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    for k in _fewshots(cfg.get("num_fewshot")):
        spec = task_spec(task, source, cfg.get("data_dir"), k, out_dir / "lm_eval_tasks")
        scorer = MultiModeScorer(
            bundle.model, modes, pad_token_id=_pad_id(bundle.tokenizer), batch_size=int(cfg.get("batch_size") or 1),
            num_sink_tokens=int(opts["num_sink_tokens"]), prefill_chunk_size=opts["prefill_chunk_size"],
            position_mode=str(cfg.get("position_mode") or "true"),
        )
        manager = TaskManager(include_defaults=False)
        per_mode: dict[str, dict[str, Any]] = {}
        for mode in modes:  # the first pass computes every mode; the others read the memo
            lm = AnchorLM(
                pretrained=bundle.model, tokenizer=bundle.tokenizer, mode=mode, scorer=scorer,
                batch_size=int(cfg.get("batch_size") or 1), insert_anchors=bool(opts["insert_anchors"]),
                ac_layout=str(opts["ac_layout"]),
            )
            res = simple_evaluate(
                model=lm, tasks=[spec], num_fewshot=k, limit=limit, log_samples=True, task_manager=manager,
                bootstrap_iters=0, random_seed=int(cfg.get("seed", 0)), verbosity="ERROR",
            )
            per_mode[mode] = {"metrics": res["results"][task], "samples": res["samples"][task]}
        rows += _rows(task, info, k, source, modes, scorer, per_mode, out_dir, limit)
    return rows


def _speedup(scorer: MultiModeScorer, baseline: str, mode: str) -> float | None:
    """time(baseline) / time(mode), measured side by side by the scorer (None if either is missing)."""
    if baseline not in scorer.seconds or not scorer.seconds.get(mode):
        return None
    return scorer.seconds[baseline] / scorer.seconds[mode]


def _pad_id(tok: Any) -> int:
    for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def _request_keys(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` pairs lm-eval scored for one example."""
    args = sample["arguments"]
    if isinstance(args, dict):  # lm-eval >= 0.4.x: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [(a["arg_0"], a["arg_1"]) for a in args.values()]
    return [tuple(a) for a in args]  # type: ignore[misc]


def _prediction(sample: dict[str, Any]) -> int:
    lls = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
    return max(range(len(lls)), key=lambda i: float(lls[i]))


def cache_metrics(per_example: list[list[Scored]]) -> dict[str, Any]:
    """C⇓ over every scored choice, and MaxKV = mean over examples of the largest kept cache."""
    kept = sum(x.kv_kept for ex in per_example for x in ex)
    total = sum(x.kv_total for ex in per_example for x in ex)
    peaks = [max(x.kv_kept for x in ex) for ex in per_example if ex]
    return {
        "c_red": 1.0 - kept / total if total else None,
        "max_kv": sum(peaks) / len(peaks) if peaks else None,
        "kv_kept": kept,
        "kv_total": total,
    }


def peak_metrics(per_example: list[list[Scored]]) -> dict[str, Any]:
    """PeakKV = mean over examples of the largest peak cache any of its choices needed."""
    peaks = [max(x.peak_kv for x in ex) for ex in per_example if ex]
    return {"peak_kv": sum(peaks) / len(peaks) if peaks else None}


def _rows(
    task: str, info: Any, k: int, source: str, modes: list[str], scorer: MultiModeScorer,
    per_mode: dict[str, dict[str, Any]], out_dir: Path, limit: Any,
) -> list[dict[str, Any]]:
    preds = {m: {s["doc_id"]: _prediction(s) for s in per_mode[m]["samples"]} for m in modes}
    rows = []
    for mode in modes:
        metrics, samples = per_mode[mode]["metrics"], per_mode[mode]["samples"]
        scored = [[scorer.result(mode, key) for key in _request_keys(s)] for s in samples]
        cache = {**cache_metrics(scored), **peak_metrics(scored)}
        ref = "ansan" if mode == "anchor" and "ansan" in preds else "full"
        agree = None
        if ref in preds and ref != mode:
            same = [preds[mode][d] == preds[ref][d] for d in preds[mode]]
            agree = sum(same) / len(same) if same else None
        row: dict[str, Any] = {
            "suite": "qa",
            "task": task,
            "method": mode,
            "num_fewshot": k,
            "n": len(samples),
            "split": info.local_split if source == "local" else info.hub_split,
            "source": source,
            "acc": metrics.get("acc,none"),
            "acc_norm": metrics.get("acc_norm,none"),
            **cache,
            "time_s": scorer.seconds[mode],
            "t_up": _speedup(scorer, "full", mode),
            "t_up_stock": _speedup(scorer, "stock", mode),
            "agree": agree,
            "agree_ref": ref if agree is not None else None,
        }
        notes = []
        if source == "local" and info.note:
            notes.append(info.note)
        if limit:
            notes.append(f"limit={limit}")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    with (out_dir / f"predictions_{k}shot.jsonl").open("w") as fh:
        for s in per_mode[modes[0]]["samples"]:
            d = s["doc_id"]
            keys = _request_keys(s)
            rec = {"doc_id": d, "target": s.get("target")}
            for m in modes:
                rec[m] = {
                    "pred": preds[m][d],
                    "logprobs": [scorer.result(m, key).logprob for key in keys],
                    "kv_kept": [scorer.result(m, key).kv_kept for key in keys],
                    "kv_total": [scorer.result(m, key).kv_total for key in keys],
                    "peak_kv": [scorer.result(m, key).peak_kv for key in keys],
                }
            fh.write(json.dumps(rec) + "\n")
    return rows


SUITE = Suite(
    name="qa",
    tasks=tuple(QA_TASKS),
    default_tasks=PAPER_ORDER,
    run_task=run_task,
    describe="Multiple-choice QA (lm-eval): acc, C⇓, T⇑, MaxKV, PeakKV per mode",
    check=check_config,
)
