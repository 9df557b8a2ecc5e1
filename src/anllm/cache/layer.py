"""``AnchorLayer``: one layer's keys/values of an :class:`~anllm.cache.AnchorCache`.

One preallocated buffer ``[B, H, capacity, D]`` per layer: new tokens are written at the shared width
and pruning compacts each row in place, moving kept slots from above the row's kept count into the
dropped slots below it (the plans come from the parent cache, once per step for all layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
    from .anchor_cache import AnchorCache


class AnchorLayer(CacheLayerMixin):
    """One layer's keys/values in a growable buffer; compaction plans come from the parent cache."""

    is_sliding = False
    is_compileable = False

    def __init__(self, parent: "AnchorCache"):
        super().__init__()
        self.parent = parent
        self.width = 0  # used slots (shared by all rows)

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._kbuf = key_states.new_empty((B, H, 0, D))
        self._vbuf = key_states.new_empty((B, H, 0, D))
        self.is_initialized = True

    def _ensure_capacity(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = self._kbuf.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 64)
        B, H, _, Dk = like_k.shape
        Dv = like_v.shape[-1]
        k = like_k.new_empty((B, H, new_cap, Dk))
        v = like_v.new_empty((B, H, new_cap, Dv))
        if self.width:
            k[:, :, : self.width] = self._kbuf[:, :, : self.width]
            v[:, :, : self.width] = self._vbuf[:, :, : self.width]
            self.parent.copied_slots += self.width
        self._kbuf, self._vbuf = k, v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        q = key_states.shape[2]
        end = self.width + q
        self._ensure_capacity(end, key_states, value_states)
        self._kbuf[:, :, self.width : end] = key_states
        self._vbuf[:, :, self.width : end] = value_states
        self.width = end
        return self._kbuf[:, :, :end], self._vbuf[:, :, :end]

    def compact(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, new_width: int) -> None:
        """Move slots ``src -> dst`` of ``rows`` in place (reads happen before writes).

        When pruning leaves the buffer mostly empty (e.g. after a long prefill), it is reallocated at
        twice the kept width so that memory follows the kept cache, not the longest prompt.
        """
        if rows.numel():
            self._kbuf[rows, :, dst] = self._kbuf[rows, :, src]
            self._vbuf[rows, :, dst] = self._vbuf[rows, :, src]
        self.width = new_width
        cap = self._kbuf.shape[2]
        if cap > 256 and new_width < cap // 4:
            keep = max(2 * new_width, 64)
            self._kbuf = self._kbuf[:, :, :keep].clone()
            self._vbuf = self._vbuf[:, :, :keep].clone()
            self.parent.copied_slots += new_width

    @property
    def keys(self) -> torch.Tensor | None:  # the Cache API exposes .keys/.values
        return None if not self.is_initialized else self._kbuf[:, :, : self.width]

    @keys.setter
    def keys(self, value: Any) -> None:  # set to None by CacheLayerMixin.__init__
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return None if not self.is_initialized else self._vbuf[:, :, : self.width]

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def select_rows(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._kbuf = self._kbuf[indices]
            self._vbuf = self._vbuf[indices]

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length()

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.width + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.width = 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._kbuf.nelement() * self._kbuf.element_size() + self._vbuf.nelement() * self._vbuf.element_size()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("AnchorCache does not support beam search; use greedy or sampling.")
