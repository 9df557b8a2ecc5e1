"""Batched greedy decoding with a chosen attention/cache method, recording the KV cache per step.

Why our own loop and not ``model.generate``: ``generate`` keeps feeding finished rows (their pad
tokens count as real tokens in the attention mask), which would inflate a row's cache size and so
C⇓ and MaxKV in batched runs; the paper decodes one sentence at a time. Here a finished row's new
tokens are masked out (``attention_mask=0``), so the anchor cache drops them and every row's counts
are what batch-size-1 decoding would give. It also records the cache after every step for the
"cache size over generation steps" plot (on the device during the loop, read once after it: a
decode step reads the device twice, in the model's forward and for "are all rows done?"). On
unfinished rows it computes exactly what greedy ``generate`` computes (same positions from the
padding mask; tested).

Methods (shared names with the other suites):

* ``full``: causal attention, full cache (the AnSAN rule switched off on an anchor-aware model);
* ``ansan``: the AnSAN mask with a full ``DynamicCache`` (reference for losslessness);
* ``anchor``: AnSAN + :class:`anllm.AnchorCache` (source cache dropped; the paper's AnSAN row);
* ``anchor+src``: AnSAN + ``AnchorCache(keep_prefix=True)``: the prompt/source stays cached
  (the paper's "Src Cache" row).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers.cache_utils import Cache

from ..cache import AnchorCache
from . import methods as registry

# The generation methods and their aliases come from the registry (anllm.eval.methods).
METHODS = registry.names("translation")  # full, ansan, anchor, anchor+src
ANCHOR_METHODS = tuple(m for m in METHODS if registry.needs_anchors(m))
ALIASES = registry.ALIASES  # names used in the paper/brief, accepted on the command line


def canonical_method(name: str) -> str:
    """Validate a generation method name (accepting :data:`anllm.eval.methods.ALIASES`)."""
    return registry.canonical(name, "translation")


def make_cache(method: str, position_mode: str = "true") -> Cache:
    """A fresh cache for ``method`` (one per batch: a cache belongs to one batch); ``position_mode``
    is the anchor caches' (``"true"`` positions, or the authors' ``"compact"`` renumbering)."""
    return registry.new_cache(canonical_method(method), position_mode)


@contextlib.contextmanager
def method_attention(model: Any, method: str) -> Iterator[None]:
    """Attention rule for ``method``: causal for ``full``, AnSAN for the others (see
    :func:`anllm.eval.methods.attention`)."""
    with registry.attention(model, canonical_method(method)):
        yield


DEFAULT_PREFILL_CHUNK = 256  # tokens per prefill forward for anchor caches (measured fastest on CPU at 4k)


def prefill(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache,
    chunk_size: int | None = None, **kwargs: Any,
) -> Any:
    """Read a (left-padded) prompt into ``cache``; returns the last forward's output.

    With an :class:`AnchorCache` the prompt is read ``chunk_size`` tokens at a time (default
    :data:`DEFAULT_PREFILL_CHUNK`): each chunk attends only the kept anchors, the open sentence and
    itself, which is lossless and faster than one AnSAN forward over the whole prompt. Other caches
    gain nothing from chunks and read the prompt in one forward (``chunk_size`` forces chunks).
    """
    L = input_ids.shape[1]
    if isinstance(cache, AnchorCache) and cache.keep_prefix and cache.keep_mask is None and cache.tracker is None:
        cache.keep_prompt(torch.ones_like(attention_mask, dtype=torch.bool))  # the prompt is all these chunks
    if chunk_size is None:
        chunk_size = DEFAULT_PREFILL_CHUNK if isinstance(cache, AnchorCache) else L
    chunk_size = max(1, int(chunk_size))
    out = None
    for start in range(0, L, chunk_size):
        end = min(L, start + chunk_size)
        out = model(
            input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end], past_key_values=cache, use_cache=True, **kwargs,
        )
    return out


def kept_per_row(cache: Cache, attention_mask: torch.Tensor) -> list[int]:
    """Keys/values held per row right now (real tokens). A full cache holds every token seen."""
    if isinstance(cache, AnchorCache):
        st = cache.stats()
        return [int(x) for x in st.get("kept_per_row", [0] * attention_mask.shape[0])]
    return [int(x) for x in attention_mask.sum(-1).tolist()]


@dataclass
class BatchGeneration:
    """Greedy output of one batch plus its cache accounting (per row, batch order)."""

    tokens: torch.Tensor  # [B, T] new tokens, pad after a row's EOS
    lengths: list[int]  # new tokens per row, EOS included
    seen: list[int]  # tokens fed to the model per row (prompt + generated, the last one excluded)
    kept: list[int]  # keys/values held per row at the end
    max_kept: list[int]  # peak keys/values held per row
    time_s: float
    trace: list[list[int]] = field(default_factory=list)  # [steps][B] kept per row after each forward


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str,
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    record_trace: bool = False,
    on_step: Callable[[int, Cache], None] | None = None,
    prefill_chunk_size: int | None = None,
    cache: Cache | None = None,
    sampler: Any = None,
    seed: int = 0,
) -> BatchGeneration:
    """Decode a left-padded batch with ``method``'s attention and cache (see module doc): greedy, or
    sampled from the logits that ``sampler`` (a transformers ``LogitsProcessorList``) returns."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    device = input_ids.device
    B = input_ids.shape[0]
    cache = make_cache(method) if cache is None else cache
    gen = torch.Generator(device=device).manual_seed(seed)
    fed = input_ids

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if sampler is None:
            return logits.argmax(-1)
        probs = torch.softmax(sampler(fed, logits.float()), dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    am = attention_mask.long()
    # Cache accounting stays on the device during decoding (a host read per step stalls a GPU);
    # it is read once, after the loop.
    trace: list[torch.Tensor] = []
    peak = torch.zeros(B, dtype=torch.long, device=device)
    out_tokens: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    def after_forward(step: int) -> None:
        nonlocal peak
        kept = _kept_now(cache, am)
        peak = torch.maximum(peak, kept)
        if isinstance(cache, AnchorCache) and cache.max_kept is not None:  # peaks between prefill chunks too
            peak = torch.maximum(peak, cache.max_kept.to(device))
        if record_trace:
            trace.append(kept)
        if on_step is not None:
            on_step(step, cache)

    # Only the last position's logits are needed: skip the [B, L, vocab] prompt logits.
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    t0 = time.perf_counter()
    with method_attention(model, method):
        # Positions as greedy ``generate`` computes them: count real tokens (left padding).
        pos = (am.cumsum(-1) - 1).clamp_min(0)
        logits = prefill(model, input_ids, am, pos, cache, prefill_chunk_size, **extra).logits[:, -1]
        after_forward(0)
        next_pos = am.sum(-1)
        for step in range(1, max_new_tokens + 1):
            nxt = torch.where(done, torch.full_like(lengths, pad_token_id), choose(logits))
            out_tokens.append(nxt)
            lengths += (~done).long()
            done = done | torch.isin(nxt, eos)
            if step == max_new_tokens or bool(done.all()):  # the loop's one host read per step
                break  # like generate, the last token is returned but never fed
            # A row's EOS (and the pad after it) is fed masked out: it is never part of the cache,
            # exactly as when that row is decoded alone.
            live = ~done
            am = torch.cat([am, live.long()[:, None]], dim=-1)
            fed = torch.cat([fed, nxt[:, None]], dim=-1)
            logits = model(
                input_ids=nxt[:, None],
                attention_mask=am,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
                **extra,
            ).logits[:, -1]
            next_pos = next_pos + live.long()
            after_forward(step)
    new_per_row = [int(x) for x in lengths.tolist()]  # waits for the last step: part of the timed region
    elapsed = time.perf_counter() - t0
    seen = [int(x) for x in am.sum(-1).tolist()]
    kept = kept_per_row(cache, am)
    return BatchGeneration(
        tokens=torch.stack(out_tokens, dim=1),
        lengths=new_per_row,
        seen=seen,
        kept=kept,
        max_kept=[int(x) for x in peak.tolist()],
        time_s=elapsed,
        trace=[[int(x) for x in row] for row in torch.stack(trace).tolist()] if trace else [],
    )


def _kept_now(cache: Cache, attention_mask: torch.Tensor) -> torch.Tensor:
    """:func:`kept_per_row` as a device tensor (no host read)."""
    if isinstance(cache, AnchorCache):
        if cache.num_kept is None:
            return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
        return cache.num_kept.to(attention_mask.device)
    return attention_mask.sum(-1)


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the generation config's EOS (int or list) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer defines an EOS token.")
    return sorted(ids)
