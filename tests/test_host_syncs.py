"""Host reads per decode step (issue #16 item 8): how often the anchor decode path waits for the device.

On a GPU a batch-1 decode step is bound by kernel launches, so every read of a device value (``int(t)``,
``t.item()``, ``t.tolist()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ...) stalls the pipeline.
Counted here on CPU, where every tensor stands for a device tensor: Python-level reads by wrapping the
``Tensor`` methods, and reads made inside ATen (``nonzero`` behind ``x[mask]``, ``masked_select``,
``unique``, ``_local_scalar_dense``...) by a dispatch mode. The counts are exact and must not depend on
the batch size or the cache length:

* a model forward with an :class:`anllm.AnchorCache` (decode step): **1** read (``AnchorCache.resolve_step``:
  the pruned width, the number of moved slots and the "no mask needed" test in one ``tolist``), as for
  the plain model with a ``DynamicCache``; before this test existed: 5 (3 ``__int__``, 1 ``__bool__``,
  1 ``nonzero``);
* a step of :func:`anllm.eval.generation.greedy_generate`: **2** (the forward's, and "are all rows
  done?" for early stopping); before: 13.

CPU, tiny random Llama, ~10 s.
"""

from __future__ import annotations

import collections
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import DynamicCache

import anllm
from anllm.eval.generation import greedy_generate
from anllm.testing import count_host_reads, tiny_llama, word_tokenizer

EP_WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(120)]  # 128 tokens, the tiny_llama vocab
P = 4  # "."
W = 10  # a non-anchor word

# --- the counter (anllm.testing.count_host_reads, also used by bench/gpu_check.py) ---------------


def test_the_counter_sees_explicit_and_implicit_reads() -> None:
    x = torch.arange(10)
    with count_host_reads() as c:
        int(x[0])
        x.tolist()
        bool(x.any())
        _ = x[x > 3]  # boolean-mask indexing reads the mask's count
        torch.nonzero(x)
        x.repeat_interleave(x)
        torch.nonzero_static(x > 3, size=6)  # a known size: no read
        x[torch.tensor([1, 2])]  # integer indexing: no read
    assert dict(c) == {"__int__": 1, "tolist": 1, "__bool__": 1, "aten::index": 1, "nonzero": 1,
                       "aten::repeat_interleave": 1}


def test_the_counter_counts_only_reads_of_the_given_device() -> None:
    """bench/gpu_check.py counts reads of CUDA tensors only: reading a CPU tensor does not wait for the GPU."""
    x = torch.arange(10)

    def reads() -> None:
        int(x[0])
        x.tolist()
        _ = x[x > 3]
        x.repeat_interleave(x)

    with count_host_reads("cuda") as other:
        reads()
    with count_host_reads("cpu") as same:
        reads()
    assert dict(other) == {} and dict(same) == {"__int__": 1, "tolist": 1, "aten::index": 1, "aten::repeat_interleave": 1}


def test_the_counter_restores_what_it_wraps() -> None:
    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu", "numpy")
    before = {n: torch.Tensor.__dict__.get(n) for n in names}
    nonzero = torch.nonzero
    t = torch.tensor([1, 0, 2])
    with count_host_reads() as counts:
        t[0].item(), t.tolist(), int(t[0]), bool(t[0]), t.nonzero(), torch.nonzero(t)
    assert dict(counts) == {"item": 1, "tolist": 1, "__int__": 1, "__bool__": 1, "nonzero": 2}  # nested: once
    assert {n: torch.Tensor.__dict__.get(n) for n in names} == before and torch.nonzero is nonzero
    int(t[0])  # and nothing counts after the block
    assert sum(counts.values()) == 6


# --- the model and the decode steps ----------------------------------------------------------------


def make_model(**options) -> torch.nn.Module:
    model, _ = anllm.prepare_model(tiny_llama(), word_tokenizer(EP_WORDS), "ep", **options)
    return model


def prompts(B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with anchors at different places; row 0 left-padded (a ragged cache)."""
    g = torch.Generator().manual_seed(B * 1000 + L)
    ids = torch.randint(7, 128, (B, L), generator=g)
    for b in range(B):
        ids[b, 2 + b % 5 :: 7 + b % 4] = P
    am = torch.ones(B, L, dtype=torch.long)
    am[0, : L // 3] = 0
    ids[am == 0] = 0
    return ids, am


# (options of prepare_model, AnchorCache kwargs, pass cache_position as generate does)
CASES = {
    "rule": ({}, {}, False),
    "window+sinks": ({"window": 4, "num_sink_tokens": 2}, {}, False),  # slots leave the window: moves every step
    "keep-prefix": ({}, {"keep_prefix": True}, False),
    "compact-positions": ({}, {"position_mode": "compact"}, False),
    "cache_position": ({}, {}, True),  # transformers' generate passes it (chunked-prefill position fix)
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("B,L", [(1, 16), (8, 16), (1, 300), (8, 300)])
def test_anchor_decode_step_reads_the_device_once(case: str, B: int, L: int) -> None:
    """Decode steps with anchors, non-anchors, a finished row fed masked out, and a ragged cache:
    one read per forward whatever the batch size and cache length (the pruned width, the moved
    slots and the no-mask test together)."""
    options, cache_kwargs, pass_cache_position = CASES[case]
    model = make_model(**options)
    ids, am = prompts(B, L)
    cache = anllm.AnchorCache(**cache_kwargs)
    model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
    pos = am.sum(-1) - 1
    steps = [[W + 1] * B, [P] * B, [W + 2] * B, [P if b % 2 else W + 3 for b in range(B)], [W + 4] * B, [W + 5] * B]
    moved = cache.copied_slots
    with count_host_reads() as counts:
        for i, tokens in enumerate(steps):
            live = torch.ones(B, 1, dtype=torch.long)
            live[-1] = int(i < 3)  # the last row finishes after three steps (fed masked out)
            am = torch.cat([am, live], 1)
            pos = pos + live[:, 0]
            extra = {"cache_position": torch.tensor([L + i])} if pass_cache_position else {}
            model(input_ids=torch.tensor(tokens)[:, None], attention_mask=am, position_ids=pos[:, None],
                  past_key_values=cache, use_cache=True, **extra)
    assert dict(counts) == {"tolist": len(steps)}, dict(counts)
    assert cache.copied_slots > moved  # the steps did compact (anchors, ragged rows)
    stats = cache.stats()  # statistics are read here, after the steps
    assert stats["seen_per_row"] == am.sum(-1).tolist()


@torch.no_grad()
def test_plain_and_tracked_full_caches_read_once_too() -> None:
    """For reference: the AnSAN rule over a full DynamicCache (the no-mask test) and the plain model
    (transformers' own padding check) also read once per decode step."""
    model = make_model()
    ids, am = prompts(2, 40)
    for enabled in (True, False):
        cache = DynamicCache()
        with anllm.anchor_attention(model, enabled=enabled):
            out = model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
            nxt, a = out.logits[:, -1].argmax(-1), am
            with count_host_reads() as counts:
                for _ in range(4):
                    a = torch.cat([a, torch.ones(2, 1, dtype=torch.long)], 1)
                    nxt = model(input_ids=nxt[:, None], attention_mask=a, past_key_values=cache,
                                use_cache=True).logits[:, -1].argmax(-1)
        assert sum(counts.values()) == 4, (enabled, dict(counts))


def _generate_reads(model, B: int, L: int, method: str, n: int) -> tuple[collections.Counter, object]:  # noqa: ANN001
    ids, am = prompts(B, L)
    with count_host_reads() as counts:
        # EOS id 10_000 is outside the vocabulary: every run decodes all n tokens
        out = greedy_generate(model, ids, am, method, max_new_tokens=n, eos_token_ids=[10_000], pad_token_id=0,
                              record_trace=True)
    return counts, out


@torch.no_grad()
@pytest.mark.parametrize("method", ["anchor", "anchor+src", "ansan"])
@pytest.mark.parametrize("B,L", [(1, 16), (8, 300)])
def test_greedy_generate_reads_twice_per_step(method: str, B: int, L: int) -> None:
    """Per decode step of our decode loop: the forward's read and "are all rows done?". Measured as
    the difference between 10 and 6 new tokens (the prefill and the final statistics cancel)."""
    model = make_model()
    short, a = _generate_reads(model, B, L, method, 6)
    long, b = _generate_reads(model, B, L, method, 10)
    per_step = {k: (long[k] - short[k]) / 4 for k in set(long) | set(short) if long[k] != short[k]}
    assert sum(per_step.values()) == 2, per_step
    # the accounting read once after the loop is the one it read every step before
    assert len(b.trace) == 10 and b.trace[:6] == a.trace and b.max_kept == [max(c) for c in zip(*b.trace)]
    assert b.kept == b.trace[-1] and torch.equal(b.tokens[:, :6], a.tokens)
