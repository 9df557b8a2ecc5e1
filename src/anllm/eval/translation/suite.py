"""The translation suite's glue: ``translation.*`` options and checks, one task's evaluation (our
methods and external hypotheses under the same metrics), its output files and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ...data.sources import TRANSLATION_INSTRUCTION
from ...modeling import is_anchor_aware
from .. import methods as registry
from ..metrics import (
    DEFAULT_COMET_MODEL,
    CometEnvError,
    CometUnavailable,
    comet_score_systems,
    find_comet_python,
    resolve_comet_checkpoint,
    sacrebleu_scores,
)
from ..methods import opt
from ..suites import TaskInputError
from .decode import TranslationRun, translate
from .prompts import PROMPT_FORMATS
from .testsets import TASKS, hypothesis_files, load_hypotheses, load_test_set, system_name, write_lines

log = logging.getLogger("anllm.eval.translation")

DEFAULT_METHODS = registry.DEFAULTS["translation"]


def _comet_check(spec: str | None, python: str | None, cache_dir: str | None,
                 notes: list[str]) -> tuple[str | None, CometEnvError | None]:
    """Before any generation: is COMET's environment there and its model loadable? Returns (the model
    to score with or None, the environment's error to raise once the other metrics are saved)."""
    if not spec:
        notes.append("translation: COMET disabled (translation.comet_model=null); BLEU/chrF reported.")
        return None, None
    try:
        find_comet_python(python)
        resolve_comet_checkpoint(spec, cache_dir)
        return spec, None
    except CometEnvError as e:
        return None, e
    except CometUnavailable as e:
        notes.append(f"translation: COMET not computed — {e} BLEU/chrF are reported.")
        log.warning(notes[-1])
        return None, None


def evaluate_translation(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    data_dir: str | Path | None,
    out_dir: Path | None = None,
    limit: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    hypotheses: Sequence[Path] = (),
    generate: bool = True,
    batch_size: int = 4,
    max_new_tokens: int = 512,
    comet_model: str | None = DEFAULT_COMET_MODEL,
    comet_batch_size: int = 8,
    comet_python: str | None = None,
    comet_cache_dir: str | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    instruction: str = TRANSLATION_INSTRUCTION,
    splitter: str | None = None,
    prompt_format: str = "alpaca",
    plots: bool = True,
    progress: bool = True,
    prefill_chunk_size: int | None = None,
    **generation: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run one translation task; returns (rows, notes). Writes hypotheses/per-segment files/plots
    to ``out_dir`` when given.

    COMET scores every system at the end, in one run of COMET's own environment (``comet_python``, on
    ``device``; :func:`anllm.eval.metrics.comet_score_systems`). A missing or broken environment
    raises :class:`~anllm.eval.metrics.CometEnvError` after everything else is done, with the rows
    (BLEU, chrF, cache metrics) and notes in its ``rows``/``notes``."""
    srcs, refs = load_test_set(task, data_dir, limit)
    notes: list[str] = []
    comet_label, comet_error = _comet_check(comet_model, comet_python, comet_cache_dir, notes)
    rows: list[dict[str, Any]] = []
    hyps_of: list[list[str]] = []  # per row, for COMET at the end
    runs: list[TranslationRun] = []

    def metrics_row(method: str, hyps: list[str]) -> dict[str, Any]:
        scores = sacrebleu_scores(hyps, refs).as_dict()
        row: dict[str, Any] = {"suite": "translation", "task": task, "method": method, "split": "test", "n": len(srcs)}
        for k in ("bleu", "chrf", "bleu_signature", "chrf_signature"):
            row[k] = scores[k]
        row["comet"] = None
        row["comet_model"] = None
        hyps_of.append(list(hyps))
        return row

    if hypotheses:
        n_total = len(load_test_set(task, data_dir, None)[0])
        for path in hypotheses:
            row = metrics_row(system_name(path), load_hypotheses(path, len(srcs), n_total))
            row["note"] = f"external outputs: {path.name}"
            rows.append(row)
    if generate:
        if model is None:
            raise ValueError("translation: no model to generate with; pass a checkpoint or translation.hypotheses=FILE.")
        for method in methods:
            run = translate(
                model,
                tokenizer,
                srcs,
                method,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                instruction=instruction,
                splitter=splitter,
                prompt_format=prompt_format,
                progress=progress,
                prefill_chunk_size=prefill_chunk_size,
                **generation,
            )
            runs.append(run)
            row = metrics_row(method, run.hypotheses)
            row.update(run.cache_metrics())
            row.update({k: generation[k] for k in ("src_cache", "decoding", "position_mode", "template") if k in generation})
            row["max_new_tokens"] = max_new_tokens
            row["prompt_format"] = prompt_format
            truncated = sum(g >= max_new_tokens for g in run.gen_tokens)
            if truncated:
                row["note"] = f"{truncated}/{len(srcs)} outputs hit max_new_tokens={max_new_tokens}"
            rows.append(row)
            if out_dir is not None:
                _save_run(Path(out_dir), run, srcs, refs)
    if out_dir is not None and plots and runs:
        _plots(Path(out_dir), runs, model, tokenizer)
    if comet_label and rows:
        try:
            systems = {str(i): (srcs, hyps, refs) for i, hyps in enumerate(hyps_of)}
            scores = comet_score_systems(systems, comet_label, batch_size=comet_batch_size, device=device,
                                         python=comet_python, cache_dir=comet_cache_dir, num_threads=num_threads)
            for i, row in enumerate(rows):
                row["comet"], row["comet_model"] = scores[str(i)].system, comet_label
        except CometUnavailable as e:
            notes.append(f"translation: COMET not computed — {e} BLEU/chrF are reported.")
            log.warning(notes[-1])
        except CometEnvError as e:
            comet_error = e
    if comet_error is not None:
        notes.append(f"translation: COMET not computed — {comet_error} BLEU/chrF are reported.")
        comet_error.rows, comet_error.notes = rows, notes
        raise comet_error
    return rows, notes


def _save_run(out_dir: Path, run: TranslationRun, srcs: Sequence[str], refs: Sequence[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = run.method.replace("+", "_")
    write_lines(out_dir / f"{tag}.hyp.en", run.hypotheses)
    with open(out_dir / f"{tag}.segments.jsonl", "w", encoding="utf-8") as f:
        for i, (s, r) in enumerate(zip(srcs, refs)):
            rec = {
                "i": i,
                "src": s,
                "ref": r,
                "hyp": run.hypotheses[i],
                "raw": run.raw[i],
                "prompt_tokens": run.prompt_tokens[i],
                "gen_tokens": run.gen_tokens[i],
                "kv_seen": run.seen[i],
                "kv_kept": run.kept[i],
                "max_kv": run.max_kept[i],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _plots(out_dir: Path, runs: list[TranslationRun], model: Any, tokenizer: Any) -> None:
    from ..plots import plot_ansan_mask_for_text, plot_cache_over_steps

    seg = runs[0].trace_segments[0] if runs[0].trace_segments else 0
    traces = {}
    for run in runs:
        if run.trace and run.trace_segments:
            col = run.trace_segments.index(seg)
            traces[run.method] = [step[col] for step in run.trace]
    if traces:
        plot_cache_over_steps(traces, out_dir / "cache_over_steps.png", title=f"KV cache while translating segment {seg}")
    if is_anchor_aware(model):
        plot_ansan_mask_for_text(model, tokenizer, runs[0].prompts[seg], out_dir / "ansan_mask.png")


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    """Suite entry point (see :mod:`anllm.eval.suites`)."""
    tcfg = opt(cfg, "translation", {})
    hyp_files = hypothesis_files(opt(tcfg, "hypotheses"))
    generate = opt(tcfg, "generate")
    if generate is None:
        generate = not hyp_files
    model = getattr(bundle, "model", None)
    anchor_aware = model is not None and is_anchor_aware(model)
    methods, notes = registry.resolve_methods(tcfg, opt(cfg, "modes"), anchor_aware, "translation")
    comet_error: CometEnvError | None = None
    try:
        rows, run_notes = _evaluate(bundle, cfg, tcfg, task, out_dir, model, methods, hyp_files, generate)
    except CometEnvError as e:  # the other metrics are done: save and report them, then exit 2
        rows, run_notes, comet_error = e.rows, e.notes, e
    notes = notes + run_notes
    bundle_notes = getattr(bundle, "notes", None)
    if bundle_notes is not None:
        for note in notes:
            if note not in bundle_notes:
                bundle_notes.append(note)
    if notes and rows:
        for row in rows:
            if row.get("comet") is None and not row.get("note"):
                row["note"] = "no COMET model (see notes)"
    if comet_error is not None:
        raise TaskInputError(str(comet_error), rows)
    return rows


def _evaluate(bundle: Any, cfg: Any, tcfg: Any, task: str, out_dir: Path, model: Any, methods: Sequence[str],
              hyp_files: Sequence[Path], generate: bool) -> tuple[list[dict[str, Any]], list[str]]:
    return evaluate_translation(
        model,
        getattr(bundle, "tokenizer", None),
        task,
        data_dir=opt(cfg, "data_dir"),
        out_dir=out_dir,
        limit=opt(cfg, "limit"),
        methods=methods,
        hypotheses=hyp_files,
        generate=bool(generate),
        batch_size=int(opt(tcfg, "batch_size", opt(cfg, "batch_size", 4))),
        max_new_tokens=int(opt(tcfg, "max_new_tokens", 512)),
        comet_model=tcfg.get("comet_model", DEFAULT_COMET_MODEL) if hasattr(tcfg, "get") else DEFAULT_COMET_MODEL,
        comet_batch_size=int(opt(tcfg, "comet_batch_size", 8)),
        comet_python=opt(tcfg, "comet_python"),
        comet_cache_dir=opt(tcfg, "comet_cache_dir"),
        device=str(opt(cfg, "device", "auto")),
        num_threads=opt(cfg, "num_threads"),
        instruction=str(opt(tcfg, "instruction", TRANSLATION_INSTRUCTION)),
        splitter=opt(tcfg, "splitter"),
        prompt_format=str(opt(tcfg, "prompt_format", "alpaca")),
        plots=bool(opt(tcfg, "plots", True)),
        progress=bool(opt(cfg, "progress", True)),
        prefill_chunk_size=opt(tcfg, "prefill_chunk_size"),
        template=str(opt(tcfg, "template", "anllm")),
        src_cache=str(opt(tcfg, "src_cache", "prompt")),
        position_mode=str(opt(cfg, "position_mode", "true")),
        decoding=str(opt(tcfg, "decoding", "greedy")),
        seed=int(opt(tcfg, "seed", 0)),
    )


def _selected_tasks(cfg: Any, known: Sequence[str], default: Sequence[str]) -> list[str]:
    requested = opt(cfg, "tasks")
    if requested is None:
        return list(default)
    requested = [requested] if isinstance(requested, str) else list(requested)
    return [t for t in requested if t in known]


def check(cfg: Any) -> None:
    """Validate ``translation.*`` and the data before the model loads (errors name the fix)."""
    tcfg = opt(cfg, "translation", {})
    explicit = opt(tcfg, "methods")
    for m in [explicit] if isinstance(explicit, str) else list(explicit or []):
        registry.canonical(m, "translation")
    hypothesis_files(opt(tcfg, "hypotheses"))
    if str(opt(tcfg, "prompt_format", "alpaca")) not in PROMPT_FORMATS:
        raise ValueError(f"translation.prompt_format={opt(tcfg, 'prompt_format')!r}: choose one of {PROMPT_FORMATS}.")
    for key in ("max_new_tokens", "comet_batch_size", "batch_size"):
        value = opt(tcfg, key)
        if value is not None and int(value) < 1:
            raise ValueError(f"translation.{key} must be >= 1, got {value}.")
    for task in _selected_tasks(cfg, tuple(TASKS), ("wmt23_de_en",)):
        if opt(cfg, "data_dir") is not None:
            load_test_set(task, opt(cfg, "data_dir"), 1)


def _make_suite() -> Any:
    from ..suites import Suite

    return Suite(
        name="translation",
        tasks=tuple(TASKS),
        default_tasks=("wmt23_de_en",),
        run_task=run_task,
        describe="WMT De→En (Alpaca prompt, greedy): BLEU, chrF, COMET-DA, C⇓, MaxKV, tokens/s",
        check=check,
    )


SUITE = _make_suite()
