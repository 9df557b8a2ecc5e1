"""prepare_model works for any HF decoder that uses transformers' attention interface.

Each architecture: AnSAN changes the logits (the rule is applied, no NaN with padding), and greedy
generation with AnchorCache equals generation with a full DynamicCache (tokens and scores).
The rule itself is checked against a loop reference in test_masks.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import anllm
from anllm.anchors import AnchorConfig

ANCHOR = 5


def _tiny(arch: str):
    import transformers as tf

    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=False),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**common),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=8),
    }
    torch.manual_seed(0)
    cfg = configs[arch]()
    cfg._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[ANCHOR]).to_dict()
    anllm.prepare_model(model, None)
    return model


def _ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 64, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < 0.2] = ANCHOR
    return ids


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"])
def test_architecture_applies_rule_and_cache_is_exact(arch: str) -> None:
    model = _tiny(arch)
    ids = _ids(2, 24, seed=1)
    am = torch.ones_like(ids)
    am[1, :5] = 0
    with torch.no_grad():
        ansan = model(ids, attention_mask=am).logits
        with anllm.anchor_attention(model, enabled=False):
            causal = model(ids, attention_mask=am).logits
    assert (ansan[am.bool()] - causal[am.bool()]).abs().max() > 1e-4, "AnSAN must change the logits"
    assert not torch.isnan(ansan).any()

    kwargs = dict(attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
        cache = anllm.AnchorCache()
        pruned = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(full.sequences, pruned.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(full.scores, pruned.scores))
    assert diff < 1e-3
    assert cache.stats()["kept"] < cache.stats()["seen"]


def test_full_attention_baseline_respects_packed_documents() -> None:
    """mode='none' (the paper's Llama2-RedPajama control) trains on packed rows too: a document's
    logits must not depend on the document packed before it."""
    from anllm.testing import tiny_llama

    model, _ = anllm.prepare_model(tiny_llama(), None, mode="none")
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed = model(ids, document_ids=docs).logits
        alone = model(ids[:, 8:]).logits
        plain = model(ids).logits
    torch.testing.assert_close(packed[:, 8:], alone)
    assert (plain[:, 8:] - alone).abs().max() > 1e-4  # without document_ids it is plain causal
    assert not anllm.is_anchor_aware(model)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"])
def test_generation_logits_equal_an_unhooked_model_with_the_loop_reference_mask(arch: str) -> None:
    """An independent oracle for anchor inference: every step's logits of ``generate`` with AnchorCache
    (batch of 3, left padding, one row stopping early at EOS) equal a forward of the *un-hooked* model
    over the sequence so far, fed the 4D mask built by test_masks' loop reference, float32, 1e-5."""
    from oracles import reference_mask

    model = _tiny(arch)
    ids = _ids(3, 16, seed=4)
    am = torch.ones_like(ids)
    am[1, :4], am[2, :9] = 0, 0
    ids[am == 0] = 0
    kwargs = dict(attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        probe = model.generate(ids, past_key_values=anllm.AnchorCache(), eos_token_id=None, **kwargs)
    new = probe.sequences[:, ids.shape[1]:].tolist()
    # an EOS id that one row emits early (first at step s) and the other rows never: it stops early
    stop = next(((r, s, t) for r in range(3) for s, t in enumerate(new[r][:8])
                 if t not in new[r][:s] and all(t not in new[o] for o in range(3) if o != r)), None)
    assert stop is not None, f"no token separates a row in this draw ({arch}): change the seed"
    r_eos, s_eos, eos = stop
    with torch.no_grad():
        out = model.generate(ids, past_key_values=anllm.AnchorCache(), eos_token_id=eos, **kwargs)
    seqs, P = out.sequences, ids.shape[1]
    assert int(seqs[r_eos, P + s_eos]) == eos and len(out.logits) == 10  # that row finished, the batch went on
    for b in range(3):
        steps = s_eos + 1 if b == r_eos else len(out.logits)  # a finished row's later logits are padding
        for t in range(steps):
            seq = seqs[b, : P + t]
            real = torch.cat([am[b].bool(), torch.ones(t, dtype=torch.bool)])
            mask = torch.tensor(reference_mask((seq == ANCHOR).tolist(), real.tolist(), [0] * len(seq)))
            mask[~real, ~real] = True  # padding rows attend themselves only (no NaN); nobody attends them
            pos = (real.long().cumsum(0) - 1).clamp_min(0)
            with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
                ref = model(seq[None], attention_mask=mask[None, None], position_ids=pos[None]).logits[0, -1]
            torch.testing.assert_close(out.logits[t][b], ref, atol=1e-5, rtol=1e-5)
