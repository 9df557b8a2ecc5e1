"""``LayoutTracker``: the token layout of whatever a cache holds, continued step by step.

Shared by :class:`~anllm.cache.AnchorCache` (which prunes what it tracks) and the full caches
(``DynamicCache``) that the anchor-aware model's hooks track, so decode steps get the AnSAN mask.
"""

from __future__ import annotations

import torch

from ..masks import AnsanOptions, TokenLayout, layout_from_tokens


class LayoutTracker:
    """The token layout of whatever a cache holds, plus per-row counters to continue it.

    Shared by :class:`AnchorCache` (which prunes) and full caches (``DynamicCache``), for which the
    model hook tracks the layout so that decode steps still get the AnSAN mask.
    """

    def __init__(self, options: AnsanOptions, keep_prefix: bool = False, keep_mask: torch.Tensor | None = None):
        self.options = options
        self.keep_prefix = keep_prefix
        self.keep_mask = keep_mask  # [B, P] over the prompt's columns: True = kept for what follows
        self.layout: TokenLayout | None = None  # [B, W] kept slots
        self.num_steps = 0
        self.batch_size: int | None = None
        # Tokens fed so far: the same for every row (padding included), so a host int that needs no read.
        self.seen_tokens = 0

    def extend(self, is_anchor: torch.Tensor, valid: torch.Tensor) -> tuple[TokenLayout, TokenLayout]:
        """Layout of new tokens ``[B, q]`` continuing each row; returns ``(new, keys)`` where ``keys``
        is the layout of everything attention sees this step (``[B, W + q]``)."""
        B = is_anchor.shape[0]
        if self.batch_size is None:
            self.batch_size = B
        elif B != self.batch_size:
            raise ValueError(
                f"This cache holds a batch of {self.batch_size} rows but the input has {B}. A cache belongs "
                "to one batch: create a new AnchorCache() for each generate call (or call cache.reset())."
            )
        first = self.layout is None
        if first:
            starts = dict(idx_start=0, seg_start=0, rank_start=0)
        else:
            starts = dict(idx_start=self.seen_idx, seg_start=self.open_seg, rank_start=self.valid_seen)
        start = 0 if first else self.seen_tokens
        new = layout_from_tokens(
            is_anchor,
            valid,
            None,
            self.options,
            prefix=self.keep_prefix and self.num_steps == 0 and self.keep_mask is None,
            **starts,
        )
        # A declared prompt (possibly read in chunks), kept where the mask says. Tokens after it are
        # neither prompt nor prefix, which layout_from_tokens already says: skip the gather there.
        if self.keep_mask is not None and start < self.keep_mask.shape[1]:
            if self.keep_mask.device != new.idx.device:
                self.keep_mask = self.keep_mask.to(new.idx.device)  # once, not on every step
            P = self.keep_mask.shape[1]
            in_prompt = new.idx < P
            kept = self.keep_mask.gather(1, new.idx.clamp(max=P - 1)) & in_prompt
            new = new.with_(prefix=kept, prompt=in_prompt)
        self.seen_idx = new.idx[:, -1] + 1
        self.seen_tokens = start + is_anchor.shape[1]
        self.open_seg = new.seg[:, -1] + new.anchor[:, -1].long()
        self.valid_seen = (0 if first else self.valid_seen) + new.valid.long().sum(-1)
        keys = new if first else TokenLayout.cat([self.layout, new])
        return new, keys

    def reset(self) -> None:
        self.__init__(self.options, self.keep_prefix, self.keep_mask)
