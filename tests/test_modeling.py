"""Anchor-aware models (anllm.modeling): backends, causal switch, NaN safety, save/load, errors.

All on CPU with tiny random Llamas and word-level tokenizers built here. The flex_attention test
compiles through inductor (a C++ compiler is needed): ~40 s the first time on 2 cores, a few seconds
once inductor's on-disk cache is warm. The rest: ~10 s.
"""

from __future__ import annotations

import os
import shutil

# Local files only; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import anllm
from oracles import reference_mask
from anllm.testing import tiny_llama, word_tokenizer



EP_WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(120)]  # 128 tokens, the tiny_llama vocab
EP_IDS = [4, 5, 6]  # ".", "!", "?"


def ep_model(attn: str = "sdpa", **prepare_kwargs) -> torch.nn.Module:
    model, _ = anllm.prepare_model(
        tiny_llama(attn_implementation=attn), word_tokenizer(EP_WORDS), "ep", **prepare_kwargs
    )
    assert model.config.anllm["anchor_token_ids"] == EP_IDS
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids / attention_mask / document_ids with left and right padding, packed documents, several
    anchor kinds, adjacent anchors, and a fully padded row."""
    g = torch.Generator().manual_seed(seed)
    B, L = 4, 20
    ids = torch.randint(7, 128, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    doc = torch.zeros(B, L, dtype=torch.long)
    ids[0, [3, 9, 10, 19]] = torch.tensor([4, 5, 4, 6])  # adjacent anchors, anchor last
    am[1, :5] = 0  # left padding
    ids[1, [7, 12]] = torch.tensor([6, 4])
    doc[1, 11:] = 1  # two packed documents
    am[2, 14:] = 0  # right padding
    ids[2, [0, 4, 8]] = 4  # anchor first
    doc[2, 6:] = 1
    doc[2, 10:] = 2
    am[3] = 0  # all padding
    ids[am == 0] = 0
    return ids, am, doc


def real_positions(am: torch.Tensor) -> torch.Tensor:
    return am.bool()


# --- the rule reaches the model ------------------------------------------------------------------


@torch.no_grad()
def test_prepared_model_applies_the_rule() -> None:
    """A prepared model equals the plain model fed the brute-force AnSAN mask as a 4D mask."""
    ids, am, doc = batch()
    got = ep_model()(ids, attention_mask=am, document_ids=doc).logits
    is_anchor = torch.isin(ids, torch.tensor(EP_IDS))
    mask = torch.tensor(
        [
            reference_mask(is_anchor[b].tolist(), am[b].bool().tolist(), doc[b].tolist())
            for b in range(len(ids))
        ]
    )[:, None]
    plain = tiny_llama()  # same seed, same weights, no hooks
    want = plain(ids, attention_mask=mask).logits
    real = real_positions(am)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ansan_differs_from_causal_and_can_be_switched_off() -> None:
    ids, am, _ = batch()
    model = ep_model()
    plain = tiny_llama()
    causal = plain(ids, attention_mask=am).logits
    ansan = model(ids, attention_mask=am).logits
    real = real_positions(am)
    assert (ansan[real] - causal[real]).abs().max() > 1e-2  # the rule changes the output
    with anllm.anchor_attention(model, enabled=False):
        assert not anllm.is_anchor_aware(model)
        off = model(ids, attention_mask=am).logits
    torch.testing.assert_close(off[real], causal[real], atol=1e-5, rtol=1e-5)
    assert anllm.is_anchor_aware(model)  # restored after the block
    torch.testing.assert_close(model(ids, attention_mask=am).logits[real], ansan[real])


@torch.no_grad()
def test_eager_and_sdpa_agree() -> None:
    ids, am, doc = batch()
    model = ep_model("sdpa")
    sdpa = model(ids, attention_mask=am, document_ids=doc).logits
    model.config._attn_implementation = "eager"
    eager = model(ids, attention_mask=am, document_ids=doc).logits
    real = real_positions(am)
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(eager).all() and torch.isfinite(sdpa).all()


def _cxx_compiler() -> str | None:
    return (
        shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    )


@torch.no_grad()
def test_flex_attention_forward_agrees_with_sdpa() -> None:
    """flex_attention gets the rule as a BlockMask (forward, compiled CPU kernel; the BlockMask itself,
    its memo, training with gradient checkpointing and backward: tests/test_flex.py)."""
    if _cxx_compiler() is None:
        from conftest import skip_or_fail

        skip_or_fail(
            "flex_attention on CPU compiles through inductor, which needs a C++ compiler "
            "(g++/clang++): none found"
        )
    ids, am, doc = batch()
    model = ep_model("sdpa")
    sdpa = model(ids, attention_mask=am, document_ids=doc).logits
    model.config._attn_implementation = "flex_attention"
    flex = model(ids, attention_mask=am, document_ids=doc).logits
    real = real_positions(am)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(flex).all()


@torch.no_grad()
def test_inputs_embeds_with_anchor_mask() -> None:
    """Without input_ids the caller says where the anchors are (anchor_mask=)."""
    ids, am, doc = batch()
    model = ep_model()
    want = model(ids, attention_mask=am, document_ids=doc).logits
    embeds = model.get_input_embeddings()(ids)
    is_anchor = torch.isin(ids, torch.tensor(EP_IDS))
    got = model(
        inputs_embeds=embeds, anchor_mask=is_anchor, attention_mask=am, document_ids=doc
    ).logits
    real = real_positions(am)
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="anchor_mask"):
        model(inputs_embeds=embeds, attention_mask=am)


# --- no NaN with a fully padded row --------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fully_padded_row_gives_no_nan(attn: str) -> None:
    ids, am, doc = batch()
    model = ep_model(attn).train()
    labels = ids.masked_fill(am == 0, -100)
    out = model(ids, attention_mask=am, document_ids=doc, labels=labels)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- save / load ---------------------------------------------------------------------------------


AC_WORDS = [".", ",", "the", "cat", "sat", "on", "mat", "a", "dog"] + [f"w{i}" for i in range(23)]


def ac_pair(tied: bool) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tok = word_tokenizer(AC_WORDS)
    model = tiny_llama(vocab_size=len(tok))
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, tok


@pytest.mark.parametrize("tied", [False, True])
def test_ac_embedding_rows_start_from_period(tied: bool) -> None:
    model, tok = ac_pair(tied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    period = tok.convert_tokens_to_ids(".")
    n = len(tok)
    model, tok = anllm.prepare_model(model, tok, "ac")
    ac = tok.convert_tokens_to_ids(anllm.AC_TOKEN)
    assert ac == n and len(tok) == n + 1
    assert model.config.anllm["anchor_token_ids"] == [ac]
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb_in.shape[0] == emb_out.shape[0] == n + 1
    torch.testing.assert_close(emb_in[ac], before_in[period], atol=0, rtol=0)
    torch.testing.assert_close(emb_out[ac], before_out[period], atol=0, rtol=0)
    torch.testing.assert_close(emb_in[:n], before_in, atol=0, rtol=0)  # old rows untouched
    torch.testing.assert_close(emb_out[:n], before_out, atol=0, rtol=0)
    assert (emb_in.data_ptr() == emb_out.data_ptr()) == tied  # tying survives the resize
    # <AC> is one token wherever it appears in text, and an anchor
    assert tok("the cat . <AC> sat").input_ids == [
        tok.convert_tokens_to_ids(w) for w in ["the", "cat", "."]
    ] + [ac, tok.convert_tokens_to_ids("sat")]
    # idempotent: preparing again adds nothing and keeps the rows
    model, tok = anllm.prepare_model(model, tok, "ac")
    assert len(tok) == n + 1 and model.get_input_embeddings().weight.shape[0] == n + 1


@torch.no_grad()
@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_save_load_round_trip(mode: str, tmp_path) -> None:
    if mode == "ep":
        model, tok = tiny_llama(), word_tokenizer(EP_WORDS)
    else:
        model, tok = ac_pair(tied=False)
    model, tok = anllm.prepare_model(model, tok, mode, num_sink_tokens=1)
    saved = dict(model.config.anllm)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    anchor = saved["anchor_token_ids"][0]
    ids = torch.tensor(
        [[7, 8, anchor, 9, 10, 11, anchor, 12, 13], [0, 0, 7, 9, anchor, 8, 10, 11, 12]]
    )
    am = (ids != 0).long()
    want = model(ids, attention_mask=am).logits
    real = real_positions(am)

    raw = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert raw.config.anllm == saved  # settings survive save_pretrained
    assert not anllm.is_anchor_aware(raw)  # hooks do not
    raw_logits = raw(ids, attention_mask=am).logits
    assert (raw_logits[real] - want[real]).abs().max() > 1e-2

    loaded, tok2 = anllm.from_pretrained(str(tmp_path))
    assert anllm.is_anchor_aware(loaded)
    assert loaded.config.anllm == saved
    assert anllm.get_anchor_config(loaded).anchor_token_ids == saved["anchor_token_ids"]
    if mode == "ac":
        assert tok2.convert_tokens_to_ids(anllm.AC_TOKEN) == anchor
    got = loaded(ids, attention_mask=am).logits
    torch.testing.assert_close(
        got[real], want[real], atol=0, rtol=0
    )  # identical weights, identical mask

    # prepare_model(mode=None) on the raw load re-applies the same settings
    anllm.prepare_model(raw, tok2)
    torch.testing.assert_close(
        raw(ids, attention_mask=am).logits[real], want[real], atol=1e-6, rtol=1e-6
    )


# --- clear errors --------------------------------------------------------------------------------


def test_ac_model_with_tokenizer_lacking_ac(tmp_path) -> None:
    model, _ = anllm.prepare_model(*ac_pair(tied=False), "ac")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<AC>"):
        anllm.prepare_model(loaded, word_tokenizer(AC_WORDS))
    # a tokenizer whose <AC> has another id is refused too
    other = word_tokenizer(AC_WORDS + ["extra"])
    other.add_special_tokens({"additional_special_tokens": [anllm.AC_TOKEN]})
    with pytest.raises(ValueError, match="trained with"):
        anllm.prepare_model(loaded, other)


def test_ep_without_punctuation_is_refused() -> None:
    with pytest.raises(ValueError, match="punctuation"):
        anllm.prepare_model(tiny_llama(), word_tokenizer(EP_WORDS), "ep", ep_punctuation="")
    no_stops = word_tokenizer([",", ";", "("] + [f"w{i}" for i in range(20)])
    with pytest.raises(ValueError, match="EP anchor"):
        anllm.prepare_model(tiny_llama(), no_stops, "ep")


def test_unknown_mode_and_missing_settings() -> None:
    with pytest.raises(ValueError, match="Unknown anchor mode"):
        anllm.prepare_model(tiny_llama(), word_tokenizer(EP_WORDS), "xyz")
    with pytest.raises(ValueError, match="no saved anchor settings"):
        anllm.prepare_model(tiny_llama(), word_tokenizer(EP_WORDS))
    with (
        pytest.raises(ValueError, match="not anchor-aware"),
        anllm.anchor_attention(tiny_llama(), enabled=True),
    ):
        pass


def test_flash_attention_is_refused() -> None:
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        anllm.prepare_model(model, word_tokenizer(EP_WORDS), "ep")
    # switching a prepared model to flash attention fails at the next forward, not silently
    model = ep_model()
    model.config._attn_implementation = "flash_attention_2"
    ids = torch.tensor([[7, 8, 4, 9]])
    with pytest.raises(ValueError, match="flash_attention_2"):
        model(ids)


def test_document_ids_with_a_cache_are_refused() -> None:
    model = ep_model()
    ids = torch.tensor([[7, 8, 4, 9]])
    with pytest.raises(ValueError, match="document_ids"):
        model(
            ids,
            document_ids=torch.zeros_like(ids),
            past_key_values=anllm.AnchorCache(),
            use_cache=True,
        )
    with pytest.raises(ValueError, match="document_ids"):
        model(ids, document_ids=torch.zeros_like(ids), use_cache=True)


@torch.no_grad()
def test_document_ids_in_eval_mode_need_no_use_cache_flag() -> None:
    """Scoring packed rows in eval mode works as is (no implicit cache is made for them)."""
    ids, am, doc = batch()
    model = ep_model()
    assert not model.training and model.config.use_cache
    out = model(ids, attention_mask=am, document_ids=doc)
    assert out.past_key_values is None
    explicit = model(ids, attention_mask=am, document_ids=doc, use_cache=False).logits
    torch.testing.assert_close(out.logits, explicit, atol=0, rtol=0)


@torch.no_grad()
def test_packed_documents_do_not_see_each_other() -> None:
    """Each document of a packed row scores as if alone (RoPE is relative: offsets are harmless)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(7, 128, (1, 9), generator=g), torch.randint(7, 128, (1, 7), generator=g)
    a[0, [2, 5]] = 4
    b[0, 3] = 5
    model = ep_model(num_sink_tokens=1)
    packed = torch.cat([a, b], 1)
    doc = torch.cat([torch.zeros_like(a), torch.ones_like(b)], 1)
    got = model(packed, document_ids=doc).logits
    torch.testing.assert_close(got[:, :9], model(a).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 9:], model(b).logits, atol=1e-5, rtol=1e-5)
    unpacked = model(packed).logits  # without document_ids the second document sees the first
    assert (unpacked[:, 9:] - got[:, 9:]).abs().max() > 1e-2
