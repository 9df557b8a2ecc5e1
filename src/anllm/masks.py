"""The AnSAN attention rule: the one place where "who may attend whom" is defined.

Everything else (dense SDPA/eager masks, flex_attention BlockMasks, the pruned AnchorCache) is
derived from :func:`visible` and :func:`reachable_later` below.

The rule (Pang et al., 2024, sec. 3): a token belongs to the *segment* that ends at the next anchor
(inclusive). Query q may attend key k iff k comes no later than q, both are real tokens (not
padding) of the same packed document, and

* k and q are in the same segment, or
* k is an anchor and q is not (non-anchors see every earlier anchor; anchors see only their own
  sentence), or
* k is one of the first ``num_sink_tokens`` tokens of the document (option, StreamingLLM-style), or
* k is one of the ``window`` tokens right before q (option, a local window as in SepLLM: q - k <= window), or
* k belongs to a kept part of the prompt and q comes after the prompt (``keep_prefix``: the
  paper's "Src Cache"; the kept part is the whole prompt or a span of it, e.g. the source).

``anchors_see_anchors=True`` additionally lets anchors see earlier anchors (option, off by default).
``hide_anchors=True`` removes the anchor clause altogether: every token sees only its own sentence
(plus sinks/prefix). That is not a model anyone trains; it is the *sentence-only control* of the
evaluation, whose distance to the real rule measures what the anchors carry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

__all__ = [
    "AnsanOptions",
    "TokenLayout",
    "visible",
    "reachable_later",
    "ansan_mask",
    "layout_from_tokens",
    "ansan_mask_mod",
    "flex_block_mask",
]


@dataclass(frozen=True)
class AnsanOptions:
    """Options beyond the paper's rule; all off by default."""

    num_sink_tokens: int = 0
    anchors_see_anchors: bool = False
    hide_anchors: bool = False  # the sentence-only control (evaluation), see the module docstring
    window: int = 0  # a query also sees the ``window`` tokens right before it in its document

    def __post_init__(self) -> None:
        for name in ("num_sink_tokens", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass
class TokenLayout:
    """Per-token facts the rule needs, each a tensor of the same shape (usually ``[B, L]``).

    ``idx`` orders tokens in time (causality); ``seg`` is the segment id (number of anchors before
    the token in its row); ``doc`` the packed-document id; ``valid`` is False for padding and for
    empty cache slots; ``sink`` marks the first ``num_sink_tokens`` real tokens of a document;
    ``prefix`` marks prompt tokens whose keys/values stay visible to every token after the prompt;
    ``prompt`` marks the prompt's tokens (among themselves they follow the plain rule).
    """

    idx: torch.Tensor
    seg: torch.Tensor
    anchor: torch.Tensor
    valid: torch.Tensor
    doc: torch.Tensor
    sink: torch.Tensor
    prefix: torch.Tensor
    prompt: torch.Tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenLayout":
        """Apply ``fn`` to every field (indexing, slicing, reshaping)."""
        return TokenLayout(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(parts: list["TokenLayout"], dim: int = -1) -> "TokenLayout":
        return TokenLayout(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=dim) for f in fields(TokenLayout)}
        )

    @property
    def shape(self) -> torch.Size:
        return self.idx.shape

    def with_(self, **changes: torch.Tensor) -> "TokenLayout":
        return replace(self, **changes)


def visible(q: TokenLayout, k: TokenLayout, options: AnsanOptions = AnsanOptions()) -> torch.Tensor:
    """True where query token ``q`` may attend key token ``k`` (fields broadcast against each other)."""
    allowed = (k.idx <= q.idx) & (k.doc == q.doc) & k.valid & q.valid
    if options.hide_anchors:
        via_anchor = torch.zeros_like(k.anchor)
    else:
        via_anchor = k.anchor if options.anchors_see_anchors else k.anchor & ~q.anchor
    clauses = (k.seg == q.seg) | via_anchor | k.sink | (k.prefix & ~q.prompt)
    if options.window:
        clauses = clauses | (q.idx - k.idx <= options.window)
    return allowed & clauses


def reachable_later(
    k: TokenLayout,
    open_seg: torch.Tensor,
    open_doc: torch.Tensor,
    options: AnsanOptions = AnsanOptions(),
    next_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """True for keys that some *future* token could still attend under :func:`visible`.

    Future tokens come after every key, lie in the row's open segment ``open_seg`` (or a later one)
    and document ``open_doc``, and come after the prompt; the first of them has index ``next_idx``
    (needed with a window: it sees keys with ``next_idx - idx <= window``, later tokens fewer). A
    finished segment's non-anchor tokens outside the window fail every clause of :func:`visible`
    for all of them, so dropping them is lossless. ``open_seg``/``open_doc``/``next_idx``
    broadcast against the key fields (e.g. ``[B, 1]``).
    """
    anchor = torch.zeros_like(k.anchor) if options.hide_anchors else k.anchor
    keep = (k.seg == open_seg) | anchor | k.sink | k.prefix
    if options.window:
        if next_idx is None:
            raise ValueError("reachable_later needs next_idx when the rule has a window.")
        keep = keep | (next_idx - k.idx <= options.window)
    return k.valid & (k.doc == open_doc) & keep


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    x = x.long()
    return x.cumsum(-1) - x


def layout_from_tokens(
    is_anchor: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    options: AnsanOptions = AnsanOptions(),
    *,
    idx_start: torch.Tensor | int = 0,
    seg_start: torch.Tensor | int = 0,
    rank_start: torch.Tensor | int = 0,
    prefix: bool = False,
) -> TokenLayout:
    """Build the :class:`TokenLayout` of a ``[B, L]`` block of tokens, vectorised.

    The ``*_start`` arguments continue a row that already has tokens (a cache): ``idx_start`` is
    the number of tokens seen, ``seg_start`` the number of anchors seen, ``rank_start`` the number of
    real tokens seen in the current document (for sinks).
    """
    if is_anchor.dim() != 2:
        raise ValueError(f"is_anchor must be [batch, length], got shape {tuple(is_anchor.shape)}")
    B, L = is_anchor.shape
    device = is_anchor.device
    valid = torch.ones_like(is_anchor, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid.shape != is_anchor.shape:
        raise ValueError(
            f"attention_mask shape {tuple(valid.shape)} does not match input shape {tuple(is_anchor.shape)}"
        )
    anchor = is_anchor.bool() & valid
    doc = (
        torch.zeros((B, L), dtype=torch.long, device=device)
        if document_ids is None
        else document_ids.to(device=device, dtype=torch.long)
    )
    if doc.shape != is_anchor.shape:
        raise ValueError(f"document_ids shape {tuple(doc.shape)} does not match input shape {tuple(is_anchor.shape)}")
    idx = torch.arange(L, device=device).expand(B, L) + _as_col(idx_start, B, device)
    seg = _exclusive_cumsum(anchor) + _as_col(seg_start, B, device)
    if options.num_sink_tokens > 0:
        # Rank of each real token within its document: count of real tokens before it, minus the
        # count at the start of its document run (cummax recovers the latest run start).
        before = _exclusive_cumsum(valid)
        starts = torch.ones_like(valid)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        base = torch.where(starts, before, torch.zeros_like(before)).cummax(-1).values
        rank = before - base
        first_run = starts.long().cumsum(-1) == 1
        rank = rank + torch.where(first_run, _as_col(rank_start, B, device), 0)
        sink = valid & (rank < options.num_sink_tokens)
    else:
        sink = torch.zeros_like(valid)
    return TokenLayout(
        idx=idx,
        seg=seg,
        anchor=anchor,
        valid=valid,
        doc=doc,
        sink=sink,
        prefix=torch.full_like(valid, prefix),
        prompt=torch.full_like(valid, prefix),
    )


def _as_col(x: torch.Tensor | int, B: int, device: torch.device) -> torch.Tensor:
    if isinstance(x, int):
        return torch.full((B, 1), x, dtype=torch.long, device=device)
    return x.to(device=device, dtype=torch.long).reshape(B, 1)


def ansan_mask(
    is_anchor: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    *,
    num_sink_tokens: int = 0,
    anchors_see_anchors: bool = False,
    hide_anchors: bool = False,
    window: int = 0,
) -> torch.Tensor:
    """The dense AnSAN mask ``[B, L, L]``: True where query i may attend key j.

    ``is_anchor`` is ``[B, L]`` bool; ``attention_mask`` is the usual 2D padding mask (1 = token);
    ``document_ids`` (``[B, L]`` ints) separates documents packed into one row. Padding rows are
    all False (padding neither attends nor is attended).
    """
    options = AnsanOptions(num_sink_tokens, anchors_see_anchors, hide_anchors, window)
    lay = layout_from_tokens(is_anchor, attention_mask, document_ids, options)
    return dense_mask(lay, lay, options)[:, 0]


def dense_mask(q: TokenLayout, k: TokenLayout, options: AnsanOptions) -> torch.Tensor:
    """``[B, 1, Lq, Lk]`` bool mask between query and key layouts (the SDPA format).

    The queries must be the last ``Lq`` keys, in time order, and every earlier key older than every
    query (true for a full sequence and for a cache, whose slots need not be in time order among
    themselves: an :class:`~anllm.cache.AnchorCache` fills dropped slots out of order). Long query blocks go
    through :func:`_run_table_mask`, which evaluates :func:`visible` once per run of identical
    queries instead of once per query.
    """
    if q.shape[1] < _RUN_TABLE_MIN_QUERIES:
        return visible(q.map(lambda t: t[:, None, :, None]), k.map(lambda t: t[:, None, None, :]), options)
    return _run_table_mask(q, k, options)


_RUN_TABLE_MIN_QUERIES = 64


def _run_table_mask(q: TokenLayout, k: TokenLayout, options: AnsanOptions) -> torch.Tensor:
    """Same result as the direct broadcast, ~L/(2 x tokens per sentence) times fewer rule evaluations.

    Apart from causality, a query's row depends only on its (seg, anchor, doc, valid, prefix), which
    is constant over runs of consecutive tokens (a sentence's non-anchor tokens, then its anchor).
    So: evaluate the rule for one representative per run with causality off, copy each query's run
    row into place (a row memcpy, much cheaper on CPU than L^2 broadcast comparisons), then apply
    causality with ``tril_`` (key j precedes query i iff j <= i + Lk - Lq). The window clause depends
    on the query's index, so it is ORed in afterwards from a direct (cheap) index comparison.
    """
    B, Lq = q.shape
    Lk = k.shape[1]
    device = q.idx.device
    change = torch.zeros((B, Lq), dtype=torch.bool, device=device)
    change[:, 0] = True
    for f in (q.seg, q.anchor, q.doc, q.valid, q.prefix, q.prompt):
        change[:, 1:] |= f[:, 1:] != f[:, :-1]
    run = change.long().cumsum(-1) - 1  # run id of each query, per row
    R = int(run[:, -1].max()) + 1
    first = torch.zeros((B, R), dtype=torch.long, device=device)  # first query of each run
    first.scatter_reduce_(1, run, torch.arange(Lq, device=device).expand(B, Lq), "amin", include_self=False)
    rep = q.map(lambda t: t.gather(1, first))
    rep = rep.with_(idx=torch.full_like(rep.idx, torch.iinfo(torch.long).max))  # causality comes last
    no_window = replace(options, window=0)
    table = visible(rep.map(lambda t: t[:, :, None]), k.map(lambda t: t[:, None, :]), no_window)  # [B, R, Lk]
    rows = (run + R * torch.arange(B, device=device)[:, None]).reshape(-1)
    out = table.reshape(B * R, Lk).index_select(0, rows).view(B, 1, Lq, Lk)
    out = out.tril_(diagonal=Lk - Lq)
    if options.window:
        qq, kk = q.map(lambda t: t[:, None, :, None]), k.map(lambda t: t[:, None, None, :])
        band = (kk.idx <= qq.idx) & (qq.idx - kk.idx <= options.window)
        out |= band & (kk.doc == qq.doc) & kk.valid & qq.valid
    return out


def ansan_mask_mod(q: TokenLayout, k: TokenLayout, q_offset: int, options: AnsanOptions) -> Callable:
    """The rule as a ``mask_mod(b, h, q_idx, kv_idx)`` for flex_attention / transformers' mask
    interface. ``q_idx - q_offset`` indexes the query layout, ``kv_idx`` the key layout."""

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - signature fixed by flex_attention
        qi = q_idx - q_offset
        return visible(q.map(lambda t: t[b, qi]), k.map(lambda t: t[b, kv_idx]), options)

    return mask_mod


FLEX_BLOCK_SIZE = 128  # flex_attention's default sparse block size
_FLEX_CHUNK_ELEMENTS = 1 << 26  # dense-mask elements evaluated at once while classifying blocks


def flex_block_mask(q: TokenLayout, k: TokenLayout, options: AnsanOptions, block_size: int = FLEX_BLOCK_SIZE) -> Any:
    """The rule as a flex_attention ``BlockMask`` between query and key layouts (the queries the last
    ``Lq`` keys, after every other key, as for :func:`dense_mask`).

    Each ``block_size`` x ``block_size`` tile is classified empty / partial / full from
    :func:`dense_mask`, evaluated one band of query blocks at a time (memory ``band x Lk``, not
    ``Lq x Lk``); partial tiles apply :func:`ansan_mask_mod` inside the kernel. The result is what
    ``create_block_mask(ansan_mask_mod(...))`` gives (tiles beyond the sequence are padding, so a
    ragged last tile is partial), but nothing is traced or compiled: a new batch, of any length,
    never triggers a compilation here.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, Lq = q.shape
    Lk = k.shape[1]
    off = Lk - Lq
    bs = block_size
    nk = -(-Lk // bs)
    band = max(1, _FLEX_CHUNK_ELEMENTS // max(1, B * nk * bs * bs)) * bs  # query rows per band
    partial, full = [], []
    for r0 in range(0, Lq, band):
        r1 = min(Lq, r0 + band)
        # Keys after the band's last query are invisible to it (causality): evaluate up to there only,
        # which also keeps the band's queries the last keys, as dense_mask expects.
        m = dense_mask(q.map(lambda t: t[:, r0:r1]), k.map(lambda t: t[:, : off + r1]), options)[:, 0]
        m = torch.nn.functional.pad(m, (0, nk * bs - (off + r1), 0, -(r1 - r0) % bs))
        tiles = m.view(B, -1, bs, nk, bs)
        some, every = tiles.any(4).any(2), tiles.all(4).all(2)
        partial.append(some & ~every)
        full.append(every)

    def ordered(dense_tiles: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.cat(dense_tiles, dim=1)[:, None].to(torch.int32)  # [B, 1, nq, nk]
        count = d.sum(-1).to(torch.int32)
        return count, torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)

    # flex numbers queries 0..Lq-1 (not by their key position): q_offset 0.
    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=(bs, bs),
        mask_mod=ansan_mask_mod(q, k, 0, options), seq_lengths=(Lq, Lk),
    )
