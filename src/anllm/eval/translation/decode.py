"""Translating a test set with one method: batched, left-padded decoding (greedy, or the authors'
sampling) through :func:`anllm.eval.generation.greedy_generate`, with the cache accounting per segment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...data.sft import marking_for
from ...data.sources import TRANSLATION_INSTRUCTION
from ...modeling import get_anchor_config
from ..generation import canonical_method, eos_ids_of, greedy_generate, make_cache
from .prompts import PROMPT_FORMATS, SRC_CACHE, build_chat_prompt, build_prompt, clean_output, source_span, token_mask


def sampling_processor(decoding: str) -> Any:
    """None for greedy decoding; the authors' sampling (temperature 0.1, top-k 40, top-p 0.1) as
    transformers' own logits warpers for ``decoding="paper"``."""
    if decoding == "greedy":
        return None
    if decoding != "paper":
        raise ValueError(f"translation.decoding={decoding!r}: choose greedy or paper.")
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    return LogitsProcessorList([TemperatureLogitsWarper(0.1), TopKLogitsWarper(40), TopPLogitsWarper(0.1)])


@dataclass
class TranslationRun:
    """One method's outputs and cache accounting, in segment order."""

    method: str
    hypotheses: list[str]
    raw: list[str]
    prompt_tokens: list[int]
    gen_tokens: list[int]
    seen: list[int]
    kept: list[int]
    max_kept: list[int]
    time_s: float
    trace: list[list[int]] = field(default_factory=list)  # [steps][rows of the first batch]
    trace_segments: list[int] = field(default_factory=list)  # segment index of each trace column
    prompts: list[str] = field(default_factory=list)

    def cache_metrics(self) -> dict[str, float]:
        total_seen = sum(self.seen)
        return {
            "c_red": 1.0 - sum(self.kept) / total_seen if total_seen else 0.0,
            "c_red_peak": 1.0 - sum(self.max_kept) / total_seen if total_seen else 0.0,
            "max_kv": sum(self.max_kept) / len(self.max_kept) if self.max_kept else 0.0,
            "kv_kept": int(sum(self.kept)),
            "kv_total": int(total_seen),
            "time_s": self.time_s,
            "gen_tokens": int(sum(self.gen_tokens)),
            "tokens_per_s": sum(self.gen_tokens) / self.time_s if self.time_s > 0 else 0.0,
        }


def translate(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    method: str,
    *,
    batch_size: int = 4,
    max_new_tokens: int = 512,
    instruction: str = TRANSLATION_INSTRUCTION,
    splitter: str | None = None,
    prompt_format: str = "alpaca",
    record_trace: bool = True,
    progress: bool = True,
    prefill_chunk_size: int | None = None,
    template: str = "anllm",
    src_cache: str = "prompt",
    position_mode: str = "true",
    decoding: str = "greedy",
    seed: int = 0,
) -> TranslationRun:
    """Translate ``sources`` with ``method`` (batched, left-padded, longest prompts first).

    ``template``: the SFT prompt template (anllm | paper); ``src_cache``: what ``anchor+src`` keeps
    (the whole ``prompt``, or the ``source`` span only, as the authors); ``position_mode``: true |
    compact positions in anchor caches; ``decoding``: greedy | paper (the authors' sampling)."""
    from tqdm.auto import tqdm

    method = canonical_method(method)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if src_cache not in SRC_CACHE:
        raise ValueError(f"translation.src_cache={src_cache!r}: choose one of {SRC_CACHE}.")
    marking = marking_for(get_anchor_config(model), splitter)
    anchor_token = marking.token if marking is not None else None
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"translation.prompt_format={prompt_format!r}: choose one of {PROMPT_FORMATS}.")
    if prompt_format == "chat":
        prompts = [build_chat_prompt(s, tokenizer, marking=marking, instruction=instruction) for s in sources]
    else:
        prompts = [build_prompt(s, marking=marking, instruction=instruction, template=template) for s in sources]
    spans = [source_span(p, s, marking) for p, s in zip(prompts, sources)]
    sampler = sampling_processor(decoding)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    eos = eos_ids_of(model, tokenizer)
    # A chat template already spells out its special tokens.
    encoded = [tokenizer(p, add_special_tokens=prompt_format != "chat")["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    n = len(prompts)
    res: dict[str, list[Any]] = {k: [None] * n for k in ("hyp", "raw", "gen", "seen", "kept", "max_kept")}
    total_time = 0.0
    trace: list[list[int]] = []
    trace_segments: list[int] = []
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=f"translate [{method}]", disable=not progress, leave=False)):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        am = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            am[r, width - len(encoded[i]) :] = 1
        cache = make_cache(method, position_mode)
        if method == "anchor+src" and src_cache == "source":
            keep = torch.zeros((len(idx), width), dtype=torch.bool)
            for r, i in enumerate(idx):
                keep[r, width - len(encoded[i]) :] = token_mask(tokenizer, prompts[i], spans[i], len(encoded[i]),
                                                               prompt_format != "chat")
            cache.keep_prompt(keep.to(device))  # type: ignore[union-attr]
        out = greedy_generate(
            model,
            ids.to(device),
            am.to(device),
            method,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos,
            pad_token_id=pad_id,
            record_trace=record_trace and b == 0,
            prefill_chunk_size=prefill_chunk_size,
            cache=cache,
            sampler=sampler,
            seed=seed + b,
        )
        total_time += out.time_s
        if b == 0:
            trace, trace_segments = out.trace, list(idx)
        for r, i in enumerate(idx):
            raw = tokenizer.decode(out.tokens[r, : out.lengths[r]].tolist(), skip_special_tokens=True)
            res["raw"][i] = raw
            res["hyp"][i] = clean_output(raw, anchor_token)
            res["gen"][i] = out.lengths[r]
            res["seen"][i] = out.seen[r]
            res["kept"][i] = out.kept[r]
            res["max_kept"][i] = out.max_kept[r]
    return TranslationRun(
        method=method,
        hypotheses=res["hyp"],
        raw=res["raw"],
        prompt_tokens=[len(e) for e in encoded],
        gen_tokens=res["gen"],
        seen=res["seen"],
        kept=res["kept"],
        max_kept=res["max_kept"],
        time_s=total_time,
        trace=trace,
        trace_segments=trace_segments,
        prompts=prompts,
    )
