"""protocol=paper: every deviation from the authors is a switch, and the paper value reproduces the
authors' behaviour — one worked example per switch (docs/protocol.md lists them)."""

from __future__ import annotations

import json

import pytest
import torch

import anllm
from anllm.anchors import Marking, sentence_spans
from anllm.schema import compose
from anllm.testing import bpe_tokenizer, tiny_llama, word_tokenizer

PARAGRAPH = ("Dr. Smith arrived at 3 p.m. on Monday. He was tired.\nThe meeting, however, went on until late! "
             "Did anyone notice? Nobody did.")


def test_protocol_switch_composes_both_clis():
    paper = compose("train", ["+exp=anllm_ac", "protocol=paper"])
    ours = compose("train", ["+exp=anllm_ac"])
    assert (paper.data.packing, paper.data.splitter, list(paper.anchor.ep_tokens), paper.anchor.ac_after_last,
            paper.anchor.ac_join) == (False, "punkt", ["."], False, " <AC> ")
    assert (ours.data.packing, ours.data.splitter, ours.anchor.ep_tokens, ours.anchor.ac_after_last,
            ours.anchor.ac_join) == (True, "blingfire", None, True, None)
    ev = compose("evaluate", ["checkpoint=x", "protocol=paper"])
    assert (ev.position_mode, ev.qa.ac_layout, ev.translation.src_cache, ev.translation.decoding,
            ev.translation.max_new_tokens, ev.translation.batch_size, ev.translation.template) == (
        "compact", "demonstration", "source", "paper", 1024, 1, "paper")
    ev = compose("evaluate", ["checkpoint=x"])
    assert (ev.position_mode, ev.qa.ac_layout, ev.translation.src_cache, ev.translation.decoding) == (
        "true", "sentence", "prompt", "greedy")
    # each item stays settable on its own
    assert compose("train", ["+exp=anllm_ac", "protocol=paper", "data.packing=true"]).data.packing is True


def test_ep_paper_anchors_are_the_period_only():
    from anllm.schema import plain_dict
    from anllm.train.model import build_model_and_tokenizer

    c = plain_dict(compose("train", ["+exp=anllm_ep", "model=tiny", "protocol=paper"]))
    model, tok = build_model_and_tokenizer(c)
    ids = anllm.get_anchor_config(model).anchor_token_ids
    assert ids == [tok.convert_tokens_to_ids(".")] and len(ids) == 1
    ours, _ = build_model_and_tokenizer(plain_dict(compose("train", ["+exp=anllm_ep", "model=tiny"])))
    assert len(anllm.get_anchor_config(ours).anchor_token_ids) > 1  # ours: every sentence-ending punctuation token
    with pytest.raises(ValueError, match="not a single token"):
        anllm.anchors.ep_token_ids(tok, ["?!?!?!"])


def test_ac_paper_text_is_the_authors_join_of_punkt_sentences():
    import punkt

    sentences = punkt.PunktSentenceTokenizer(punkt.load_model("english")).tokenize(PARAGRAPH)
    assert len(sentences) == 5 and sentences[0] == "Dr. Smith arrived at 3 p.m. on Monday."
    assert Marking("<AC>", "punkt", after_last=False, join=" <AC> ").apply(PARAGRAPH) == " <AC> ".join(sentences)
    # ours: <AC> glued after every sentence, newlines kept, one after the last sentence too
    ours = Marking("<AC>").apply(PARAGRAPH)
    assert ours.endswith("Nobody did.<AC>") and "tired.<AC>\nThe meeting" in ours
    # punkt reads across the newline like nltk.sent_tokenize; blingfire always ends a sentence there
    assert len(sentence_spans("It rained\nall day. Then it stopped.", "punkt")) == 2
    assert len(sentence_spans("It rained\nall day. Then it stopped.", "blingfire")) == 3


def test_src_cache_keeps_exactly_the_source_span():
    """translation.src_cache=source: the prompt's source tokens (and anchors, and the open sentence) are
    kept for generation, however many chunks read the prompt; the rest of the prompt is dropped."""
    from anllm.eval.generation import prefill
    from anllm.eval.translation import build_prompt, source_span, token_mask

    src = "Der Hund läuft schnell. Die Katze schläft."
    prompt = build_prompt(src)
    tok = bpe_tokenizer([prompt] * 3, vocab_size=300)
    ids = torch.tensor(tok(prompt)["input_ids"])
    keep = token_mask(tok, prompt, source_span(prompt, src, None), len(ids), True)
    assert tok.decode(ids[keep]).strip() == src
    model = tiny_llama(vocab_size=len(tok) + 4)
    anllm.prepare_model(model, tok, mode="ep")
    cache = anllm.AnchorCache(keep_prefix=True).keep_prompt(keep[None])
    am = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        prefill(model, ids[None], am, (am.cumsum(-1) - 1), cache, chunk_size=7)
    lay = cache.tracker.layout
    kept = set(lay.idx[0][lay.valid[0]].tolist())
    is_anchor = torch.isin(ids, model._anllm_attention.anchor_ids)
    last_anchor = int(is_anchor.nonzero().max())
    want = set(keep.nonzero()[:, 0].tolist()) | set(is_anchor.nonzero()[:, 0].tolist()) | set(range(last_anchor + 1, len(ids)))
    assert kept == want
    assert len(kept) < len(ids) and not set(range(last_anchor + 1)) - want <= kept  # the instruction/headers are gone


def test_compact_positions_number_from_the_pruned_cache():
    """position_mode=compact: after pruning, new tokens are numbered from the kept length (the authors)."""
    tok = word_tokenizer(["w", "."])
    model = tiny_llama(vocab_size=16)
    anllm.prepare_model(model, tok, mode="ep", ep_tokens=["."])
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    W, P = tok.convert_tokens_to_ids("w"), tok.convert_tokens_to_ids(".")
    for mode in ("compact", "true"):
        cache, starts = anllm.AnchorCache(position_mode=mode), []
        am = torch.ones(1, 6, dtype=torch.long)
        with torch.no_grad():
            model(input_ids=torch.tensor([[W, W, P, W, P, W]]), attention_mask=am, past_key_values=cache, use_cache=True)
            for _ in range(2):
                am = torch.cat([am, torch.ones(1, 1, dtype=torch.long)], 1)
                starts.append(cache.get_seq_length())  # where transformers numbers the next token from
                model(input_ids=torch.tensor([[W]]), attention_mask=am, past_key_values=cache, use_cache=True)
        if mode == "compact":  # kept after the prompt: ". . w" = 3 slots, so the authors number 3, 4
            assert [int(p[0, 0]) for p in seen[-2:]] == [3, 4]
        else:  # true positions continue the full sequence: 6, 7
            assert seen[-1] is None and starts == [6, 7]


def test_qa_paper_layout_puts_one_anchor_per_demonstration():
    from anllm.eval.lm_eval_model import anchor_qa_context

    ctx = "Question: Is it? Yes.\nAnswer: no\n\nQuestion: Why? Because.\nAnswer: yes\n\nThe sky is blue.\nQuestion: What?\nAnswer:"
    out = anchor_qa_context(ctx, "<AC>", layout="demonstration")
    assert out == ("Question: Is it? Yes.\nAnswer: no <AC>\n\nQuestion: Why? Because.\nAnswer: yes <AC>\n\n"
                   "The sky is blue.\nQuestion: What?\nAnswer:")
    assert anchor_qa_context(ctx, "<AC>").count("<AC>") == 7  # ours: after every sentence before the query


def test_paper_recipe_is_one_epoch_without_packing():
    import importlib.util
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("anllm_slurm_recipe", repo / "slurm" / "recipe.py")
    recipes = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipes
    spec.loader.exec_module(recipes)
    recipe = recipes.load()["anllm_ac_7b"]  # what `sbatch slurm/anllm_ac_7b.sbatch` passes to train.py
    overrides = recipe.overrides({"RPJ_STREAM": "1"})  # streamed: trainer.max_steps = ceil(850k documents / 512 rows per step)
    assert "protocol=paper" in overrides and "trainer.max_steps=1661" in overrides
    cfg = compose("train", overrides)
    assert cfg.data.packing is False and cfg.trainer.num_train_epochs == 1 and cfg.block_size == 8192
    t = cfg.trainer
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * recipe.gpus == 512  # rows per step on 4 x 8 GPUs
    local = compose("train", recipe.overrides({"RPJ_DIR": "/data/rpj"}))  # a local copy: the epoch is counted
    assert local.trainer.max_steps == -1 and local.trainer.num_train_epochs == 1 and local.data.packing is False
    page = (repo / "experiments" / "recipes" / "anllm_ac_7b.md").read_text()
    assert "1,661" in page and "protocol=paper" in page


def test_scoring_external_outputs_needs_no_checkpoint(shared_data, tmp_path):
    from anllm.eval.runner import register_resolvers, run

    register_resolvers()
    hyp = shared_data / "wmt23_de_en" / "system-outputs" / "generaltest2023.de-en.hyp.GPT4-5shot.en"
    cfg = compose("evaluate", ["suite=translation", f"data_dir={shared_data}", f"output_dir={tmp_path}",
                               f"translation.hypotheses=[{hyp}]", "translation.comet_model=null"])
    rec = run(cfg)
    row = next(r for r in rec["rows"] if r["task"] == "wmt23_de_en")
    assert round(row["bleu"], 1) == 47.9 and round(row["chrf"], 1) == 69.8  # the official WMT23 scores
    with pytest.raises(ValueError, match="checkpoint=DIR is required"):
        run(compose("evaluate", ["suite=translation", f"data_dir={shared_data}", f"output_dir={tmp_path / 'x'}"]))
    assert json.loads((tmp_path / "results.json").read_text())["checkpoint"] is None
