"""A sketch (not part of the engine) of a faster dense AnSAN mask, to show where the time goes.

``anllm.masks.visible`` evaluates about a dozen ``[B, Lq, Lk]`` broadcast operations. On CPU, a
broadcast whose inner operand has stride 0 (``q.field[:, :, None]``) or an outer-product comparison
runs element by element (~0.5-0.8 ns/element here), about 8x slower than a contiguous elementwise op
or a row copy (~0.1 ns/element). Those ops, not the rule, dominate mask construction.

Observation: apart from causality, a query's row of the mask depends only on its
``(seg, anchor, doc, valid, prefix)``, which is constant over runs of consecutive tokens (a sentence's
non-anchor tokens form one run, its anchor another). So:

1. evaluate :func:`visible` for one representative query per run, with causality switched off
   (``[B, R, Lk]``, R ≈ 2 × number of sentences, i.e. ~8% of the rows at 25 tokens per sentence);
2. copy each query's run row into place (``index_select``: a row memcpy);
3. apply causality with ``tril_``, valid because key ``j`` precedes query ``i`` iff
   ``j <= i + (Lk - Lq)`` (keys are the kept cache slots, all older than every new token, then the
   new tokens in order).

Exact for every option (sinks, documents, prefix, anchors_see_anchors); checked against
``anllm.masks.dense_mask`` in ``bench_mask.py`` before it is timed.

Step 1 still uses broadcasts over ``[B, R, Lk]``. :func:`onehot_segment_mask` (default options only)
avoids them: the per-segment rows are a one-hot scatter plus key-only rows, so every op is contiguous.
At 8k one more cost appears: a fresh 64 MiB bool tensor costs ~45 ms of page faults on first touch
(more than building it), so the output buffer must be reused across forwards to approach the floor.
"""

from __future__ import annotations

import torch

from anllm.masks import AnsanOptions, TokenLayout, visible

DEFAULT = AnsanOptions()


def run_table_mask(q: TokenLayout, k: TokenLayout, options: AnsanOptions = DEFAULT) -> torch.Tensor:
    """Same result as ``anllm.masks.dense_mask(q, k, options)``: bool ``[B, 1, Lq, Lk]``."""
    B, Lq = q.shape
    Lk = k.shape[1]
    keyed = (q.seg, q.anchor.long(), q.doc, q.valid.long(), q.prefix.long())
    change = torch.zeros((B, Lq), dtype=torch.bool, device=q.idx.device)
    change[:, 0] = True
    for f in keyed:
        change[:, 1:] |= f[:, 1:] != f[:, :-1]
    run = change.long().cumsum(-1) - 1  # [B, Lq] run id of each query
    R = int(run[:, -1].max()) + 1
    # Position of the first token of each run (runs past a row's last one point at token 0 and are
    # never selected).
    first = torch.zeros((B, R), dtype=torch.long, device=q.idx.device)
    first.scatter_reduce_(
        1, run, torch.arange(Lq, device=q.idx.device).expand(B, Lq), "amin", include_self=False
    )
    rep = q.map(lambda t: t.gather(1, first))
    rep = rep.with_(idx=torch.full_like(rep.idx, torch.iinfo(torch.long).max))  # no causality here
    table = visible(
        rep.map(lambda t: t[:, :, None]), k.map(lambda t: t[:, None, :]), options
    )  # [B, R, Lk]
    flat = run + R * torch.arange(B, device=run.device)[:, None]
    out = table.reshape(B * R, Lk).index_select(0, flat.reshape(-1)).view(B, 1, Lq, Lk)
    return out.tril_(diagonal=Lk - Lq)


def onehot_segment_mask(
    is_anchor: torch.Tensor, attention_mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Same as ``anllm.ansan_mask`` with default options (no documents, sinks or prefix), as
    ``[B, 1, L, L]``, without any slow broadcast: the per-segment rows come from a one-hot scatter
    (``O(S·L)``), every other op is contiguous. ``out`` reuses a buffer across calls, which at 8k
    saves the page faults of a fresh 64 MiB allocation (tens of ms, more than the mask itself)."""
    valid = attention_mask.bool()
    anchor = is_anchor.bool() & valid
    B, L = anchor.shape
    seg = anchor.long().cumsum(-1) - anchor.long()
    S = int(seg.max()) + 1 if L else 1
    same = torch.zeros(
        (B, S + 1, L), dtype=torch.bool, device=anchor.device
    )  # row S: padding queries
    same.scatter_(1, seg[:, None, :], True)
    # rows 0..S: anchor queries (own sentence only); rows S+1..: non-anchors (+ every anchor)
    table = torch.cat([same, same | anchor[:, None, :]], dim=1)
    table &= valid[:, None, :]
    R = 2 * (S + 1)
    code = torch.where(valid, seg + (S + 1) * (~anchor).long(), S)
    code = code + R * torch.arange(B, device=code.device)[:, None]
    if out is None:
        out = torch.empty((B, 1, L, L), dtype=torch.bool, device=anchor.device)
    torch.index_select(table.view(B * R, L), 0, code.view(-1), out=out.view(B * L, L))
    return out.tril_()
