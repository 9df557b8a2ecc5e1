"""Training-free KV-cache baselines read with a bounded cache from the start, at the anchor cache's budget.

Here (:func:`streaming_visible`, :func:`knorm_visible`, :func:`baseline_logits`): the
perplexity suite, and ``streamingllm``/``streamingllm_q``/``knorm`` in the recall probe and the
long-range tasks; *every* token attends at most ``budget`` keys, as when a long text is read with a
bounded cache from the start. This is the equal-cache opponent of anchor inference, whose tokens
also attend at most the anchor cache's peak (see :func:`ansan_budget`). kvpress has no such reading
(its presses compress once, after a full-attention prefill), so it stays written here; at the point
where a press compresses, the two agree on the kept keys (tested: StreamingLLMPress vs
:func:`streaming_visible`, KnormPress vs :func:`knorm_visible`).

* ``streamingllm`` (Xiao et al., 2024): the first ``num_sink_tokens`` tokens (attention sinks) plus
  the most recent ones. Sinks are capped at half the budget so that a tiny budget still keeps the
  tokens right before the continuation.
* ``knorm`` (Devoto et al., 2024, "A simple and effective L2 norm-based strategy for KV cache
  compression"): per layer and KV head, the keys with the *lowest* L2 norm.

The field's compress-once methods (kvpress presses, including StreamingLLM and K-norm applied once
after a full-attention prefill) are :mod:`anllm.eval.presses`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import torch

from ..modeling import anchor_attention, attention_backend, is_anchor_aware
from . import methods as registry


# ---- streaming (every token attends at most ``budget`` keys) -------------------------------------


def streaming_visible(length: int, budget: int | torch.Tensor, num_sink_tokens: int = 4, device: Any = None) -> torch.Tensor:
    """``[L, L]`` bool: query q sees the first ``s = min(num_sink_tokens, budget // 2)`` tokens (attention
    sinks) and the ``budget - s`` most recent tokens including itself (StreamingLLM with a rolling cache).

    ``budget`` is one number for every query (equal *peak* memory), or ``[L]`` numbers, one per query
    (equal keys per query: each token attends exactly as many keys as the anchor reading lets it)."""
    b = torch.as_tensor(budget, device=device).long()
    if bool((b < 1).any()):
        raise ValueError(f"budget must be >= 1, got {budget}.")
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    b = b.reshape(-1, 1) if b.dim() else b  # per query: a column
    sinks = torch.clamp(b // 2, max=num_sink_tokens)
    return (k <= q) & ((k < sinks) | (q - k < b - sinks))


def streaming_batch_mask(lengths: list[int], width: int, budgets: list[Any], num_sink_tokens: int) -> torch.Tensor:
    """``[B, 1, W, W]`` StreamingLLM masks for left-padded rows (padding queries see only themselves, so
    no fully masked row turns into NaN); a row's budget is one number or one per token."""
    out = torch.eye(width, dtype=torch.bool).repeat(len(lengths), 1, 1)
    for b, (n, budget) in enumerate(zip(lengths, budgets)):
        out[b, width - n :, width - n :] = streaming_visible(n, budget, num_sink_tokens)
    return out[:, None]


def knorm_visible(keys: torch.Tensor, budget: int) -> torch.Tensor:
    """``[B, H, L, L]`` bool from keys ``[B, H, L, D]`` (one layer, no cache): query q sees itself and
    the ``budget - 1`` earlier keys of lowest L2 norm (ties: the earlier key), per KV head.

    That is what a cache that evicts its highest-norm key whenever it exceeds the budget holds: a
    key's norm never changes, so the set kept after reading q-1 tokens is the budget-1 lowest of them.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}.")
    norms = keys.float().norm(dim=-1)  # [B, H, L]
    L = norms.shape[-1]
    idx = torch.arange(L, device=keys.device)
    nk, nj = norms[..., :, None], norms[..., None, :]  # key k (rows) vs earlier key j (columns)
    lower = (nj < nk) | ((nj == nk) & (idx[None, :] < idx[:, None]))  # [B, H, k, j]: j ranks before k
    # rank of key k among keys j < q: exclusive prefix count over j, read at column q.
    before = lower.to(torch.int32).cumsum(-1) - lower.to(torch.int32)  # [B, H, k, q]
    kept = (before < budget - 1) & (idx[:, None] < idx[None, :])  # k < q among the budget-1 lowest
    return kept.transpose(-1, -2) | torch.eye(L, dtype=torch.bool, device=keys.device)  # [B, H, q, k]


# A per-layer mask: mask_fn(module, query, key, attention_mask) -> bool mask for SDPA
MaskFn = Callable[[Any, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_MASK_FN: contextvars.ContextVar[MaskFn | None] = contextvars.ContextVar("anllm_mask_fn", default=None)
MASKED_SDPA = "anllm_masked_sdpa"


def _masked_sdpa_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """SDPA under the mask the innermost :func:`masked_attention` makes for this layer (registered as
    ``anllm_masked_sdpa``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask_fn = _MASK_FN.get()
    if mask_fn is None:
        raise RuntimeError("anllm_masked_sdpa attention runs only inside anllm.eval.baselines.masked_attention().")
    return sdpa_attention_forward(module, query, key, value, mask_fn(module, query, key, attention_mask), **kwargs)


@contextlib.contextmanager
def masked_attention(model: Any, mask_fn: MaskFn) -> Iterator[None]:
    """Run ``model`` with SDPA under a mask computed per layer by ``mask_fn(module, query, key,
    attention_mask)`` - what a baseline needs when its kept keys differ by layer (K-norm's, a press's)
    and one shared mask cannot say it. Through transformers' attention interface, restored afterwards."""
    from transformers import AttentionInterface

    AttentionInterface.register(MASKED_SDPA, _masked_sdpa_forward)
    token = _MASK_FN.set(mask_fn)
    try:
        with attention_backend(model, MASKED_SDPA):
            yield
    finally:
        _MASK_FN.reset(token)


def knorm_attention(model: Any, budget: int) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` with the streaming K-norm baseline: each layer's keys kept by :func:`knorm_visible`."""
    budget = int(budget)

    def knorm_mask(module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if key.shape[-2] != query.shape[-2]:
            raise ValueError("The streaming K-norm baseline scores a whole sequence in one forward (no cache).")
        keep = knorm_visible(key, budget).repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # KV -> query heads
        return keep if attention_mask is None else keep & attention_mask.bool()

    return masked_attention(model, knorm_mask)


# The long-text readings' baselines (streamingllm, streamingllm_q, knorm: see anllm.eval.methods);
# PER_QUERY is StreamingLLM at equal keys *per query* (not the peak): see streaming_visible.
STREAMING_METHODS = registry.names("ppl", kinds=("baseline",))
PER_QUERY = next(m for m in STREAMING_METHODS if registry.METHODS[m].budget == "per-query")


@torch.no_grad()
def baseline_logits(model: Any, input_ids: torch.Tensor, method: str, budget: int | torch.Tensor,
                    num_sink_tokens: int = 4) -> torch.Tensor:
    """Logits ``[L, V]`` of one sequence (``[L]`` ids) read with ``method``'s bounded cache, causal
    attention (the anchor rule off): ``streamingllm`` (``budget``: one number, or ``[L]`` per query)
    or ``knorm`` at ``budget`` keys per token."""
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    L = ids.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool, device=ids.device).tril()
    if method in ("streamingllm", PER_QUERY):
        mask, ctx = streaming_visible(L, budget, num_sink_tokens, ids.device), contextlib.nullcontext()
    elif method == "knorm":
        mask, ctx = causal, knorm_attention(model, budget)
    else:
        raise ValueError(f"Unknown streaming baseline {method!r}: choose from {STREAMING_METHODS}.")
    off = anchor_attention(model, enabled=False) if is_anchor_aware(model) else contextlib.nullcontext()
    with off, ctx:
        return model(input_ids=ids, attention_mask=mask[None, None], use_cache=False).logits[0]


def ansan_budget(is_anchor: torch.Tensor, options: Any = None) -> int:
    """The most keys any token attends under the AnSAN rule for one sequence (``[L]`` bool anchors):
    the anchor cache's peak, i.e. the cache size an equal-*peak-memory* baseline gets."""
    return int(ansan_keys_per_query(is_anchor, options).max())


def ansan_keys_per_query(is_anchor: torch.Tensor, options: Any = None) -> torch.Tensor:
    """``[L]``: how many keys each token attends under the AnSAN rule (sinks + anchors + open sentence
    + window, as the model's options say): the per-query budget of an equal-*attention-cost* baseline."""
    from ..masks import AnsanOptions, dense_mask, layout_from_tokens

    options = options or AnsanOptions()
    lay = layout_from_tokens(is_anchor.reshape(1, -1).bool(), None, None, options)
    return dense_mask(lay, lay, options)[0, 0].sum(-1)
