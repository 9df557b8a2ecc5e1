"""The AnSAN rule (anllm.masks) against the deliberately naive, loop-based reference in
tests/oracles.py, written from the rule's text, not from ``masks.visible``. Runtime: ~10 s.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
import random

import pytest
import torch

from anllm import ansan_mask
from anllm.masks import AnsanOptions, TokenLayout, layout_from_tokens, reachable_later, visible
from oracles import Row, random_row, reference_mask

SPECIAL_ROWS: list[Row] = [
    # no anchor at all
    ([False] * 8, [True] * 8, [0] * 8),
    # adjacent anchors, anchor first and last
    ([True, True, False, True, True, False, False, True], [True] * 8, [0] * 8),
    # all padding
    ([False, True, False, False, True, False, False, False], [False] * 8, [0] * 8),
    # left padding + two documents, anchor ending the first document
    (
        [False, False, False, True, False, True, False, False],
        [False, False] + [True] * 6,
        [9, 9, 1, 1, 2, 2, 2, 2],
    ),
    # right padding after a final anchor; a padded "anchor" must not split a segment
    ([False, True, False, True, True, False, False, False], [True] * 5 + [False] * 3, [0] * 8),
    # every token an anchor
    ([True] * 8, [True] * 8, [0, 0, 0, 1, 1, 1, 2, 2]),
]


def random_batches(seed: int, n_batches: int) -> list[list[Row]]:
    rng = random.Random(seed)
    batches = [SPECIAL_ROWS]
    for _ in range(n_batches):
        L = rng.randint(1, 16)
        batches.append([random_row(rng, L) for _ in range(rng.randint(1, 4))])
    return batches


def as_tensors(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([r[0] for r in rows], dtype=torch.bool),
        torch.tensor([r[1] for r in rows], dtype=torch.long),
        torch.tensor([r[2] for r in rows], dtype=torch.long),
    )


OPTIONS = [(0, False), (0, True), (1, False), (3, False), (2, True)]


def test_reference_self_check() -> None:
    """The reference itself on a hand-worked row, so a bug in it cannot hide a bug in the engine."""
    # tokens: a b . c ! d   (anchors at 2 and 4)
    M = reference_mask([False, False, True, False, True, False], [True] * 6, [0] * 6)
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # the anchor sees its own sentence
        [0, 0, 1, 1, 0, 0],  # c sees the earlier anchor, not a b
        [0, 0, 0, 1, 1, 0],  # "!" sees its own sentence only
        [0, 0, 1, 0, 1, 1],  # d sees both anchors
    ]
    assert M == [[bool(x) for x in r] for r in expected]


@pytest.mark.parametrize("num_sink_tokens,anchors_see_anchors", OPTIONS)
def test_ansan_mask_matches_reference(num_sink_tokens: int, anchors_see_anchors: bool) -> None:
    batches = random_batches(seed=1000 + num_sink_tokens * 10 + anchors_see_anchors, n_batches=300)
    n_true = n_false = 0
    for rows in batches:
        is_anchor, real, doc = as_tensors(rows)
        got = ansan_mask(
            is_anchor,
            real,
            doc,
            num_sink_tokens=num_sink_tokens,
            anchors_see_anchors=anchors_see_anchors,
        )
        assert got.dtype == torch.bool and got.shape == (
            len(rows),
            is_anchor.shape[1],
            is_anchor.shape[1],
        )
        for b, row in enumerate(rows):
            want = reference_mask(
                *row, num_sink_tokens=num_sink_tokens, anchors_see_anchors=anchors_see_anchors
            )
            assert got[b].tolist() == want, (
                f"row {row} options sink={num_sink_tokens} a2a={anchors_see_anchors}"
            )
            n_true += sum(map(sum, want))
            n_false += sum(len(r) - sum(r) for r in want)
    assert n_true > 100 and n_false > 100  # the layouts exercise both outcomes


def test_padding_rows_and_columns_are_all_false() -> None:
    is_anchor, real, doc = as_tensors(SPECIAL_ROWS)
    m = ansan_mask(is_anchor, real, doc, num_sink_tokens=2, anchors_see_anchors=True)
    pad = ~real.bool()
    assert not m[pad].any()  # padding queries see nothing
    assert not m.transpose(1, 2)[pad].any()  # and nobody sees padding


def test_defaults_without_padding_or_documents() -> None:
    """No attention_mask / document_ids means one real document per row."""
    is_anchor = torch.tensor([[False, True, False, False, True, True, False]])
    want = reference_mask(is_anchor[0].tolist(), [True] * 7, [0] * 7)
    assert ansan_mask(is_anchor)[0].tolist() == want


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="batch, length"):
        ansan_mask(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask shape"):
        ansan_mask(torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 4))
    with pytest.raises(ValueError, match="document_ids shape"):
        ansan_mask(torch.zeros(2, 5, dtype=torch.bool), None, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="num_sink_tokens"):
        AnsanOptions(num_sink_tokens=-1)


def _count(xs: list[bool]) -> int:
    return sum(1 for x in xs if x)


@pytest.mark.parametrize("num_sink_tokens,anchors_see_anchors", OPTIONS)
@pytest.mark.parametrize("keep_prefix", [False, True])
def test_layout_continued_in_pieces(
    num_sink_tokens: int, anchors_see_anchors: bool, keep_prefix: bool
) -> None:
    """A row laid out in two forwards (as a cache does) gives the same mask as the whole row.

    Without document_ids (the cache path). With ``keep_prefix`` the first piece is the kept prompt.
    """
    rng = random.Random(7 + num_sink_tokens + 10 * keep_prefix)
    options = AnsanOptions(num_sink_tokens, anchors_see_anchors)
    for _ in range(200):
        L = rng.randint(2, 14)
        rows = [random_row(rng, L) for _ in range(rng.randint(1, 3))]
        t = rng.randint(1, L - 1)
        is_anchor, real, _ = as_tensors(rows)
        first = layout_from_tokens(is_anchor[:, :t], real[:, :t], None, options, prefix=keep_prefix)
        anchors_before = (is_anchor[:, :t] & real[:, :t].bool()).sum(-1)
        second = layout_from_tokens(
            is_anchor[:, t:],
            real[:, t:],
            None,
            options,
            idx_start=t,
            seg_start=anchors_before,
            rank_start=real[:, :t].sum(-1),
        )
        lay = TokenLayout.cat([first, second])
        got = visible(lay.map(lambda x: x[:, :, None]), lay.map(lambda x: x[:, None, :]), options)
        for b, (a, r, _) in enumerate(rows):
            want = reference_mask(
                a,
                r,
                [0] * L,
                num_sink_tokens,
                anchors_see_anchors,
                prefix_len=t if keep_prefix else 0,
            )
            assert got[b].tolist() == want, (rows[b], t)


@pytest.mark.parametrize("num_sink_tokens,anchors_see_anchors", OPTIONS)
@pytest.mark.parametrize("with_prefix", [False, True])
def test_reachable_later_matches_brute_force(
    num_sink_tokens: int, anchors_see_anchors: bool, with_prefix: bool
) -> None:
    """A key is reachable iff some token appended later to the row could see it.

    Brute force: append every anchor/non-anchor pattern of 1-3 real tokens (of the row's open
    document) and ask the reference mask whether any appended token sees the key.
    """
    rng = random.Random(99 + num_sink_tokens * 3 + anchors_see_anchors + 50 * with_prefix)
    options = AnsanOptions(num_sink_tokens, anchors_see_anchors)
    patterns = [p for n in (1, 2, 3) for p in itertools.product([False, True], repeat=n)]
    n_reach = n_drop = 0
    for rows in random_batches(seed=rng.randint(0, 10**6), n_batches=120):
        L = len(rows[0][0])
        prefix_len = rng.randint(0, L) if with_prefix else 0
        is_anchor, real, doc = as_tensors(rows)
        lay = layout_from_tokens(is_anchor, real, doc, options)
        lay = lay.with_(prefix=torch.arange(L)[None, :].expand_as(real) < prefix_len)
        open_seg = (is_anchor & real.bool()).sum(-1, keepdim=True)
        open_doc = doc[:, -1:]
        got = reachable_later(lay, open_seg, open_doc)
        for b, (a, r, d) in enumerate(rows):
            want = [False] * L
            for p in patterns:
                n = len(p)
                M = reference_mask(
                    a + list(p),
                    r + [True] * n,
                    d + [d[-1]] * n,
                    num_sink_tokens,
                    anchors_see_anchors,
                    prefix_len,
                )
                for k in range(L):
                    want[k] = want[k] or any(M[q][k] for q in range(L, L + n))
            assert got[b].tolist() == want, (rows[b], prefix_len)
            n_reach += _count(want)
            n_drop += _count([r[k] and not want[k] for k in range(L)])
    assert n_reach > 50 and n_drop > 50  # both kept and prunable real keys occur


@pytest.mark.parametrize("num_sink_tokens,anchors_see_anchors", OPTIONS)
def test_long_rows_take_the_run_table_path_and_match_reference(
    num_sink_tokens: int, anchors_see_anchors: bool
) -> None:
    """Rows of >= 64 queries are built one row per run of identical queries (masks._run_table_mask);
    they must equal the reference too, with padding, packing and every option."""
    from anllm import masks

    rng = random.Random(77 + num_sink_tokens)
    for _ in range(4):
        L = rng.randint(masks._RUN_TABLE_MIN_QUERIES, 150)
        rows = [random_row(rng, L) for _ in range(rng.randint(1, 3))]
        is_anchor, real, doc = as_tensors(rows)
        got = ansan_mask(
            is_anchor, real, doc, num_sink_tokens=num_sink_tokens, anchors_see_anchors=anchors_see_anchors
        )
        for b, row in enumerate(rows):
            want = reference_mask(*row, num_sink_tokens=num_sink_tokens, anchors_see_anchors=anchors_see_anchors)
            assert got[b].tolist() == want


@pytest.mark.parametrize("num_sink_tokens", [0, 2])
def test_hide_anchors_is_the_sentence_only_control(num_sink_tokens: int) -> None:
    """``hide_anchors``: every token sees its own sentence (and sinks) only, on short rows and on the
    long-row path; a key is reachable later iff an appended token could see it."""
    from anllm import masks

    rng = random.Random(5 + num_sink_tokens)
    options = AnsanOptions(num_sink_tokens, hide_anchors=True)
    batches = random_batches(seed=31 + num_sink_tokens, n_batches=100)
    long_len = rng.randint(masks._RUN_TABLE_MIN_QUERIES, 100)
    batches += [[random_row(rng, long_len) for _ in range(2)]]
    patterns = [p for n in (1, 2) for p in itertools.product([False, True], repeat=n)]
    hidden = 0
    for rows in batches:
        is_anchor, real, doc = as_tensors(rows)
        got = ansan_mask(is_anchor, real, doc, num_sink_tokens=num_sink_tokens, hide_anchors=True)
        lay = layout_from_tokens(is_anchor, real, doc, options)
        reach = reachable_later(lay, (is_anchor & real.bool()).sum(-1, keepdim=True), doc[:, -1:], options)
        for b, (a, r, d) in enumerate(rows):
            want = reference_mask(a, r, d, num_sink_tokens, hide_anchors=True)
            assert got[b].tolist() == want
            full = reference_mask(a, r, d, num_sink_tokens)
            hidden += sum(f and not w for fr, wr in zip(full, want) for f, w in zip(fr, wr))
            if len(a) > 16:
                continue
            L = len(a)
            want_reach = [False] * L
            for p in patterns:
                M = reference_mask(a + list(p), r + [True] * len(p), d + [d[-1]] * len(p), num_sink_tokens,
                                   hide_anchors=True)
                for k in range(L):
                    want_reach[k] = want_reach[k] or any(M[q][k] for q in range(L, L + len(p)))
            assert reach[b].tolist() == want_reach
    assert hidden > 50  # the control really removes earlier anchors from view


# ---- the local window (AnsanOptions.window) ---------------------------------------------------------

WINDOW_OPTIONS = [  # (window, num_sink_tokens, anchors_see_anchors, hide_anchors)
    (1, 0, False, False), (2, 0, False, False), (3, 2, False, False), (5, 0, True, False), (2, 1, False, True),
]


def test_window_reference_self_check() -> None:
    """The window clause by hand: tokens a b . c d e (anchor at 2), window 1."""
    M = reference_mask([False, False, True, False, False, False], [True] * 6, [0] * 6, window=1)
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],  # c: the anchor (also its window)
        [0, 0, 1, 1, 1, 0],  # d: anchor + own sentence
        [0, 0, 1, 1, 1, 1],
    ]
    assert M == [[bool(x) for x in r] for r in expected]
    # the window reaches back over a finished sentence: "b" after ". " with window 2 sees "a" and "."
    M = reference_mask([False, True, False], [True] * 3, [0] * 3, window=2)
    assert M[2] == [True, True, True]
    assert reference_mask([False, True, False], [True] * 3, [0] * 3)[2] == [False, True, True]


@pytest.mark.parametrize("window,num_sink_tokens,anchors_see_anchors,hide_anchors", WINDOW_OPTIONS)
def test_window_mask_matches_reference(window: int, num_sink_tokens: int, anchors_see_anchors: bool,
                                       hide_anchors: bool) -> None:
    """Short rows (direct broadcast) and long rows (the run-table path) with padding and packing."""
    from anllm import masks

    rng = random.Random(4000 + window * 7 + num_sink_tokens)
    batches = random_batches(seed=rng.randint(0, 10**6), n_batches=150)
    for L in (rng.randint(masks._RUN_TABLE_MIN_QUERIES, 120), rng.randint(masks._RUN_TABLE_MIN_QUERIES, 120)):
        batches.append([random_row(rng, L) for _ in range(2)])
    widened = 0
    for rows in batches:
        is_anchor, real, doc = as_tensors(rows)
        got = ansan_mask(is_anchor, real, doc, num_sink_tokens=num_sink_tokens, anchors_see_anchors=anchors_see_anchors,
                         hide_anchors=hide_anchors, window=window)
        for b, (a, r, d) in enumerate(rows):
            want = reference_mask(a, r, d, num_sink_tokens, anchors_see_anchors, hide_anchors=hide_anchors,
                                  window=window)
            assert got[b].tolist() == want, (rows[b], window)
            narrow = reference_mask(a, r, d, num_sink_tokens, anchors_see_anchors, hide_anchors=hide_anchors)
            widened += sum(w and not n for wr, nr in zip(want, narrow) for w, n in zip(wr, nr))
    assert widened > 50  # the window really adds keys


@pytest.mark.parametrize("window,num_sink_tokens,anchors_see_anchors,hide_anchors", WINDOW_OPTIONS)
def test_window_reachable_later_matches_brute_force(window: int, num_sink_tokens: int, anchors_see_anchors: bool,
                                                    hide_anchors: bool) -> None:
    """With a window, a key is kept iff some token appended later (1-3 of them) could still see it.
    Rows that end in padding are skipped: a cache row is never continued after padding (generation
    pads on the left), and the window counts real tokens."""
    rng = random.Random(600 + window)
    options = AnsanOptions(num_sink_tokens, anchors_see_anchors, hide_anchors, window)
    patterns = [p for n in (1, 2, 3) for p in itertools.product([False, True], repeat=n)]
    n_window_only = 0
    for rows in random_batches(seed=rng.randint(0, 10**6), n_batches=80):
        L = len(rows[0][0])
        is_anchor, real, doc = as_tensors(rows)
        lay = layout_from_tokens(is_anchor, real, doc, options)
        open_seg = (is_anchor & real.bool()).sum(-1, keepdim=True)
        got = reachable_later(lay, open_seg, doc[:, -1:], options, next_idx=torch.full((len(rows), 1), L))
        plain = reachable_later(lay, open_seg, doc[:, -1:], replace(options, window=0))
        for b, (a, r, d) in enumerate(rows):
            want = [False] * L
            for p in patterns:
                n = len(p)
                M = reference_mask(a + list(p), r + [True] * n, d + [d[-1]] * n, num_sink_tokens, anchors_see_anchors,
                                   hide_anchors=hide_anchors, window=window)
                for k in range(L):
                    want[k] = want[k] or any(M[q][k] for q in range(L, L + n))
            if not r[-1]:
                continue  # a cache appends after real tokens only (padding is on the left)
            assert got[b].tolist() == want, (rows[b], window)
            n_window_only += int((got[b] & ~plain[b]).sum())
    assert window < 2 or n_window_only > 5  # window 1: the newest key is in the open sentence or an anchor anyway
    with pytest.raises(ValueError, match="next_idx"):
        reachable_later(lay, open_seg, doc[:, -1:], options)


def test_window_layout_continued_in_pieces() -> None:
    """A row laid out in two forwards (as a cache does) gives the same windowed mask as the whole row."""
    rng = random.Random(17)
    options = AnsanOptions(1, window=3)
    for _ in range(150):
        L = rng.randint(2, 14)
        rows = [random_row(rng, L) for _ in range(rng.randint(1, 3))]
        t = rng.randint(1, L - 1)
        is_anchor, real, _ = as_tensors(rows)
        first = layout_from_tokens(is_anchor[:, :t], real[:, :t], None, options)
        second = layout_from_tokens(is_anchor[:, t:], real[:, t:], None, options, idx_start=t,
                                    seg_start=(is_anchor[:, :t] & real[:, :t].bool()).sum(-1),
                                    rank_start=real[:, :t].sum(-1))
        lay = TokenLayout.cat([first, second])
        got = visible(lay.map(lambda x: x[:, :, None]), lay.map(lambda x: x[:, None, :]), options)
        for b, (a, r, _) in enumerate(rows):
            assert got[b].tolist() == reference_mask(a, r, [0] * L, 1, window=3), (rows[b], t)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_window_must_be_a_non_negative_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="window"):
        AnsanOptions(window=bad)  # type: ignore[arg-type]
