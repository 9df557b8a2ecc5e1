"""Perplexity suite: long documents scored chunk by chunk through a cache, full vs anchor cache.

Why chunks: this is how a long text is read under a memory budget. With the full cache every chunk
attends everything before it; with :class:`anllm.AnchorCache` only what the AnSAN rule still needs
(earlier anchors + the open sentence) is kept between chunks. Because the anchor cache is lossless,
``anchor`` must give the same PPL as ``ansan`` (the AnSAN mask over the whole document at once; tested
to float noise), at a fraction of the cache: the rows show PPL, C⇓ (1 − kept/seen keys/values after
the document), MaxKV (peak keys/values held between chunks), time and T⇑ against ``full``.

Methods:

* ``full`` (causal attention, full cache), ``ansan`` (AnSAN, full cache), ``anchor`` (AnSAN +
  AnchorCache);
* ``sentence``: the *sentence-only control* — AnSAN with earlier anchors hidden, so every token sees
  only its own sentence (and sinks). ``anchor`` minus ``sentence`` is what the anchors carry;
* ``streamingllm`` / ``knorm``: training-free baselines at **equal cache**: causal attention where
  every token attends at most ``budget`` keys — sinks + the most recent tokens, or the lowest-norm
  keys per layer and head (:mod:`anllm.eval.baselines`). ``budget`` is, per document, the most keys
  any token attends under the AnSAN rule (the anchor cache's peak: equal *peak memory*); for a model
  without anchors the last token of every sentence stands in for an anchor (the budget an AC model
  would get), or set ``ppl.budget`` to a number;
* ``streamingllm_q``: StreamingLLM at equal keys *per query*: each token attends exactly as many keys
  as the anchor reading lets that token attend (equal attention cost and mean memory).

Every row reports ``mean_kv`` (keys a token attends, averaged over the tokens) and ``peak_kv`` (the
most keys a token attends; both averaged over documents) beside ``max_kv`` (the cache held between
chunks), so both definitions of "the same cache" can be read off; with ``ppl.tail_from`` (e.g. 2048) a
row also has ``ppl_tail``: the perplexity of the tokens at positions >= tail_from only, where a window
has long lost the start of the document.

Documents come from ``data_dir/pretrain_text`` (RedPajama layout ``{"text", "meta"}``); pick held-out
ones with ``ppl.where`` (e.g. ``{meta.source: nltk_inaugural}``) and ``ppl.select``, or read the
held-out split of a training data config with task ``holdout`` and ``ppl.data`` (see
:mod:`anllm.data.split`).

This module is the suite's glue (``ppl.*`` options, checks, the task entry point); the work is in
:mod:`anllm.eval.documents` (which documents), :mod:`anllm.eval.ppl_core` (scoring and rows),
:mod:`anllm.eval.budgets` (the baselines' budgets) and :mod:`anllm.eval.methods` (the method names).
Their public names are re-exported here, so ``perplexity.score_document`` etc. keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..modeling import is_anchor_aware
from ..schema.core import plain
from . import methods as registry
from .budgets import document_budget, keys_per_query, mean_keys_per_query, query_budgets, sentence_end_tokens
from .documents import HOLDOUT_TASK, SELECT, TASKS, documents_for, load_documents, select_documents
from .methods import NEEDS_ANCHORS, PPL_METHODS, opt, ppl_method, runnable_methods
from .ppl_core import (
    DocScore, full_sequence_token_nll, mean_se, perplexity_rows, score_document, score_documents,
)

__all__ = [
    "DEFAULT_METHODS", "HOLDOUT_TASK", "NEEDS_ANCHORS", "PPL_METHODS", "SELECT", "SUITE", "TASKS", "DocScore",
    "check", "document_budget", "documents_for", "full_sequence_token_nll", "keys_per_query", "load_documents",
    "mean_keys_per_query", "mean_se", "perplexity_rows", "ppl_method", "query_budgets", "row_options",
    "run_task", "runnable_methods", "score_document", "score_documents", "select_documents", "sentence_end_tokens",
]

DEFAULT_METHODS = registry.DEFAULTS["ppl"]


def row_options(cfg: Any) -> dict[str, Any]:
    """The ``ppl.*`` settings that shape the rows (shared by evaluate.py and the training check)."""
    pcfg = opt(cfg, "ppl", {})
    max_tokens = pcfg.get("max_tokens", 2048) if hasattr(pcfg, "get") else 2048
    budget = opt(pcfg, "budget")
    tail_from = opt(pcfg, "tail_from")
    offset_bins = opt(pcfg, "offset_bins")
    return {
        "tail_from": None if tail_from is None else int(tail_from),
        "offset_bins": None if offset_bins is None else [int(b) for b in offset_bins],
        "chunk_size": int(opt(pcfg, "chunk_size", 256)),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "budget": None if budget is None else int(budget),
        "num_sink_tokens": int(opt(pcfg, "num_sink_tokens", 4)),
        "position_mode": str(opt(cfg, "position_mode", "true")),
    }


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    """Suite entry point (see :mod:`anllm.eval.suites`)."""
    methods, notes = registry.resolve_methods(opt(cfg, "ppl", {}), opt(cfg, "modes"), is_anchor_aware(bundle.model),
                                              "ppl")
    rows = score_documents(
        bundle.model, bundle.tokenizer, bundle.anchor, documents_for(cfg, task), methods, task=task,
        out_dir=out_dir, progress=bool(opt(cfg, "progress", True)), **row_options(cfg),
    )
    for note in notes:
        if note not in bundle.notes:
            bundle.notes.append(note)
    return rows


def check(cfg: Any) -> None:
    """Validate ``ppl.*`` and the documents before the model loads (errors name the fix)."""
    pcfg = opt(cfg, "ppl", {})
    explicit = opt(pcfg, "methods")
    names = explicit if explicit else [m for m in (opt(cfg, "modes") or []) if m not in registry.FROM_MODES["ppl"]]
    for m in [names] if isinstance(names, str) else list(names or []):
        try:
            ppl_method(m)
        except ValueError as e:
            where = "ppl.methods" if explicit else "modes"
            raise ValueError(f"{where}: {e} The perplexity suite knows {PPL_METHODS}.") from None
    for key in ("chunk_size", "max_tokens", "num_documents", "budget", "tail_from"):
        value = opt(pcfg, key)
        if value is not None and int(value) < 1:
            raise ValueError(f"ppl.{key} must be >= 1, got {value}.")
    bins = opt(pcfg, "offset_bins")
    if bins is not None and (not len(bins) or int(bins[0]) != 1 or any(int(b) <= int(a) for a, b in zip(bins, bins[1:]))):
        raise ValueError(f"ppl.offset_bins must be increasing lower edges starting at 1 (e.g. [1, 2, 5, 9, 17, 33]), "
                         f"got {list(bins)}.")
    if str(opt(pcfg, "select", "last")) not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {opt(pcfg, 'select')!r}.")
    requested = opt(cfg, "tasks")
    tasks = ["speeches"] if requested is None else [t for t in ([requested] if isinstance(requested, str) else list(requested)) if t in TASKS or t == HOLDOUT_TASK]
    for task in tasks:
        if task == HOLDOUT_TASK:
            data = plain(opt(pcfg, "data"))
            if not isinstance(data, dict) or data.get("kind") not in ("jsonl", "demo"):
                raise ValueError(
                    "ppl task holdout reads the held-out split of a training data config: pass ppl.data={kind: jsonl, "
                    "paths: [...], holdout_fraction: ...} (the run's data section, e.g. from anllm_train_config.yaml)."
                )
            continue
        if opt(cfg, "data_dir") is None:
            raise FileNotFoundError("The perplexity suite reads data_dir/pretrain_text: pass data_dir=../shared/data.")
        path = Path(str(opt(cfg, "data_dir"))).expanduser() / TASKS[task]
        if not path.is_file():
            raise FileNotFoundError(f"ppl task {task}: {path} not found (expected {TASKS[task]} under data_dir).")


def _make_suite() -> Any:
    from .suites import Suite

    return Suite(
        check=check,
        name="ppl",
        tasks=(*TASKS, HOLDOUT_TASK),
        default_tasks=("speeches",),
        run_task=run_task,
        describe="Perplexity of long held-out documents read in chunks: full vs anchor cache (PPL, C⇓, MaxKV, T⇑)",
    )


SUITE = _make_suite()
