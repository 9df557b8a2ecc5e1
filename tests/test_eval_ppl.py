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
