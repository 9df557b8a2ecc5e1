"""flex_attention (issue #16 item 7): the AnSAN BlockMask, its memo, and flex against the dense mask.

* The BlockMask of :func:`anllm.masks.flex_block_mask` is exactly what torch's own ``create_block_mask``
  makes of the rule's ``mask_mod`` (same tiles), and the mask a kernel applies with it (full tiles +
  ``mask_mod`` inside partial tiles) is the dense mask, element for element: padding, packed
  documents, windows, sinks, ragged last tiles, query blocks shorter than the keys (a cache).
* The model builds one BlockMask per batch: the same input tensors again reuse it, a different batch of
  the same shape gets its own (different) mask, and nothing is recompiled for it.
* Forward (compiled CPU kernel, which reads the tiles) equals SDPA with the dense mask, in eval and in
  training mode with gradient checkpointing.
* Backward: torch refuses flex backward on CPU (``_validate_device``), and its compiled CPU kernel has
  none. The test lifts that guard and runs flex's *eager* reference implementation (dense, autograd)
  under gradient checkpointing: logits and every parameter's gradient equal the dense-mask model's
  (<= 1e-5). That checks the rule's ``mask_mod`` and the gradients through checkpointed layers; the
  fused backward *kernel* (which reads the transposed tiles) runs only on a GPU (bench/gpu_check.py).

Compiling the CPU kernel needs a C++ compiler (~30 s the first time on 2 cores, seconds with
inductor's disk cache warm). Shapes are kept static here: torch 2.13's CPU flex template fails to
compile with dynamic shapes (a second sequence length makes dynamo retry dynamically).
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.nn.attention import flex_attention as fa

import anllm
from anllm.modeling import anchor_options
from anllm.masks import AnsanOptions, ansan_mask_mod, dense_mask, flex_block_mask, layout_from_tokens
from anllm.testing import tiny_llama, word_tokenizer

EP_WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(120)]  # 128 tokens, the tiny_llama vocab
EP_IDS = [4, 5, 6]
B, L = 3, 300  # three 128-token tiles per side, the last one ragged


def needs_compiler() -> None:
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
        from conftest import skip_or_fail

        skip_or_fail("flex_attention on CPU compiles through inductor, which needs a C++ compiler (g++/clang++)")


@pytest.fixture(autouse=True)
def static_shapes():
    """One compile per shape, never a dynamic retry (see the module docstring)."""
    import torch._dynamo

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding, right padding, packed documents, anchors every few tokens (different per seed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 128, (B, L), generator=g)
    ids[torch.rand((B, L), generator=g) < 0.08] = 4
    am = torch.ones(B, L, dtype=torch.long)
    am[0, :37] = 0
    am[2, 250:] = 0
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[1, 140:] = 1
    doc[1, 200:] = 2
    ids[am == 0] = 0
    return ids, am, doc


def ep_model(attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    model, _ = anllm.prepare_model(tiny_llama(attn_implementation=attn), word_tokenizer(EP_WORDS), "ep", **kwargs)
    assert model.config.anllm["anchor_token_ids"] == EP_IDS
    return model


# --- the BlockMask ---------------------------------------------------------------------------------


def _tiles(num: torch.Tensor, idx: torch.Tensor, nk: int) -> torch.Tensor:
    """Dense ``[B, H, nq, nk]`` tile map from a BlockMask's (count, indices) pair."""
    chosen = torch.arange(idx.shape[-1]) < num[..., None].long()
    d = torch.zeros((*num.shape, nk + 1), dtype=torch.bool)
    d.scatter_(-1, torch.where(chosen, idx.long(), nk), True)
    return d[..., :nk]


def effective_mask(bm, Lq: int, Lk: int) -> torch.Tensor:  # noqa: ANN001
    """What a flex kernel computes with ``bm``: full tiles, and ``mask_mod`` inside partial tiles."""
    bq, bk = bm.BLOCK_SIZE
    nk = -(-Lk // bk)
    partial = _tiles(bm.kv_num_blocks, bm.kv_indices, nk)
    full = _tiles(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    assert not (partial & full).any()
    grow = lambda t: t.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :Lq, :Lk]  # noqa: E731
    rule = fa.create_mask(bm.mask_mod, bm.kv_num_blocks.shape[0], 1, Lq, Lk, device="cpu")
    return grow(full) | (grow(partial) & rule)


OPTION_CASES = {
    "rule": AnsanOptions(),
    "window+sinks": AnsanOptions(num_sink_tokens=3, window=40),
    "anchors-see-anchors": AnsanOptions(anchors_see_anchors=True),
    "hide-anchors": AnsanOptions(hide_anchors=True),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("Lq", [L, 70, 1])  # a whole row; the last queries of a cache (prefill chunk, decode)
@pytest.mark.parametrize("block", [128, 16])
def test_block_mask_is_the_dense_rule(case: str, Lq: int, block: int, monkeypatch) -> None:
    options = OPTION_CASES[case]
    ids, am, doc = batch(1)
    lay = layout_from_tokens(torch.isin(ids, torch.tensor(EP_IDS)), am, doc, options)
    q = lay.map(lambda t: t[:, L - Lq :])
    want = dense_mask(q, lay, options)
    monkeypatch.setattr(anllm.masks, "_FLEX_CHUNK_ELEMENTS", 1)  # one query tile per band: the banding is tested too
    bm = flex_block_mask(q, lay, options, block_size=block)
    assert torch.equal(effective_mask(bm, Lq, L), want)
    # and the tiles are exactly torch's own classification of the same mask_mod
    ref = fa.create_block_mask(ansan_mask_mod(q, lay, 0, options), B, None, Lq, L, device="cpu", BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(bm, name), getattr(ref, name)), name
    assert bm.seq_lengths == (Lq, L)


def test_the_builder_never_compiles() -> None:
    """Variable lengths (and new batches) cost no compilation: the tiles come from plain tensor ops."""
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    for n in (50, 129, 300):
        ids, am, doc = batch(n)
        lay = layout_from_tokens(torch.isin(ids[:, :n], torch.tensor(EP_IDS)), am[:, :n], doc[:, :n])
        flex_block_mask(lay, lay, AnsanOptions())
    assert dict(counters["stats"]) == before


# --- the model: memo, no recompiles, forward ---------------------------------------------------------


def _capture_masks(model) -> list:  # noqa: ANN001
    seen: list = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    return seen


@torch.no_grad()
def test_one_block_mask_per_batch_and_no_recompile() -> None:
    needs_compiler()
    from torch._dynamo.utils import counters

    model = ep_model("sdpa")
    att = model._anllm_attention
    (ids, am, doc), (ids2, am2, doc2) = batch(0), batch(1)
    dense = [model(i, attention_mask=a, document_ids=d).logits for i, a, d in ((ids, am, doc), (ids2, am2, doc2))]
    model.config._attn_implementation = "flex_attention"
    masks = _capture_masks(model)
    real, real2 = am.bool(), am2.bool()

    first = model(ids, attention_mask=am, document_ids=doc).logits
    assert att.flex_builds == 1
    torch.testing.assert_close(first[real], dense[0][real], atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]

    again = model(ids, attention_mask=am, document_ids=doc).logits  # the same tensors: the same mask
    assert att.flex_builds == 1 and masks[1] is masks[0]
    torch.testing.assert_close(again, first, atol=0, rtol=0)

    other = model(ids2, attention_mask=am2, document_ids=doc2).logits  # same shape, other batch: a new mask
    assert att.flex_builds == 2 and masks[2] is not masks[0]
    assert not torch.equal(effective_mask(masks[2], L, L), effective_mask(masks[0], L, L))
    torch.testing.assert_close(other[real2], dense[1][real2], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # neither the mask nor the kernel recompiled

    # Never stale: a tensor changed in place, an equal copy, other rule options, inference tensors.
    ids[1, 150] = 4
    model(ids, attention_mask=am, document_ids=doc)
    assert att.flex_builds == 3
    with anllm.anchor_attention(model, enabled=False):
        model.config._attn_implementation = "sdpa"
        causal_docs = model(ids, attention_mask=am, document_ids=doc).logits
        model.config._attn_implementation = "flex_attention"
        got = model(ids, attention_mask=am, document_ids=doc).logits  # the rule is off: packed causal mask
    assert att.flex_builds == 4
    torch.testing.assert_close(got[real], causal_docs[real], atol=1e-5, rtol=1e-5)
    model(ids.clone(), attention_mask=am, document_ids=doc)
    assert att.flex_builds == 5
    assert counters["stats"]["unique_graphs"] == graphs
    with anchor_options(model, hide_anchors=True):  # (another rule: the kernel's mask_mod compiles anew)
        model(ids, attention_mask=am, document_ids=doc)
    assert att.flex_builds == 6
    with torch.inference_mode():  # (the kernel compiles once more for inference tensors: transformers' compile)
        i, a, d = ids.clone(), am.clone(), doc.clone()
        model(i, attention_mask=a, document_ids=d)
        model(i, attention_mask=a, document_ids=d)
    assert att.flex_builds == 8  # no version counters to key on: built every time


def test_training_forward_with_gradient_checkpointing_equals_dense() -> None:
    """Training mode, gradient checkpointing (reentrant: the first forward runs without grad, so
    the compiled CPU kernel, which reads the tiles, computes it): flex logits = dense-mask logits."""
    needs_compiler()
    ids, am, doc = batch(2)
    dense_model, flex_model = ep_model("sdpa"), ep_model("flex_attention")
    for m in (dense_model, flex_model):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    want = dense_model(ids, attention_mask=am, document_ids=doc).logits
    got = flex_model(ids, attention_mask=am, document_ids=doc).logits
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert got.requires_grad


def _eager_flex_with_cpu_backward(monkeypatch) -> None:  # noqa: ANN001
    """transformers' flex path, uncompiled, with torch's "no backward on CPU" guard lifted."""
    import transformers.integrations.flex_attention as hf_flex

    def eager(query, key, value, training=False, **kwargs):  # noqa: ANN001, ANN003
        return fa.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("reentrant", [True, False])
def test_forward_and_backward_with_gradient_checkpointing_equal_dense(reentrant: bool, monkeypatch) -> None:
    _eager_flex_with_cpu_backward(monkeypatch)
    ids, am, doc = batch(3)
    labels = torch.where(am.bool(), ids, -100)
    out = {}
    for attn in ("sdpa", "flex_attention"):
        model = ep_model(attn)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        res = model(ids, attention_mask=am, document_ids=doc, labels=labels)
        res.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[attn] = (res.logits.detach(), grads, model._anllm_attention)
    (want, want_g, _), (got, got_g, att) = out["sdpa"], out["flex_attention"]
    assert att.flex_builds == 1  # one mask for the forward and the checkpointed recomputation
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert want_g.keys() == got_g.keys() and len(got_g) == len(list(ep_model().parameters()))
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-5, rtol=1e-5, msg=name)
