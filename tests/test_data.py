"""anllm.data: AC insertion, tokenisation, packing with document ids, SFT masking, collator, cache,
bad input, the offline demo corpus, and a real slice of ../shared/data with the SmolLM2 tokenizer.

Expected ids are written by hand against a tiny word-level tokenizer whose vocabulary is listed
below. Runtime: about 30-40 s on 2 CPU cores (most of it is `datasets` start-up per build).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch

import anllm
from anllm.data import (
    DataCollatorForAnchors,
    DataStats,
    build_alpaca_prompt,
    build_train_dataset,
    demo_documents,
    process_stream,
)
from anllm.data import processing as processing_mod

datasets.disable_progress_bars()

# --- a tokenizer small enough to write expected ids by hand -------------------------------------

WORDS = "<pad> <s> </s> <unk> . the cat sat dog ran a b c".split()
#          0    1    2    3    4  5   6   7   8   9  10 11 12   and <AC> = 13
PAD, BOS, EOS, UNK, DOT, THE, CAT, SAT, DOG, RAN, A, B, C = range(13)
AC = 13


def word_tokenizer(words: list[str] = WORDS, bos: bool = True, ac: bool = True):
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if ac:
        tok.add_tokens([AddedToken("<AC>", special=True, normalized=False)], special_tokens=True)
    return tok


def ac_config(tok) -> anllm.AnchorConfig:
    return anllm.AnchorConfig(mode="ac", anchor_token="<AC>", anchor_token_ids=[tok.convert_tokens_to_ids("<AC>")])


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


DOCS = [{"text": "The cat sat. The dog ran."}, {"text": "A b c"}]
# With BOS, <AC> after every sentence (also the last, also without punctuation) and EOS:
DOC1 = [BOS, THE, CAT, SAT, DOT, AC, THE, DOG, RAN, DOT, AC, EOS]
DOC2 = [BOS, A, B, C, AC, EOS]


@pytest.fixture
def tok():
    return word_tokenizer()


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)


def build(cfg, tok, anchor, block_size, tmp_path, **kw):
    return build_train_dataset(cfg, tok, anchor, block_size, tmp_path / "cache", **kw)


# --- pretraining rows -----------------------------------------------------------------------------


def test_ac_insertion_and_packing_exact_ids(tok, corpus, tmp_path):
    ds, stats = build({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac_config(tok), 8, tmp_path)
    assert ds[:] == {
        "input_ids": [DOC1[:8], DOC1[8:] + DOC2[:4]],
        # labels = input_ids, except the first token of a new document inside a block
        "labels": [DOC1[:8], DOC1[8:] + [-100] + DOC2[1:4]],
        "document_ids": [[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1]],
    }
    assert (stats.documents, stats.tokens, stats.anchors, stats.sentences) == (2, 18, 3, 3)
    assert (stats.rows, stats.row_tokens, stats.dropped_tokens, stats.loss_tokens) == (2, 16, 2, 15)
    assert stats.anchor_density == pytest.approx(6.0)
    assert stats.tokens_per_s > 0 and not stats.from_cache


def test_keep_remainder_and_relative_paths_with_base_dir(tok, corpus, tmp_path):
    cfg = {"kind": "jsonl", "paths": ["*.jsonl"], "base_dir": str(tmp_path), "keep_remainder": True}
    ds, stats = build(cfg, tok, ac_config(tok), 8, tmp_path)
    assert ds["input_ids"][-1] == DOC2[4:] and ds["document_ids"][-1] == [0, 0]
    assert stats.rows == 3 and stats.dropped_tokens == 0


def test_no_bos_tokenizer_and_ep_mode_insert_nothing(tmp_path, corpus):
    tok = word_tokenizer(bos=False, ac=False)
    ep = anllm.AnchorConfig(mode="ep", anchor_token_ids=[DOT])
    ds, stats = build({"kind": "jsonl", "paths": [str(corpus)], "keep_remainder": True}, tok, ep, 100, tmp_path)
    assert ds["input_ids"] == [[THE, CAT, SAT, DOT, THE, DOG, RAN, DOT, EOS, A, B, C, EOS]]
    assert ds["document_ids"] == [[0] * 9 + [1] * 4]
    assert stats.anchors == 2 and stats.sentences is None


def test_literal_anchor_text_is_replaced_by_splitter_decisions(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "<AC>The cat<AC> sat."}])
    ds, stats = build({"kind": "jsonl", "paths": [str(path)], "keep_remainder": True}, tok, ac_config(tok), 64, tmp_path)
    assert ds["input_ids"] == [[BOS, THE, CAT, SAT, DOT, AC, EOS]]
    assert stats.anchors == stats.sentences == 1


def test_no_packing_truncates_one_document_per_row(tok, corpus, tmp_path):
    ds, stats = build({"kind": "jsonl", "paths": [str(corpus)], "packing": False}, tok, ac_config(tok), 8, tmp_path)
    assert ds[:] == {
        "input_ids": [DOC1[:8], DOC2],
        "labels": [DOC1[:8], DOC2],
        "document_ids": [[0] * 8, [0] * 6],
    }
    assert stats.truncated == 1 and stats.dropped_tokens == 4


def test_max_documents_and_holdout_split_documents(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(["a"] * (i + 1))} for i in range(10)])
    cfg = {"kind": "jsonl", "paths": [str(path)], "packing": False, "max_documents": 8, "holdout_fraction": 0.25}
    train, _ = build(cfg, tok, ac_config(tok), 64, tmp_path)
    hold, _ = build(cfg, tok, ac_config(tok), 64, tmp_path, split="holdout")
    n_a = lambda rows: sorted(r.count(A) for r in rows)  # noqa: E731 - a's identify the document
    assert len(train) == 6 and len(hold) == 2
    assert sorted(n_a(train["input_ids"]) + n_a(hold["input_ids"])) == list(range(1, 9))


def test_holdout_paths_and_fraction_are_never_trained_on(tok, tmp_path):
    """Whole held-out files plus a sampled fraction of the rest: training rows and the held-out
    documents that evaluation reads (held_out_documents) are disjoint and cover every document."""
    from anllm.data import held_out_documents

    main = write_jsonl(tmp_path / "main.jsonl", [{"text": " ".join(["a"] * (i + 1))} for i in range(10)])
    side = write_jsonl(tmp_path / "side.jsonl", [{"text": " ".join(["b"] * (i + 1))} for i in range(3)])
    cfg = {"kind": "jsonl", "paths": [str(tmp_path / "*.jsonl")], "packing": False, "holdout_fraction": 0.2,
           "holdout_paths": [str(side)]}
    train, _ = build(cfg, tok, ac_config(tok), 64, tmp_path)
    hold, _ = build(cfg, tok, ac_config(tok), 64, tmp_path, split="holdout")
    docs = held_out_documents(cfg)
    key = lambda ids: (ids.count(A), ids.count(B))  # noqa: E731 - counts identify a document
    train_keys = {key(r) for r in train["input_ids"]}
    hold_keys = {key(r) for r in hold["input_ids"]}
    assert all(b == 0 for _, b in train_keys)  # the held-out file never reaches training
    assert len(train) == 8 and len(hold) == 5 and not train_keys & hold_keys
    assert train_keys | hold_keys == {(i, 0) for i in range(1, 11)} | {(0, i) for i in range(1, 4)}
    # Evaluation reads exactly the held-out split, with ids that say where each document came from.
    assert {(t.split().count("a"), t.split().count("b")) for _, t in docs} == hold_keys
    assert [d for d, _ in docs][:3] == ["side:1", "side:2", "side:3"]
    assert all(d.startswith("main:") for d, _ in docs[3:])
    with pytest.raises(ValueError, match="holds no documents out"):
        held_out_documents({"kind": "jsonl", "paths": [str(main)]})


def test_stream_processing_matches_cached_path(tok, corpus, tmp_path):
    source = datasets.Dataset.from_list(DOCS + [{"text": "   "}]).to_iterable_dataset()
    stream = process_stream(source, tok, ac_config(tok), 8)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    cached, _ = build({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac_config(tok), 8, tmp_path)
    assert [r["input_ids"] for r in rows] == cached["input_ids"]
    assert [r["document_ids"] for r in rows] == cached["document_ids"]
    assert [r["labels"] for r in rows] == cached["labels"]
    unpacked = list(process_stream(source, tok, ac_config(tok), 8, packing=False))
    assert [r["input_ids"] for r in unpacked] == [DOC1[:8], DOC2]


def test_hub_kind_streams_jsonl_urls_line_by_line(tok, tmp_path):
    # Same code path as hf://datasets/<repo>/*.jsonl, over file:// URLs; "meta" differs in schema
    # between the files (as in RedPajama), which datasets' json loader cannot stream.
    write_jsonl(tmp_path / "a.jsonl", [{"text": DOCS[0]["text"], "meta": {"x": 1}}])
    write_jsonl(tmp_path / "b.jsonl", ["{broken", {"text": DOCS[1]["text"], "meta": "y"}])
    cfg = {"kind": "hub", "data_files": [f"file://{tmp_path}/*.jsonl"], "shuffle_buffer": 0}
    stream, stats = build(cfg, tok, ac_config(tok), 8, tmp_path)
    assert isinstance(stream, datasets.IterableDataset) and stats.streaming
    assert [r["input_ids"] for r in stream] == [DOC1[:8], DOC1[8:] + DOC2[:4]]
    assert stats.skipped == {"malformed JSON": 1}
    first_doc_only, _ = build({**cfg, "max_documents": 1, "keep_remainder": True}, tok, ac_config(tok), 8, tmp_path)
    assert [r["input_ids"] for r in first_doc_only] == [DOC1[:8], DOC1[8:]]


def test_stream_missing_text_column(tok):
    source = datasets.Dataset.from_list([{"content": "x."}]).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\]"):
        list(process_stream(source, tok, ac_config(tok), 8))


def test_parallel_workers_give_the_same_rows(tok, tmp_path):
    docs = [{"text": "The cat sat. " * (i % 5 + 1) + "A b."} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    one, s1 = build({"kind": "jsonl", "paths": [str(path)], "batch_size": 8}, tok, ac_config(tok), 16, tmp_path / "1")
    two, s2 = build({"kind": "jsonl", "paths": [str(path)], "batch_size": 8}, tok, ac_config(tok), 16, tmp_path / "2",
                    num_proc=2)
    assert one[:] == two[:] and s2.num_proc == 2
    assert (s1.tokens, s1.anchors) == (s2.tokens, s2.anchors)


# --- SFT -------------------------------------------------------------------------------------------

SFT_WORDS = WORDS + list(dict.fromkeys(w for w in (
    "below is an instruction that describes task , paired with input provides further context write response "
    "appropriately completes the request # : say hi be nice bye translate following sentences from german to "
    "english ich bin hier du auch i am here you too"
).split() if w not in WORDS))


def sft_files(tmp_path: Path) -> dict:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Say hi. Be nice.", "input": "", "output": "Hi. Bye."},
        {"instruction": "Say hi.", "input": "", "output": ""},  # empty output: skipped
    ]))
    parallel = write_jsonl(tmp_path / "par.jsonl", [{"de": "Ich bin hier. Du auch.", "en": "I am here. You too."}])
    return {"kind": "sft", "alpaca_path": str(alpaca), "parallel_path": str(parallel)}


def as_text(tok, ids) -> str:
    return " ".join(tok.convert_ids_to_tokens(ids))


def test_sft_labels_and_anchor_placement(tmp_path):
    tok = word_tokenizer(SFT_WORDS)
    ds, stats = build(sft_files(tmp_path), tok, ac_config(tok), 256, tmp_path)
    assert stats.skipped == {"empty instruction or output": 1} and stats.documents == 2 and len(ds) == 2
    rows = {as_text(tok, r["input_ids"]).split(" # # # instruction : ")[1][:5]: r for r in ds}
    pre_no_input = "<s> below is an instruction that describes a task . <AC> write a response that appropriately " \
                   "completes the request . <AC>"
    pre_input = "<s> below is an instruction that describes a task , paired with an input that provides further " \
                "context . <AC> write a response that appropriately completes the request . <AC>"
    expected = {
        "say h": (pre_no_input + " # # # instruction : say hi . <AC> be nice . <AC> # # # response :",
                  "hi . <AC> bye . <AC> </s>"),
        "trans": (pre_input + " # # # instruction : translate the following sentences from german to english . <AC>"
                  " # # # input : ich bin hier . <AC> du auch . <AC> # # # response :",
                  "i am here . <AC> you too . <AC> </s>"),
    }
    for key, (prompt, response) in expected.items():
        r = rows[key]
        n_prompt = len(prompt.split())
        assert as_text(tok, r["input_ids"]) == prompt + " " + response
        assert r["labels"][:n_prompt] == [-100] * n_prompt
        assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:]
        assert r["labels"][-1] == EOS
    assert "<unk>" not in " ".join(as_text(tok, r["input_ids"]) for r in ds)


def test_sft_ep_inserts_nothing_and_long_prompts_are_skipped(tmp_path):
    tok = word_tokenizer(SFT_WORDS, ac=False)
    ep = anllm.AnchorConfig(mode="ep", anchor_token_ids=[DOT])
    ds, stats = build(sft_files(tmp_path), tok, ep, 256, tmp_path)
    assert all("<AC>" not in as_text(tok, r["input_ids"]) for r in ds)
    assert stats.anchors > 0 and stats.sentences is None
    ds, stats = build(sft_files(tmp_path), tok, ep, 40, tmp_path)  # the translation prompt is longer than 40
    assert len(ds) == 1 and stats.skipped["prompt fills block_size"] == 1
    assert all(len(r["input_ids"]) <= 40 for r in ds)


def test_prompt_builder_matches_training_prompt():
    from anllm.anchors import Marking

    ins = "Translate the following sentences from German to English."
    p = build_alpaca_prompt(ins, "Ich bin hier. Du auch.", Marking("<AC>"))
    assert p.endswith("### Input:\nIch bin hier.<AC> Du auch.<AC>\n\n### Response:\n")
    assert p.count("<AC>") == 5
    assert "<AC>" not in build_alpaca_prompt("Say hi. Be nice.")
    # The authors' SFT template: one <AC> after the preamble, the instruction and the input; the source's
    # sentences joined by " <AC> " (their pretraining marking); "### Response:" ends the prompt.
    paper = Marking("<AC>", "punkt", after_last=False, join=" <AC> ")
    p = build_alpaca_prompt(ins, "Ich bin hier. Du auch.", paper, template="paper")
    assert p == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request. <AC>\n\n### Instruction:\n" + ins + " <AC>\n\n"
        "### Input:\nIch bin hier. <AC> Du auch. <AC>\n\n### Response:"
    )
    assert build_alpaca_prompt(ins, "Ich bin hier.", None, template="paper").endswith("### Input:\nIch bin hier.\n\n### Response:")


# --- collator --------------------------------------------------------------------------------------


def test_collator_pads_right_and_masks(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [5, -100, 7], "document_ids": [0, 0, 1]},
            {"input_ids": [8], "labels": [8], "document_ids": [0]}]
    out = DataCollatorForAnchors(tok, pad_to_multiple_of=4)(rows)
    assert out["input_ids"].tolist() == [[5, 6, 7, PAD], [8, PAD, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert out["labels"].tolist() == [[5, -100, 7, -100], [8, -100, -100, -100]]
    assert out["document_ids"].tolist() == [[0, 0, 1, -1], [0, -1, -1, -1]]
    assert all(t.dtype == torch.long for t in out.values())
    sft = DataCollatorForAnchors(tok)([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7]}])
    assert "document_ids" not in sft and sft["labels"].tolist() == [[-100, 6], [7, -100]]
    with pytest.raises(ValueError, match="document_ids"):
        DataCollatorForAnchors(tok)([rows[0], {"input_ids": [1]}])
    with pytest.raises(ValueError, match="labels has 1 entries but input_ids has 2"):
        DataCollatorForAnchors(tok)([{"input_ids": [1, 2], "labels": [1]}])


def test_collated_packed_batch_trains_an_anchor_model(tok, corpus, tmp_path):
    from anllm.testing import tiny_llama

    model, tok = anllm.prepare_model(tiny_llama(vocab_size=32), tok, mode="ac")
    anchor = anllm.get_anchor_config(model)
    ds, _ = build({"kind": "jsonl", "paths": [str(corpus)]}, tok, anchor, 8, tmp_path)
    batch = DataCollatorForAnchors(tok)(list(ds))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    no_docs = model(**{k: v for k, v in batch.items() if k != "document_ids"})
    # row 1 packs two documents: separating them changes the second document's logits only
    assert torch.allclose(out.logits[1, :4], no_docs.logits[1, :4], atol=1e-5)
    assert not torch.allclose(out.logits[1, 4:], no_docs.logits[1, 4:], atol=1e-5)


# --- cache -----------------------------------------------------------------------------------------


def test_cache_reuses_and_invalidates(tok, corpus, tmp_path, monkeypatch):
    calls = []
    original = processing_mod.TextProcessor.__call__
    monkeypatch.setattr(processing_mod.TextProcessor, "__call__",
                        lambda self, batch: calls.append(1) or original(self, batch))
    cfg = {"kind": "jsonl", "paths": [str(corpus)]}
    first, s1 = build(cfg, tok, ac_config(tok), 8, tmp_path)
    n_first = len(calls)
    second, s2 = build(cfg, tok, ac_config(tok), 8, tmp_path)
    assert n_first > 0 and len(calls) == n_first  # not reprocessed
    assert s2.from_cache and not s1.from_cache and s2.cache_path == s1.cache_path
    assert second[:] == first[:] and s2.tokens == s1.tokens and s2.seconds == s1.seconds
    assert not any(p.name.startswith((".tmp", ".work")) for p in (tmp_path / "cache").iterdir())
    _, s3 = build(cfg, tok, ac_config(tok), 6, tmp_path)  # other block size
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "The dog sat."}) + "\n")
    _, s4 = build(cfg, tok, ac_config(tok), 8, tmp_path)  # changed input file
    assert not s3.from_cache and not s4.from_cache and s4.documents == 3
    assert len(calls) > n_first
    assert DataStats.load(Path(s1.cache_path) / "stats.json").tokens == s1.tokens


# --- bad input -------------------------------------------------------------------------------------


def test_malformed_and_empty_lines_are_skipped_and_counted(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [DOCS[0], "{not json", "[1, 2]", {"text": "  \n"}, {"text": 7}, "",
                                              DOCS[1]])
    with caplog.at_level(logging.WARNING, logger="anllm.data"):
        ds, stats = build({"kind": "jsonl", "paths": [str(path)]}, tok, ac_config(tok), 8, tmp_path)
    assert stats.documents == 2 and len(ds) == 2
    assert stats.skipped == {"malformed JSON": 1, "not a JSON object": 1, "empty document": 1,
                             "text is not a string": 1}
    assert any(e.startswith(f"{path}:2") for e in stats.skipped_examples)
    assert f"{path}:2" in caplog.text and f"{path}:4" in caplog.text


def test_nothing_valid_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad", '{"text": ""}'])
    with pytest.raises(ValueError, match=r"No usable document.*malformed JSON"):
        build({"kind": "jsonl", "paths": [str(path)]}, tok, ac_config(tok), 8, tmp_path)


def test_too_little_data_for_one_block(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"All 18 tokens fit in less than one block of block_size=64"):
        build({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac_config(tok), 64, tmp_path)


def test_missing_text_column_names_the_existing_ones(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "meta": {}}])
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content', 'meta'\].*text_column"):
        build({"kind": "jsonl", "paths": [str(path)]}, tok, ac_config(tok), 8, tmp_path)


def test_block_size_beyond_model_length(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"block_size=8192 .* 2048.*block_size=2048"):
        build({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac_config(tok), 8192, tmp_path, max_model_length=2048)


def test_missing_files_and_empty_globs(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        build({"kind": "jsonl", "paths": ["nope.jsonl"], "base_dir": str(tmp_path)}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("'data/*.jsonl'")):
        build({"kind": "jsonl", "paths": ["data/*.jsonl"], "base_dir": str(tmp_path)}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(ValueError, match="alpaca_path"):
        build({"kind": "sft"}, tok, ac_config(tok), 8, tmp_path)


def test_config_and_tokenizer_mismatches(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match="Unknown data kind 'csv'"):
        build({"kind": "csv"}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(ValueError, match=r"maps '<AC>' to id 13 but the anchor config says \[99\]"):
        build({"kind": "jsonl", "paths": [str(corpus)]}, tok,
              anllm.AnchorConfig(mode="ac", anchor_token="<AC>", anchor_token_ids=[99]), 8, tmp_path)
    with pytest.raises(ValueError, match="has no '<AC>' token"):
        build({"kind": "jsonl", "paths": [str(corpus)]}, word_tokenizer(ac=False), ac_config(tok), 8, tmp_path)
    with pytest.raises(ValueError, match="holdout_fraction"):
        build({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac_config(tok), 8, tmp_path, split="holdout")
    with pytest.raises(ValueError, match="data.name"):  # checked before any network access
        build({"kind": "hub"}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(ValueError, match="set data.name"):
        build({"kind": "hub", "data_files": "*.jsonl"}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing"):
        build({"kind": "hub", "data_files": f"file://{tmp_path}/nothing*.jsonl"}, tok, ac_config(tok), 8, tmp_path)
    with pytest.raises(ValueError, match="cannot hold out"):
        build({"kind": "hub", "name": "x/y", "holdout_fraction": 0.1}, tok, ac_config(tok), 8, tmp_path)


def test_hydra_config_objects_are_accepted(tok, corpus, tmp_path, caplog):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"kind": "jsonl", "name": "mine", "paths": [corpus.name], "base_dir": str(tmp_path),
                            "pakcing": False})
    with caplog.at_level(logging.WARNING, logger="anllm.data"):
        ds, _ = build(cfg, tok, ac_config(tok), 8, tmp_path)
    assert ds["input_ids"][0] == DOC1[:8]
    assert "['pakcing'] are not used" in caplog.text


# --- demo corpus and real data ---------------------------------------------------------------------


def test_demo_corpus_is_offline_english_prose(tok, tmp_path):
    docs = list(demo_documents())
    text = "\n".join(docs)
    assert len(docs) >= 50 and len(text) >= 200_000
    sentences = sum(len(anllm.sentence_spans(d)) for d in docs)
    assert sentences >= 2_000
    words = re.findall(r"[A-Za-z]+", text.lower())
    common = sum(w in {"the", "of", "is", "a", "to", "and", "in"} for w in words) / len(words)
    assert common > 0.15  # English function words, not code
    assert "::=" not in text and ">>>" not in text
    ds, stats = build({"kind": "demo", "max_documents": 5}, tok, ac_config(tok), 32, tmp_path)
    assert stats.documents == 5 and stats.sentences > 50 and stats.anchors == stats.sentences


def _smollm2_ac_tokenizer(smollm2_dir):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_dir)
    t.add_tokens([AddedToken("<AC>", special=True, normalized=False)], special_tokens=True)
    return t


@pytest.fixture
def smollm2_tokenizer(request):
    try:
        path = request.getfixturevalue("smollm2_dir")
    except Exception as e:  # noqa: BLE001 - fixture missing or the checkpoint cannot be made here
        from conftest import skip_or_fail

        skip_or_fail(f"SmolLM2 checkpoint unavailable: {e}")
    return _smollm2_ac_tokenizer(path)


@pytest.mark.slow
def test_real_pretrain_slice_with_smollm2(smollm2_tokenizer, shared_data, tmp_path):
    tok = smollm2_tokenizer
    anchor = ac_config(tok)
    cfg = {"kind": "jsonl", "paths": [str(shared_data / "pretrain_text" / "lee_background_news.jsonl")],
           "max_documents": 40}
    ds, stats = build(cfg, tok, anchor, 256, tmp_path, max_model_length=8192)
    assert stats.documents == 40 and stats.skipped == {}
    assert stats.anchors == stats.sentences and 10 < stats.anchor_density < 60
    ac = anchor.anchor_token_ids[0]
    ids = np.array(ds["input_ids"])
    docs = np.array(ds["document_ids"])
    assert ids.shape == (stats.rows, 256)
    assert (np.diff(docs, axis=1) >= 0).all() and (docs[:, 0] == 0).all()
    # anchors follow sentence-final punctuation in real news text
    before = [tok.decode([int(ids[r, c - 1])]) for r, c in zip(*np.nonzero(ids == ac)) if c > 0]
    assert sum(b.strip()[-1:] in '.?!"\'' for b in before) / len(before) > 0.9
    assert (ids == tok.eos_token_id).sum() >= 39  # one EOS per document (the last may be dropped)


@pytest.mark.slow
def test_real_sft_slice_with_smollm2(smollm2_tokenizer, shared_data, tmp_path):
    tok = smollm2_tokenizer
    cfg = {"kind": "sft", "alpaca_path": str(shared_data / "alpaca" / "alpaca_5000.json"),
           "parallel_path": str(shared_data / "newstest_de_en" / "newstest2017-2020.de-en.jsonl"), "max_examples": 30}
    ds, stats = build(cfg, tok, ac_config(tok), 512, tmp_path)
    assert stats.documents + stats.num_skipped >= 30 and len(ds) == stats.documents
    for r in ds:
        labels = np.array(r["labels"])
        n_prompt = int((labels == -100).sum())
        assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()
        prompt = tok.decode(r["input_ids"][:n_prompt])
        assert prompt.endswith("### Response:\n") and "request.<AC>" in prompt


# --- the declared row format ----------------------------------------------------------------------

ROW_FORMAT_FIXTURE = Path(__file__).parent / "data" / "row_format.json"
GOLDEN_WORDS = WORDS[:4] + ". , ! ? ; : ' \" - the a of and to in is was he she it".split()


def golden_builds(shared_data: Path, tmp_path: Path) -> dict[str, tuple]:
    """Every way a build makes rows, on a real slice (the splitter sees real prose) and a fixed tokenizer."""
    tok = word_tokenizer(GOLDEN_WORDS)
    news = {"kind": "jsonl", "paths": [str(shared_data / "pretrain_text" / "lee_background_news.jsonl")],
            "max_documents": 12}
    ep = anllm.AnchorConfig(mode="ep", anchor_token_ids=[tok.convert_tokens_to_ids(w) for w in ".!?"])
    sft = {"kind": "sft", "alpaca_path": str(shared_data / "alpaca" / "alpaca_5000.json"),
           "parallel_path": str(shared_data / "newstest_de_en" / "newstest2017-2020.de-en.jsonl"), "max_examples": 12}
    return {
        "jsonl-ac-packed": build(news, tok, ac_config(tok), 64, tmp_path),
        "jsonl-ep-packed-remainder": build({**news, "keep_remainder": True}, tok, ep, 64, tmp_path),
        "jsonl-none-packed": build(news, tok, None, 64, tmp_path),
        "jsonl-ac-unpacked": build({**news, "packing": False}, tok, ac_config(tok), 96, tmp_path),
        "jsonl-ac-holdout": build({**news, "holdout_fraction": 0.25}, tok, ac_config(tok), 64, tmp_path, split="holdout"),
        "sft-ac": build(sft, tok, ac_config(tok), 256, tmp_path),
    }


def row_digest(ds, stats: DataStats) -> str:
    import hashlib

    counts = {k: getattr(stats, k) for k in ("documents", "tokens", "anchors", "sentences", "rows", "row_tokens",
                                              "loss_tokens", "dropped_tokens", "truncated", "skipped")}
    blob = json.dumps({"rows": ds[:], "counts": counts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_rows_match_the_declared_row_format(shared_data, tmp_path):
    """The dataset cache key holds ``store.ROW_FORMAT``, not the source: a change to the rows without a bump
    would reuse caches of the old rows. Regenerate the digests only with a bump:
    ``ANLLM_UPDATE_ROW_FORMAT=1 pytest tests/test_data.py -k row_format``."""
    from anllm.data import store

    digests = {name: row_digest(*built) for name, built in golden_builds(shared_data, tmp_path).items()}
    golden = json.loads(ROW_FORMAT_FIXTURE.read_text()) if ROW_FORMAT_FIXTURE.exists() else None
    if os.environ.get("ANLLM_UPDATE_ROW_FORMAT") == "1":
        assert golden is None or golden["row_format"] != store.ROW_FORMAT or golden["digests"] == digests, (
            f"the rows changed but ROW_FORMAT is still {store.ROW_FORMAT}: bump it in src/anllm/data/store.py first")
        ROW_FORMAT_FIXTURE.write_text(json.dumps({"row_format": store.ROW_FORMAT, "digests": digests}, indent=1) + "\n")
        return
    assert golden is not None, f"{ROW_FORMAT_FIXTURE} is missing: ANLLM_UPDATE_ROW_FORMAT=1 regenerates it"
    changed = sorted(k for k in digests.keys() | golden["digests"].keys() if digests.get(k) != golden["digests"].get(k))
    assert golden["row_format"] == store.ROW_FORMAT, (
        f"ROW_FORMAT is {store.ROW_FORMAT} but the digests are of format {golden['row_format']}: "
        "regenerate them with ANLLM_UPDATE_ROW_FORMAT=1")
    assert not changed, (f"the builds now write other rows ({', '.join(changed)}) under the same ROW_FORMAT "
                         f"{store.ROW_FORMAT}: bump it in src/anllm/data/store.py, then regenerate the digests")


def test_the_cache_key_follows_the_row_format_not_the_source(tok, corpus, tmp_path, monkeypatch):
    from anllm.data import store

    cfg = {"kind": "jsonl", "paths": [str(corpus)]}
    _, first = build(cfg, tok, ac_config(tok), 8, tmp_path)
    _, again = build(cfg, tok, ac_config(tok), 8, tmp_path)
    monkeypatch.setattr(store, "ROW_FORMAT", store.ROW_FORMAT + 1)
    _, bumped = build(cfg, tok, ac_config(tok), 8, tmp_path)
    assert (first.from_cache, again.from_cache, bumped.from_cache) == (False, True, False)
