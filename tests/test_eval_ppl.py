"""Perplexity suite: chunked scoring through the anchor cache equals one AnSAN forward; documents,
methods and errors. Runtime: ~20 s on 2 CPU cores."""

from __future__ import annotations

import json
import math

import pytest
import torch

import anllm
from anllm.eval import perplexity as pp
from anllm.testing import tiny_llama
from anllm.testing import bpe_tokenizer



@pytest.fixture(scope="module")
def docs(shared_data):
    return pp.load_documents("speeches", shared_data, limit=2)


@pytest.fixture(scope="module")
def tok(docs):
    return bpe_tokenizer([t for _, t in docs])


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(vocab_size=len(tok) + 8)
    anllm.prepare_model(m, tok, mode="ep")
    return m


def test_load_documents_selection(shared_data):
    last = pp.load_documents("speeches", shared_data, limit=2)
    assert [d for d, _ in last] == ["2017-Trump.txt", "2021-Biden.txt"]
    first = pp.load_documents("speeches", shared_data, limit=1, select="first")
    assert first[0][0] == "1945-Truman.txt"
    inaug = pp.load_documents("speeches", shared_data, where={"meta.source": "nltk_inaugural"})
    assert all(len(t) >= 2000 for _, t in inaug)
    everything = pp.load_documents("speeches", shared_data, where={"meta.source": "nltk_inaugural"}, min_chars=0)
    assert len(everything) == 59 and len(inaug) == 58  # Washington's 135-word second inaugural is too short
    books = pp.load_documents("gutenberg", shared_data, where={"meta.title": ["Dracula", "Emma"]}, limit=3)
    assert all(d.startswith(("Dracula#", "Emma#")) for d, _ in books)


def test_document_errors(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        pp.load_documents("speeches", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pp.load_documents("speeches", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="us_presidential_speeches_nltk.jsonl"):
        pp.load_documents("speeches", tmp_path)
    with pytest.raises(ValueError, match="Unknown perplexity task"):
        pp.load_documents("c4", shared_data)
    with pytest.raises(ValueError, match="no document"):
        pp.load_documents("speeches", shared_data, where={"meta.source": "nobody"})


@pytest.mark.parametrize("chunk_size", [1, 37, 128])
def test_anchor_cache_chunks_equal_one_ansan_forward(model, tok, docs, chunk_size):
    """The acceptance check: chunk-by-chunk through AnchorCache == one full-document AnSAN forward."""
    n = 150 if chunk_size == 1 else 300
    ids = tok(docs[0][1], return_tensors="pt")["input_ids"][0][:n]
    ref = pp.full_sequence_token_nll(model, ids)
    got = pp.score_document(model, ids, "anchor", chunk_size=chunk_size, return_token_nll=True)
    assert got.token_nll.shape == ref.shape == (n - 1,)
    torch.testing.assert_close(got.token_nll, ref, atol=2e-5, rtol=1e-5)
    anchors = set(anllm.get_anchor_config(model).anchor_token_ids)
    assert sum(int(t) in anchors for t in ids) >= 2
    assert got.seen == n and got.kept < n and got.max_kept >= got.kept
    dense = pp.score_document(model, ids, "ansan", chunk_size=chunk_size, return_token_nll=True)
    torch.testing.assert_close(dense.token_nll, ref, atol=2e-5, rtol=1e-5)
    assert dense.kept == n


def test_full_method_is_causal_and_differs_from_ansan(model, tok, docs):
    ids = tok(docs[1][1], return_tensors="pt")["input_ids"][0][:200]
    full = pp.score_document(model, ids, "full", chunk_size=64, return_token_nll=True)
    with anllm.anchor_attention(model, enabled=False):
        causal = pp.full_sequence_token_nll(model, ids)
    torch.testing.assert_close(full.token_nll, causal, atol=2e-5, rtol=1e-5)
    ansan = pp.full_sequence_token_nll(model, ids)
    assert not torch.allclose(ansan, causal)
    assert (full.kept, full.max_kept) == (200, 200)


def test_rows_and_suite(model, tok, shared_data, tmp_path):
    from omegaconf import OmegaConf

    from anllm.eval.suites import ModelBundle, load_suite

    suite = load_suite("ppl")
    assert suite is pp.SUITE and "speeches" in suite.tasks
    bundle = ModelBundle(model=model, tokenizer=tok, checkpoint="tiny", anchor={"mode": "ep"})
    cfg = OmegaConf.create(
        {"data_dir": str(shared_data), "limit": 2, "modes": ["full", "ansan", "anchor"],
         "ppl": {"max_tokens": 160, "chunk_size": 64, "where": {"meta.source": "nltk_inaugural"}}}
    )
    rows = suite.run_task(bundle, cfg, "speeches", tmp_path)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["full", "ansan", "anchor"]
    assert by["anchor"]["ppl"] == pytest.approx(by["ansan"]["ppl"], rel=1e-5)
    assert by["full"]["c_red"] == 0 and by["ansan"]["c_red"] == 0 and 0 < by["anchor"]["c_red"] < 1
    assert by["full"]["kv_total"] == 320 and by["anchor"]["max_kv"] < 160
    per_doc = json.loads((tmp_path / "documents.json").read_text())
    nll = sum(d["nll"] for d in per_doc["anchor"]) / sum(d["tokens"] for d in per_doc["anchor"])
    assert by["anchor"]["ppl"] == pytest.approx(math.exp(nll))
    assert all(r["t_up"] > 0 for r in rows)


def test_plain_model_runs_full_only(tok, shared_data, tmp_path):
    from anllm.eval.suites import ModelBundle

    plain = tiny_llama(vocab_size=len(tok) + 8)
    bundle = ModelBundle(model=plain, tokenizer=tok, checkpoint="plain")
    cfg = {"data_dir": str(shared_data), "limit": 1, "ppl": {"max_tokens": 64, "chunk_size": 32}}
    rows = pp.run_task(bundle, cfg, "speeches", tmp_path)
    assert [r["method"] for r in rows] == ["full"]
    assert any("no anchor settings" in n for n in bundle.notes)


def test_anchor_targets_are_read_but_not_scored() -> None:
    """AC documents carry <AC> after every sentence; PPL scores only the text tokens."""
    import anllm
    from anllm.anchors import AnchorConfig
    from anllm.eval.perplexity import score_document
    from anllm.testing import tiny_llama

    model = tiny_llama()
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[5]).to_dict()
    anllm.prepare_model(model, None)
    ids = torch.randint(6, 128, (60,), generator=torch.Generator().manual_seed(3))
    ids[[9, 20, 33, 47]] = 5
    with torch.no_grad():
        every = score_document(model, ids, "anchor", chunk_size=16, return_token_nll=True)
        text_only = score_document(model, ids, "anchor", chunk_size=16, return_token_nll=True, skip_target_ids=[5])
    assert every.tokens == 59 and text_only.tokens == 59 - 4
    keep = ids[1:] != 5
    torch.testing.assert_close(text_only.token_nll, every.token_nll[keep])


# ---- equal-cache baselines and the sentence-only control ----------------------------------------


def _oracle_nll(model, ids, mask):
    """Per-token NLL from an un-hooked forward fed an explicit [L, L] bool mask (the independent oracle)."""
    with anllm.anchor_attention(model, enabled=False), torch.no_grad():
        logits = model(input_ids=ids[None], attention_mask=mask[None, None], use_cache=False).logits[0].float()
    return -torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]


def test_streaming_keeps_sinks_and_recent_window_by_hand():
    from anllm.eval.baselines import streaming_visible

    # budget 4, one sink: query q sees token 0 and q-2..q.
    got = streaming_visible(7, budget=4, num_sink_tokens=1)
    want = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 0],
        [1, 0, 0, 0, 1, 1, 1],
    ]
    assert got.int().tolist() == want
    assert streaming_visible(7, budget=3, num_sink_tokens=4).sum(-1).max() == 3  # sinks capped at budget // 2


def test_knorm_keeps_the_lowest_norm_earlier_keys_by_hand():
    from anllm.eval.baselines import knorm_visible

    norms = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]
    keys = torch.tensor(norms)[None, None, :, None]  # [B=1, H=1, L=6, D=1]: |key| = norm
    got = knorm_visible(keys, budget=3)[0, 0].int().tolist()
    # q sees itself + the 2 lowest-norm keys among 0..q-1
    want = []
    for q in range(6):
        earlier = sorted(range(q), key=lambda j: (norms[j], j))[:2]
        want.append([int(k == q or k in earlier) for k in range(6)])
    assert got == want
    assert want[5] == [0, 1, 0, 1, 0, 1]


def test_streaming_and_sentence_methods_match_loop_references(model, tok, docs):
    """StreamingLLM (peak and per-query budgets), the sentence-only control and the budgets themselves
    against tests/oracles.py (loops over the rules' wording), not against the code's own masks."""
    from oracles import reference_mask, streaming_reference

    ids = tok(docs[0][1], return_tensors="pt")["input_ids"][0][:180]
    L = len(ids)
    is_anchor = torch.isin(ids, torch.tensor(anllm.get_anchor_config(model).anchor_token_ids)).tolist()
    rule = reference_mask(is_anchor, [True] * L)
    per_query = [sum(row) for row in rule]  # keys each token attends under the AnSAN rule
    assert len(set(per_query)) > 5  # anchor caches grow and shrink: a real per-query profile

    got = pp.score_document(model, ids, "streamingllm", budget=24, return_token_nll=True)
    want = _oracle_nll(model, ids, torch.tensor(streaming_reference(L, [24] * L, 4)))
    torch.testing.assert_close(got.token_nll, want, atol=1e-5, rtol=1e-5)
    assert (got.kept, got.max_kept) == (24, 24)

    budgets = pp.query_budgets(model, tok, "", ids)
    assert budgets.tolist() == per_query
    assert pp.document_budget(model, tok, "", ids) == max(per_query)
    got_q = pp.score_document(model, ids, "streamingllm_q", budget=budgets, return_token_nll=True)
    want_q = _oracle_nll(model, ids, torch.tensor(streaming_reference(L, per_query, 4)))
    torch.testing.assert_close(got_q.token_nll, want_q, atol=1e-5, rtol=1e-5)
    assert (got_q.kept, got_q.max_kept) == (per_query[-1], max(per_query))
    assert not torch.allclose(got_q.token_nll, got.token_nll)

    # The sentence-only control: each token sees its own sentence only (earlier anchors hidden).
    own_sentence = torch.tensor(reference_mask(is_anchor, [True] * L, hide_anchors=True))
    sentence = pp.score_document(model, ids, "sentence", chunk_size=50, return_token_nll=True)
    torch.testing.assert_close(sentence.token_nll, _oracle_nll(model, ids, own_sentence), atol=1e-5, rtol=1e-5)
    anchor = pp.score_document(model, ids, "anchor", chunk_size=50, return_token_nll=True)
    assert sentence.kept < anchor.kept and not torch.allclose(sentence.token_nll, anchor.token_nll)


def test_rows_report_mean_keys_tail_and_paired_errors(model, tok, docs):
    """mean_kv per method, the PPL after ``tail_from`` and the per-document paired standard error,
    each against a direct computation."""
    from oracles import reference_mask

    texts = [(d, t[:3000]) for d, t in docs]
    rows = pp.perplexity_rows(model, tok, texts, ["full", "anchor", "streamingllm", "streamingllm_q"], task="t",
                              max_tokens=300, tail_from=200, progress=False, chunk_size=64)
    by = {r["method"]: r for r in rows}
    encoded = [tok(t, return_tensors="pt")["input_ids"][0][:300] for _, t in texts]
    anchor_ids = torch.tensor(anllm.get_anchor_config(model).anchor_token_ids)
    rule_means, peaks = [], []
    for ids in encoded:
        M = reference_mask(torch.isin(ids, anchor_ids).tolist(), [True] * len(ids))
        rule_means.append(sum(map(sum, M)) / len(ids))
        peaks.append(max(map(sum, M)))
    assert by["full"]["mean_kv"] == pytest.approx(sum((len(i) + 1) / 2 for i in encoded) / len(encoded))
    assert by["anchor"]["mean_kv"] == pytest.approx(sum(rule_means) / len(rule_means))
    assert by["streamingllm_q"]["mean_kv"] == pytest.approx(by["anchor"]["mean_kv"])
    want_stream = sum(sum(min(p, q + 1) for q in range(len(i))) / len(i) for p, i in zip(peaks, encoded)) / len(encoded)
    assert by["streamingllm"]["mean_kv"] == pytest.approx(want_stream)
    assert by["streamingllm"]["mean_kv"] > by["anchor"]["mean_kv"]  # the peak definition is the generous one
    assert by["anchor"]["peak_kv"] == pytest.approx(sum(peaks) / len(peaks)) == by["streamingllm"]["peak_kv"]
    # the tail: positions >= 200 of a plain full-attention forward
    nll = [pp.full_sequence_token_nll(model, ids) for ids in encoded]  # AnSAN on this model
    with anllm.anchor_attention(model, enabled=False):
        full_nll = [pp.full_sequence_token_nll(model, ids) for ids in encoded]
    tail = torch.cat([x[199:] for x in full_nll])
    assert by["full"]["ppl_tail"] == pytest.approx(math.exp(float(tail.mean())), rel=1e-4)
    assert by["full"]["tokens_tail"] == len(tail)
    # paired differences of log-PPL against the anchor reading, per document
    diffs = [float(f.mean() - a.mean()) for f, a in zip(full_nll, nll)]
    mean = sum(diffs) / 2
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 1 / 2)
    assert by["full"]["dlogppl_vs_anchor"] == pytest.approx(mean, abs=2e-6)  # float noise of two readings
    assert by["full"]["dlogppl_se"] == pytest.approx(se, abs=2e-6) and se > 1e-5


def test_sentence_offsets_count_tokens_after_the_last_anchor() -> None:
    from anllm.eval.ppl_core import sentence_offsets

    is_anchor = torch.tensor([False, False, True, False, False, True, False])
    # targets at positions 1..6: before the first anchor counted from the start, then 1 right after one
    assert sentence_offsets(is_anchor).tolist() == [2, 3, 1, 2, 3, 1]
    assert sentence_offsets(torch.tensor([True, True, False])).tolist() == [1, 1]


def test_rows_by_sentence_offset_against_the_token_nll(model, tok, docs):
    """``offset_bins``: each method's NLL split by tokens after the last anchor, against the token NLLs
    and offsets computed directly; the bins add up to the row; the paired differences per bin are the
    mean over documents of (method − anchor)."""
    from anllm.eval.ppl_core import sentence_offsets

    texts = [(d, t[:2000]) for d, t in docs]
    edges = [1, 2, 5, 9]
    rows = pp.perplexity_rows(model, tok, texts, ["full", "anchor", "streamingllm_q"], task="t", max_tokens=200,
                              progress=False, chunk_size=64, offset_bins=edges)
    by = {r["method"]: r for r in rows}
    anchor_ids = torch.tensor(anllm.get_anchor_config(model).anchor_token_ids)
    per_doc = {}
    for m in ("full", "anchor"):
        sums, counts = torch.zeros(len(edges), dtype=torch.float64), torch.zeros(len(edges))
        per_doc[m] = []
        for _, text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"][0][:200]
            nll = pp.score_document(model, ids, m, chunk_size=64, return_token_nll=True).token_nll.double()
            off = sentence_offsets(torch.isin(ids, anchor_ids))
            b = torch.tensor([max(i for i, e in enumerate(edges) if o >= e) for o in off.tolist()])
            s_ = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, b, nll)
            c_ = torch.bincount(b, minlength=len(edges)).double()
            sums, counts = sums + s_, counts + c_
            per_doc[m].append((s_ / c_).tolist())
        assert by[m]["offset_tokens"] == counts.long().tolist() and all(counts > 0)
        assert by[m]["offset_nll"] == pytest.approx((sums / counts).tolist(), abs=1e-5)
        total = sum(x * n for x, n in zip(by[m]["offset_nll"], by[m]["offset_tokens"])) / sum(by[m]["offset_tokens"])
        assert total == pytest.approx(by[m]["nll"], abs=1e-6)
    want = [sum(f[i] - a[i] for f, a in zip(per_doc["full"], per_doc["anchor"])) / len(texts) for i in range(len(edges))]
    assert by["full"]["offset_dnll_vs_anchor"] == pytest.approx(want, abs=1e-5)
    assert "offset_dnll_vs_anchor" not in by["anchor"] and len(by["streamingllm_q"]["offset_dnll_se"]) == len(edges)


def test_knorm_method_matches_a_loop_reference_attention(model, tok, docs):
    """The per-layer K-norm masks against an attention function written with loops: for every query,
    sort the earlier keys of each KV head by norm, keep budget-1 of them, softmax by hand."""
    from transformers import AttentionInterface

    budget = 9

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, L, D = query.shape
        groups = H // key.shape[1]
        out = torch.zeros_like(query)
        for h in range(H):
            k, v = key[0, h // groups], value[0, h // groups]
            norms = k.norm(dim=-1).tolist()
            for q in range(L):
                kept = sorted(range(q), key=lambda j: (norms[j], j))[: budget - 1] + [q]
                w = torch.softmax((query[0, h, q] @ k[kept].T) * scaling, -1)
                out[0, h, q] = w @ v[kept]
        return out.transpose(1, 2).contiguous(), None

    ids = tok(docs[1][1], return_tensors="pt")["input_ids"][0][:40]
    got = pp.score_document(model, ids, "knorm", budget=budget, return_token_nll=True)
    AttentionInterface.register("test_knorm_reference", reference)
    model.set_attn_implementation("test_knorm_reference")
    try:
        want = _oracle_nll(model, ids, torch.ones(40, 40, dtype=torch.bool).tril())
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got.token_nll, want, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the baseline
    full = pp.score_document(model, ids, "knorm", budget=40, return_token_nll=True)
    with anllm.anchor_attention(model, enabled=False):
        torch.testing.assert_close(full.token_nll, pp.full_sequence_token_nll(model, ids), atol=1e-5, rtol=1e-5)


def test_plain_model_budget_counts_sentences():
    """Without anchors, the last token of each sentence stands in for an anchor."""
    from anllm.testing import word_tokenizer

    text = "One two three. Four five! Six seven"
    tok = word_tokenizer(text.split())
    ends = pp.sentence_end_tokens(tok, text, 7)
    assert ends.tolist() == [False, False, True, False, True, False, True]  # the last sentence ends too (as AC)
    # per query: the last token ('seven', an open sentence's end) is no anchor, so it sees 'three.',
    # 'five!', 'Six' and itself, not only its own sentence
    assert pp.query_budgets(tiny_llama(), tok, text, torch.arange(7)).tolist() == [1, 2, 3, 2, 2, 3, 4]
    assert pp.document_budget(tiny_llama(), tok, text, torch.arange(7)) == 4  # the peak


def test_holdout_task_scores_the_held_out_split(model, tok, tmp_path):
    from omegaconf import OmegaConf

    from anllm.eval.suites import ModelBundle

    lines = [{"text": f"Document {i} starts here. " + "It goes on for a while. " * 60} for i in range(12)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    data = {"kind": "jsonl", "paths": [str(path)], "holdout_fraction": 0.25}
    cfg = OmegaConf.create({"limit": 2, "modes": ["full", "anchor", "sentence", "streamingllm"],
                            "ppl": {"data": data, "max_tokens": 64, "chunk_size": 32, "select": "spread",
                                    "min_chars": 100}})
    pp.check(OmegaConf.merge(cfg, {"tasks": ["holdout"]}))
    bundle = ModelBundle(model=model, tokenizer=tok, checkpoint="tiny", anchor={"mode": "ep"})
    rows = pp.SUITE.run_task(bundle, cfg, "holdout", tmp_path)
    assert [r["method"] for r in rows] == ["full", "anchor", "sentence", "streamingllm"]
    from anllm.data import held_out_documents

    held = [d for d, _ in held_out_documents(data)]
    scored = [d["doc"] for d in json.loads((tmp_path / "documents.json").read_text())["full"]]
    assert len(held) == 3 and len(scored) == 2 and set(scored) <= set(held)
    with pytest.raises(ValueError, match="ppl.data"):
        pp.check(OmegaConf.create({"tasks": ["holdout"], "ppl": {}}))
