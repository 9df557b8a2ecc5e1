"""Report figures: files are written, non-empty PNGs, and show the data they should. Runtime: ~5 s."""

from __future__ import annotations

import pytest
import torch

import anllm
from anllm.eval import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_ansan_mask_plot_draws_the_mask(tmp_path):
    tokens = ["<s>", "The", " dog", ".", " It", " runs", "!", " Yes"]
    is_anchor = [t in (".", "!") for t in tokens]
    mask = plots.plot_ansan_mask(tokens, is_anchor, tmp_path / "mask.png")
    assert _is_png(tmp_path / "mask.png")
    assert torch.equal(mask, anllm.ansan_mask(torch.tensor([is_anchor]))[0])
    # what the picture must show: " Yes" sees both anchors and itself, not the finished sentences
    assert mask[7].nonzero().flatten().tolist() == [3, 6, 7]
    with pytest.raises(ValueError, match="tokens but is_anchor"):
        plots.plot_ansan_mask(tokens, is_anchor[:-1], tmp_path / "bad.png")


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_ansan_mask_for_text_uses_the_models_anchors(tmp_path):
    from anllm.testing import tiny_llama

    tok = _word_tokenizer(["the", "dog", "runs", "it", "barks", ".", "!", "yes"])
    model = tiny_llama(vocab_size=len(tok))
    anllm.prepare_model(model, tok, mode="ep")
    text = "the dog runs . it barks ! yes"
    mask = plots.plot_ansan_mask_for_text(model, tok, text, tmp_path / "m.png")
    ids = tok(text)["input_ids"]
    anchors = torch.tensor([[tok.convert_ids_to_tokens(i) in (".", "!") for i in ids]])
    assert anchors.sum() == 2
    assert _is_png(tmp_path / "m.png") and torch.equal(mask, anllm.ansan_mask(anchors)[0])
    short = plots.plot_ansan_mask_for_text(model, tok, text, tmp_path / "s.png", max_tokens=4)
    assert torch.equal(short, mask[:4, :4])
    plain = tiny_llama(vocab_size=len(tok))
    with pytest.raises(ValueError, match="anchor-aware"):
        plots.plot_ansan_mask_for_text(plain, tok, text, tmp_path / "p.png")


def test_cache_over_steps(tmp_path):
    traces = {"full": [10, 11, 12, 13], "anchor": [4, 5, 2, 3]}
    data = plots.plot_cache_over_steps(traces, tmp_path / "cache.png")
    assert data == traces and _is_png(tmp_path / "cache.png")
    with pytest.raises(ValueError):
        plots.plot_cache_over_steps({}, tmp_path / "none.png")


def test_quality_vs_reduction_from_rows(tmp_path):
    rows = [
        {"suite": "qa", "task": "arc_easy", "method": "full", "acc": 0.60, "acc_norm": 0.55, "c_red": 0.0},
        {"suite": "qa", "task": "arc_easy", "method": "anchor", "acc": 0.58, "acc_norm": 0.54, "c_red": 0.9},
        {"suite": "translation", "task": "wmt23_de_en", "method": "anchor+src", "bleu": 20.0, "comet": None, "c_red": 0.4},
        {"suite": "translation", "task": "wmt23_de_en", "method": "GPT4-5shot", "bleu": 47.9},  # external: no C⇓
        {"suite": "qa", "task": "boolq", "method": "error", "error": "boom"},
    ]
    points = plots.plot_quality_vs_reduction(rows, tmp_path / "q.png")
    assert _is_png(tmp_path / "q.png")
    assert [p[:2] for p in points] == [("arc_easy", "full"), ("arc_easy", "anchor"), ("wmt23_de_en", "anchor+src")]
    assert [x for p in points for x in p[2:]] == pytest.approx([0.0, 55.0, 90.0, 54.0, 40.0, 20.0])
    only_acc = plots.plot_quality_vs_reduction(rows, tmp_path / "acc.png", metric="acc")
    assert [p[3] for p in only_acc] == pytest.approx([60.0, 58.0])
    with pytest.raises(ValueError, match="No rows"):
        plots.plot_quality_vs_reduction(rows[3:], tmp_path / "none.png")
