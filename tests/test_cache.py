"""AnchorCache: exact vs DynamicCache and a full forward; prunes what the rule allows, in place.

CPU, tiny random Llamas whose lm_head is biased toward the anchor ids so that greedy generation
produces anchors at different steps in different rows (a ragged cache). Runtime: ~30 s (2 cores).
"""

from __future__ import annotations

import itertools
import os

# Local files only; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import DynamicCache

import anllm
from oracles import reference_mask
from anllm.testing import tiny_llama, word_tokenizer

EP_WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(120)]  # 128 tokens, the tiny_llama vocab
EP_IDS = [4, 5, 6]
AC_WORDS = [".", ","] + [f"w{i}" for i in range(26)]
W = 10  # a non-anchor word id, used in hand-made examples
P = 4  # "." in EP_WORDS


def make_model(
    mode: str = "ep", anchor_bias: float = 1.0, **prepare_kwargs
) -> tuple[torch.nn.Module, list[int]]:
    """A prepared tiny model; ``anchor_bias`` scales the anchors' lm_head rows (more anchors)."""
    if mode == "ep":
        model, tok = tiny_llama(), word_tokenizer(EP_WORDS)
    else:
        tok = word_tokenizer(AC_WORDS)
        model = tiny_llama(vocab_size=len(tok))
    model, tok = anllm.prepare_model(model, tok, mode, **prepare_kwargs)
    anchors = model.config.anllm["anchor_token_ids"]
    with torch.no_grad():
        model.lm_head.weight[anchors] *= anchor_bias
    model.generation_config.eos_token_id = None  # run to max_new_tokens (no early-finished rows)
    model.generation_config.pad_token_id = 0
    return model, anchors


def positions(am: torch.Tensor) -> torch.Tensor:
    """The position ids generate uses for left-padded rows."""
    return (am.long().cumsum(-1) - 1).clamp_min(0)


def left_padded_prompts(
    seed: int, B: int = 3, L: int = 10, low: int = 7, high: int = 128, anchor: int = P
):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (B, L), generator=g)
    ids[0, 3] = anchor
    ids[B - 1, L - 2] = anchor
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    am[B - 1, :6] = 0
    ids[am == 0] = 0
    return ids, am


def generate(model, ids, am, cache, n: int = 24):
    return model.generate(
        ids,
        attention_mask=am,
        past_key_values=cache,
        do_sample=False,
        max_new_tokens=n,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )


# --- exactness -----------------------------------------------------------------------------------

# mode, anchor bias, prepare options (biases chosen so rows get anchors at different steps)
CASES = {
    "ep": ("ep", 2.5, {}),
    "ac": ("ac", 2.0, {}),
    "ep-sinks": ("ep", 2.5, {"num_sink_tokens": 2}),
    "ep-anchors-see-anchors": ("ep", 2.5, {"anchors_see_anchors": True}),
    "ep-window": ("ep", 3.5, {"window": 3}),
    "ac-window-sinks": ("ac", 2.0, {"window": 4, "num_sink_tokens": 2}),
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_dynamic_cache_and_full_forward(case: str) -> None:
    mode, bias, kwargs = CASES[case]
    model, anchors = make_model(mode, bias, **kwargs)
    vocab = model.config.vocab_size
    ids, am = left_padded_prompts(seed=11, high=vocab - 1 if mode == "ac" else 128)
    n = 24
    cache = anllm.AnchorCache()
    got = generate(model, ids, am, cache, n)
    want = generate(model, ids, am, DynamicCache(), n)

    new = got.sequences[:, ids.shape[1] :]
    is_anchor = torch.isin(new, torch.tensor(anchors))
    first_anchor = [int(r.nonzero()[0]) if r.any() else None for r in is_anchor]
    # preconditions: every row generates anchors, at different steps (a ragged cache)
    assert all(f is not None for f in first_anchor) and len(set(first_anchor)) > 1, new
    if mode == "ep":
        assert len(set(new[is_anchor].tolist())) > 1  # several EP anchor ids occur

    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)

    # both equal one full forward over the final sequences with the AnSAN mask
    full_am = torch.cat([am, torch.ones_like(new)], 1)
    full = model(
        got.sequences, attention_mask=full_am, position_ids=positions(full_am), use_cache=False
    ).logits
    L = ids.shape[1]
    for i, step in enumerate(got.logits):
        torch.testing.assert_close(step, full[:, L - 1 + i], atol=1e-4, rtol=0)

    s = cache.stats()
    fed = full_am[:, :-1]  # generate never feeds back its last token
    assert s["seen"] == int(fed.sum()) and s["seen_per_row"] == fed.sum(-1).tolist()
    assert s["kept"] < s["seen"] and 0 < s["reduction"] < 1
    assert len(set(s["kept_per_row"])) > 1 or len(set(first_anchor)) > 1


@torch.no_grad()
def test_generate_without_a_cache_argument_tracks_anchors_too() -> None:
    """generate's own DynamicCache gets the rule as well (the hook tracks its layout)."""
    model, _ = make_model("ep", 2.5)
    ids, am = left_padded_prompts(seed=11)
    implicit = model.generate(
        ids,
        attention_mask=am,
        do_sample=False,
        max_new_tokens=10,
        output_logits=True,
        return_dict_in_generate=True,
    )
    explicit = generate(model, ids, am, anllm.AnchorCache(), 10)
    assert torch.equal(implicit.sequences, explicit.sequences)
    for a, b in zip(implicit.logits, explicit.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with anllm.anchor_attention(model, enabled=False):  # and differs from plain causal decoding
        plain = model.generate(
            ids,
            attention_mask=am,
            do_sample=False,
            max_new_tokens=10,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(implicit.logits, plain.logits))


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_then_chunks_equal_full_forward(attn: str) -> None:
    model, _ = make_model("ep")
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(5)
    B, L = 3, 26
    ids = torch.randint(7, 128, (B, L), generator=g)
    ids[0, [2, 3, 9, 17, 25]] = torch.tensor([4, 5, 6, 4, 4])
    ids[1, [10, 11, 20]] = torch.tensor([6, 6, 4])
    ids[2, [12, 16]] = 5
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :4] = 0
    am[2, :8] = 0  # this row's whole prefill is padding
    ids[am == 0] = 0
    full = model(ids, attention_mask=am, use_cache=False).logits

    cache = anllm.AnchorCache()
    bounds = [0, 6, 7, 10, 11, 18, 19, 20, 26]
    parts = [
        model(ids[:, s:e], attention_mask=am[:, :e], past_key_values=cache, use_cache=True).logits
        for s, e in itertools.pairwise(bounds)
    ]
    got = torch.cat(parts, 1)
    real = am.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-4, rtol=0)
    assert cache.stats()["kept"] < cache.stats()["seen"]


# --- what is kept --------------------------------------------------------------------------------


def step(model, cache, ids, am):
    return model(ids, attention_mask=am, past_key_values=cache, use_cache=True).logits


@torch.no_grad()
def test_kept_counts_and_kept_keys_by_hand() -> None:
    """Hand-computed kept counts, the peak, and the exact keys left in the cache."""
    model, _ = make_model("ep")
    a, d, x = W, P, 5  # word, ".", "!"
    # row 0: a a . a a a ! a a        row 1: <pad> <pad> a . . a a a a
    ids = torch.tensor(
        [
            [a, a + 1, d, a + 2, a + 3, a + 4, x, a + 5, a + 6],
            [0, 0, a, d, d, a + 1, a + 2, a + 3, a + 4],
        ]
    )
    am = torch.tensor([[1] * 9, [0, 0] + [1] * 7])
    cache, full = anllm.AnchorCache(), DynamicCache()
    steps = [
        ids,
        torch.tensor([[a + 7], [d]]),
        torch.tensor([[d], [a + 8]]),
        torch.tensor([[a + 9], [a + 10]]),
    ]
    kept_series = []
    for t, new in enumerate(steps):
        am = am if t == 0 else torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
        step(model, cache, new, am)
        step(model, full, new, am)
        kept_series.append(cache.stats()["kept_per_row"])
    # row 0 keeps: anchors + open sentence: {. ! f g}=4, +h=5, +"."->3 anchors=3, +y=4
    # row 1 keeps: {. . b c d e}=6, +"."->3, +x=4, +z=5
    assert kept_series == [[4, 6], [5, 3], [3, 4], [4, 5]]
    s = cache.stats()
    assert s["seen_per_row"] == [12, 10] and s["seen"] == 22
    assert s["kept"] == 9 and s["reduction"] == pytest.approx(1 - 9 / 22)
    assert s["max_kept_per_row"] == [5, 6]  # each row's peak
    assert s["max_kept"] == 10  # peak of the batch total (after the prefill)
    assert cache.kept_width == 5
    # the kept slots (any order) hold the keys/values of the kept tokens (true positions, so equal to
    # the full cache's; deeper layers differ by float rounding only, since attention ran over fewer keys)
    kept_positions = [[2, 6, 10, 11], [3, 4, 9, 10, 11]]
    lay = cache.tracker.layout
    for b, pos in enumerate(kept_positions):
        slots = lay.valid[b].nonzero()[:, 0]
        assert sorted(lay.idx[b, slots].tolist()) == pos
        for layer_a, layer_f in zip(cache.layers, full.layers):
            torch.testing.assert_close(
                layer_a.keys[b][:, slots], layer_f.keys[b][:, lay.idx[b, slots]], atol=1e-6, rtol=0
            )
            torch.testing.assert_close(
                layer_a.values[b][:, slots], layer_f.values[b][:, lay.idx[b, slots]], atol=1e-6, rtol=0
            )
    assert s["bytes"] >= s["kept_bytes"] > 0


@torch.no_grad()
def test_sinks_are_kept() -> None:
    a, d, x = W, P, 5
    # <pad> <pad> a b . c d ! e   -> sinks a b, anchors . !, open e
    ids = torch.tensor([[0, 0, a, a + 1, d, a + 2, a + 3, x, a + 4]])
    am = (ids != 0).long()
    for sinks, kept in [(0, 3), (2, 5), (3, 5), (4, 6)]:
        model, _ = make_model("ep", num_sink_tokens=sinks)
        cache = anllm.AnchorCache()
        got = step(model, cache, ids, am)
        assert cache.stats()["kept"] == kept, sinks
        # the next token, through the pruned cache, equals a full forward
        nxt = torch.cat([ids, torch.tensor([[a + 5]])], 1)
        am2 = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
        one = step(model, cache, nxt[:, -1:], am2)
        full = model(nxt, attention_mask=am2, use_cache=False).logits
        torch.testing.assert_close(torch.cat([got, one], 1)[:, 2:], full[:, 2:], atol=1e-4, rtol=0)


@torch.no_grad()
def test_sinks_spanning_several_steps() -> None:
    """Sinks are the first real tokens of the row even when they arrive over several forwards."""
    model, _ = make_model("ep", num_sink_tokens=4)
    ids = torch.tensor([[0, W, P, W + 1, W + 2, 5, W + 3, P, W + 4, W + 5]])
    am = (ids != 0).long()
    full = model(ids, attention_mask=am, use_cache=False).logits
    cache = anllm.AnchorCache()
    bounds = [0, 3, 4, 5, 6, 8, 9, 10]  # the 2nd..4th real tokens come one forward at a time
    got = torch.cat(
        [step(model, cache, ids[:, s:e], am[:, :e]) for s, e in itertools.pairwise(bounds)], 1
    )
    torch.testing.assert_close(got[:, 1:], full[:, 1:], atol=1e-4, rtol=0)
    # kept: sinks W . W+1 W+2, anchors "!" ".", open sentence W+4 W+5
    assert cache.stats()["kept"] == 8


@torch.no_grad()
def test_keep_prefix_counts_by_hand() -> None:
    model, _ = make_model("ep")
    a, d = W, P
    prompt = torch.tensor([[a, a + 1, d, a + 2, a + 3]])  # 5 real tokens: all kept
    cache = anllm.AnchorCache(keep_prefix=True)
    am = torch.ones(1, 5, dtype=torch.long)
    step(model, cache, prompt, am)
    assert cache.stats()["kept"] == 5
    for tok, kept in [
        (a + 4, 6),
        (d, 6),
        (a + 5, 7),
    ]:  # later: w kept then dropped at ".", "." and w kept
        am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
        step(model, cache, torch.tensor([[tok]]), am)
        assert cache.stats()["kept"] == kept
    plain = anllm.AnchorCache()
    am = torch.ones(1, 5, dtype=torch.long)
    step(model, plain, prompt, am)
    assert plain.stats()["kept"] == 3  # without keep_prefix: "." + open sentence


@torch.no_grad()
def test_keep_prefix_generation_equals_full_forward_with_prefix_mask() -> None:
    model, anchors = make_model("ep", 2.5)
    ids, am = left_padded_prompts(seed=11)
    n = 16
    cache = anllm.AnchorCache(keep_prefix=True)
    got = generate(model, ids, am, cache, n)
    seq = got.sequences
    B, L = ids.shape
    full_am = torch.cat([am, torch.ones(B, n, dtype=torch.long)], 1)
    is_anchor = torch.isin(seq, torch.tensor(anchors))
    assert is_anchor[:, L:].any(-1).all()  # anchors are generated after the prompt
    mask = torch.tensor(
        [
            reference_mask(is_anchor[b].tolist(), full_am[b].bool().tolist(), prefix_len=L)
            for b in range(B)
        ]
    )[:, None]
    full = model(seq, attention_mask=mask, position_ids=positions(full_am), use_cache=False).logits
    for i, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, full[:, L - 1 + i], atol=1e-4, rtol=0)
    # kept = every real prompt token + the generated tokens the rule keeps (generate never feeds
    # back its last token, so the cache saw n - 1 of them)
    new_anchor = is_anchor[:, L : L + n - 1]
    later_kept = [
        sum(1 for j in range(n - 1) if new_anchor[b, j] or not new_anchor[b, j + 1 :].any())
        for b in range(B)
    ]
    assert cache.stats()["kept_per_row"] == [int(am[b].sum()) + later_kept[b] for b in range(B)]
    # and it is not the same as generating without the prompt kept
    plain = generate(model, ids, am, anllm.AnchorCache(), n)
    assert any((x - y).abs().max() > 1e-3 for x, y in zip(got.logits, plain.logits))


@torch.no_grad()
def test_compact_positions_differ_only_after_pruning() -> None:
    model, _ = make_model("ep")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(7, 128, (2, 6), generator=g)
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, :2] = 0
    ids[am == 0] = 0
    true, compact = anllm.AnchorCache(), anllm.AnchorCache(position_mode="compact")
    stream = [ids] + [torch.randint(7, 128, (2, 1), generator=g) for _ in range(3)]
    stream += [torch.tensor([[P], [5]])]  # both rows end a sentence: pruning
    stream += [torch.randint(7, 128, (2, 1), generator=g) for _ in range(3)]
    pruned = False
    for t, new in enumerate(stream):
        if t:
            am = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
        a, b = step(model, true, new, am), step(model, compact, new, am)
        real = am[:, -new.shape[1] :].bool()
        if not pruned:
            torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
        else:
            assert (a - b).abs().max() > 1e-3, t
        pruned = true.stats()["kept"] < true.stats()["seen"]
        assert compact.stats() == true.stats()  # same tokens kept, only positions differ
    assert pruned
    with pytest.raises(ValueError, match="position_mode"):
        anllm.AnchorCache(position_mode="shifted")


@torch.no_grad()
def test_batch_repeat_interleave_scores_continuations() -> None:
    model, _ = make_model("ep")
    g = torch.Generator().manual_seed(4)
    ctx = torch.randint(7, 128, (2, 8), generator=g)
    ctx[0, [2, 5]] = P
    ctx[1, 6] = 6
    ctx_am = torch.ones(2, 8, dtype=torch.long)
    ctx_am[1, :3] = 0
    ctx[ctx_am == 0] = 0
    n = 3
    cont = torch.randint(7, 128, (2 * n, 5), generator=g)
    cont[[0, 4], [1, 2]] = P
    cont[3, 0] = 5
    cont_am = torch.ones(2 * n, 5, dtype=torch.long)
    cont_am[1, 3:] = 0  # continuations of different lengths (right padding)
    cont_am[5, 4:] = 0
    cont[cont_am == 0] = 0

    cache = anllm.AnchorCache()
    step(model, cache, ctx, ctx_am)
    assert cache.stats()["kept"] < cache.stats()["seen"]
    cache.batch_repeat_interleave(n)
    rep_am = ctx_am.repeat_interleave(n, 0)
    am = torch.cat([rep_am, cont_am], 1)
    got = step(model, cache, cont, am)

    full_ids = torch.cat([ctx.repeat_interleave(n, 0), cont], 1)
    full = model(full_ids, attention_mask=am, use_cache=False).logits[:, 8:]
    real = cont_am.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-4, rtol=0)
    assert cache.stats()["seen_per_row"] == am.sum(-1).tolist()


# --- in place ------------------------------------------------------------------------------------


@torch.no_grad()
def test_decode_steps_without_anchor_move_nothing() -> None:
    model, _ = make_model("ep")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(7, 128, (1, 10), generator=g)
    ids[0, [3, 6]] = P
    am = torch.ones(1, 10, dtype=torch.long)
    cache = anllm.AnchorCache()
    step(model, cache, ids, am)
    grew = 0
    for _ in range(60):  # enough steps to outgrow the first buffer once
        layers = cache.layers
        ptrs = [layer._kbuf.data_ptr() for layer in layers]
        caps = [layer._kbuf.shape[2] for layer in layers]
        widths = [layer.width for layer in layers]
        old = [layer.keys.clone() for layer in layers]
        copied = cache.copied_slots
        am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
        step(model, cache, torch.randint(7, 128, (1, 1), generator=g), am)
        growth = [layer._kbuf.shape[2] > cap for layer, cap in zip(layers, caps)]
        expected = sum(
            w for w, gr in zip(widths, growth) if gr
        )  # a growth copies the used slots once
        assert cache.copied_slots == copied + expected
        for layer, ptr, gr, k in zip(layers, ptrs, growth, old):
            assert (layer._kbuf.data_ptr() == ptr) != gr  # reallocated only when the capacity grows
            torch.testing.assert_close(
                layer.keys[:, :, : k.shape[2]], k, atol=0, rtol=0
            )  # old slots stay put
        grew += any(growth)
    assert grew == 1
    # a step with a new anchor does move slots (the anchor into the kept prefix)
    copied = cache.copied_slots
    am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
    step(model, cache, torch.tensor([[P]]), am)
    assert cache.copied_slots > copied and cache.stats()["kept"] == 3


@torch.no_grad()
def test_ragged_decode_moves_only_the_new_token() -> None:
    """Ragged batch: a short row's new token fills its first free slot; old slots never move."""
    model, _ = make_model("ep")
    ids = torch.tensor([[W, P, W + 1, W + 2, W + 3, W + 4], [W, W + 1, W + 2, W + 3, P, W + 5]])
    am = torch.ones(2, 6, dtype=torch.long)
    cache = anllm.AnchorCache()
    step(model, cache, ids, am)
    assert cache.stats()["kept_per_row"] == [5, 2]
    for t in range(5):
        old = [layer.keys.clone() for layer in cache.layers]
        copied = cache.copied_slots
        am = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
        step(model, cache, torch.tensor([[W + 10 + t], [W + 20 + t]]), am)
        # row 1 (2 + t kept) is shorter than the shared width: its new token moves once per layer
        assert cache.copied_slots - copied == len(cache.layers)
        for layer, k in zip(cache.layers, old):
            torch.testing.assert_close(layer.keys[0, :, : 5 + t], k[0, :, : 5 + t], atol=0, rtol=0)
            torch.testing.assert_close(layer.keys[1, :, : 2 + t], k[1, :, : 2 + t], atol=0, rtol=0)


@torch.no_grad()
def test_window_decode_moves_one_slot_per_step_and_stays_lossless() -> None:
    """With a local window, each decode step after a sentence closes drops the closed sentence's
    oldest word as it leaves the window: the new token fills that one slot (one move per layer)
    instead of the rest of the cache shifting down by one. Slot order then differs from time order,
    and decoding still equals the full cache with the mask."""
    window = 6
    model, _ = make_model("ep", window=window, num_sink_tokens=0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(7, 128, (1, 20), generator=g)
    ids[0, [4, 9]] = P
    am = torch.ones(1, 20, dtype=torch.long)
    cache, full = anllm.AnchorCache(), DynamicCache()
    torch.testing.assert_close(step(model, cache, ids, am), step(model, full, ids, am), atol=1e-5, rtol=1e-5)
    tokens = torch.randint(7, 128, (14,), generator=g)
    tokens[0] = P  # closes the sentence 10..19, whose last words then leave the window one per step
    one_in_one_out = 0
    for tok in tokens.tolist():
        am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
        copied, kept = cache.copied_slots, cache.stats()["kept"]
        a = step(model, cache, torch.tensor([[tok]]), am)
        torch.testing.assert_close(a, step(model, full, torch.tensor([[tok]]), am), atol=1e-5, rtol=1e-5)
        if tok != P and cache.stats()["kept"] == kept:  # one token in, one out of the window
            assert cache.copied_slots - copied == len(cache.layers)
            one_in_one_out += 1
    assert one_in_one_out == 5  # words 15..19 of the closed sentence left one by one
    n = am.shape[1]
    lay = cache.tracker.layout
    idx = lay.idx[0][lay.valid[0]]
    assert sorted(idx.tolist()) == [4, 9, *range(20, n)]  # anchors + the open sentence (the window is inside it)
    assert not bool((idx[1:] > idx[:-1]).all())  # slots out of time order, and lossless above


@torch.no_grad()
def test_step_protocol_one_read_and_end_step_resolves_by_itself() -> None:
    """The hook's protocol: begin_step plans on the device, resolve_step reads once (the width, the
    moved slots and the caller's flags together), end_step compacts. A caller that never calls
    resolve_step (a hand-written hook) gets the same cache: end_step resolves by itself."""
    from anllm.masks import AnsanOptions

    opts = AnsanOptions()
    ids = torch.tensor([[W, W + 1, P, W + 2], [W, P, W + 1, W + 2]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    is_anchor = ids == P
    a, b = anllm.AnchorCache(), anllm.AnchorCache()
    for cache in (a, b):
        cache.begin_step(is_anchor, valid, opts)
        assert cache.get_seq_length() == 0  # inside the first step: nothing seen before it
    assert a.resolve_step(torch.tensor(True), None, torch.tensor(False)) == [True, None, False]
    assert a.resolve_step(torch.tensor(True)) == [None]  # resolved already: no second read
    for cache in (a, b):
        cache.end_step()
        # row 0 keeps ". c", row 1 ". b c" (anchors + open sentence)
        assert cache.get_seq_length() == 4 and cache.tracker.layout.valid.tolist() == [[True, True, False], [True] * 3]
        assert cache.stats()["kept_per_row"] == [2, 3] and cache.max_kept_total == 5
    with pytest.raises(RuntimeError, match="outside a step"):
        a.resolve_step()
    for cache in (a, b):  # a decode step: the new token of row 1 is an anchor (row 1 drops its open slots)
        cache.begin_step(torch.tensor([[False], [True]]), torch.ones(2, 1, dtype=torch.bool), opts)
        assert cache.get_seq_length() == 4
    a.resolve_step()
    for cache in (a, b):
        cache.end_step()
        assert cache.tracker.layout.valid.tolist() == [[True] * 3, [True, True, False]]
        assert cache.stats()["kept_per_row"] == [3, 2] and cache.get_seq_length() == 5
    assert a.max_kept_total == b.max_kept_total == 5


# --- clear errors --------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_errors() -> None:
    model, _ = make_model("ep")
    ids = torch.tensor([[W, P, W + 1]])
    cache = anllm.AnchorCache()
    step(model, cache, ids, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch of 1 rows"):
        step(model, cache, ids.repeat(2, 1)[:, :1], torch.ones(2, 4, dtype=torch.long))

    plain = tiny_llama()
    with pytest.raises(RuntimeError, match="prepare_model"):
        plain(ids, past_key_values=anllm.AnchorCache(), use_cache=True)
    none_model, _ = anllm.prepare_model(tiny_llama(), word_tokenizer(EP_WORDS), "none")
    with pytest.raises(RuntimeError, match="prepare_model"):
        none_model(ids, past_key_values=anllm.AnchorCache(), use_cache=True)

    other, _ = make_model("ep", num_sink_tokens=1)
    with pytest.raises(ValueError, match="different anchor options"):
        step(other, cache, ids[:, :1], torch.ones(1, 4, dtype=torch.long))

    filled = DynamicCache()
    plain(ids, past_key_values=filled, use_cache=True)  # tokens the anchor-aware model never saw
    with pytest.raises(ValueError, match="anchors\\s+are unknown|already holds"):
        step(model, filled, ids[:, :1], torch.ones(1, 4, dtype=torch.long))

    cache.reset()  # an emptied cache takes any batch again
    step(model, cache, ids.repeat(2, 1), torch.ones(2, 3, dtype=torch.long))
    assert cache.stats()["seen_per_row"] == [3, 3]

    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(1)
    with pytest.raises(NotImplementedError, match="beam"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


@torch.no_grad()
def test_beam_search_is_refused_not_silently_wrong() -> None:
    """Beam search reorders cache rows behind the model's back; the anchor layout cannot follow."""
    model, _ = make_model("ep", 2.5)
    ids, am = left_padded_prompts(seed=11)
    kwargs = {"attention_mask": am, "do_sample": False, "num_beams": 2, "max_new_tokens": 4}
    with pytest.raises(ValueError, match="reordered"):
        model.generate(ids, **kwargs)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, past_key_values=anllm.AnchorCache(), **kwargs)
    # the same for a row selection done by hand on a DynamicCache between two forwards
    cache = DynamicCache()
    step(model, cache, ids, am)
    cache.batch_select_indices(torch.tensor([1, 0, 2]))
    am = torch.cat([am, torch.ones(3, 1, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="reordered"):
        step(model, cache, torch.full((3, 1), W), am)
    with anllm.anchor_attention(model, enabled=False):  # plain causal beam search is untouched
        assert model.generate(ids, **kwargs).shape == (3, ids.shape[1] + 4)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_chunked_prefill_in_generate_equals_one_shot(mode: str) -> None:
    """generate(prefill_chunk_size=N) reads the prompt in chunks through the model's hooks: the same
    tokens and logits as a one-shot AnSAN prefill, with left padding, for chunks of 1 token, chunks
    that split sentences, and chunks longer than the prompt; AnchorCache and a tracked DynamicCache."""
    model, anchors = make_model(mode, 2.5 if mode == "ep" else 2.0)
    vocab = model.config.vocab_size
    ids, am = left_padded_prompts(seed=3, L=14, high=vocab - 1 if mode == "ac" else 128, anchor=anchors[0])
    ref = generate(model, ids, am, anllm.AnchorCache(), 10)
    assert bool(torch.isin(ids, torch.tensor(anchors)).any())
    for chunk, make_cache in itertools.product([1, 4, 64], [anllm.AnchorCache, DynamicCache]):
        cache = make_cache()
        got = model.generate(ids, attention_mask=am, past_key_values=cache, do_sample=False, max_new_tokens=10,
                             output_logits=True, return_dict_in_generate=True, prefill_chunk_size=chunk)
        assert torch.equal(got.sequences, ref.sequences), (chunk, make_cache)
        for a, b in zip(got.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if isinstance(cache, anllm.AnchorCache):
            assert cache.stats()["kept"] < cache.stats()["seen"]


@torch.no_grad()
def test_paths_that_skip_the_hooks_fail_loudly() -> None:
    model, _ = make_model("ep", 2.5)
    ids, am = left_padded_prompts(seed=3)
    with pytest.raises(RuntimeError, match="not anchor-aware"):  # the decoder's forward, hooks skipped
        model.model.forward(input_ids=ids, attention_mask=am, past_key_values=anllm.AnchorCache(), use_cache=True)
    cache = DynamicCache()
    step(model, cache, ids, am)
    model.model.forward(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)  # grows it behind our back
    with pytest.raises(ValueError, match="skipped its hooks"):
        step(model, cache, ids[:, :1], torch.cat([am, torch.ones(3, 2, dtype=torch.long)], 1))
    with pytest.raises((ValueError, NotImplementedError), match="reordered|crop"):  # assisted decoding crops
        model.generate(ids[:1], attention_mask=am[:1], past_key_values=anllm.AnchorCache(), do_sample=False,
                       max_new_tokens=6, prompt_lookup_num_tokens=2)


@torch.no_grad()
def test_decode_steps_that_see_everything_pass_no_mask() -> None:
    """A non-anchor decode token sees every kept slot: no 4D mask (SDPA's fast path), same logits."""
    model, _ = make_model("ep")
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    ids = torch.tensor([[W, W + 1, P, W + 2, W + 3, P, W + 4]] * 2)
    am = torch.ones(2, 7, dtype=torch.long)

    def run(fast: bool, token: int) -> torch.Tensor:
        model._anllm_attention.fast_decode = fast
        cache = anllm.AnchorCache()
        step(model, cache, ids, am)
        seen.clear()
        return step(model, cache, torch.full((2, 1), token), torch.ones(2, 8, dtype=torch.long))

    fast = run(True, W + 5)
    assert seen == [None]  # the whole step ran without a mask
    masked = run(False, W + 5)
    assert seen[0] is not None and bool(seen[0].all())
    torch.testing.assert_close(fast, masked, atol=1e-6, rtol=0)
    run(True, P)  # an anchor token sees only its own sentence: it needs the mask
    assert seen[0] is not None and not bool(seen[0].all())
    model._anllm_attention.fast_decode = True


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 4])
def test_window_generation_equals_the_loop_reference(chunk: int | None) -> None:
    """Anchors + sinks + a local window: generation through the pruned cache (one-shot or chunked
    prefill, ragged left-padded rows) equals one forward with the mask of tests/oracles.py, and the
    cache keeps exactly what a later token can see: sinks + anchors + open sentence + window."""
    window, sinks = 3, 1
    model, anchors = make_model("ep", 3.0, window=window, num_sink_tokens=sinks)
    ids, am = left_padded_prompts(seed=13, L=14)
    n = 20
    cache = anllm.AnchorCache()
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    got = model.generate(ids, attention_mask=am, past_key_values=cache, do_sample=False, max_new_tokens=n,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    seq = got.sequences
    B, L = ids.shape
    full_am = torch.cat([am, torch.ones(B, n, dtype=torch.long)], 1)
    is_anchor = torch.isin(seq, torch.tensor(anchors))
    assert is_anchor[:, L:].any(-1).all()
    mask = torch.tensor([
        reference_mask(is_anchor[b].tolist(), full_am[b].bool().tolist(), num_sink_tokens=sinks, window=window)
        for b in range(B)
    ])[:, None]
    full = model(seq, attention_mask=mask, position_ids=positions(full_am), use_cache=False).logits
    for i, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, full[:, L - 1 + i], atol=1e-4, rtol=0)
    # kept = the keys a further (non-anchor) token would see, itself excluded
    fed = seq[:, :-1]
    fed_am = full_am[:, :-1]
    want, narrow = [], []
    for b in range(B):
        a = torch.isin(fed[b], torch.tensor(anchors)).tolist() + [False]
        r = fed_am[b].bool().tolist() + [True]
        want.append(sum(reference_mask(a, r, num_sink_tokens=sinks, window=window)[-1][:-1]))
        narrow.append(sum(reference_mask(a, r, num_sink_tokens=sinks)[-1][:-1]))
    assert cache.stats()["kept_per_row"] == want
    assert sum(want) > sum(narrow)  # the window is kept on top of anchors
