"""AnchorCache: a transformers ``Cache`` that keeps only the keys/values the AnSAN rule can still use.

After each forward, every cached token that :func:`anllm.masks.reachable_later` rules out (the
non-anchor tokens of finished sentences, padding) is dropped. Under the AnSAN mask this is lossless:
generation matches a full ``DynamicCache`` on the same prepared model.

Storage is one preallocated buffer per layer, ``[B, H, capacity, D]``; new tokens are written at the
shared width ``W`` (the same column for every row) and pruning compacts each row in place: every
dropped slot below the row's kept count is filled by one kept slot from above it, so a step moves
only as many slots as it drops below that line (a closed sentence: its anchor; a local window: the
one new token per step, not the whole window shifted by one), and never re-copies the whole cache (a
``DynamicCache`` step concatenates, i.e. copies, all of it). Slot order is therefore not time order:
attention does not depend on it (keys carry their positions; the mask reads each slot's layout), and
every new token still comes after every cached slot. Rows are ragged: a row with fewer kept tokens
has empty (``valid=False``) slots that the mask hides.

The cache only knows *which* tokens are anchors through the anchor-aware model (``prepare_model``);
its forward hook calls :meth:`AnchorCache.begin_step` before and :meth:`AnchorCache.end_step` after
each forward.

Host reads: a step reads the device once (:meth:`AnchorCache.resolve_step`: the new width, the number
of moved slots, and whatever flags the caller adds, e.g. the model's "no mask needed" test, in one
``tolist``). Everything else stays on the device: the compaction plan (``nonzero_static`` with the
size read in that one read), the layout, and the statistics, which are read only by :meth:`stats`.
On a GPU, where a batch-1 decode step is bound by kernel launches, every read is a pipeline stall.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers.cache_utils import Cache

from ..masks import AnsanOptions, TokenLayout, reachable_later
from .layer import AnchorLayer
from .tracker import LayoutTracker

PositionMode = Literal["true", "compact"]


class AnchorCache(Cache):
    """Lossless anchor-pruned KV cache (see module docstring).

    Args:
        keep_prefix: keep the prompt's keys/values for every token generated after it, as in the
            paper's "Src Cache" variant. The prompt is the first forward, or what :meth:`keep_prompt`
            declares (a prompt read in chunks; or only a span of it, e.g. the source).
        position_mode: ``"true"`` (default) keeps the positions a full forward would use (RoPE as in
            training; lossless). ``"compact"`` numbers new tokens by the pruned cache length, like the
            authors' code, for comparison only (not lossless).
    """

    def __init__(self, keep_prefix: bool = False, position_mode: PositionMode = "true"):
        if position_mode not in ("true", "compact"):
            raise ValueError(f"position_mode must be 'true' or 'compact', got {position_mode!r}")
        super().__init__(layers=[])
        self.keep_prefix = keep_prefix
        self.position_mode = position_mode
        self.tracker: LayoutTracker | None = None
        self.copied_slots = 0  # slots moved or copied by pruning/growth, per layer (for benchmarks)
        self._step: dict[str, Any] | None = None  # device tensors of the step in progress (begin_step)
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None  # resolve_step
        self._keys_layout: TokenLayout | None = None
        # Statistics, on the device (read by stats(), never inside a step).
        self.num_seen: torch.Tensor | None = None
        self.num_kept: torch.Tensor | None = None
        self.max_kept: torch.Tensor | None = None
        self._max_kept_total: torch.Tensor | None = None
        self._seen_before = 0
        self.keep_mask: torch.Tensor | None = None

    def keep_prompt(self, mask: torch.Tensor) -> "AnchorCache":
        """Declare the prompt before reading it: ``mask`` is ``[B, P]`` over the (left-padded) prompt's
        columns, True where a token's keys/values stay visible to everything generated after the
        prompt (all True: the whole prompt; a span: e.g. only the source, as the authors' Src Cache).
        Inside the prompt the plain rule applies, however many forwards read it."""
        if self.tracker is not None:
            raise RuntimeError("keep_prompt() must be called before the cache's first forward.")
        self.keep_mask = mask.bool()
        return self

    # ---- called by the anchor-aware model's forward hooks -------------------------------------
    def begin_step(
        self, is_anchor: torch.Tensor, valid: torch.Tensor, options: AnsanOptions
    ) -> tuple[TokenLayout, TokenLayout]:
        """Register the new tokens and plan the pruning on the device (no host read); returns
        ``(query_layout, key_layout)`` for the mask. :meth:`resolve_step` (called by the model's hook,
        else by :meth:`end_step`) reads the plan's sizes."""
        if self.tracker is None:
            self.tracker = LayoutTracker(options, self.keep_prefix, self.keep_mask)
        elif self.tracker.options != options:
            raise ValueError("This AnchorCache was filled by a model with different anchor options.")
        if self._step is not None:
            raise RuntimeError("AnchorCache.begin_step called twice without end_step (interrupted forward?).")
        self._seen_before = self.get_seq_length()
        new, keys = self.tracker.extend(is_anchor, valid)
        self._keys_layout = keys
        B, Wq = keys.shape
        keep = reachable_later(keys, self.tracker.open_seg[:, None], keys.doc[:, -1:], options,
                               next_idx=self.tracker.seen_idx[:, None])
        counts = keep.sum(-1)
        # Kept slots above the row's kept count move into the dropped slots below it (as many of each).
        inside = torch.arange(Wq, device=keep.device) < counts[:, None]
        moved, holes = keep & ~inside, ~keep & inside
        self._step = {"keep": keep, "counts": counts, "holes": holes, "moved": moved, "keys": keys}
        # Statistics (real tokens only), kept on the device.
        seen = new.valid.long().sum(-1)
        kept_now = (keep & keys.valid).long().sum(-1)
        total = kept_now.sum()
        self.num_seen = seen if self.num_seen is None else self.num_seen + seen
        self.num_kept = kept_now
        self.max_kept = kept_now if self.max_kept is None else torch.maximum(self.max_kept, kept_now)
        self._max_kept_total = total if self._max_kept_total is None else torch.maximum(self._max_kept_total, total)
        return new, keys

    def resolve_step(self, *flags: torch.Tensor | None) -> list[bool | None]:
        """The step's one host read: the kept width (and whether every slot stays), the number of
        slots that move, and the caller's ``flags`` (0-dim bool tensors, e.g. the model's "this step
        needs no mask"; None stays None), all in one ``tolist``. Builds the compaction plan and the
        kept layout; returns the flags' values. Idempotent within a step (a second call reads nothing
        and returns Nones)."""
        if self._step is None:
            raise RuntimeError("AnchorCache.resolve_step called outside a step (begin_step first).")
        if self._plan is not None:
            return [None] * len(flags)
        st = self._step
        keep, counts, holes, moved, keys = st["keep"], st["counts"], st["holes"], st["moved"], st["keys"]
        B, Wq = keep.shape
        live = [f for f in flags if f is not None]
        if B:
            scalars = [counts.max(), counts.min(), moved.sum()] + [f.reshape(()).long() for f in live]
            values = torch.stack(scalars).tolist()  # the one read
            new_width, min_count, n_moved, got = values[0], values[1], values[2], values[3:]
        else:
            new_width, min_count, n_moved, got = 0, 0, 0, [int(bool(f)) for f in live]
        if n_moved:  # which slots move where: nonzero with its size already known reads nothing more
            # Row-major order pairs each row's k-th moving slot with its k-th hole (a row has as many of each).
            where = torch.nonzero_static(moved, size=n_moved)
            rows, src = where[:, 0], where[:, 1]
            dst = torch.nonzero_static(holes, size=n_moved)[:, 1]
        else:  # the usual decode step: nothing moves
            rows = src = dst = torch.empty(0, dtype=torch.long, device=keep.device)
        if min_count == Wq:  # every row keeps every slot (so all are valid): the layout is the keys'
            self.tracker.layout = keys
        else:  # slot j of a row keeps its token or takes the one moved into it; slots past the count are empty
            order = torch.arange(new_width, device=keep.device).repeat(B, 1)
            order[rows, dst] = src
            kept = keys.map(lambda t: t.gather(-1, order))
            slot_ok = torch.arange(new_width, device=keep.device)[None, :] < counts[:, None]
            self.tracker.layout = kept.with_(valid=kept.valid & slot_ok)
        self._plan = (rows, src, dst, new_width)
        it = iter(got)
        return [None if f is None else bool(next(it)) for f in flags]

    def end_step(self) -> None:
        """Apply the pruning planned in :meth:`begin_step` to every layer, in place."""
        if self._step is None:
            return
        if self._plan is None:
            self.resolve_step()
        rows, src, dst, new_width = self._plan
        for layer in self.layers:
            layer.compact(rows, src, dst, new_width)
            self.copied_slots += int(rows.shape[0])  # a host size: no read
        self._step = None
        self._plan = None
        self._keys_layout = None

    def compact_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Positions of new tokens numbered from each row's kept length (the authors' scheme).

        Inside a step the base is taken from the keys before the new tokens (``tracker.layout`` may
        already hold the layout after this step)."""
        base = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        if self._step is not None and self._keys_layout is not None:
            base = self._keys_layout.valid[:, : self._keys_layout.shape[-1] - valid.shape[-1]].long().sum(-1)
        elif self.tracker is not None and self.tracker.layout is not None:
            base = self.tracker.layout.valid.long().sum(-1)
        pos = base[:, None] + valid.long().cumsum(-1) - 1
        return pos.clamp_min(0)

    # ---- transformers Cache API ---------------------------------------------------------------
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._step is None:
            raise RuntimeError(
                "AnchorCache got keys/values from a model that is not anchor-aware. Call "
                "anllm.prepare_model(model, tokenizer, mode='ac'|'ep') first (or load with anllm.from_pretrained)."
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(AnchorLayer(self))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (not kept): with true positions, new tokens continue from here."""
        if self.tracker is None:
            return 0
        return self._seen_before if self._step is not None else self.tracker.seen_tokens

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        width = self.layers[layer_idx].width if layer_idx < len(self.layers) else 0
        return width + cache_position.shape[0], 0

    def reset(self) -> None:
        """Empty the cache for a new batch (a declared prompt belonged to the old one)."""
        self.__init__(self.keep_prefix, self.position_mode)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("AnchorCache cannot be cropped (pruned tokens are gone).")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (e.g. score several continuations of one pruned context)."""
        self.batch_select_indices(torch.arange(self._rows(), device=self._device()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the given rows, in order."""
        if self._step is not None:
            raise RuntimeError("Cannot select rows in the middle of a forward.")
        indices = indices.to(self._device())
        for layer in self.layers:
            layer.select_rows(indices)
        t = self.tracker
        if t is not None and t.layout is not None:
            t.layout = t.layout.map(lambda x: x[indices])
            t.seen_idx, t.open_seg, t.valid_seen = t.seen_idx[indices], t.open_seg[indices], t.valid_seen[indices]
            t.batch_size = int(indices.numel())
            if t.keep_mask is not None:
                t.keep_mask = t.keep_mask[indices.to(t.keep_mask.device)]
        for name in ("num_seen", "num_kept", "max_kept"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[indices])

    def _rows(self) -> int:
        if self.tracker is None or self.tracker.batch_size is None:
            raise RuntimeError("The AnchorCache is empty.")
        return self.tracker.batch_size

    def _device(self) -> torch.device:
        if self.tracker is not None and self.tracker.layout is not None:
            return self.tracker.layout.idx.device
        return torch.device("cpu")

    # ---- statistics -----------------------------------------------------------------------------
    @property
    def max_kept_total(self) -> int:
        """Peak keys/values held by the whole batch after any forward (a host read)."""
        return 0 if self._max_kept_total is None else int(self._max_kept_total)

    @property
    def kept_width(self) -> int:
        return self.layers[0].width if self.layers else 0

    def nbytes(self) -> int:
        """Bytes allocated for keys/values (all layers, including spare capacity)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_nbytes(self) -> int:
        """Bytes of the kept keys/values themselves (real tokens, all layers)."""
        if not self.layers or self.num_kept is None:
            return 0
        per_slot = 0
        for layer in self.layers:
            B, H, cap, D = layer._kbuf.shape
            per_slot += H * (D + layer._vbuf.shape[-1]) * layer._kbuf.element_size()
        return per_slot * int(self.num_kept.sum())

    def stats(self) -> dict[str, Any]:
        """Cache statistics: totals and per row. ``reduction`` is C⇓ = 1 - kept/seen."""
        if self.num_seen is None:
            return {"seen": 0, "kept": 0, "max_kept": 0, "reduction": 0.0, "bytes": 0, "kept_bytes": 0}
        seen, kept = int(self.num_seen.sum()), int(self.num_kept.sum())
        return {
            "seen": seen,
            "kept": kept,
            "max_kept": self.max_kept_total,
            "reduction": 1.0 - kept / seen if seen else 0.0,
            "bytes": self.nbytes(),
            "kept_bytes": self.kept_nbytes(),
            "seen_per_row": self.num_seen.tolist(),
            "kept_per_row": self.num_kept.tolist(),
            "max_kept_per_row": self.max_kept.tolist(),
        }
