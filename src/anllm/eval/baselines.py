"""Training-free KV-cache compression baselines, run at the anchor cache's budget.

Each method compresses the full cache of a prefilled context to ``budget`` entries per row (the
number of entries the :class:`anllm.AnchorCache` kept for the same context), after a causal
prefill, as KV-press methods do; continuations are then scored against the compressed cache with
their true positions (kept keys keep their original RoPE rotation).

* ``streamingllm`` (Xiao et al., 2024): the first ``num_sink_tokens`` tokens (attention sinks) plus
  the most recent ones. Sinks are capped at half the budget so that a tiny budget still keeps the
  tokens right before the continuation.
* ``knorm`` (Devoto et al., 2024, "A simple and effective L2 norm-based strategy for KV cache
  compression"): per layer and KV head, the keys with the *lowest* L2 norm.

Why not NVIDIA's ``kvpress`` package: every release that supports transformers 4.57 (0.3.0–0.5.5)
requires ``numpy>=2``, while this environment pins ``numpy<2`` (unbabel-comet 2.2.7); releases
before 0.3 predate the transformers cache API used here. Installing it would break COMET.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import DynamicCache

Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _streaming_select(keys: torch.Tensor, offset: torch.Tensor, keep: torch.Tensor, W: int, sinks: int) -> torch.Tensor:
    """Indices ``[B, H, W]`` (into the padded context) of sinks + recent tokens; left slots padded."""
    B, H, L, _ = keys.shape
    idx = torch.empty((B, W), dtype=torch.long, device=keys.device)
    for b in range(B):
        n, o = int(keep[b]), int(offset[b])
        s = min(sinks, n // 2)
        chosen = list(range(o, o + s)) + list(range(L - (n - s), L))
        idx[b] = torch.tensor([o] * (W - n) + chosen, device=keys.device)
    return idx[:, None, :].expand(B, H, W)


def _knorm_select(keys: torch.Tensor, offset: torch.Tensor, keep: torch.Tensor, W: int, sinks: int) -> torch.Tensor:
    """Per KV head, the ``keep`` keys of lowest L2 norm (in time order); left slots padded."""
    B, H, L, _ = keys.shape
    norms = keys.float().norm(dim=-1)  # [B, H, L]
    col = torch.arange(L, device=keys.device)
    norms = norms.masked_fill(col[None, None, :] < offset[:, None, None], float("inf"))
    idx = torch.empty((B, H, W), dtype=torch.long, device=keys.device)
    for b in range(B):
        n, o = int(keep[b]), int(offset[b])
        chosen = norms[b].topk(n, dim=-1, largest=False).indices.sort(-1).values  # [H, n]
        idx[b, :, W - n :] = chosen
        idx[b, :, : W - n] = o
    return idx


METHODS: dict[str, Selector] = {"streamingllm": _streaming_select, "knorm": _knorm_select}


def compress(
    method: str, cache: DynamicCache, ctx_mask: torch.Tensor, budget: list[int], num_sink_tokens: int = 4
) -> tuple[DynamicCache, torch.Tensor]:
    """Compress a left-padded context cache to ``budget[b]`` entries per row.

    Returns the new cache and its ``[B, W]`` attention mask (1 = kept entry, 0 = padding slot).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown baseline {method!r}: choose from {sorted(METHODS)}.")
    select = METHODS[method]
    lengths = ctx_mask.sum(-1)
    keep = torch.minimum(torch.tensor(budget, device=ctx_mask.device).clamp_min(0), lengths)
    offset = ctx_mask.shape[1] - lengths
    W = max(int(keep.max()), 1)  # a zero-width cache is awkward for some backends: one masked slot
    past_mask = (torch.arange(W, device=ctx_mask.device)[None, :] >= (W - keep)[:, None]).long()
    new = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        idx = select(k, offset, keep, W, num_sink_tokens)
        k2 = k.gather(2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
        v2 = v.gather(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
        new.update(k2, v2, layer_idx)
    return new, past_mask
