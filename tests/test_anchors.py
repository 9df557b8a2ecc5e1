"""EP and AC anchors on the real SmolLM2-135M-Instruct tokenizer and model.

What is checked: which vocabulary tokens the EP rule makes anchors, ``prepare_model`` in both modes
on the real checkpoint (AC: one special token, embedding rows copied from "."), and `<AC>`
insertion on real text (one `<AC>` id per sentence after tokenization). The model is loaded once per
session and copied per mode. Runtime ~20 s on 2 CPU cores once the checkpoint is converted (the
first conversion adds ~45 s).
"""

from __future__ import annotations

import copy
import json
import os
import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import anllm
from anllm.anchors import (
    AC_TOKEN,
    ac_token_id,
    ep_anchor_ids,
    insert_anchor_token,
    is_ep_anchor_text,
    sentence_spans,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture
def tok(smollm2_dir):
    """A fresh tokenizer per test (AC mutates the tokenizer it is given)."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def base_model(smollm2_dir):
    """The one load of the real model in this module; tests work on deep copies."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def ep_model_tok(smollm2_dir, base_model):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return anllm.prepare_model(copy.deepcopy(base_model), tokenizer, mode="ep")


@pytest.fixture(scope="session")
def ac_model_tok(smollm2_dir, base_model):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return anllm.prepare_model(copy.deepcopy(base_model), tokenizer, mode="ac")


@pytest.fixture(scope="session")
def vocab_text(smollm2_dir) -> dict[int, str]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return {i: tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tokenizer))}


def single_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is not one SmolLM2 token: {tokenizer.convert_ids_to_tokens(ids)}"
    return ids[0]


def _has_alnum(s: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in s)


# --- the EP rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [".", "?", "!", '."', ".”", "...", ".)", "?!", ").", "!!", " .", "’."])
def test_ep_rule_accepts_sentence_enders(text):
    assert is_ep_anchor_text(text)


@pytest.mark.parametrize(
    "text", ["Mr.", "Dr.", ".com", "3.", ".5", "e.g.", "U.S.", ",", ";", ":", ".,", "./", "#!/", ".-", "", " ", "\n"]
)
def test_ep_rule_rejects_non_enders(text):
    assert not is_ep_anchor_text(text)


def test_ep_rule_custom_punctuation():
    assert is_ep_anchor_text(";", punctuation=";")
    assert not is_ep_anchor_text(".", punctuation=";")
    assert is_ep_anchor_text("。", punctuation="。")


def test_smollm2_ep_anchor_tokens(tok, vocab_text):
    ids = ep_anchor_ids(tok)
    anchors = set(ids)
    assert len(ids) == len(anchors)
    # The plain enders are single SmolLM2 tokens and anchors, as are merged punctuation tokens.
    for text in [".", "?", "!", '."', ".”", "...", ".)", "?!", ").", "!!", '?"', "!)"]:
        assert single_id(tok, text) in anchors, text
    # Punctuation that does not end a sentence, or continues after the period, is not an anchor.
    for text in [",", ";", ":", ".,", ".;", "./", "#!/", "?,", "._"]:
        assert single_id(tok, text) not in anchors, text
    assert all(tid not in anchors for tid in tok.all_special_ids)
    # Every anchor is whitespace + punctuation only, and ends (before closers) with . ? or !
    for tid in ids:
        text = vocab_text[tid]
        assert text.strip() and not _has_alnum(text), repr(text)
        assert text.strip().rstrip("\"')]}»”’")[-1] in ".?!", repr(text)
    # ... and the rule finds every such token of the vocabulary (checked independently here).
    expected = {
        tid
        for tid, text in vocab_text.items()
        if tid not in tok.all_special_ids
        and text.strip()
        and all(unicodedata.category(c).startswith("P") for c in text.strip())
        and text.strip().rstrip("\"')]}»”’")[-1:] in {".", "?", "!"}
    }
    assert anchors == expected


def test_smollm2_never_merges_period_with_letters_or_digits(tok, vocab_text):
    """GPT-2 byte-level pre-tokenisation keeps '.' apart from words and digits, so SmolLM2 has no
    "Mr." / ".com" / "3." tokens: EP therefore marks the '.' of abbreviations, decimals and URLs
    too (the same as the authors' Llama-2 id-29889 rule)."""
    merged = [t for t in vocab_text.values() if any(c in t for c in ".?!") and _has_alnum(t)]
    assert merged == []
    anchors = set(ep_anchor_ids(tok))
    text = "Dr. Smith paid 3.14 dollars at www.example.com. Really?"
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(i in anchors for i in ids) == text.count(".") + text.count("?")


def test_smollm2_period_newline_is_two_tokens(tok):
    """There is no ".\\n" token: whitespace is its own pre-token, so the '.' before a newline is the anchor."""
    anchors = set(ep_anchor_ids(tok))
    ids = tok.encode("End.\nNext.\n\nThe end.\n\n", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["End", ".", "Ċ", "Next", ".", "Ċ", "Ċ", "The", "Ġend", ".", "ĊĊ"]
    assert [i in anchors for i in ids] == [p == "." for p in pieces]


def test_ep_anchor_ids_with_unknown_punctuation_is_an_error(tok):
    with pytest.raises(ValueError, match="ep_punctuation"):
        ep_anchor_ids(tok, punctuation="")
    with pytest.raises(ValueError, match="No token"):
        ep_anchor_ids(tok, punctuation="\u2e2e")  # reversed question mark: not in the vocabulary alone


# --- prepare_model on SmolLM2 ----------------------------------------------------------------------


def test_prepare_ep_on_smollm2(ep_model_tok, tok, base_model):
    model, tokenizer = ep_model_tok
    cfg = anllm.get_anchor_config(model)
    assert cfg.mode == "ep" and cfg.anchor_token_ids == ep_anchor_ids(tok)
    assert len(tokenizer) == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert torch.equal(model.get_input_embeddings().weight, base_model.get_input_embeddings().weight)
    assert anllm.is_anchor_aware(model)


def test_ep_smollm2_anchor_cache_matches_full_cache(ep_model_tok):
    """Lossless anchor cache on the real model: same greedy tokens, fewer kept keys/values."""
    model, tokenizer = ep_model_tok
    prompt = "The cat sat on the mat. It was warm. The dog slept nearby. Then the"
    enc = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(attention_mask=enc.attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        full = model.generate(enc.input_ids, past_key_values=DynamicCache(), **kwargs)
        cache = anllm.AnchorCache()
        pruned = model.generate(enc.input_ids, past_key_values=cache, **kwargs)
    assert torch.equal(full, pruned)
    stats = cache.stats()
    assert stats["kept"] < stats["seen"]


def test_prepare_ac_on_smollm2(ac_model_tok, tok):
    model, tokenizer = ac_model_tok
    new_id = ac_token_id(tokenizer)
    assert new_id == len(tok)  # appended after the 49152 original tokens
    assert len(tokenizer) == len(tok) + 1
    assert tokenizer.added_tokens_decoder[new_id].special
    cfg = anllm.get_anchor_config(model)
    assert cfg.mode == "ac" and cfg.anchor_token_ids == [new_id] and cfg.anchor_token == AC_TOKEN
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    assert emb_in.shape[0] == emb_out.shape[0] == len(tokenizer)
    assert model.config.tie_word_embeddings and emb_in.data_ptr() == emb_out.data_ptr()
    dot = single_id(tokenizer, ".")
    assert torch.equal(emb_in[new_id], emb_in[dot])
    assert torch.equal(emb_out[new_id], emb_out[dot])


def test_ac_token_is_never_split(ac_model_tok):
    _, tokenizer = ac_model_tok
    ac = ac_token_id(tokenizer)
    assert tokenizer.encode(AC_TOKEN, add_special_tokens=False) == [ac]
    text = "Hi.<AC> There.<AC>\nx<AC><AC>y <<AC>> z"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(ac) == text.count(AC_TOKEN)
    assert tokenizer.decode(ids) == text
    assert AC_TOKEN not in tokenizer.decode(ids, skip_special_tokens=True)
    # The anchor follows the period directly; the next word keeps its leading-space token.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Hi.<AC> There", add_special_tokens=False)) == [
        "Hi", ".", AC_TOKEN, "ĠThere"
    ]


def test_prepare_ac_twice_adds_nothing(ac_model_tok):
    model, tokenizer = ac_model_tok
    before = (len(tokenizer), model.get_input_embeddings().weight.shape[0], ac_token_id(tokenizer))
    anllm.prepare_model(model, tokenizer, mode="ac")
    assert (len(tokenizer), model.get_input_embeddings().weight.shape[0], ac_token_id(tokenizer)) == before


def test_ac_tokenizer_save_load_keeps_token(ac_model_tok, tmp_path):
    model, tokenizer = ac_model_tok
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert ac_token_id(again) == ac_token_id(tokenizer)
    assert again.encode("a.<AC>", add_special_tokens=False) == tokenizer.encode("a.<AC>", add_special_tokens=False)
    anllm.prepare_model(model, again)  # the saved settings accept the reloaded tokenizer


def test_ac_needs_the_token(tok):
    with pytest.raises(ValueError, match="prepare_model"):
        ac_token_id(tok)


# --- AC insertion on real text ---------------------------------------------------------------------


@pytest.mark.parametrize("splitter", ["blingfire", "pysbd"])
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dr. Smith arrived at 9 a.m. on Monday. He paid 3.14 dollars.",
         "Dr. Smith arrived at 9 a.m. on Monday.<AC> He paid 3.14 dollars.<AC>"),
        ("Mr. and Mrs. Smith live in the U.S. They like it.",
         "Mr. and Mrs. Smith live in the U.S.<AC> They like it.<AC>"),
        ('She said, "Stop." He stopped.', 'She said, "Stop."<AC> He stopped.<AC>'),
        ("(This is in parens.) Next.", "(This is in parens.)<AC> Next.<AC>"),
        ("Grüße aus München. Das ist „schön“! Ünïcödé 😀 geht’s.",
         "Grüße aus München.<AC> Das ist „schön“!<AC> Ünïcödé 😀 geht’s.<AC>"),
        ("First line.\nSecond line without period\n\nThird. Fourth!\r\nFifth?",
         "First line.<AC>\nSecond line without period<AC>\n\nThird.<AC> Fourth!<AC>\r\nFifth?<AC>"),
        ("No final punctuation here", "No final punctuation here<AC>"),
        ("  Leading space. Trailing space.  ", "  Leading space.<AC> Trailing space.<AC>  "),
        ("", ""),
        ("   \n\n  ", "   \n\n  "),
    ],
)
def test_insert_anchor_token(text, expected, splitter):
    assert insert_anchor_token(text, splitter=splitter) == expected
    assert insert_anchor_token(text, splitter=splitter).replace(AC_TOKEN, "") == text


@pytest.mark.parametrize("splitter", ["blingfire", "pysbd"])
def test_insert_after_last_false(splitter):
    text = "One sentence here. Another one there. The last one"
    assert insert_anchor_token(text, splitter=splitter, after_last=False) == (
        "One sentence here.<AC> Another one there.<AC> The last one"
    )
    assert insert_anchor_token("Only one.", splitter=splitter, after_last=False) == "Only one."
    assert insert_anchor_token("", splitter=splitter, after_last=False) == ""


def test_insert_custom_token():
    assert insert_anchor_token("A b. C d.", token="<X>") == "A b.<X> C d.<X>"


def test_unknown_splitter_is_an_error():
    with pytest.raises(ValueError, match="splitter"):
        insert_anchor_token("A. B.", splitter="nltk")  # type: ignore[arg-type]


def _real_docs(shared_data, n: int) -> list[str]:
    path = shared_data / "pretrain_text" / "lee_background_news.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


@pytest.mark.parametrize("splitter", ["blingfire", "pysbd"])
def test_one_ac_id_per_sentence_on_real_text(ac_model_tok, shared_data, splitter):
    _, tokenizer = ac_model_tok
    ac = ac_token_id(tokenizer)
    docs = _real_docs(shared_data, 25)
    total = 0
    for doc in docs:
        n = len(sentence_spans(doc, splitter))
        for after_last, want in [(True, n), (False, max(n - 1, 0))]:
            marked = insert_anchor_token(doc, splitter=splitter, after_last=after_last)
            ids = tokenizer.encode(marked, add_special_tokens=False)
            assert ids.count(ac) == want
            assert tokenizer.decode(ids) == marked
        # Inserting <AC> leaves the tokens of the original text untouched around it.
        plain = tokenizer.encode(doc, add_special_tokens=False)
        marked_ids = tokenizer.encode(insert_anchor_token(doc, splitter=splitter), add_special_tokens=False)
        assert [i for i in marked_ids if i != ac] == plain
        total += n
    assert total > 3 * len(docs)  # real news paragraphs: several sentences each


def test_sentence_spans_are_character_offsets():
    """blingfire reports offsets into the str (code points), also for non-ASCII and astral text."""
    text = "Grüße „aus“ München 😀. Zweiter Satz! Dritter — letzter?"
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans] == ["Grüße „aus“ München 😀.", "Zweiter Satz!", "Dritter — letzter?"]
    assert [text[s:e] for s, e in sentence_spans(text, "pysbd")][-1] == "Dritter — letzter?"


def test_pysbd_closing_quote_stays_with_its_sentence():
    """pysbd may open the next segment with the previous sentence's closing quote (seen in the Lee
    news corpus); the anchor must come after the quote, never between '.' and '"'."""
    text = (
        '"Let the two countries move towards peace. "However, we are fully prepared to face all '
        'consequences." The President said he had support.'
    )
    marked = insert_anchor_token(text, splitter="pysbd")
    assert '.<AC>"' not in marked and '<AC>"<AC>' not in marked
    assert marked.endswith('consequences."<AC> The President said he had support.<AC>')
    assert all(text[s] != '"' or s == 0 for s, _ in sentence_spans(text, "pysbd"))


@pytest.mark.parametrize("splitter", ["blingfire", "pysbd"])
@pytest.mark.parametrize("sep", ["\n", "\r\n", "\x0c", "\x85", "\u2028", "\u2029"])
def test_every_line_break_ends_a_sentence_before_the_break(sep, splitter):
    """str.splitlines() breaks on more than \\r and \\n; the anchor goes before any of them, once."""
    assert insert_anchor_token(f"Hi there.{sep}Next one.", splitter=splitter) == f"Hi there.<AC>{sep}Next one.<AC>"


@pytest.mark.parametrize("splitter", ["blingfire", "pysbd"])
@pytest.mark.parametrize(
    "text, expected",
    [
        # pysbd splits after '?' / '.' when punctuation follows directly (seen in the Wikipedia sample).
        ("Proudhon wrote What is Property?, published in 1840. It was read widely.",
         "Proudhon wrote What is Property?, published in 1840.<AC> It was read widely.<AC>"),
        ("It ran for a substantial period of time.. It has not met with success.",
         "It ran for a substantial period of time..<AC> It has not met with success.<AC>"),
        ("你好。再见。", "你好。<AC>再见。<AC>"),  # no whitespace between sentences: still split
    ],
)
def test_anchor_never_cuts_glued_punctuation(text, expected, splitter):
    assert insert_anchor_token(text, splitter=splitter) == expected
