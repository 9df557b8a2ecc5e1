"""Tiny random models and tokenizers for tests and benchmarks (CPU, seconds)."""

from __future__ import annotations

from typing import Any

from .models.tiny import tiny_llama  # noqa: F401 - re-exported: tests build tiny models from here


SPECIAL_WORDS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer whose ids tests can write by hand: 0-3 are
    ``<pad> <s> </s> <unk>``, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL_WORDS + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def bpe_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE trained in memory on ``texts`` (pad=0, bos=1, eos=2, like ``tiny_llama``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
