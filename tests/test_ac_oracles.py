"""AC models through the perplexity and translation suites, against forwards built by hand: the text
with ``<AC>`` written in by hand, an un-hooked model, and the loop-reference mask of test_masks.
Runtime: a few seconds (tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

import anllm
from anllm.models.tiny import tiny_model_and_tokenizer

TEXT = "The river rose in the night. By morning the bridge was gone! Farmers watched from the hill."
BY_HAND = "The river rose in the night.<AC> By morning the bridge was gone!<AC> Farmers watched from the hill.<AC>"


@pytest.fixture(scope="module")
def ac_model():
    model, tok = tiny_model_and_tokenizer(seed=3)
    model, tok = anllm.prepare_model(model.eval(), tok, mode="ac")
    with torch.no_grad():  # an untrained <AC> is a copy of "."; make it its own token
        model.get_input_embeddings().weight[-1] += 0.5 * torch.randn_like(model.get_input_embeddings().weight[-1])
    return model, tok


def oracle_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Un-hooked forward over ``ids`` ([L]) with the loop-reference AnSAN mask."""
    from oracles import reference_mask

    ac = anllm.get_anchor_config(model).anchor_token_ids
    mask = torch.tensor(reference_mask(torch.isin(ids, torch.tensor(ac)).tolist(), [True] * len(ids), [0] * len(ids)))
    with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
        return model(ids[None], attention_mask=mask[None, None]).logits[0].float()


def test_ac_perplexity_equals_the_hand_marked_forward(ac_model):
    from anllm.eval import perplexity as pp

    model, tok = ac_model
    ac_id = tok.convert_tokens_to_ids("<AC>")
    ids = torch.tensor(tok(BY_HAND)["input_ids"])
    assert int((ids == ac_id).sum()) == 3
    logp = torch.log_softmax(oracle_logits(model, ids)[:-1], -1)
    nll = -logp.gather(-1, ids[1:, None])[:, 0]
    keep = ids[1:] != ac_id  # <AC> is read, not scored
    want = math.exp(float(nll[keep].mean()))
    rows = pp.score_documents(model, tok, anllm.get_anchor_config(model).to_dict(), [("doc", TEXT)], ["anchor", "ansan"],
                              task="t", chunk_size=7, max_tokens=None, progress=False)
    for r in rows:
        assert r["ppl"] == pytest.approx(want, rel=1e-5), r["method"]
    full = pp.score_documents(model, tok, anllm.get_anchor_config(model).to_dict(), [("doc", TEXT)], ["full"],
                              task="t", max_tokens=None, progress=False)[0]
    assert full["ppl"] != pytest.approx(want, rel=1e-3)  # the rule matters here


def test_ac_translation_equals_a_hand_built_prompt_decoded_by_the_oracle(ac_model):
    from anllm.eval import translation as tr

    model, tok = ac_model
    src = "Der Fluss stieg in der Nacht. Am Morgen war die Brücke weg."
    run = tr.translate(model, tok, [src], "anchor", max_new_tokens=6, progress=False, prefill_chunk_size=5)
    prompt = run.prompts[0]
    by_hand = (
        "Below is an instruction that describes a task, paired with an input that provides further context.<AC> "
        "Write a response that appropriately completes the request.<AC>\n\n### Instruction:\n"
        "Translate the following sentences from German to English.<AC>\n\n### Input:\n"
        "Der Fluss stieg in der Nacht.<AC> Am Morgen war die Brücke weg.<AC>\n\n### Response:\n"
    )
    assert prompt == by_hand
    ids = torch.tensor(tok(by_hand)["input_ids"])
    eos = tok.eos_token_id
    for _ in range(6):  # greedy decoding with the oracle forward over the whole sequence each step
        nxt = int(oracle_logits(model, ids)[-1].argmax())
        ids = torch.cat([ids, torch.tensor([nxt])])
        if nxt == eos:
            break
    want = tok.decode(ids[len(tok(by_hand)["input_ids"]):].tolist(), skip_special_tokens=True)
    assert run.raw[0] == want
