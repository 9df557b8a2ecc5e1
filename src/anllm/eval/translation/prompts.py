"""The translation prompt: the SFT data's own Alpaca template (or the tokenizer's chat template),
anchors placed as in training, and the model output cut back to one hypothesis line."""

from __future__ import annotations

from typing import Any

import torch

from ...anchors import Marking
from ...data.sft import build_alpaca_prompt, mark_sentences
from ...data.sources import TRANSLATION_INSTRUCTION


def build_prompt(
    source: str,
    *,
    anchor_token: str | None = None,
    instruction: str = TRANSLATION_INSTRUCTION,
    splitter: str = "blingfire",
    marking: Marking | None = None,
    template: str = "anllm",
) -> str:
    """The Alpaca ``prompt_input`` prompt exactly as SFT builds it (:func:`anllm.data.sft.build_alpaca_prompt`);
    for AC models (``marking``, or just ``anchor_token``) anchors go where the SFT ``template`` put them."""
    if marking is None and anchor_token is not None:
        marking = Marking(anchor_token, splitter)  # type: ignore[arg-type]
    return build_alpaca_prompt(instruction, source, marking, template)


PROMPT_FORMATS = ("alpaca", "chat")


def build_chat_prompt(
    source: str,
    tokenizer: Any,
    *,
    anchor_token: str | None = None,
    instruction: str = TRANSLATION_INSTRUCTION,
    splitter: str = "blingfire",
    marking: Marking | None = None,
) -> str:
    """The request as one user turn of the tokenizer's chat template (for chat-tuned base models,
    e.g. SmolLM2-Instruct, that were never trained on the Alpaca template)."""
    if marking is None and anchor_token is not None:
        marking = Marking(anchor_token, splitter)  # type: ignore[arg-type]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("translation.prompt_format=chat needs a tokenizer with a chat template; use prompt_format=alpaca.")
    content = f"{mark_sentences(instruction, marking)}\n\n{mark_sentences(source, marking)}"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def clean_output(text: str, anchor_token: str | None = None) -> str:
    """One hypothesis line: anchors removed, cut where the model starts a new "###" section,
    whitespace (newlines included) collapsed so files stay line-aligned."""
    if anchor_token:
        text = text.replace(anchor_token, "")
    text = text.split("###", 1)[0]
    return " ".join(text.split())


SRC_CACHE = ("prompt", "source")


def source_span(prompt: str, source: str, marking: Marking | None) -> tuple[int, int]:
    """Character span of the (marked) source inside ``prompt`` (the last occurrence: the input section)."""
    marked = mark_sentences(source.strip(), marking)
    start = prompt.rfind(marked)
    if start < 0:
        raise ValueError("The source text is not found verbatim in the prompt; cannot keep its span (src_cache=source).")
    return start, start + len(marked)


def token_mask(tokenizer: Any, prompt: str, span: tuple[int, int], length: int, add_special_tokens: bool) -> torch.Tensor:
    """``[length]`` bool: the prompt tokens that overlap the character span."""
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:length]
    s, e = span
    return torch.tensor([a < e and b > s and b > a for a, b in offsets], dtype=torch.bool)
