"""The forward hooks that make a prepared model apply the AnSAN rule (see :mod:`anllm.modeling`).

:class:`AnchorAttention` turns ``input_ids`` + the 2D mask (+ ``document_ids`` for packed rows) into
the 4D mask the model's attention backend expects, keeps the token layout of whatever cache the model
reads (an :class:`~anllm.cache.AnchorCache` prunes it; a ``DynamicCache`` keeps all), so decode steps
are masked exactly as the full sequence would be, and memoises flex-attention ``BlockMask``s.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from .anchors import AnchorConfig
from .cache import AnchorCache, LayoutTracker
from .masks import AnsanOptions, TokenLayout, ansan_mask_mod, dense_mask, flex_block_mask, layout_from_tokens

UNSUPPORTED_BACKENDS = ("flash_attention_2", "flash_attention_3", "paged_attention")  # causal/varlen masks only


def _first_keys(cache: Cache) -> torch.Tensor | None:
    layers = getattr(cache, "layers", None)
    return getattr(layers[0], "keys", None) if layers else None


def decoder_of(model: Any) -> Any:
    """The module that runs the decoder layers (``model.model`` for ``LlamaForCausalLM``)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _fix_chunked_positions(kwargs: dict, attention_mask: Any) -> None:
    """Left-padded rows in transformers' chunked prefill get ``position_ids = cache_position``, i.e.
    positions shifted by their padding, while the decode steps after it count real tokens (as an
    unchunked prefill does). Give the chunks the positions an unchunked prefill would have.

    Decided on the device (a ``where``), not by reading it: this runs on every step of ``generate``."""
    pos, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and isinstance(pos, torch.Tensor)
            and isinstance(cache_position, torch.Tensor) and cache_position.numel()):
        return
    q = cache_position.shape[-1]
    if pos.shape[-1] != q:
        return
    am = attention_mask.to(pos.device)
    chunk_of_padded_prefill = (
        (cache_position[-1] == am.shape[1] - 1) & ~am.bool().all() & (pos == cache_position).all()
    )
    fixed = (am.long().cumsum(-1) - 1).clamp_min(0)[:, -q:]
    kwargs["position_ids"] = torch.where(chunk_of_padded_prefill, fixed, pos)


class AnchorAttention:
    """Owns the forward hooks that apply the rule; one per prepared model."""

    def __init__(self, model: Any, cfg: AnchorConfig):
        self.model_ref = weakref.ref(model)
        self.cfg = cfg
        self.options = AnsanOptions(cfg.num_sink_tokens, cfg.anchors_see_anchors, window=cfg.window)
        self.anchor_ids = torch.tensor(cfg.anchor_token_ids, dtype=torch.long)
        self._anchor_ids_on: dict[torch.device, torch.Tensor] = {}  # one copy per device, made once
        self.enabled = True
        # flex_attention: the last BlockMask built without a cache, and what it was built from
        # (weak references to the input tensors and their version counters, plus the settings).
        self._flex_memo: tuple[tuple, tuple, Any] | None = None
        self.flex_builds = 0  # BlockMasks built (tests: the same batch twice builds once)
        self._trackers: "weakref.WeakKeyDictionary[Cache, LayoutTracker]" = weakref.WeakKeyDictionary()
        # The first layer's key tensor each tracked cache held after our last forward: a different one
        # before the next forward means the cache was changed behind our back (beam search reorders
        # rows, assisted decoding crops), so the tracked anchor layout no longer matches it.
        self._last_keys: "weakref.WeakKeyDictionary[Cache, Any]" = weakref.WeakKeyDictionary()
        # On the decoder stack (``model.model`` for Llama & co.), not on the LM wrapper: generate's
        # chunked prefill calls the wrapper's ``.forward`` directly, which skips the wrapper's hooks,
        # but the wrapper always *calls* the decoder, whose hooks therefore run on every path.
        target = decoder_of(model)
        self._handles = [
            target.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            target.register_forward_hook(self._post_forward, with_kwargs=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        document_ids = kwargs.pop("document_ids", None)
        anchor_mask = is_anchor = kwargs.pop("anchor_mask", None)
        if not (self.enabled and self.cfg.enabled):
            if document_ids is None:
                return args, kwargs  # plain causal attention: leave the model's own fast path alone
            is_anchor = torch.zeros(document_ids.shape, dtype=torch.bool, device=document_ids.device)
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            return args, kwargs  # a caller-built 4D mask wins
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if is_anchor is None:
            if input_ids is None:
                raise ValueError("An anchor-aware model needs input_ids (or anchor_mask= with inputs_embeds).")
            is_anchor = torch.isin(input_ids, self._anchor_ids(input_ids.device))
        B, q = is_anchor.shape
        valid = (
            torch.ones_like(is_anchor, dtype=torch.bool)
            if attention_mask is None
            else attention_mask[:, -q:].to(is_anchor.device).bool()
        )
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False) and not module.training
        if cache is None and use_cache:
            if document_ids is not None and kwargs.get("use_cache") is None:
                kwargs["use_cache"] = False  # packed rows cannot be continued: no implicit cache
            else:
                cache = kwargs["past_key_values"] = DynamicCache(config=module.config)
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids (packed rows) are for training/scoring without a cache.")
        if cache is not None:
            _fix_chunked_positions(kwargs, attention_mask)
        if isinstance(cache, AnchorCache):
            qlay, klay = cache.begin_step(is_anchor, valid, self.options)
            if cache.position_mode == "compact":
                kwargs["position_ids"] = cache.compact_positions(valid)
            # The step's one host read: the cache's new width and this step's "no mask needed" test together.
            mask, sees_all = self._mask_parts(module.config, qlay, klay)
            (no_mask,) = cache.resolve_step(sees_all)
            kwargs["attention_mask"] = None if no_mask else mask
            return args, kwargs
        elif isinstance(cache, Cache):
            tracker = self._trackers.get(cache)
            if tracker is None:
                if cache.get_seq_length() > 0:
                    raise ValueError(
                        "This cache already holds tokens the anchor-aware model did not see, so their anchors "
                        "are unknown. Start generation with an empty cache (DynamicCache() or AnchorCache())."
                    )
                tracker = self._trackers[cache] = LayoutTracker(self.options)
            elif cache in self._last_keys and self._last_keys[cache]() is not _first_keys(cache):
                raise ValueError(
                    "The cache was reordered or cropped outside the anchor-aware model (beam search, "
                    "assisted decoding, batch_select_indices, or a forward that skipped its hooks), so its "
                    "anchor layout is lost. Use greedy or sampling decoding (AnchorCache.batch_repeat_interleave "
                    "to score continuations)."
                )
            qlay, klay = tracker.extend(is_anchor, valid)
            tracker.layout = klay
            tracker.num_steps += 1
        else:
            impl = getattr(module.config, "_attn_implementation", None)
            memo_key = None
            if impl == "flex_attention":
                memo_key = self._flex_key((anchor_mask, input_ids, attention_mask, document_ids))
                if memo_key is not None and self._flex_memo is not None and _same_inputs(self._flex_memo, memo_key):
                    kwargs["attention_mask"] = self._flex_memo[2]
                    return args, kwargs
            qlay = klay = layout_from_tokens(is_anchor, valid, document_ids, self.options)
            kwargs["attention_mask"] = self.build_mask(module.config, qlay, klay)
            if memo_key is not None:
                self._flex_memo = (*memo_key, kwargs["attention_mask"])
            return args, kwargs
        kwargs["attention_mask"] = self.build_mask(module.config, qlay, klay)
        return args, kwargs

    fast_decode = True  # class default; tests switch it off to compare

    def _needs_no_mask(self, config: Any, q: TokenLayout, k: TokenLayout) -> bool:
        """Whether to test for a decode step whose new token may see every cached slot (not an
        anchor, no padding, no empty slots): SDPA's unmasked path computes exactly that, and on CPU
        it is several times faster than the same attention with a 4D mask."""
        impl = getattr(config, "_attn_implementation", None)
        return self.fast_decode and impl == "sdpa" and q.shape[1] == 1 and k.shape[1] > 1

    def _anchor_ids(self, device: torch.device) -> torch.Tensor:
        """The anchor ids on ``device``, copied there once (not from pageable memory on every forward)."""
        ids = self._anchor_ids_on.get(device)
        if ids is None:
            ids = self._anchor_ids_on[device] = self.anchor_ids.to(device)
        return ids

    def _flex_key(self, tensors: tuple) -> tuple[tuple, tuple] | None:
        """What a BlockMask built without a cache depends on: the settings, and the input tensors
        themselves (weak references + version counters: the same objects, not modified in place).
        None (no memo) for inference-mode tensors, which have no version counter."""
        refs, versions = [], []
        for t in tensors:
            if t is None:
                refs.append(None)
                versions.append(None)
                continue
            try:
                versions.append((t._version, tuple(t.shape), t.device))
            except RuntimeError:  # inference tensors track no versions: nothing safe to key on
                return None
            refs.append(weakref.ref(t))
        settings = (self.options, self.enabled and self.cfg.enabled)
        return (settings, tuple(versions)), tuple(refs)

    def _post_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, AnchorCache):
            cache.end_step()
            cache.tracker.num_steps += 1
        elif isinstance(cache, Cache) and cache in self._trackers:
            keys = _first_keys(cache)
            if keys is not None:
                self._last_keys[cache] = weakref.ref(keys)
        return output

    # -- masks ---------------------------------------------------------------------------------
    def build_mask(self, config: Any, q: TokenLayout, k: TokenLayout) -> Any:
        """The 4D mask for this model's attention backend, from the one rule in :mod:`anllm.masks`
        (None: a decode step that sees every key, which SDPA then attends unmasked)."""
        mask, sees_all = self._mask_parts(config, q, k)
        return None if sees_all is not None and bool(sees_all) else mask

    def _mask_parts(self, config: Any, q: TokenLayout, k: TokenLayout) -> tuple[Any, torch.Tensor | None]:
        """``(mask, sees_all)``: the backend's mask, and for a step that may pass no mask (see
        :meth:`_needs_no_mask`) a 0-dim bool device tensor saying whether the mask allows every key
        (else None). The caller reads ``sees_all``: alone, or with the cache's read (one per step)."""
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl == "sdpa":
            mask = dense_mask(q, k, self.options)
            return mask, (mask.all() if self._needs_no_mask(config, q, k) else None)
        model = self.model_ref()
        dtype = model.dtype if model is not None else torch.float32
        if impl == "eager":
            allowed = dense_mask(q, k, self.options)
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min), None  # additive: 0 or -inf-ish
        if impl in UNSUPPORTED_BACKENDS:
            raise ValueError(f"attn_implementation={impl!r} cannot express the AnSAN mask; use sdpa or flex_attention.")
        if impl == "flex_attention":
            self.flex_builds += 1
            return flex_block_mask(q, k, self.options), None
        B, Lq = q.shape
        Lk = k.shape[1]
        device = q.idx.device
        return create_causal_mask(
            config=config,
            input_embeds=torch.empty((B, Lk, 0), dtype=dtype, device=device),
            attention_mask=None,
            cache_position=torch.arange(Lk - Lq, Lk, device=device),
            past_key_values=None,
            and_mask_function=ansan_mask_mod(q, k, Lk - Lq, self.options),
        ), None


def _same_inputs(memo: tuple, key: tuple) -> bool:
    """Whether ``key`` (from ``_flex_key``) names the very tensors, unmodified, that ``memo`` was built from."""
    (static_then, refs_then), (static_now, refs_now) = memo[:2], key
    if static_then != static_now:
        return False
    for then, now in zip(refs_then, refs_now):
        if (then is None) != (now is None):
            return False
        if then is not None and then() is not now():  # a dead reference is never the same tensor
            return False
    return True
