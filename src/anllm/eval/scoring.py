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
* baselines (``streamingllm``, ``knorm``) — causal attention; the context's full cache is
  compressed to the number of entries the ``anchor`` cache kept for that same group (equal budget),
  then the continuations are scored against it (see :mod:`anllm.eval.baselines`).
* ``stock`` — causal attention, every ``context + continuation`` in its own full forward, the
  context recomputed for each choice: what lm-eval's stock ``HFLM`` does, and the paper's speed
  baseline. Same scores as ``full``; it is there to time the two baselines side by side.

Contexts are read into anchor caches in chunks (:func:`anllm.eval.generation.prefill`).

Timing: every batch of groups is run in every mode back to back (modes alternate batch by batch, so
machine load hits them alike), after one untimed warm-up batch, with ``torch.cuda.synchronize`` on
GPU. Cache accounting per scored continuation: ``kv_total`` = context + continuation entries a full
cache holds when the continuation is scored (its last token is predicted, never fed), ``kv_kept`` =
what the mode's cache holds then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import torch
from transformers.cache_utils import DynamicCache

from ..cache import AnchorCache
from ..modeling import anchor_attention, is_anchor_aware
from . import baselines
from .generation import prefill

CACHE_MODES = ("full", "anchor")
MODES = ("full", "ansan", "anchor", "stock")
BASELINES = tuple(baselines.METHODS)


@dataclass
class Scored:
    """The result of scoring one continuation in one mode."""

    logprob: float
    greedy: bool
    kv_total: int
    kv_kept: int


@dataclass
class Group:
    """One context with the continuations to score after it (``keys`` identify the requests)."""

    ctx: list[int]
    conts: list[list[int]]
    keys: list[Hashable]


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

    ``modes`` may contain ``full``, ``ansan``, ``anchor`` and baseline names; a baseline needs
    ``anchor`` (its budget is the anchor cache's kept size for the same group).
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
        if any(m in ("ansan", "anchor") for m in modes) and not is_anchor_aware(model):
            raise ValueError(
                "Modes 'ansan'/'anchor' need an anchor-aware model (saved anchor settings, or anchors=ep|ac "
                "to apply them): this model only supports mode 'full'."
            )
        if any(m in BASELINES for m in modes) and "anchor" not in modes:
            raise ValueError("Baselines at equal cache budget need mode 'anchor' (it sets the budget).")
        # anchor first: the baselines read its budget.
        self.modes = sorted(dict.fromkeys(modes), key=lambda m: (m in BASELINES, m != "anchor"))
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_size = max(1, int(batch_size))
        self.num_sink_tokens = num_sink_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.position_mode = position_mode
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
            warm_budgets: dict[int, int] = {}
            for mode in self.modes:  # untimed warm-up on the first batch (allocator, kernels, caches)
                self._run(mode, batches[0][:1], warm_budgets)
            self._warm = True
        for batch in batches:
            budgets: dict[int, int] = {}
            for mode in self.modes:
                self._sync()
                t0 = time.perf_counter()
                results = self._run(mode, batch, budgets)
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
    def _run(self, mode: str, batch: list[Group], budgets: dict[int, int]) -> list[list[Scored]]:
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
                res = self._shared_prefix(batch, AnchorCache(position_mode=self.position_mode))  # type: ignore[arg-type]
                for i, g in enumerate(batch):
                    budgets[i] = res[i][0].kv_kept - (len(g.conts[0]) - 1)
                return res
            # Baselines: contexts of one token cannot be compressed (the budget is >= 1): score those
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
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        out, r = [], 0
        for g in batch:
            res = []
            for cont in g.conts:
                start, _ = spans[r]
                lp, greedy = _score_tokens(logp[r, start : start + len(cont)], cont)
                total = len(g.ctx) + len(cont) - 1
                res.append(Scored(lp, greedy, total, total))
                r += 1
            out.append(res)
        return out

    def _shared_prefix(
        self, batch: list[Group], cache: Any, compress: tuple[str, dict[int, int]] | None = None
    ) -> list[list[Scored]]:
        """Prefill every context once (left-padded), then score all continuations against the cache.

        With ``compress=(method, budgets)`` (baselines) the context *minus its last token* is
        prefilled causally and compressed to ``budget - 1`` entries; the last context token is then
        fed with the continuations, so the first continuation token is also predicted from the
        compressed cache and the cache at scoring time holds ``budget + len(cont) - 1`` entries,
        exactly like the anchor cache it is compared with.
        """
        tail = 1 if compress is not None else 0
        ctx_ids, ctx_mask = self._pad([g.ctx[: len(g.ctx) - tail] for g in batch], left=True)
        pos = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
        out = prefill(self.model, ctx_ids, ctx_mask, pos, cache, self.prefill_chunk_size, logits_to_keep=1)
        cache = out.past_key_values
        first_logp = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each continuation's 1st token
        ctx_len = torch.tensor([len(g.ctx) - tail for g in batch], device=self.device)
        if isinstance(cache, AnchorCache):
            kept_ctx = [int(k) for k in cache.stats()["kept_per_row"]]
            past_mask = ctx_mask
        elif compress is not None:
            method, budgets = compress
            budget = [budgets[i] - 1 for i in range(len(batch))]
            cache, past_mask = baselines.compress(method, cache, ctx_mask, budget, self.num_sink_tokens)
            kept_ctx = [int(x) + 1 for x in past_mask.sum(-1).tolist()]
        else:
            kept_ctx = [len(g.ctx) for g in batch]
            past_mask = ctx_mask
        rows = torch.tensor([i for i, g in enumerate(batch) for _ in g.conts], device=self.device)
        conts = [c for g in batch for c in g.conts]
        cache.batch_select_indices(rows)
        feeds = [g.ctx[len(g.ctx) - tail :] + c[:-1] for g in batch for c in g.conts]
        logp = None if tail else first_logp[rows][:, None]
        if max(map(len, feeds)) > 0:
            feed, feed_mask = self._pad(feeds, left=False)
            pos = ctx_len[rows][:, None] + torch.arange(feed.shape[1], device=self.device)
            out = self.model(
                input_ids=feed, attention_mask=torch.cat([past_mask[rows], feed_mask], -1), position_ids=pos,
                past_key_values=cache, use_cache=True,
            )
            step = torch.log_softmax(out.logits.float(), -1)
            logp = step if logp is None else torch.cat([logp, step], 1)
        results, r = [], 0
        for i, g in enumerate(batch):
            res = []
            for cont in g.conts:
                lp, greedy = _score_tokens(logp[r, : len(cont)], cont)
                res.append(Scored(lp, greedy, len(g.ctx) + len(cont) - 1, kept_ctx[i] + len(cont) - 1))
                r += 1
            results.append(res)
        return results


def _score_tokens(logp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of ``cont`` under ``logp`` [len(cont), V]; greedy = argmax everywhere."""
    target = torch.tensor(cont, device=logp.device)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    return float(lp.sum()), bool((logp.argmax(-1) == target).all())
