"""The scoring core of the perplexity suite: long documents read chunk by chunk through a method's cache.

Why chunks: this is how a long text is read under a memory budget. With the full cache every chunk
attends everything before it; with :class:`anllm.AnchorCache` only what the AnSAN rule still needs
(earlier anchors + the open sentence) is kept between chunks. The equal-cache baselines read the
document in one forward with their bounded masks (:mod:`anllm.eval.baselines`), at the budgets of
:mod:`anllm.eval.budgets`. :func:`perplexity_rows` turns the scores into report rows (PPL, C⇓, MaxKV,
MeanKV, PeakKV, time, T⇑, paired errors against ``anchor``); :func:`score_documents` is what the
suite (:mod:`anllm.eval.perplexity`) and the training run's held-out check (:mod:`anllm.train.heldout`)
call.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache

from ..anchors import marking_of
from . import baselines
from . import methods as registry
from .budgets import anchor_tokens, keys_per_query, query_budgets
from .generation import kept_per_row
from .methods import attention, new_cache, ppl_method


@dataclass
class DocScore:
    nll: float  # summed over predicted tokens
    tokens: int  # predicted tokens (document length - 1)
    seen: int
    kept: int
    max_kept: int
    time_s: float
    token_nll: torch.Tensor | None = None
    trace: list[int] = field(default_factory=list)  # kept after each chunk
    nll_tail: float = 0.0  # summed over predicted tokens at positions >= tail_from
    tokens_tail: int = 0


@torch.no_grad()
def score_document(
    model: Any,
    input_ids: torch.Tensor,
    method: str,
    *,
    chunk_size: int = 256,
    return_token_nll: bool = False,
    skip_target_ids: Sequence[int] = (),
    budget: int | torch.Tensor | None = None,
    num_sink_tokens: int = 4,
    position_mode: str = "true",
    tail_from: int | None = None,
) -> DocScore:
    """Negative log-likelihood of one document (``[L]`` ids) read in chunks through ``method``'s cache.

    ``skip_target_ids`` (e.g. the ``<AC>`` id) are read but not scored as targets, so an AC model's
    PPL is over the same text tokens as a plain model's. ``budget`` (keys per token) is required for
    the equal-cache baselines, which read the document in one forward with their bounded masks
    (``streamingllm_q``: ``[L]`` keys, one budget per query). ``tail_from`` also sums the NLL of the
    predicted tokens at positions >= ``tail_from``.
    """
    method = ppl_method(method)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    L = ids.shape[1]
    if L < 2:
        raise ValueError("A document needs at least 2 tokens to score.")
    t0 = time.perf_counter()
    if method in baselines.STREAMING_METHODS:
        if budget is None:
            raise ValueError(f"Method {method!r} needs a cache budget (keys per token).")
        logits = baselines.baseline_logits(model, ids[0], method, budget, num_sink_tokens).float()
        b = torch.as_tensor(budget)
        kept, peak = (int(b[-1]), int(b.max())) if b.dim() else (min(int(b), L), min(int(b), L))
        token_nll = -torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
        return _doc_score(token_nll, ids[0, 1:], skip_target_ids, L, kept, peak, time.perf_counter() - t0,
                          return_token_nll, [kept], tail_from)
    cache: Cache = new_cache(method, position_mode)
    nlls: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    prev_last: torch.Tensor | None = None
    trace: list[int] = []
    peak = 0
    with attention(model, method):
        for start in range(0, L, chunk_size):
            chunk = ids[:, start : start + chunk_size]
            am = torch.ones((1, start + chunk.shape[1]), dtype=torch.long, device=ids.device)
            logits = model(input_ids=chunk, attention_mask=am, past_key_values=cache, use_cache=True).logits[0].float()
            if prev_last is not None:
                logits = torch.cat([prev_last[None], logits], dim=0)
                targets = chunk[0]
            else:
                targets = chunk[0, 1:]
            prev_last = logits[-1]
            logp = torch.log_softmax(logits[: targets.shape[0]], dim=-1)
            nlls.append(-logp.gather(-1, targets[:, None])[:, 0])
            all_targets.append(targets)
            kept = kept_per_row(cache, am)[0]
            peak = max(peak, kept)
            trace.append(kept)
    return _doc_score(torch.cat(nlls), torch.cat(all_targets), skip_target_ids, L, trace[-1], peak,
                      time.perf_counter() - t0, return_token_nll, trace, tail_from)


def _doc_score(token_nll: torch.Tensor, targets: torch.Tensor, skip_target_ids: Sequence[int], seen: int, kept: int,
               peak: int, elapsed: float, return_token_nll: bool, trace: list[int], tail_from: int | None = None) -> DocScore:
    position = torch.arange(1, targets.shape[0] + 1, device=targets.device)  # of each predicted token
    if len(skip_target_ids):
        scored = ~torch.isin(targets, torch.tensor(list(skip_target_ids), device=targets.device))
        token_nll, position = token_nll[scored], position[scored]
    tail = position >= tail_from if tail_from is not None else torch.zeros_like(position, dtype=torch.bool)
    return DocScore(
        nll=float(token_nll.sum()),
        tokens=int(token_nll.numel()),
        seen=seen,
        kept=kept,
        max_kept=peak,
        time_s=elapsed,
        token_nll=token_nll.cpu() if return_token_nll else None,
        trace=trace,
        nll_tail=float(token_nll[tail].sum()),
        tokens_tail=int(tail.sum()),
    )


def full_sequence_token_nll(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL from one forward over the whole document (no cache): the reference the chunked
    scores must match (AnSAN on an anchor-aware model, causal otherwise)."""
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return -logp.gather(-1, ids[0, 1:, None])[:, 0].cpu()


def perplexity_rows(
    model: Any,
    tokenizer: Any,
    docs: Sequence[tuple[str, str]],
    methods: Sequence[str],
    *,
    task: str,
    chunk_size: int = 256,
    max_tokens: int | None = 2048,
    out_dir: Path | None = None,
    progress: bool = True,
    skip_target_ids: Sequence[int] = (),
    budget: int | None = None,
    num_sink_tokens: int = 4,
    position_mode: str = "true",
    tail_from: int | None = None,
    offset_bins: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One row per method over all ``docs``: corpus PPL (exp of mean token NLL), C⇓, MaxKV (peak keys),
    MeanKV (keys per query), time, T⇑; with ``tail_from`` also the PPL of positions >= tail_from; with
    ``offset_bins`` (increasing lower edges from 1, e.g. ``[1, 2, 5, 9, 17, 33]``) the mean NLL of the
    tokens by how far after the last anchor they come (:func:`sentence_offsets`), and its paired
    difference to ``anchor``: where in a sentence the readings part.

    ``streamingllm``/``knorm`` get ``budget`` keys per token, or (``None``) each document's
    :func:`document_budget` (the anchor reading's peak); ``streamingllm_q`` gets, token by token, the
    keys the anchor reading attends (:func:`query_budgets`).
    """
    from tqdm.auto import tqdm

    methods = [ppl_method(m) for m in methods]
    encoded = []
    offsets: list[torch.Tensor] = []
    for doc_id, text in docs:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        per_query = query_budgets(model, tokenizer, text, ids)
        sentence = query_budgets(model, tokenizer, text, ids, hide_anchors=True) if "sentence" in methods else None
        peak = int(per_query.max()) if budget is None else int(budget)
        encoded.append((doc_id, ids, peak, per_query, sentence))
        if offset_bins is not None:
            edges = torch.tensor(list(offset_bins))
            scored = ~torch.isin(ids[1:], torch.tensor(list(skip_target_ids), dtype=ids.dtype))
            bins = torch.bucketize(sentence_offsets(anchor_tokens(model, tokenizer, text, ids)[0]), edges, right=True) - 1
            offsets.append(bins[scored])  # aligned with the scored targets' token NLLs

    def budget_for(method: str, peak: int, per_query: torch.Tensor) -> Any:
        return per_query if method == baselines.PER_QUERY else peak

    rows: list[dict[str, Any]] = []
    per_doc: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        scores = [
            score_document(model, ids, method, chunk_size=chunk_size, skip_target_ids=skip_target_ids,
                           budget=budget_for(method, b, bq), num_sink_tokens=num_sink_tokens,
                           position_mode=position_mode, tail_from=tail_from, return_token_nll=bool(offsets))
            for _, ids, b, bq, _ in tqdm(encoded, desc=f"ppl [{method}]", disable=not progress, leave=False)
        ]
        kpq = [keys_per_query(method, len(ids), b, bq, sq).double() for _, ids, b, bq, sq in encoded]
        mean_kv = [float(k.mean()) for k in kpq]
        nll, n = sum(s.nll for s in scores), sum(s.tokens for s in scores)
        seen, kept = sum(s.seen for s in scores), sum(s.kept for s in scores)
        t = sum(s.time_s for s in scores)
        row = {
            "suite": "ppl",
            "task": task,
            "method": method,
            "n": len(docs),
            "ppl": math.exp(nll / n),
            "nll": nll / n,
            "c_red": 1.0 - kept / seen,
            "max_kv": sum(s.max_kept for s in scores) / len(scores),
            "mean_kv": sum(mean_kv) / len(mean_kv),
            "peak_kv": sum(float(k.max()) for k in kpq) / len(kpq),  # the most keys a token attends, per document
            "kv_kept": int(kept),
            "kv_total": int(seen),
            "time_s": t,
            "tokens_per_s": seen / t if t > 0 else 0.0,
            "chunk_size": chunk_size,
            "max_tokens": max_tokens,
        }
        if registry.METHODS[method].budget == "peak":
            row["budget"] = round(sum(e[2] for e in encoded) / len(encoded), 1)
        n_tail = sum(s.tokens_tail for s in scores)
        if tail_from is not None:
            row["tail_from"] = tail_from
            row["ppl_tail"] = math.exp(sum(s.nll_tail for s in scores) / n_tail) if n_tail else None
            row["tokens_tail"] = n_tail
        rows.append(row)
        per_doc[method] = [
            {"doc": d, "tokens": s.tokens, "nll": s.nll, "ppl": math.exp(s.nll / s.tokens), "kv_seen": s.seen,
             "kv_kept": s.kept, "max_kv": s.max_kept, "mean_kv": mkv, "kv_after_chunk": s.trace,
             **({"nll_tail": s.nll_tail, "tokens_tail": s.tokens_tail} if tail_from is not None else {}),
             **({"budget": b} if registry.METHODS[method].budget == "peak" else {})}
            for (d, _, b, _, _), s, mkv in zip(encoded, scores, mean_kv)
        ]
        if offsets:
            for d, s, bins in zip(per_doc[method], scores, offsets):
                n_bins = len(offset_bins)  # type: ignore[arg-type]
                d["offset_nll"] = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, s.token_nll.double()).tolist()
                d["offset_tokens"] = torch.bincount(bins, minlength=n_bins).tolist()
            nll_b = [sum(d["offset_nll"][i] for d in per_doc[method]) for i in range(len(offset_bins))]  # type: ignore[arg-type]
            tok_b = [sum(d["offset_tokens"][i] for d in per_doc[method]) for i in range(len(offset_bins))]  # type: ignore[arg-type]
            row.update(offset_bins=list(offset_bins), offset_tokens=tok_b,  # type: ignore[arg-type]
                       offset_nll=[x / n if n else None for x, n in zip(nll_b, tok_b)])
    _add_paired_errors(rows, per_doc)
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is not None:
        for r in rows:
            r["t_up"] = full["time_s"] / r["time_s"] if r["time_s"] > 0 else None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "documents.json").write_text(json.dumps(per_doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return rows


def _add_paired_errors(rows: list[dict[str, Any]], per_doc: dict[str, list[dict[str, Any]]]) -> None:
    """For every method beside ``anchor``: the mean per-document difference of log-PPL (method − anchor)
    and its standard error, so "A beats B" can be read against noise (positive = the anchor reading is
    better). Documents are the unit: their differences are independent, their tokens are not."""
    if "anchor" not in per_doc:
        return
    ref = [d["nll"] / d["tokens"] for d in per_doc["anchor"]]
    for r in rows:
        if r["method"] == "anchor" or r["method"] not in per_doc:
            continue
        diffs = [d["nll"] / d["tokens"] - a for d, a in zip(per_doc[r["method"]], ref)]
        r["dlogppl_vs_anchor"], r["dlogppl_se"] = mean_se(diffs)
        if "offset_nll" in r:  # the same by offset bin, over the documents that have tokens in the bin
            pairs = list(zip(per_doc[r["method"]], per_doc["anchor"]))
            cells = [mean_se(ds) if (ds := [m["offset_nll"][i] / m["offset_tokens"][i] - a["offset_nll"][i] / a["offset_tokens"][i]
                                            for m, a in pairs if a["offset_tokens"][i]]) else (None, None)
                     for i in range(len(r["offset_bins"]))]
            r["offset_dnll_vs_anchor"], r["offset_dnll_se"] = [c[0] for c in cells], [c[1] for c in cells]


def sentence_offsets(is_anchor: torch.Tensor) -> torch.Tensor:
    """``[L - 1]``: for each predicted token (positions 1..L-1), how many tokens after the last anchor
    before it it comes (1: right after an anchor); before the first anchor, counted from the document
    start (position + 1). Under the AnSAN rule a token at offset o sees its sentence's o - 1 earlier
    tokens, earlier anchors and sinks; a window of the same size sees the most recent tokens instead."""
    pos = torch.arange(is_anchor.numel())
    last = torch.where(is_anchor.cpu().bool(), pos, torch.full_like(pos, -1)).cummax(0).values
    return pos[1:] - last[:-1]


def mean_se(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); None for n < 2)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def score_documents(
    model: Any, tokenizer: Any, anchor: dict[str, Any] | None, docs: Sequence[tuple[str, str]],
    methods: Sequence[str], *, task: str, **options: Any,
) -> list[dict[str, Any]]:
    """:func:`perplexity_rows` for a model with ``anchor`` settings (``bundle.anchor``): AC models read
    text the way they were trained, ``<AC>`` after every sentence (read, not scored)."""
    skip: list[int] = []
    marking = marking_of(anchor)
    if marking is not None:
        docs = [(doc_id, marking.apply(text)) for doc_id, text in docs]
        skip = list(anchor.get("anchor_token_ids") or [])  # type: ignore[union-attr]
    return perplexity_rows(model, tokenizer, docs, methods, task=task, skip_target_ids=skip, **options)

