"""Recall probe: items from held-out prose, batched methods against one-sequence oracles, accuracy.
Runtime: a few seconds (tiny random model, word-level tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

import anllm
from anllm.eval import recall as rc
from anllm.testing import tiny_llama, word_tokenizer

PROSE = [f"Sentence number {i} of the prose is here." for i in range(40)]
VALUES = [v for vals in rc.CATEGORIES.values() for v in vals]
WORDS = sorted({w for s in PROSE for w in s.replace(".", " .").split()} | set(VALUES) | {"is", "."}
               | {f"{n}'s" for n in rc.NAMES} | {w for c in rc.CATEGORIES for w in c.split()})


@pytest.fixture(scope="module")
def tok():
    from tokenizers import pre_tokenizers

    t = word_tokenizer(WORDS)
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(".", behavior="isolated")])
    return t


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(vocab_size=len(tok) + 8)
    anllm.prepare_model(m, tok, mode="ep")
    return m


def test_items_are_built_from_prose_with_the_fact_after_it(tok):
    docs = [("a", " ".join(PROSE[:20])), ("b", " ".join(PROSE[20:]))]
    items = rc.build_items(docs, tok, num_items=30, max_distance=5, num_before=3, seed=1)
    assert items == rc.build_items(docs, tok, num_items=30, max_distance=5, num_before=3, seed=1)  # deterministic
    for it in items:
        assert len(it.before) == 3 and len(it.fillers) == 5 and set(it.before + it.fillers) <= set(PROSE)
        assert it.choices[it.answer] in it.fact and len(set(it.choices)) == 4
        text = rc.context_text(it, 2, None)
        assert text.index(it.fact) > 0 and text.endswith(it.cue) and text.count(it.fact) == 1
    assert len({it.answer for it in items}) > 1 and len({it.category for it in items}) > 1
    # AC text: <AC> after every complete sentence, never after the open cue
    ac = rc.context_text(items[0], 2, "<AC>")
    assert ac.count("<AC>") == 3 + 1 + 2 and ac.endswith(items[0].cue)
    with pytest.raises(ValueError, match="consecutive prose sentences"):
        rc.build_items(docs, tok, num_items=1, max_distance=30)


def test_batched_methods_equal_one_sequence_oracles(model, tok):
    """Each method's left-padded batch against one unpadded sequence read with the loop references of
    tests/oracles.py (the AnSAN rule, the sentence-only control, StreamingLLM at peak and per query)."""
    from oracles import method_mask, reference_mask

    from anllm.eval.perplexity import query_budgets

    docs = [("a", " ".join(PROSE))]
    items = rc.build_items(docs, tok, num_items=5, max_distance=4, seed=3)
    texts = [rc.context_text(it, k, None) for it, k in zip(items, [0, 1, 4, 2, 3])]
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]  # ragged lengths: left padding in the batch
    anchor_ids = torch.tensor(anllm.get_anchor_config(model).anchor_token_ids)
    rules = [reference_mask(torch.isin(x, anchor_ids).tolist(), [True] * len(x)) for x in seqs]
    per_query = [[sum(row) for row in M] for M in rules]
    peaks = [max(p) for p in per_query]
    assert [query_budgets(model, tok, t, x).tolist() for t, x in zip(texts, seqs)] == per_query
    for method in ("full", "anchor", "sentence", "streamingllm", "streamingllm_q"):
        given = [torch.tensor(p) for p in per_query] if method == "streamingllm_q" else peaks
        got, kept = rc.next_token_logits(model, seqs, method, given, tok.pad_token_id)
        for j, x in enumerate(seqs):
            L = len(x)
            mask = method_mask(method, torch.isin(x, anchor_ids).tolist(), peaks[j], per_query[j])
            with anllm.anchor_attention(model, enabled=False), torch.no_grad():
                want = model(input_ids=x[None], attention_mask=torch.tensor(mask)[None, None]).logits[0, -1]
            torch.testing.assert_close(got[j], want, atol=1e-5, rtol=1e-5)
            assert kept[j] <= L and (method != "full" or kept[j] == L)
            if method == "streamingllm_q":
                assert kept[j] == per_query[j][-1]


def test_rows_count_correct_choices(model, tok, tmp_path):
    docs = [("a", " ".join(PROSE))]
    items = rc.build_items(docs, tok, num_items=6, max_distance=2, seed=0)
    rows = rc.recall_rows(model, tok, {"mode": "ep"}, items, ["full", "anchor", "streamingllm"], [0, 2],
                          batch_size=4, out_dir=tmp_path, progress=False)
    assert {(r["method"], r["distance"]) for r in rows} == {(m, k) for m in ("full", "anchor", "streamingllm") for k in (0, 2)}
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12
    for r in rows:
        mine = [p for p in preds if p["distance"] == r["distance"]]
        assert r["acc"] == sum(p[r["method"]] == p["answer"] for p in mine) / 6
        assert r["n"] == 6 and 0 <= r["c_red"] < 1 and (r["method"] != "full" or r["c_red"] == 0)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "observed_attention", "expected_attention"])
def test_presses_read_the_cue_against_the_anchor_cache_size(model, tok, tmp_path, method):
    """A kvpress press compresses the item up to the cue's last token to what the anchor cache holds when the
    value is predicted, minus that token (one prefill per row), then reads the last token: per row the
    logits of kvpress's own single-sequence use (tests/oracles.py), the anchor reading's kept count, and
    rows whose C⇓ is the anchor's."""
    from oracles import kvpress_reference

    from anllm.eval import presses
    from anllm.eval import methods as registry
    from anllm.eval.perplexity import query_budgets

    items = rc.build_items([("a", " ".join(PROSE))], tok, num_items=4, max_distance=4, seed=5)
    texts = [rc.context_text(it, k, None) for it, k in zip(items, [0, 4, 2, 3])]
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    budgets = [int(query_budgets(model, tok, t, x)[-1]) for t, x in zip(texts, seqs)]
    assert all(b < len(x) for b, x in zip(budgets, seqs))  # the budget bites
    got, kept = rc.next_token_logits(model, seqs, method, budgets, tok.pad_token_id)
    assert kept == budgets
    for j, (x, b) in enumerate(zip(seqs, budgets)):
        press = presses.make_press(method, len(x) - 1, b - 1)
        with anllm.anchor_attention(model, enabled=False):  # the presses read causally
            want, _ = kvpress_reference(model, press, x[:-1], x[-1:], registry.METHODS[method].eager)
        torch.testing.assert_close(got[j], want[-1], atol=1e-5, rtol=1e-5)
    rows = rc.recall_rows(model, tok, {"mode": "ep"}, items, ["anchor", method], [0, 3], batch_size=3,
                          out_dir=tmp_path, progress=False)
    by = {(r["method"], r["distance"]): r for r in rows}
    for k in (0, 3):
        assert by[(method, k)]["kv_kept"] == by[("anchor", k)]["kv_kept"]
        assert by[(method, k)]["c_red"] == by[("anchor", k)]["c_red"] > 0
        assert by[(method, k)]["time_s"] > 0 and 0 <= by[(method, k)]["acc"] <= 1
