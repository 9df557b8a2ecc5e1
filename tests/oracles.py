"""Independent references the engine is tested against: written from the rule's wording, with loops.

One place for the oracles (the AnSAN rule, the equal-cache baselines' visibility, and kvpress used
the way its README shows), so that a test never checks the code against itself. Nothing here imports
:mod:`anllm.masks`.

The AnSAN rule, as worded: query q may attend key k (k <= q) iff both are real tokens of the same
packed document and (same segment, or k is an anchor and q is not); a segment ends at an anchor,
inclusive; padding rows/columns are all False. Options: the first ``num_sink_tokens`` real tokens of
each document stay visible to the later tokens of that document; ``anchors_see_anchors`` lets anchors
see earlier anchors; a kept prompt prefix (``prefix_len``) is visible to every token after it;
``hide_anchors`` (the sentence-only control) drops the anchor clause; ``window`` W: q also sees the W
real tokens of its document right before it.
"""

from __future__ import annotations

import random

Row = tuple[list[bool], list[bool], list[int]]  # (is_anchor, is_real, document id) per position


def reference_mask(
    is_anchor: list[bool],
    real: list[bool],
    doc: list[int] | None = None,
    num_sink_tokens: int = 0,
    anchors_see_anchors: bool = False,
    prefix_len: int = 0,
    hide_anchors: bool = False,
    window: int = 0,
) -> list[list[bool]]:
    """``M[q][k]`` for one row, by brute force over the rule's wording."""
    L = len(is_anchor)
    doc = doc if doc is not None else [0] * L
    anchor = [is_anchor[i] and real[i] for i in range(L)]  # padding is no token, so never an anchor

    def segment_end(i: int) -> int:
        """A segment ends at the next anchor, inclusive (an unfinished segment ends at L)."""
        for j in range(i, L):
            if anchor[j]:
                return j
        return L

    def is_sink(k: int) -> bool:
        earlier_in_doc = sum(1 for j in range(k) if real[j] and doc[j] == doc[k])
        return real[k] and earlier_in_doc < num_sink_tokens

    def in_window(q: int, k: int) -> bool:
        """k is one of the ``window`` real tokens of q's document right before q."""
        between = [j for j in range(k, q) if real[j] and doc[j] == doc[q]]
        return k < q and len(between) <= window

    M = [[False] * L for _ in range(L)]
    for q in range(L):
        for k in range(q + 1):
            if not (real[q] and real[k] and doc[q] == doc[k]):
                continue
            same_segment = segment_end(k) == segment_end(q)
            via_anchor = anchor[k] and (anchors_see_anchors or not anchor[q]) and not hide_anchors
            via_sink = is_sink(k)
            via_prefix = k < prefix_len <= q
            via_window = window > 0 and in_window(q, k)
            M[q][k] = same_segment or via_anchor or via_sink or via_prefix or via_window
    return M


def random_row(rng: random.Random, L: int) -> Row:
    """A row with random padding (none/left/right/all), 1-3 packed documents and anchor density."""
    pad_kind = rng.choice(["none", "left", "right", "left", "right", "all"] if L > 1 else ["none", "all"])
    n_pad = 0 if pad_kind == "none" else (L if pad_kind == "all" else rng.randint(1, L - 1))
    real = [True] * L
    if pad_kind == "left":
        real[:n_pad] = [False] * n_pad
    elif pad_kind in ("right", "all"):
        real[L - n_pad :] = [False] * n_pad
    density = rng.choice([0.0, 0.15, 0.35, 0.7, 1.0])
    # Padding may carry an anchor id (e.g. pad == "."): it must still not count as an anchor.
    is_anchor = [rng.random() < density for _ in range(L)]
    # Documents: contiguous runs with distinct, increasing ids; padding gets a random id.
    real_pos = [i for i in range(L) if real[i]]
    n_docs = rng.randint(1, min(3, max(1, len(real_pos))))
    cuts = sorted(rng.sample(real_pos[1:], n_docs - 1)) if n_docs > 1 and len(real_pos) > 1 else []
    first = rng.randint(0, 5)
    doc = [first + sum(1 for c in cuts if c <= i) for i in range(L)]
    for i in range(L):
        if not real[i]:
            doc[i] = rng.choice([0, -1, doc[i], first + 7])
    return is_anchor, real, doc


def streaming_reference(length: int, budgets: list[int], num_sink_tokens: int = 4) -> list[list[bool]]:
    """StreamingLLM by its wording: query q (with a budget of ``budgets[q]`` keys) keeps the first
    ``s = min(num_sink_tokens, budget // 2)`` tokens and the ``budget - s`` most recent ones, itself
    included; it never attends more than ``budget`` keys."""
    M = [[False] * length for _ in range(length)]
    for q in range(length):
        b = budgets[q]
        s = min(num_sink_tokens, b // 2)
        recent = list(range(q, -1, -1))[: b - s]
        for k in list(range(min(s, q + 1))) + recent:
            M[q][k] = True
    return M


def method_mask(method: str, is_anchor: list[bool], peak: int, per_query: list[int],
                num_sink_tokens: int = 4) -> list[list[bool]]:
    """The mask a reading ``method`` applies to one unpadded sequence, from the references above:
    causal (``full``), StreamingLLM at the peak or per query, or the AnSAN rule (``sentence``: anchors
    hidden)."""
    L = len(is_anchor)
    if method == "full":
        return [[k <= q for k in range(L)] for q in range(L)]
    if method == "streamingllm":
        return streaming_reference(L, [peak] * L, num_sink_tokens)
    if method == "streamingllm_q":
        return streaming_reference(L, per_query, num_sink_tokens)
    return reference_mask(is_anchor, [True] * L, hide_anchors=method == "sentence")


def kvpress_reference(model, press, ctx, feed, eager: bool = False):
    """kvpress used the way its README shows, on one unpadded sequence: ``press`` (a kvpress press, or
    None for no compression) as a context manager around one prefill of ``ctx`` into a DynamicCache, then
    ``feed`` decoded one token at a time without a mask (every layer attends all it holds). ``eager``:
    the prefill runs with eager attention (presses that read attention weights). Returns ``([len(feed),
    V] logits, entries kept per layer)``."""
    import contextlib

    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    torch.manual_seed(0)  # presses that draw random numbers: the seed anllm.eval.baselines sets per row
    before = model.config._attn_implementation
    with torch.no_grad():
        if eager and press is not None:
            model.set_attn_implementation("eager")
        try:
            with press(model) if press is not None else contextlib.nullcontext():
                model(input_ids=ctx[None], past_key_values=cache, use_cache=True)
        finally:
            model.set_attn_implementation(before)
        widths = [layer.keys.shape[2] for layer in cache.layers]
        logits = [model(input_ids=t.view(1, 1), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[len(ctx) + j]])).logits[0, -1] for j, t in enumerate(feed)]
    return torch.stack(logits), widths
