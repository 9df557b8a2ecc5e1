"""kvpress presses as equal-cache baselines: exact kept counts per row, batched scoring against kvpress's
own single-sequence use, budgets that change the scores, and agreement with this project's StreamingLLM
and K-norm. Runtime: seconds (a tiny random Llama, random token ids)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers.cache_utils import DynamicCache

import anllm
from anllm.anchors import AnchorConfig
from anllm.eval import baselines, presses
from anllm.eval import methods as registry
from anllm.eval.readers import press_logits
from anllm.testing import tiny_llama

presses.load_kvpress()  # a dependency: missing, this fails (and transformers' attention stays its own)
pytestmark = pytest.mark.usefixtures("one_thread")

PRESSES = [m.name for m in registry.REGISTRY if m.kind == "press"]
REQUIRED = ["streamingllm_press", "snapkv", "tova", "observed_attention", "expected_attention", "knorm_press",
            "pyramidkv"]
SINKS = 2


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(vocab_size=128, num_layers=3)
    m.eval()
    return m


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _full_keys(model, ids):
    """Per layer, ``[H_kv, L, D]`` keys of a plain causal forward over ``ids`` (no press)."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers]


def _kept_positions(pressed, b, layer, full):
    """``[H_kv]`` sorted lists: the context positions whose keys row ``b`` of ``pressed`` kept in ``layer``
    (found by matching the kept keys against the full cache's; every kept key must match exactly one)."""
    keys = pressed.cache.layers[layer].keys[b]  # [H, W, D]
    valid = pressed.valid[b, layer]
    out = []
    for h in range(keys.shape[0]):
        kept = keys[h, valid]
        match = (kept[:, None, :] - full[layer][h][None]).abs().amax(-1) < 1e-6  # [kept, L]
        assert (match.sum(-1) == 1).all(), "a kept key is not one of the context's keys"
        pos = match.float().argmax(-1).tolist()
        assert len(set(pos)) == len(pos), "a key kept twice"
        out.append(sorted(pos))
    return out


def _kvpress_reference(model, method, ctx, keep, feed):
    """kvpress's own single-sequence use (tests/oracles.py) with the press this project builds for it."""
    from oracles import kvpress_reference

    press = presses.make_press(method, len(ctx), keep, SINKS) if keep < len(ctx) else None
    return kvpress_reference(model, press, ctx, feed, registry.METHODS[method].eager)


def test_the_required_presses_are_one_registry_entry_each_in_qa_recall_longrange():
    for name in REQUIRED:
        m = registry.METHODS[name]
        assert m.kind == "press" and m.press and set(m.suites) == {"qa", "recall", "longrange"}, name
    assert registry.ALIASES["h2o"] == "observed_attention"
    assert registry.METHODS["observed_attention"].eager  # it scores from the prefill's attention weights
    assert registry.METHODS["streamingllm"].press == "StreamingLLMPress"  # QA's compress-once streamingllm
    assert registry.METHODS["knorm"].press == "KnormPress"
    import kvpress

    for m in registry.REGISTRY:
        if m.press:
            assert isinstance(presses.make_press(m.name, 40, 10), getattr(kvpress, m.press)), m.name


@pytest.mark.parametrize("method", PRESSES)
def test_each_press_keeps_the_requested_count_of_real_keys_per_row(model, method):
    """Rows of different lengths and budgets (one larger than its context, one zero) in one batch: each row
    keeps exactly its budget per layer and KV head (PyramidKV: on average over layers, more in lower
    layers), every kept entry is one of that row's own keys, and the rows are left-padded into one cache."""
    ctxs = _rows([37, 50, 21, 12, 9, 57])
    budgets = [11, 40, 5, 30, 0, 30]
    pressed = presses.press_prefill(model, method, ctxs, budgets, SINKS)
    n_layers = model.config.num_hidden_layers
    want = [min(b, len(c)) for b, c in zip(budgets, ctxs)]
    assert pressed.kept == want and pressed.lengths == [len(c) for c in ctxs]
    W = pressed.valid.shape[-1]
    assert pressed.cache.layers[0].keys.shape[2] == W == max(
        int(pressed.valid[b, layer].sum()) for b in range(len(ctxs)) for layer in range(n_layers))
    for b, (ctx, n) in enumerate(zip(ctxs, want)):
        counts = pressed.valid[b].sum(-1).tolist()  # per layer
        if method == "pyramidkv" and 0 < n < len(ctx):
            assert sum(counts) == n * n_layers
        else:
            assert counts == [n] * n_layers, (b, counts)
        for layer in range(n_layers):
            assert pressed.valid[b, layer, W - counts[layer] :].all()  # right-aligned: padding on the left
        if n:
            full = _full_keys(model, ctx)
            for layer in range(n_layers):
                pos = _kept_positions(pressed, b, layer, full)
                assert all(len(p) == counts[layer] for p in pos)
                if n == len(ctx):
                    assert all(p == list(range(len(ctx))) for p in pos)  # nothing to compress: all kept
    if method == "pyramidkv":  # the pyramid (where kvpress's rule allows it, else SnapKV): lower layers keep more
        counts = pressed.valid[5].sum(-1).tolist()
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


@pytest.mark.parametrize("method", PRESSES)
def test_batched_press_scoring_equals_kvpress_on_one_sequence(model, method):
    """press_logits (ragged rows, left-padded feeds of several tokens, per-layer masks) gives, row by row,
    what kvpress's own single-sequence use gives; and the kept counts are those of kvpress's cache."""
    ctxs = _rows([33, 47, 26], seed=1)
    feeds = _rows([3, 1, 4], seed=2)
    budgets = [9, 20, 13]
    n = max(len(f) for f in feeds)
    got, kept = press_logits(model, ctxs, feeds, method, budgets, 0, n, SINKS)
    assert got.shape[:2] == (3, n) and kept == budgets
    for j, (ctx, feed, keep) in enumerate(zip(ctxs, feeds, budgets)):
        want, widths = _kvpress_reference(model, method, ctx, keep, feed)
        assert sum(widths) == keep * len(widths) and (method == "pyramidkv" or set(widths) == {keep})
        torch.testing.assert_close(got[j, n - len(feed) :], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PRESSES)
def test_each_press_changes_the_scores_when_the_budget_changes(model, method):
    """Another budget, other scores (every row); a budget of the whole context is the plain full forward."""
    ctxs = _rows([40, 31], seed=3)
    feeds = _rows([2, 2], seed=4)
    small, _ = press_logits(model, ctxs, feeds, method, [6, 6], 0, 2, SINKS)
    large, _ = press_logits(model, ctxs, feeds, method, [20, 20], 0, 2, SINKS)
    whole, kept = press_logits(model, ctxs, feeds, method, [100, 100], 0, 2, SINKS)
    assert kept == [40, 31]
    for j, (ctx, feed) in enumerate(zip(ctxs, feeds)):
        assert (small[j] - large[j]).abs().max() > 1e-3, j
        with torch.no_grad():
            full = model(input_ids=torch.cat([ctx, feed])[None]).logits[0, -2:]
        torch.testing.assert_close(whole[j], full, atol=1e-5, rtol=1e-5)
        assert (small[j] - full).abs().max() > 1e-3


@pytest.mark.parametrize("keep", [1, 2, 5, 8, 13, 29])
def test_kvpress_streamingllm_keeps_what_our_streaming_reading_holds(model, keep):
    """StreamingLLMPress compressing a context of L tokens to ``keep`` keeps exactly the keys our
    every-token-bounded StreamingLLM lets the context's last token attend at a budget of ``keep``
    (:func:`streaming_visible`: min(sinks, keep // 2) sinks + the most recent), in every layer and head."""
    ctx = _rows([30], seed=5)[0]
    L = len(ctx)
    full = _full_keys(model, ctx)
    ours = baselines.streaming_visible(L, keep, SINKS)[L - 1].nonzero().flatten().tolist()
    pressed = presses.press_prefill(model, "streamingllm_press", [ctx], [keep], SINKS)
    for layer in range(model.config.num_hidden_layers):
        assert all(p == ours for p in _kept_positions(pressed, 0, layer, full))
    # QA's compress-once streamingllm is the same press
    again = presses.press_prefill(model, "streamingllm", [ctx], [keep], SINKS)
    assert torch.equal(again.cache.layers[0].keys, pressed.cache.layers[0].keys)


@pytest.mark.parametrize("keep", [1, 3, 7, 15, 28])
def test_kvpress_knorm_keeps_what_our_knorm_reading_holds(model, keep):
    """KnormPress compressing L tokens to ``keep`` keeps, per layer and KV head, the keys our streaming
    K-norm lets the next token attend besides itself at a budget of ``keep + 1`` (:func:`knorm_visible`:
    the cache that evicts its highest-norm key, after reading the L tokens)."""
    ids = _rows([31], seed=6)[0]
    ctx, L = ids[:-1], len(ids) - 1
    full_next = _full_keys(model, ids)  # the context's keys (causal: the same) and the next token's
    pressed = presses.press_prefill(model, "knorm_press", [ctx], [keep], SINKS)
    for layer in range(model.config.num_hidden_layers):
        row = baselines.knorm_visible(full_next[layer][None], keep + 1)[0, :, L, :L]  # [H, L]: besides itself
        ours = [row[h].nonzero().flatten().tolist() for h in range(row.shape[0])]
        assert _kept_positions(pressed, 0, layer, [k[:, :L] for k in full_next]) == ours


def test_press_names_are_accepted_where_a_context_is_compressed_and_refused_in_ppl():
    from anllm.eval import longrange, recall
    from anllm.eval.qa import check_config

    cfg = {"data_dir": "/somewhere", "modes": ["full", "anchor"]}
    check_config(OmegaConf.create({**cfg, "qa": {"baselines": PRESSES + ["streamingllm", "knorm", "h2o"]}}))
    recall.check(OmegaConf.create({**cfg, "recall": {"methods": ["full", "anchor", *PRESSES, "h2o"]}}))
    longrange.check(OmegaConf.create({**cfg, "longrange": {"methods": ["full", "anchor", *PRESSES]}}))
    with pytest.raises(ValueError, match="'snapkv' is not a ppl method"):
        registry.ppl_method("snapkv")
    with pytest.raises(ValueError, match="Unknown method 'snapk'"):
        registry.ppl_method("snapk", "recall")


def _hand_model():
    """Tiny Llama whose only anchor is token 5 (EP settings set by hand)."""
    m = tiny_llama()
    m.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[5]).to_dict()
    anllm.prepare_model(m, None)
    return m


def test_qa_scorer_runs_every_press_at_the_anchor_cache_kept_count():
    """Every press scored side by side with ``anchor`` in the QA scorer: per continuation it holds what the
    anchor cache holds; QA's streamingllm/knorm equal the kvpress entries; the presses differ from full."""
    from anllm.eval.scoring import MultiModeScorer

    model = _hand_model()
    g = torch.Generator().manual_seed(7)
    body = lambda n: [int(t) for t in torch.randint(10, 120, (n,), generator=g)]  # noqa: E731
    ctxs = {"a": body(6) + [5] + body(9) + [5] + body(12) + [5] + body(4),
            "b": body(14) + [5] + body(20) + [5] + body(7),
            "c": [1, 50]}
    reqs = [((k, i), c, body(1 + i)) for k, c in ctxs.items() for i in range(3)]
    modes = ["full", "anchor", "streamingllm", "knorm", *PRESSES]
    scorer = MultiModeScorer(model, modes, batch_size=2, warmup=False, num_sink_tokens=SINKS)
    scorer.score(reqs)
    differs = {m: 0 for m in PRESSES}
    for key, ctx, cont in reqs:
        anchor = scorer.result("anchor", key)
        for m in PRESSES:
            s = scorer.result(m, key)
            assert (s.kv_kept, s.kv_total) == (anchor.kv_kept, anchor.kv_total), (m, key)
            if len(ctx) >= 2:
                assert s.peak_kv == max(len(ctx) - 1, s.kv_kept)
            differs[m] += abs(s.logprob - scorer.result("full", key).logprob) > 1e-4
        for ours, press in (("streamingllm", "streamingllm_press"), ("knorm", "knorm_press")):
            assert scorer.result(ours, key).logprob == pytest.approx(scorer.result(press, key).logprob, abs=1e-6)
    assert all(differs.values()), differs


def test_loading_kvpress_leaves_transformers_attention_functions_as_they_were():
    """kvpress wraps transformers' attention registry on import; its wrapper breaks flex_attention
    (dropout passed as ``scaling``). After load_kvpress every backend is transformers' own again, so a
    flex model in the same process still runs."""
    import subprocess
    import sys

    code = (
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A\n"
        "before = dict(A.items())\n"
        "from anllm.eval.presses import load_kvpress\n"
        "load_kvpress()\n"
        "assert 'kvpress' in __import__('sys').modules\n"
        "changed = [k for k, f in before.items() if A[k] is not f]\n"
        "assert not changed, changed\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
