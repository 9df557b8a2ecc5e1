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
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache

from ..anchors import marking_of
from ..modeling import anchor_options, is_anchor_aware
from . import baselines
from .generation import canonical_method, kept_per_row, make_cache, method_attention

# task -> file under data_dir
TASKS: dict[str, str] = {
    "speeches": "pretrain_text/us_presidential_speeches_nltk.jsonl",
    "gutenberg": "pretrain_text/gutenberg_books.jsonl",
    "wikipedia": "pretrain_text/wikipedia_enwiki_sample.jsonl",
    "abc_news": "pretrain_text/abc_news_nltk.jsonl",
    "lee_news": "pretrain_text/lee_background_news.jsonl",
}
HOLDOUT_TASK = "holdout"  # the held-out split of ``ppl.data`` (a training data config)
PPL_METHODS = ("full", "ansan", "anchor", "sentence", "streamingllm", "streamingllm_q", "knorm")
DEFAULT_METHODS = ("full", "ansan", "anchor")
NEEDS_ANCHORS = ("ansan", "anchor", "sentence")


def runnable_methods(methods: Sequence[str], anchor_aware: bool) -> tuple[list[str], list[str]]:
    """``(methods a model can be read with, methods skipped)``: a model without anchor settings has
    no anchor/AnSAN/sentence reading. The one statement of that rule (PPL, recall, the study report)."""
    if anchor_aware:
        return list(methods), []
    return [m for m in methods if m not in NEEDS_ANCHORS], [m for m in methods if m in NEEDS_ANCHORS]


# ---- documents ------------------------------------------------------------------------------------


def _get_path(record: dict[str, Any], key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def load_documents(
    task: str,
    data_dir: str | Path | None,
    *,
    limit: int | None = None,
    where: dict[str, Any] | None = None,
    select: str = "last",
    min_chars: int = 2000,
) -> list[tuple[str, str]]:
    """``(doc_id, text)`` of ``task``'s documents matching ``where`` (``{"meta.source": "nltk_inaugural"}``;
    a value may be a list), at least ``min_chars`` long; ``select="last"`` takes the file's last
    ``limit`` documents (a hold-out), ``"first"`` the first."""
    if task not in TASKS:
        raise ValueError(f"Unknown perplexity task {task!r}: choose one of {sorted(TASKS)}.")
    if data_dir is None:
        raise FileNotFoundError(
            f"The perplexity suite reads {TASKS[task]} from data_dir: pass data_dir=../shared/data."
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} does not exist. Pass data_dir=../shared/data (relative to the repo).")
    path = root / TASKS[task]
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {path} not found under data_dir {root} (expected {TASKS[task]}).")
    if select not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {select!r}.")
    docs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            ok = True
            for key, want in (where or {}).items():
                got = _get_path(rec, key)
                wants = list(want) if isinstance(want, (list, tuple)) else [want]
                if got not in wants and str(got) not in [str(w) for w in wants]:
                    ok = False
                    break
            if ok and len(rec.get("text", "")) >= min_chars:
                meta = rec.get("meta", {}) or {}
                doc_id = str(meta.get("title") or meta.get("file") or f"{path.stem}:{n}")
                if "chunk" in meta:
                    doc_id += f"#{meta['chunk']}"
                docs.append((doc_id, rec["text"]))
    if not docs:
        raise ValueError(f"{task}: no document in {path} matches ppl.where={where} with at least {min_chars} characters.")
    return select_documents(docs, limit, select, min_chars)


# ---- scoring ---------------------------------------------------------------------------------------


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


def ppl_method(name: str) -> str:
    """Validate a perplexity method (generation aliases such as ``causal`` accepted)."""
    if name in PPL_METHODS:
        return name
    m = canonical_method(name)
    if m == "anchor+src":
        raise ValueError("anchor+src keeps the first chunk whole; it is a translation variant, not a PPL method.")
    return m


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
    cache: Cache = make_cache("anchor" if method == "sentence" else method, position_mode)
    nlls: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    prev_last: torch.Tensor | None = None
    trace: list[int] = []
    peak = 0
    rule = anchor_options(model, hide_anchors=True) if method == "sentence" else contextlib.nullcontext()
    with method_attention(model, "anchor" if method == "sentence" else method), rule:
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


def document_budget(model: Any, tokenizer: Any, text: str, ids: torch.Tensor) -> int:
    """Keys per token the equal-cache baselines get for one document: the anchor cache's peak (the most
    keys any token attends under the model's AnSAN rule); without anchors, the last token of every
    sentence plays the anchor (what an AC model would keep for the same text)."""
    return int(query_budgets(model, tokenizer, text, ids).max())


def query_budgets(model: Any, tokenizer: Any, text: str, ids: torch.Tensor, hide_anchors: bool = False) -> torch.Tensor:
    """``[L]``: the keys each token of one document attends under the model's AnSAN rule (its sinks,
    anchors, open sentence and window); without anchors, as :func:`document_budget` says.
    ``hide_anchors``: the same under the sentence-only control."""
    from dataclasses import replace

    from ..masks import AnsanOptions

    att = getattr(model, "_anllm_attention", None)
    if att is not None and att.cfg.enabled:
        is_anchor, options = torch.isin(ids.cpu(), att.anchor_ids), att.options
    else:
        is_anchor, options = sentence_end_tokens(tokenizer, text, len(ids)).clone(), AnsanOptions()
        # The text's last token is never an anchor: an AC model reads an <AC> *after* a finished last
        # sentence, and an open one (a recall cue) has none; marking it would shrink its own budget.
        is_anchor[-1:] = False
    return baselines.ansan_keys_per_query(is_anchor, replace(options, hide_anchors=hide_anchors))


def keys_per_query(method: str, length: int, budget: int | None, per_query: torch.Tensor | None,
                   sentence: torch.Tensor | None) -> torch.Tensor:
    """``[L]``: the keys each token of a document attends under ``method`` (``full``: every earlier
    token; ``anchor``/``ansan``: the AnSAN rule's row; ``sentence``: the control's; StreamingLLM and
    K-norm: their budget, capped by the tokens read so far). Its mean is the attention cost and mean
    memory, its max the peak a token-by-token reader holds."""
    q = torch.arange(1, length + 1)
    if method == "full":
        return q
    if method in ("anchor", "ansan", baselines.PER_QUERY):
        return per_query
    if method == "sentence":
        return sentence
    return q.clamp(max=int(budget))


def mean_keys_per_query(method: str, length: int, budget: int | None, per_query: torch.Tensor | None,
                        sentence: torch.Tensor | None) -> float:
    """The mean of :func:`keys_per_query`."""
    return float(keys_per_query(method, length, budget, per_query, sentence).double().mean())


def sentence_end_tokens(tokenizer: Any, text: str, length: int) -> torch.Tensor:
    """``[length]`` bool: the token that ends each sentence of ``text`` (the splitter's sentences)."""
    from ..anchors import sentence_spans

    enc = tokenizer(text, return_offsets_mapping=True)
    ends = torch.tensor([e for _, e in enc["offset_mapping"]][:length])
    out = torch.zeros(len(ends), dtype=torch.bool)
    for _, end in sentence_spans(text):
        hit = torch.nonzero(ends >= end)
        if len(hit):
            out[int(hit[0])] = True
    return out


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
) -> list[dict[str, Any]]:
    """One row per method over all ``docs``: corpus PPL (exp of mean token NLL), C⇓, MaxKV (peak keys),
    MeanKV (keys per query), time, T⇑; with ``tail_from`` also the PPL of positions >= tail_from.

    ``streamingllm``/``knorm`` get ``budget`` keys per token, or (``None``) each document's
    :func:`document_budget` (the anchor reading's peak); ``streamingllm_q`` gets, token by token, the
    keys the anchor reading attends (:func:`query_budgets`).
    """
    from tqdm.auto import tqdm

    methods = [ppl_method(m) for m in methods]
    encoded = []
    for doc_id, text in docs:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        per_query = query_budgets(model, tokenizer, text, ids)
        sentence = query_budgets(model, tokenizer, text, ids, hide_anchors=True) if "sentence" in methods else None
        peak = int(per_query.max()) if budget is None else int(budget)
        encoded.append((doc_id, ids, peak, per_query, sentence))

    def budget_for(method: str, peak: int, per_query: torch.Tensor) -> Any:
        return per_query if method == baselines.PER_QUERY else peak

    rows: list[dict[str, Any]] = []
    per_doc: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        scores = [
            score_document(model, ids, method, chunk_size=chunk_size, skip_target_ids=skip_target_ids,
                           budget=budget_for(method, b, bq), num_sink_tokens=num_sink_tokens,
                           position_mode=position_mode, tail_from=tail_from)
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
        if method in ("streamingllm", "knorm"):
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
             **({"budget": b} if method in ("streamingllm", "knorm") else {})}
            for (d, _, b, _, _), s, mkv in zip(encoded, scores, mean_kv)
        ]
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


def mean_se(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); None for n < 2)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


# ---- the suite ---------------------------------------------------------------------------------------


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_methods(pcfg: Any, run_modes: Sequence[str] | None, anchor_aware: bool) -> tuple[list[str], list[str]]:
    """Methods to run (``ppl.methods``, else the run's ``modes``) and notes on what was skipped."""
    explicit = _opt(pcfg, "methods")
    names = explicit if explicit else (run_modes or DEFAULT_METHODS)
    names = [names] if isinstance(names, str) else list(names)
    methods = []
    for m in names:
        if m in ("anchor+src", "ansan_src", "anchor_src", "src") and not explicit:
            continue  # a translation variant among the run's modes
        c = ppl_method(m)
        if c not in methods:
            methods.append(c)
    notes = []
    if not anchor_aware:
        methods, dropped = runnable_methods(methods, anchor_aware)
        methods = methods or ["full"]
        if dropped:
            notes.append(f"ppl: the model has no anchor settings, so anchor methods were skipped ({', '.join(dropped)}).")
    return methods, notes


def select_documents(docs: list[tuple[str, str]], limit: int | None, select: str, min_chars: int) -> list[tuple[str, str]]:
    """Documents of at least ``min_chars``; ``limit`` of them: the ``first``, the ``last`` or ``spread``
    evenly over the list (mixes the sources of a held-out split)."""
    if select not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {select!r}.")
    docs = [d for d in docs if len(d[1]) >= min_chars]
    if limit is None or limit >= len(docs):
        return docs
    if select == "first":
        return docs[:limit]
    if select == "last":
        return docs[-limit:]
    step = len(docs) / limit
    return [docs[int(i * step)] for i in range(limit)]


SELECT = ("first", "last", "spread")


def documents_for(cfg: Any, task: str) -> list[tuple[str, str]]:
    """The documents ``task`` scores under this run config (``ppl.*`` selects them)."""
    pcfg = _opt(cfg, "ppl", {})
    limit = _opt(cfg, "limit", _opt(pcfg, "num_documents", 8))
    select = str(_opt(pcfg, "select", "last"))
    min_chars = int(_opt(pcfg, "min_chars", 2000))
    if task == HOLDOUT_TASK:
        from ..data.split import held_out_documents

        docs = held_out_documents(_plain(_opt(pcfg, "data")), _opt(pcfg, "data_base_dir"))
        chosen = select_documents(docs, int(limit) if limit is not None else None, select, min_chars)
        if not chosen:
            raise ValueError(f"ppl.data holds out no document of at least {min_chars} characters (ppl.min_chars).")
        return chosen
    where = _plain(_opt(pcfg, "where"))
    if where is not None and not isinstance(where, dict):
        raise ValueError(f"ppl.where must be a mapping such as {{meta.source: nltk_inaugural}}, got {where!r}.")
    return load_documents(task, _opt(cfg, "data_dir"), limit=limit, where=where, select=select, min_chars=min_chars)


def _plain(x: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


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


def row_options(cfg: Any) -> dict[str, Any]:
    """The ``ppl.*`` settings that shape the rows (shared by evaluate.py and the training check)."""
    pcfg = _opt(cfg, "ppl", {})
    max_tokens = pcfg.get("max_tokens", 2048) if hasattr(pcfg, "get") else 2048
    budget = _opt(pcfg, "budget")
    tail_from = _opt(pcfg, "tail_from")
    return {
        "tail_from": None if tail_from is None else int(tail_from),
        "chunk_size": int(_opt(pcfg, "chunk_size", 256)),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "budget": None if budget is None else int(budget),
        "num_sink_tokens": int(_opt(pcfg, "num_sink_tokens", 4)),
        "position_mode": str(_opt(cfg, "position_mode", "true")),
    }


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    """Suite entry point (see :mod:`anllm.eval.suites`)."""
    methods, notes = resolve_methods(_opt(cfg, "ppl", {}), _opt(cfg, "modes"), is_anchor_aware(bundle.model))
    rows = score_documents(
        bundle.model, bundle.tokenizer, bundle.anchor, documents_for(cfg, task), methods, task=task,
        out_dir=out_dir, progress=bool(_opt(cfg, "progress", True)), **row_options(cfg),
    )
    for note in notes:
        if note not in bundle.notes:
            bundle.notes.append(note)
    return rows


def check(cfg: Any) -> None:
    """Validate ``ppl.*`` and the documents before the model loads (errors name the fix)."""
    pcfg = _opt(cfg, "ppl", {})
    explicit = _opt(pcfg, "methods")
    names = explicit if explicit else [m for m in (_opt(cfg, "modes") or []) if m not in ("anchor+src", "ansan_src", "anchor_src", "src")]
    for m in [names] if isinstance(names, str) else list(names or []):
        try:
            ppl_method(m)
        except ValueError as e:
            where = "ppl.methods" if explicit else "modes"
            raise ValueError(f"{where}: {e} The perplexity suite knows {PPL_METHODS}.") from None
    for key in ("chunk_size", "max_tokens", "num_documents", "budget", "tail_from"):
        value = _opt(pcfg, key)
        if value is not None and int(value) < 1:
            raise ValueError(f"ppl.{key} must be >= 1, got {value}.")
    if str(_opt(pcfg, "select", "last")) not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {_opt(pcfg, 'select')!r}.")
    requested = _opt(cfg, "tasks")
    tasks = ["speeches"] if requested is None else [t for t in ([requested] if isinstance(requested, str) else list(requested)) if t in TASKS or t == HOLDOUT_TASK]
    for task in tasks:
        if task == HOLDOUT_TASK:
            data = _plain(_opt(pcfg, "data"))
            if not isinstance(data, dict) or data.get("kind") not in ("jsonl", "demo"):
                raise ValueError(
                    "ppl task holdout reads the held-out split of a training data config: pass ppl.data={kind: jsonl, "
                    "paths: [...], holdout_fraction: ...} (the run's data section, e.g. from anllm_train_config.yaml)."
                )
            continue
        if _opt(cfg, "data_dir") is None:
            raise FileNotFoundError("The perplexity suite reads data_dir/pretrain_text: pass data_dir=../shared/data.")
        path = Path(str(_opt(cfg, "data_dir"))).expanduser() / TASKS[task]
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
