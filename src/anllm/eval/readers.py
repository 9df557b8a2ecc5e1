"""Read a left-padded batch of sequences under a method and return the logits at their ends.

The recall probe (:func:`next_token_logits`: the token after each sequence, plus the keys each row's
cache held) and the long-range suite (:func:`last_logits`: the last ``n`` positions, for
teacher-forced answers) read their items this way; the methods are those of :mod:`anllm.eval.methods`:

* ``full``: causal attention, no cache (one forward);
* ``ansan``: the AnSAN mask, no cache (the recall probe reads it through the anchor cache instead:
  lossless, so the same logits);
* ``anchor`` / ``sentence``: AnSAN (earlier anchors hidden for ``sentence``) through an
  :class:`anllm.AnchorCache`, one forward;
* ``streamingllm`` / ``streamingllm_q``: causal attention with each row's StreamingLLM mask
  (:func:`anllm.eval.baselines.streaming_batch_mask`); ``knorm``: one forward per sequence (its key
  ranking must not see padding);
* the kvpress presses (``snapkv``, ``tova``, ..., :func:`anllm.eval.methods.press_of`): each row's
  prefix is read and its cache compressed once to the row's budget (one prefill per row), then the
  rest of the row is fed in one left-padded batch (:func:`press_logits`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import baselines, presses
from .methods import attention, press_of


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], attention mask [B, L])`` of ``seqs`` padded on the left with ``pad_id``."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, L - len(x) :] = x
        mask[i, L - len(x) :] = 1
    return ids, mask


@torch.no_grad()
def next_token_logits(
    model: Any, seqs: list[torch.Tensor], method: str, budgets: list[Any], pad_id: int, num_sink_tokens: int = 4,
    position_mode: str = "true",
) -> tuple[torch.Tensor, list[int]]:
    """``([B, V] logits for the token after each sequence, keys each row's cache held)`` under ``method``,
    one left-padded forward (K-norm: one forward per sequence, its ranking must not see padding)."""
    from ..cache import AnchorCache

    if press_of(method) is not None:  # budget: the keys the last token attends (the anchor cache then)
        logits, kept = press_logits(model, [x[:-1] for x in seqs], [x[-1:] for x in seqs], method,
                                    [int(b) - 1 for b in budgets], pad_id, 1, num_sink_tokens)
        return logits[:, -1], [k + 1 for k in kept]
    if method == "knorm":
        logits = [baselines.baseline_logits(model, x, method, b)[-1] for x, b in zip(seqs, budgets)]
        return torch.stack(logits), [min(b, len(x)) for x, b in zip(seqs, budgets)]
    device = next(model.parameters()).device
    ids, mask = left_pad(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    lengths = [len(x) for x in seqs]
    if method in ("streamingllm", baselines.PER_QUERY):
        am = baselines.streaming_batch_mask(lengths, ids.shape[1], budgets, num_sink_tokens).to(device)
        with attention(model, method):
            out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1], [min(int(torch.as_tensor(b).reshape(-1)[-1]), n) for b, n in zip(budgets, lengths)]
    if method == "full":
        with attention(model, method):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1], lengths
    cache = AnchorCache(position_mode=position_mode)  # type: ignore[arg-type]  # ansan too: lossless
    with attention(model, method):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:, -1], [int(k) for k in cache.stats()["kept_per_row"]]


@torch.no_grad()
def last_logits(
    model: Any, seqs: list[torch.Tensor], method: str, budgets: list[Any], pad_id: int, n: int,
    num_sink_tokens: int = 4, position_mode: str = "true",
) -> torch.Tensor:
    """``[B, n, V]``: the logits at each sequence's last ``n`` positions under ``method``, one
    left-padded forward (:func:`next_token_logits` for ``n`` tokens; K-norm: one forward
    per sequence). ``budgets``: per row, the peak (``streamingllm``/``knorm``) or ``[L]`` keys per query
    (``streamingllm_q``); ignored by the other methods."""
    from ..cache import AnchorCache

    if method == "knorm":
        return torch.stack([baselines.baseline_logits(model, x, method, b, num_sink_tokens)[-n:]
                            for x, b in zip(seqs, budgets)])
    device = next(model.parameters()).device
    ids, mask = left_pad(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = dict(input_ids=ids, position_ids=pos, logits_to_keep=n)
    if method in ("streamingllm", baselines.PER_QUERY):
        am = baselines.streaming_batch_mask([len(x) for x in seqs], ids.shape[1], budgets, num_sink_tokens).to(device)
        with attention(model, method):
            return model(attention_mask=am, use_cache=False, **kw).logits[:, -n:]
    if method in ("full", "ansan"):
        with attention(model, method):
            return model(attention_mask=mask, use_cache=False, **kw).logits[:, -n:]
    cache = AnchorCache(position_mode=position_mode)  # type: ignore[arg-type]
    with attention(model, method):
        return model(attention_mask=mask, past_key_values=cache, use_cache=True, **kw).logits[:, -n:]


@torch.no_grad()
def press_logits(
    model: Any, prefixes: list[torch.Tensor], feeds: list[torch.Tensor], method: str, budgets: list[int], pad_id: int,
    n: int, num_sink_tokens: int = 4,
) -> tuple[torch.Tensor, list[int]]:
    """``([B, n, V] logits at the last n fed positions, context entries kept per row)``: each prefix is
    read causally and compressed by ``method``'s kvpress press to ``budgets[b]`` entries
    (:func:`anllm.eval.presses.press_prefill`: one prefill per row), then the feeds (left-padded,
    ``n`` at most their longest length) are read against the compressed caches at their true positions."""
    device = next(model.parameters()).device
    pressed = presses.press_prefill(model, method, prefixes, budgets, num_sink_tokens)
    ids, mask = left_pad([f.reshape(-1) for f in feeds], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if n > ids.shape[1]:
        raise ValueError(f"Asked for the logits of {n} positions, but the longest feed has {ids.shape[1]} tokens.")
    start = torch.tensor(pressed.lengths, device=device)[:, None]
    pos = start + (mask.cumsum(-1) - 1).clamp_min(0)
    out = pressed.forward(model, ids, mask, pos, logits_to_keep=n)
    return out.logits[:, -n:], list(pressed.kept)
