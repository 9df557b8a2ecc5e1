"""Anchor-aware models: ``prepare_model`` makes any HF decoder apply the AnSAN rule by itself.

How, without touching library code: a forward pre-hook (a public PyTorch mechanism) on the causal
LM turns ``input_ids`` + the 2D ``attention_mask`` (+ optional ``document_ids`` for packed rows)
into the 4D mask that the model's attention backend expects, built from :mod:`anllm.masks`:

* ``sdpa``: dense bool ``[B, 1, Lq, Lk]`` (the CPU training path);
* ``eager``: the same mask as an additive float mask (eager *adds* the mask, so a bool mask would be
  silently wrong);
* ``flex_attention``: a ``BlockMask`` from :func:`anllm.masks.flex_block_mask` (tiles classified
  from the dense rule, the rule's ``mask_mod`` inside partial tiles; nothing compiled, so new batches
  and new lengths never recompile it), memoised for the same input tensors (:attr:`AnchorAttention.flex_builds`
  counts the builds);
* any other backend registered in transformers' ``AttentionMaskInterface``: the rule as a
  ``mask_mod`` through ``transformers.masking_utils.create_causal_mask``.

transformers passes a ready 4D mask through unchanged, so every layer of every model that uses the
attention interface (Llama, Mistral, Qwen2, ...) gets the rule. With a cache, the hook keeps the
token layout of what the cache holds (``AnchorCache`` prunes it; a ``DynamicCache`` keeps all), so
decode steps are masked exactly as the full sequence would be.

Anchor settings live in ``model.config.anllm`` and survive ``save_pretrained``; hooks do not, so
load with :func:`from_pretrained` (or call ``prepare_model`` again). The hooks themselves are
:class:`anllm.attention.AnchorAttention`; this module prepares, loads and switches models.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Iterator

from .anchors import AC_TOKEN, DEFAULT_EP_PUNCTUATION, AnchorConfig, ac_token_id, add_ac_token, ep_anchor_ids, ep_token_ids
from .attention import UNSUPPORTED_BACKENDS, AnchorAttention

CONFIG_KEY = "anllm"


def get_anchor_config(model_or_config: Any) -> AnchorConfig | None:
    """The anchor settings stored in a model's config (None for a plain model)."""
    config = getattr(model_or_config, "config", model_or_config)
    d = getattr(config, CONFIG_KEY, None)
    return AnchorConfig.from_dict(d) if d else None


def prepare_model(
    model: Any,
    tokenizer: Any,
    mode: str | None = None,
    *,
    ep_punctuation: str = DEFAULT_EP_PUNCTUATION,
    anchor_token: str = AC_TOKEN,
    num_sink_tokens: int = 0,
    anchors_see_anchors: bool = False,
    window: int = 0,
    ep_tokens: list[str] | None = None,
    splitter: str = "blingfire",
    ac_after_last: bool = True,
    ac_join: str | None = None,
) -> tuple[Any, Any]:
    """Make ``model`` anchor-aware (AnLLM-AC ``"ac"``, AnLLM-EP ``"ep"`` or plain ``"none"``).

    ``mode=None`` re-applies the settings saved in ``model.config.anllm`` (after loading).
    AC adds ``<AC>`` to the tokenizer and initialises its embedding rows from "."; EP finds every
    vocabulary token that ends a sentence (see :mod:`anllm.anchors`), or exactly ``ep_tokens``
    (the authors: ``["."]``). ``splitter``/``ac_after_last``/``ac_join`` record how AC text is
    marked, so evaluation reads text the way training wrote it.
    """
    saved = get_anchor_config(model)
    if mode is None:
        if saved is None:
            raise ValueError("This model has no saved anchor settings: pass mode='ac', 'ep' or 'none'.")
        cfg = saved
        if cfg.mode == "ac":
            tid = ac_token_id(tokenizer, cfg.anchor_token or AC_TOKEN)
            if [tid] != cfg.anchor_token_ids:
                raise ValueError(
                    f"The tokenizer maps {cfg.anchor_token!r} to id {tid}, but the model was trained with "
                    f"{cfg.anchor_token_ids}. Load the tokenizer saved with this model."
                )
    else:
        if mode == "ac":
            ids = [add_ac_token(model, tokenizer, anchor_token)]
        elif mode == "ep":
            ids = ep_token_ids(tokenizer, ep_tokens) if ep_tokens else ep_anchor_ids(tokenizer, ep_punctuation)
        elif mode == "none":
            ids = []
        else:
            raise ValueError(f"Unknown anchor mode {mode!r}: choose 'ac', 'ep' or 'none'.")
        cfg = AnchorConfig(
            mode=mode,  # type: ignore[arg-type]
            anchor_token_ids=ids,
            anchor_token=anchor_token if mode == "ac" else None,
            ep_punctuation=ep_punctuation,
            num_sink_tokens=num_sink_tokens,
            anchors_see_anchors=anchors_see_anchors,
            window=window,
            ep_tokens=list(ep_tokens) if ep_tokens and mode == "ep" else None,
            splitter=splitter,
            ac_after_last=ac_after_last,
            ac_join=ac_join,
        )
        if cfg.mode == "ac":
            cfg.marking().apply("Check. The settings.")  # an unknown splitter or a join without <AC> fails here
    setattr(model.config, CONFIG_KEY, cfg.to_dict())
    old = getattr(model, "_anllm_attention", None)
    if old is not None:
        old.remove()
    impl = getattr(model.config, "_attn_implementation", None)
    if cfg.enabled and impl in UNSUPPORTED_BACKENDS:
        raise ValueError(
            f"attn_implementation={impl!r} cannot express the AnSAN mask (it only knows causal/varlen "
            "masks). Load the model with attn_implementation='sdpa' (or 'flex_attention' on GPU)."
        )
    # Installed for mode "none" too: packed rows (document_ids) must not attend across documents
    # in the full-attention baseline either (the rule without anchors = causal within a document).
    model._anllm_attention = AnchorAttention(model, cfg)
    return model, tokenizer


def from_pretrained(path: str, **kwargs: Any) -> tuple[Any, Any]:
    """Load a causal LM + tokenizer and re-apply its saved anchor settings (if any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs.setdefault("attn_implementation", "sdpa")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if get_anchor_config(model) is not None:
        prepare_model(model, tokenizer)
    return model, tokenizer


@contextlib.contextmanager
def anchor_attention(model: Any, enabled: bool) -> Iterator[None]:
    """Temporarily switch the AnSAN rule off (plain causal attention) or on for an anchor-aware model."""
    att = getattr(model, "_anllm_attention", None)
    if att is None or not att.cfg.enabled:
        if enabled:
            raise ValueError("This model is not anchor-aware: call anllm.prepare_model(mode='ac'|'ep') first.")
        yield
        return
    before = att.enabled
    att.enabled = enabled
    try:
        yield
    finally:
        att.enabled = before


@contextlib.contextmanager
def attention_backend(model: Any, impl: str | None) -> Iterator[None]:
    """Run ``model`` with another attention backend (``None``: leave it), restored afterwards."""
    before = model.config._attn_implementation
    if impl is None or impl == before:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def anchor_options(model: Any, **changes: Any) -> Iterator[None]:
    """Temporarily change the rule's :class:`~anllm.masks.AnsanOptions` of an anchor-aware model
    (e.g. ``hide_anchors=True`` for the sentence-only control). Use a fresh cache inside."""
    att = getattr(model, "_anllm_attention", None)
    if att is None or not att.cfg.enabled:
        raise ValueError("This model is not anchor-aware: call anllm.prepare_model(mode='ac'|'ep') first.")
    before = att.options
    att.options = replace(before, **changes)
    try:
        yield
    finally:
        att.options = before


def is_anchor_aware(model: Any) -> bool:
    att = getattr(model, "_anllm_attention", None)
    return att is not None and att.enabled and att.cfg.enabled


__all__ = ["AnchorAttention", "anchor_attention", "anchor_options", "from_pretrained", "get_anchor_config",
           "is_anchor_aware", "prepare_model"]
