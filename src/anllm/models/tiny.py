"""``model=tiny``: a random tiny Llama with a real (small) tokenizer, offline and deterministic.

Used by ``train.py model=tiny`` (smoke runs, tests) and by the benchmarks. Why build the tokenizer
here: tests and smoke runs must not depend on a download or on the SmolLM2 conversion, and a
49k-token vocabulary would dominate a 100k-parameter model. A byte-level BPE (the GPT-2/Llama-3
family's scheme) trained on Python's own documentation (``pydoc_data.topics``, shipped with CPython)
has "." and the other sentence-ending marks as tokens, so EP finds anchors and AC can initialise
``<AC>`` from ".". Training takes about a second and gives the same vocabulary every time; the model
is saved with it, so a checkpoint never needs the builder again.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the ids tiny_llama uses


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped-down Python builds
        raise RuntimeError("model=tiny trains its tokenizer on pydoc_data.topics, which this Python lacks.") from e
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: BOS in front of every text, nothing at the end (documents get EOS from the data code).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024, model_max_length: int = 8192) -> Any:
    """A fresh ``PreTrainedTokenizerFast`` (callers may add tokens to it; the cache is not touched)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"model.tiny.vocab_size={vocab_size} is too small: byte-level BPE needs 256 bytes + specials.")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(int(vocab_size))),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )


def tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **overrides: Any,
):
    """A randomly initialised Llama (GQA, RoPE) small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = attn_implementation
    return model.eval()


def tiny_model_and_tokenizer(
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    context_length: int = 8192,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Random tiny Llama (:func:`tiny_llama`) sized to the tiny tokenizer's vocabulary."""
    tok = tiny_tokenizer(vocab_size, context_length)
    model = tiny_llama(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=context_length,
        attn_implementation=attn_implementation,
        seed=seed,
    )
    return model.train(), tok
