"""The held-out check at the end of training (anllm.train.heldout), on model=tiny with the demo corpus:
its numbers equal a direct `evaluate.py suite=ppl tasks=[holdout]`, its documents never reach the
training rows, the starting model is measured once, and it is skipped with a one-line note when off.
Runtime: ~30 s."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from anllm.schema import compose
from anllm.train import ConfigError, run

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, cache, *overrides):
    return compose("train", ["+exp=anllm_ac", "model=tiny", "data=demo", f"output_dir={out}", f"cache_dir={cache}",
                             "trainer.report_to=none", "trainer.disable_tqdm=true", "trainer.max_steps=3",
                             "block_size=128", *overrides])


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heldout")
    cfg = tiny(tmp / "run", tmp / "cache")
    run(cfg)
    return tmp, cfg, json.loads((tmp / "run" / "anllm_train_summary.json").read_text())["heldout"]


def test_check_numbers_equal_evaluate_ppl_on_the_same_documents(checked_run, capsys):
    from anllm.eval.runner import register_resolvers, run as evaluate

    tmp, _, check = checked_run
    assert check["trained"]["ppl_anchor"] < check["start"]["ppl_anchor"]  # 3 steps at lr 2e-4 already help
    register_resolvers()
    ecfg = compose("evaluate", [f"checkpoint={tmp / 'run'}", "suite=ppl", "tasks=[holdout]", "modes=[full,anchor]",
                                f"output_dir={tmp / 'eval'}"])
    for key, value in OmegaConf.to_container(OmegaConf.create(check["evaluate_equivalent"])).items():
        OmegaConf.update(ecfg, key, value, force_add=True)
    rows = {r["method"]: r for r in evaluate(ecfg)["rows"]}
    assert rows["full"]["ppl"] == pytest.approx(check["trained"]["ppl_full"], rel=1e-6)
    assert rows["anchor"]["ppl"] == pytest.approx(check["trained"]["ppl_anchor"], rel=1e-6)
    assert rows["anchor"]["c_red"] == pytest.approx(check["trained"]["c_red"])
    assert rows["full"]["n"] == check["trained"]["documents"] == 8


def test_check_documents_never_reach_the_training_rows(checked_run):
    from anllm import get_anchor_config
    from anllm.data import build_train_dataset
    from anllm.train.heldout import documents
    from anllm.train.model import build_model_and_tokenizer
    from anllm.schema import plain_dict

    tmp, cfg, check = checked_run
    c = plain_dict(cfg)
    model, tok = build_model_and_tokenizer(c)
    ds, _ = build_train_dataset({k: v for k, v in c["data"].items() if k != "id"}, tok, get_anchor_config(model),
                                c["block_size"], tmp / "cache" / "datasets")
    rows = np.concatenate([np.asarray(r, dtype=np.int32) for r in ds["input_ids"]]).tobytes()
    docs = documents(c, check["settings"])
    assert len(docs) == 8
    from anllm.anchors import insert_anchor_token

    for _, text in docs:
        ids = np.asarray(tok(insert_anchor_token(text), add_special_tokens=False)["input_ids"][5:37], dtype=np.int32)
        assert len(ids) == 32 and ids.tobytes() not in rows
    # and a training document's ids are found the same way (the search itself works)
    assert np.asarray(ds[3]["input_ids"][40:72], dtype=np.int32).tobytes() in rows


def test_start_numbers_are_measured_once(checked_run, monkeypatch):
    from anllm.train import heldout

    tmp, _, first = checked_run
    calls = []
    real = heldout.measure
    monkeypatch.setattr(heldout, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(tiny(tmp / "run2", tmp / "cache"))
    again = json.loads((tmp / "run2" / "anllm_train_summary.json").read_text())["heldout"]
    assert len(calls) == 1 and again["start"] == first["start"]  # only the trained model was measured


def test_check_off_or_impossible(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="anllm.train")
    run(tiny(tmp_path / "off", tmp_path / "cache", "heldout.enabled=false", "trainer.max_steps=1"))
    notes = [r.message for r in caplog.records if "held-out check" in r.message]
    assert notes == ["held-out check off (heldout.enabled=false; turn on with heldout.enabled=true)"]
    assert json.loads((tmp_path / "off" / "anllm_train_summary.json").read_text())["heldout"] is None
    assert "held-out check (" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds no documents out"):
        run(tiny(tmp_path / "x", tmp_path / "cache", "heldout.enabled=true", "data.holdout_fraction=0"))
    with pytest.raises(ConfigError, match="heldout.enabled"):
        run(tiny(tmp_path / "y", tmp_path / "cache", "heldout.enabled=maybe"))


def test_check_numbers_equal_an_independent_forward(checked_run):
    """The check's PPLs against one plain forward per document + log-softmax over the held-out ids
    (no cache, no chunks, none of the suite's scoring code): causal attention gives the full PPL, the
    model's AnSAN mask gives the anchor PPL (the anchor cache is lossless). ``<AC>`` is read as in
    training but never scored."""
    import math

    import torch

    import anllm
    from anllm.schema import plain_dict
    from anllm.train.heldout import documents, settings

    tmp, cfg, check = checked_run
    c = plain_dict(cfg)
    s, _ = settings(c)
    model, tok = anllm.from_pretrained(str(tmp / "run"))
    model.eval()
    marking = anllm.get_anchor_config(model).marking()
    ac_id = anllm.get_anchor_config(model).anchor_token_ids[0]
    totals = {"full": [0.0, 0], "anchor": [0.0, 0]}
    for _, text in documents(c, s):
        ids = tok(marking.apply(text), return_tensors="pt")["input_ids"][:, : int(s["max_tokens"])]
        scored = ids[0, 1:] != ac_id
        for name, enabled in (("full", False), ("anchor", True)):
            with torch.no_grad(), anllm.anchor_attention(model, enabled=enabled):
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0][scored]
            totals[name][0] += float(nll.sum())
            totals[name][1] += int(scored.sum())
    assert math.exp(totals["full"][0] / totals["full"][1]) == pytest.approx(check["trained"]["ppl_full"], rel=1e-4)
    assert math.exp(totals["anchor"][0] / totals["anchor"][1]) == pytest.approx(check["trained"]["ppl_anchor"], rel=1e-4)
