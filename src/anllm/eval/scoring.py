"""Score continuations of shared contexts under several attention/cache modes, side by side.

This is the compute core of the QA suite (lm-eval only sees its results). A *group* is one context
and the continuations to score after it (the choices of a multiple-choice item). Modes:

* ``full``   — causal attention (AnSAN off), the context prefilled once into a full ``DynamicCache``,
  then all continuations scored in one batched forward against it.
* ``ansan``  — the AnSAN mask over each full sequence ``context + continuation`` (no cache): the
  reference that training uses and that the authors' harness measured.
* ``anchor`` — AnSAN + :class:`anllm.AnchorCache`: prefill the context once, prune, then
  ``batch_select_indices`` the pruned rows to one per continuation and score all continuations in
  one forward whose ``attention_mask`` covers every token seen. Lossless: same scores as ``ansan``.
* compress-once baselines (``streamingllm``, ``knorm`` and every kvpress press of the registry:
  ``snapkv``, ``tova``, ``observed_attention``, ``expected_attention``, ``pyramidkv``, ...) — causal
  attention; the context's full cache is compressed by the method's kvpress press to the number of
  entries the ``anchor`` cache kept for that same group (equal kept budget), then the continuations
  are scored against it (see :mod:`anllm.eval.presses`): the kept keys were computed over the whole
  context, and the peak memory is the full context cache. A press sees one unpadded context, so
  these contexts are prefilled one group at a time (the continuations are still scored in one batch).
* streaming baselines (``streamingllm_stream``, ``streamingllm_stream_q``) — StreamingLLM with a
  cache bounded from the start, as anchor inference is: causal attention (the anchor rule off) where
  every token of ``context + continuation`` attends at most ``budget`` keys, the attention sinks plus
  the most recent tokens (:func:`anllm.eval.baselines.streaming_visible`), one left-padded forward
  per batch of sequences. ``streamingllm_stream``: one budget per sequence, the anchor reading's peak
  for it (:func:`anllm.eval.baselines.ansan_budget` of the fed tokens, i.e. the most keys any of its
  tokens attends under the model's AnSAN rule: equal *peak* memory). ``streamingllm_stream_q``: each
  token attends as many keys as it does under the AnSAN rule
  (:func:`anllm.eval.baselines.ansan_keys_per_query`: equal attention cost per token).
* ``stock`` — causal attention, every ``context + continuation`` in its own full forward, the
  context recomputed for each choice: what lm-eval's stock ``HFLM`` does, and the paper's speed
  baseline. Same scores as ``full``; it is there to time the two baselines side by side.

Contexts are read into anchor caches in chunks (:func:`anllm.eval.generation.prefill`).

Timing: every batch of groups is run in every mode back to back (modes alternate batch by batch, so
machine load hits them alike), after one untimed warm-up batch, with ``torch.cuda.synchronize`` on
GPU. The AnSAN keys per token that set the streaming budgets and the anchor peak are counted before
the timed runs (the rule's bookkeeping, not any mode's compute).

Cache accounting per scored continuation (its last token is predicted, never fed, so the *fed*
sequence is ``context + continuation[:-1]``):

* ``kv_total`` — context + continuation entries a full cache holds when the continuation is scored;
* ``kv_kept`` — what the mode's cache holds then; for the streaming baselines, the keys the query
  that predicts the last continuation token attends (``min(budget, its position + 1)``, or its own
  per-query budget);
* ``peak_kv`` — the most entries the mode's cache held at any point while reading the context and
  scoring: ``full``/``ansan``/``stock``: ``kv_total``; compress-once baselines: the full prefilled
  context (``len(context) - 1``: its last token is fed with the continuation) or, if larger, the
  cache at scoring time; ``anchor``: the largest of the AnchorCache's kept size after each prefill
  forward, the most keys any fed token attends under the rule (:func:`~anllm.eval.baselines.ansan_budget`,
  what a token-by-token read must hold) and the cache at scoring time (every continuation token is
  fed in one forward, so none is pruned before the last is scored); streaming baselines: the budget
  (``streamingllm_stream_q``: its largest per-query budget, which is the same number). Transient
  widths inside one prefill forward (a chunk's own tokens before pruning) are not counted, as in the
  other suites: they depend on ``prefill_chunk_size``, not on the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import torch
from transformers.cache_utils import DynamicCache

from ..cache import AnchorCache
from ..modeling import anchor_attention, is_anchor_aware
from . import baselines, presses
from . import methods as registry
from .baselines import streaming_batch_mask
from .generation import _accepts_logits_to_keep, prefill

# The QA suite's methods (anllm.eval.methods): modes, and baselines that compress once at the anchor
# cache's kept size or stream (name -> per-query budgets, else one budget per sequence, the AnSAN peak).
MODES = registry.names("qa", kinds=("cache", "mask", "stock"))
COMPRESS_BASELINES = tuple(m for m in registry.names("qa", kinds=("baseline", "press"))
                           if registry.METHODS[m].compress_once)
STREAM_BASELINES = {m: registry.METHODS[m].budget == "per-query" for m in registry.names("qa", kinds=("baseline",))
                    if not registry.METHODS[m].compress_once}
BASELINES = COMPRESS_BASELINES + tuple(STREAM_BASELINES)
assert all(registry.METHODS[m].press for m in COMPRESS_BASELINES), "a compress-once baseline without a kvpress press"


@dataclass
class Scored:
    """The result of scoring one continuation in one mode."""

    logprob: float
    greedy: bool
    kv_total: int
    kv_kept: int
    peak_kv: int  # the most entries the mode's cache held while reading the context and scoring


@dataclass
class Group:
    """One context with the continuations to score after it (``keys`` identify the requests)."""

    ctx: list[int]
    conts: list[list[int]]
    keys: list[Hashable]


@dataclass
class _BatchState:
    """What modes share within one batch: the anchor cache's kept context entries per group (the
    compress-once budget) and, per group and continuation, the AnSAN keys per fed token (``[L]``)."""

    kept_ctx: dict[int, int]
    counts: list[list[torch.Tensor]] | None


def group_requests(requests: Iterable[tuple[Hashable, Sequence[int], Sequence[int]]]) -> list[Group]:
    """Group ``(key, context_ids, continuation_ids)`` by identical context, keeping first-seen order."""
    groups: dict[tuple[int, ...], Group] = {}
    for key, ctx, cont in requests:
        if not cont:
            raise ValueError(f"Empty continuation for request {key!r}: nothing to score.")
        g = groups.setdefault(tuple(ctx), Group(list(ctx), [], []))
        g.conts.append(list(cont))
        g.keys.append(key)
    return list(groups.values())


class MultiModeScorer:
    """Scores request groups in several modes and memoises the results by request key.

    ``modes`` may contain ``full``, ``ansan``, ``anchor``, ``stock`` and baseline names; a
    compress-once baseline needs ``anchor`` (its budget is the anchor cache's kept size for the same
    group); a streaming baseline needs an anchor-aware model (its budget is the AnSAN rule's).
    """

    def __init__(
        self,
        model: Any,
        modes: Sequence[str],
        *,
        pad_token_id: int = 0,
        batch_size: int = 1,
        num_sink_tokens: int = 4,
        warmup: bool = True,
        prefill_chunk_size: int | None = None,
        position_mode: str = "true",
    ):
        unknown = [m for m in modes if m not in MODES + BASELINES]
        if unknown:
            raise ValueError(f"Unknown scoring mode(s) {unknown}: choose from {MODES + BASELINES}.")
        if any(registry.needs_anchors(m) for m in modes) and not is_anchor_aware(model):
            raise ValueError(
                "Modes 'ansan'/'anchor' and the streaming baselines need an anchor-aware model (saved anchor "
                "settings, or anchors=ep|ac to apply them): this model only supports mode 'full'."
            )
        if any(m in COMPRESS_BASELINES for m in modes) and "anchor" not in modes:
            raise ValueError("Baselines at equal cache budget need mode 'anchor' (it sets the budget).")
        if any(m in COMPRESS_BASELINES for m in modes):
            presses.load_kvpress()  # they compress with kvpress presses: imported before anything is timed
        # anchor first: the baselines read its budget.
        self.modes = sorted(dict.fromkeys(modes), key=lambda m: (m in BASELINES, m != "anchor"))
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_size = max(1, int(batch_size))
        self.num_sink_tokens = num_sink_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.position_mode = position_mode
        self._count_keys = any(m == "anchor" or m in STREAM_BASELINES for m in self.modes)
        self.memo: dict[str, dict[Hashable, Scored]] = {m: {} for m in self.modes}
        self.seconds: dict[str, float] = {m: 0.0 for m in self.modes}
        self._warm = not warmup

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- public --------------------------------------------------------------------------------
    def score(self, requests: Sequence[tuple[Hashable, Sequence[int], Sequence[int]]], progress: Any = None) -> None:
        """Score every request not yet memoised, in every mode."""
        todo = [r for r in requests if r[0] not in self.memo[self.modes[0]]]
        groups = group_requests(todo)
        # Longest contexts first: similar lengths share a batch (less padding), OOMs show early.
        groups.sort(key=lambda g: -len(g.ctx) - max(map(len, g.conts)))
        batches = [groups[i : i + self.batch_size] for i in range(0, len(groups), self.batch_size)]
        if batches and not self._warm:
            warm = self._state(batches[0][:1])
            for mode in self.modes:  # untimed warm-up on the first batch (allocator, kernels, caches)
                self._run(mode, batches[0][:1], warm)
            self._warm = True
        for batch in batches:
            state = self._state(batch)  # untimed: the AnSAN rule's bookkeeping
            for mode in self.modes:
                self._sync()
                t0 = time.perf_counter()
                results = self._run(mode, batch, state)
                self._sync()
                self.seconds[mode] += time.perf_counter() - t0
                for g, res in zip(batch, results):
                    for key, s in zip(g.keys, res):
                        self.memo[mode][key] = s
            if progress is not None:
                progress.update(sum(len(g.conts) for g in batch))

    def result(self, mode: str, key: Hashable) -> Scored:
        return self.memo[mode][key]

    # ---- modes ---------------------------------------------------------------------------------
    def _state(self, batch: list[Group]) -> _BatchState:
        """Per group and continuation, the keys each fed token (``context + continuation[:-1]``)
        attends under the model's AnSAN rule (only when a mode needs them)."""
        if not self._count_keys:
            return _BatchState({}, None)
        att = self.model._anllm_attention
        counts = []
        for g in batch:
            row = []
            for cont in g.conts:
                seq = torch.tensor(g.ctx + cont[:-1], dtype=torch.long)
                row.append(baselines.ansan_keys_per_query(torch.isin(seq, att.anchor_ids.cpu()), att.options).cpu())
            counts.append(row)
        return _BatchState({}, counts)

    def _run(self, mode: str, batch: list[Group], state: _BatchState) -> list[list[Scored]]:
        budgets = state.kept_ctx
        with torch.inference_mode():
            if mode == "ansan":
                return self._full_sequence(batch)
            if mode == "stock":
                with anchor_attention(self.model, enabled=False):
                    return self._full_sequence(batch)
            if mode == "full":
                with anchor_attention(self.model, enabled=False):
                    return self._shared_prefix(batch, DynamicCache())
            if mode == "anchor":
                cache = AnchorCache(position_mode=self.position_mode)
                res = self._shared_prefix(batch, cache)  # type: ignore[arg-type]
                for i, g in enumerate(batch):
                    budgets[i] = res[i][0].kv_kept - (len(g.conts[0]) - 1)
                    if state.counts is not None:  # a token-by-token read holds at least what a token attends
                        for s, c in zip(res[i], state.counts[i]):
                            s.peak_kv = max(s.peak_kv, int(c.max()))
                return res
            if mode in STREAM_BASELINES:
                assert state.counts is not None
                return self._streaming(batch, state.counts, per_query=STREAM_BASELINES[mode])
            # Compress-once baselines: contexts of one token cannot be compressed (the budget is >= 1): score those
            # like 'full'; the others are compressed to the anchor budget.
            out: list[list[Scored] | None] = [None] * len(batch)
            short = [i for i, g in enumerate(batch) if len(g.ctx) < 2]
            long_ = [i for i, g in enumerate(batch) if len(g.ctx) >= 2]
            with anchor_attention(self.model, enabled=False):
                if short:
                    for i, res in zip(short, self._shared_prefix([batch[i] for i in short], DynamicCache())):
                        out[i] = res
                if long_:
                    sub_budget = {j: budgets[i] for j, i in enumerate(long_)}
                    sub = self._shared_prefix([batch[i] for i in long_], DynamicCache(), compress=(mode, sub_budget))
                    for i, res in zip(long_, sub):
                        out[i] = res
            return out  # type: ignore[return-value]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pad(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            if not s:
                continue
            if left:
                ids[i, L - len(s) :] = torch.tensor(s)
                mask[i, L - len(s) :] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _full_sequence(self, batch: list[Group]) -> list[list[Scored]]:
        """One forward over each whole ``context + continuation`` (AnSAN from the model's hook, or
        causal with the rule switched off: lm-eval's stock per-request scoring)."""
        rows, spans = [], []
        for g in batch:
            for cont in g.conts:
                seq = g.ctx + cont
                rows.append(seq[:-1])
                spans.append((len(g.ctx) - 1, cont))
        ids, mask = self._pad(rows, left=False)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # normalised per span below
        out, r = [], 0
        for g in batch:
            res = []
            for cont in g.conts:
                start, _ = spans[r]
                lp, greedy = _score_tokens(logits[r, start : start + len(cont)], cont)
                total = len(g.ctx) + len(cont) - 1
                res.append(Scored(lp, greedy, total, total, total))
                r += 1
            out.append(res)
        return out

    def _shared_prefix(
        self, batch: list[Group], cache: Any, compress: tuple[str, dict[int, int]] | None = None
    ) -> list[list[Scored]]:
        """Prefill every context once (left-padded), then score all continuations against the cache.

        With ``compress=(method, budgets)`` (baselines) the context *minus its last token* is
        prefilled causally, one group at a time, and compressed by the method's kvpress press to
        ``budget - 1`` entries; the last context token is then fed with the continuations, so the
        first continuation token is also predicted from the compressed cache and the cache at scoring
        time holds ``budget + len(cont) - 1`` entries, exactly like the anchor cache it is compared with.
        """
        tail = 1 if compress is not None else 0
        ctx_len = torch.tensor([len(g.ctx) - tail for g in batch], device=self.device)
        pressed = None
        if compress is not None:
            method, budgets = compress
            pressed = presses.press_prefill(self.model, method, [g.ctx[:-1] for g in batch],
                                              [budgets[i] - 1 for i in range(len(batch))], self.num_sink_tokens)
            peak_ctx = list(pressed.lengths)  # the full cache, before compression
            kept_ctx = [k + 1 for k in pressed.kept]
        else:
            ctx_ids, ctx_mask = self._pad([g.ctx for g in batch], left=True)
            pos = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
            out = prefill(self.model, ctx_ids, ctx_mask, pos, cache, self.prefill_chunk_size, logits_to_keep=1)
            cache = out.past_key_values
            first_logits = out.logits[:, -1]  # predicts each continuation's 1st token
            past_mask = ctx_mask
            if isinstance(cache, AnchorCache):
                stats = cache.stats()
                kept_ctx = [int(k) for k in stats["kept_per_row"]]
                peak_ctx = [int(k) for k in stats["max_kept_per_row"]]  # after each prefill forward
            else:
                kept_ctx = [len(g.ctx) for g in batch]
                peak_ctx = kept_ctx
        rows = torch.tensor([i for i, g in enumerate(batch) for _ in g.conts], device=self.device)
        conts = [c for g in batch for c in g.conts]
        if pressed is not None:
            pressed.select(rows)
        else:
            cache.batch_select_indices(rows)
        feeds = [g.ctx[len(g.ctx) - tail :] + c[:-1] for g in batch for c in g.conts]
        logp = None if tail else first_logits[rows][:, None]  # logits; _score_tokens normalises
        if max(map(len, feeds)) > 0:
            feed, feed_mask = self._pad(feeds, left=False)
            pos = ctx_len[rows][:, None] + torch.arange(feed.shape[1], device=self.device)
            if pressed is not None:
                out = pressed.forward(self.model, feed, feed_mask, pos)
            else:
                out = self.model(
                    input_ids=feed, attention_mask=torch.cat([past_mask[rows], feed_mask], -1), position_ids=pos,
                    past_key_values=cache, use_cache=True,
                )
            step = out.logits
            logp = step if logp is None else torch.cat([logp.to(step.dtype), step], 1)
        results, r = [], 0
        for i, g in enumerate(batch):
            res = []
            for cont in g.conts:
                lp, greedy = _score_tokens(logp[r, : len(cont)], cont)
                kept = kept_ctx[i] + len(cont) - 1
                res.append(Scored(lp, greedy, len(g.ctx) + len(cont) - 1, kept, max(peak_ctx[i], kept)))
                r += 1
            results.append(res)
        return results

    def _streaming(self, batch: list[Group], counts: list[list[torch.Tensor]], per_query: bool) -> list[list[Scored]]:
        """StreamingLLM bounded from the start: one left-padded causal forward (the anchor rule off)
        over every fed sequence ``context + continuation[:-1]``, each token attending the sinks and the
        most recent tokens within its budget (``counts``: AnSAN keys per fed token; the budget is their
        maximum, or, with ``per_query``, each token's own count)."""
        rows, budgets = [], []
        for g, cs in zip(batch, counts):
            for cont, c in zip(g.conts, cs):
                rows.append(g.ctx + cont[:-1])
                budgets.append(c if per_query else int(c.max()))
        ids, mask = self._pad(rows, left=True)
        lengths = [len(x) for x in rows]
        am = streaming_batch_mask(lengths, ids.shape[1], budgets, self.num_sink_tokens).to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        K = max(len(c) for g in batch for c in g.conts)  # left padding: every row's scored positions are last
        extra = {"logits_to_keep": K} if _accepts_logits_to_keep(self.model) else {}
        with anchor_attention(self.model, enabled=False):
            logits = self.model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False, **extra).logits
        logp = logits[:, -K:]  # logits; _score_tokens normalises the continuation's positions only
        out, r = [], 0
        for g, cs in zip(batch, counts):
            res = []
            for cont, c in zip(g.conts, cs):
                lp, greedy = _score_tokens(logp[r, K - len(cont) :], cont)
                n = lengths[r]
                kept = int(c[-1]) if per_query else min(int(c.max()), n)  # keys the last fed token attends
                res.append(Scored(lp, greedy, n, kept, min(int(c.max()), n)))
                r += 1
            out.append(res)
        return out


def _score_tokens(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of ``cont`` under ``logits`` [len(cont), V]; greedy = argmax everywhere.

    The fp32 log-softmax is taken here, over the continuation's positions only: never over a whole
    5-shot context (a [batch, length, vocabulary] fp32 tensor is gigabytes at 7B vocabularies)."""
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(cont, device=logp.device)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    return float(lp.sum()), bool((logp.argmax(-1) == target).all())
