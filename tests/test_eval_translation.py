"""Translation suite: official WMT23 scores through our scoring path, a real (tiny) COMET model
(scored in COMET's own environment: tests/test_comet_env.py has the subprocess itself), greedy
generation with the anchor cache (lossless vs a full cache), prompts, errors.

Runtime: ~60 s on 2 CPU cores (most of it building/loading the tiny COMET checkpoint).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import anllm
from anllm.eval import translation as tr
from anllm.eval.generation import greedy_generate
from anllm.eval.metrics import CometUnavailable, resolve_comet_checkpoint, sacrebleu_scores
from anllm.testing import tiny_llama
from anllm.testing import bpe_tokenizer

WMT23 = "wmt23_de_en"


# ---- fixtures -------------------------------------------------------------------------------------


def _corpus(shared_data: Path, n: int = 40) -> list[str]:
    d = shared_data / "wmt23_de_en"
    src = (d / "generaltest2023.de-en.src.de").read_text(encoding="utf-8").splitlines()[:n]
    ref = (d / "generaltest2023.de-en.ref.refA.en").read_text(encoding="utf-8").splitlines()[:n]
    return src + ref



@pytest.fixture(scope="module")
def tok(shared_data):
    return bpe_tokenizer(_corpus(shared_data))


def _batch(tok, prompts):
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _ep_model(tok, prompts: list[str]):
    """Tiny random Llama with EP anchors whose "." is made a likely greedy choice *while decoding*
    (a random model would hardly ever emit an anchor): its output row points along the mean final
    hidden state of a first greedy run's decoding positions."""
    model = tiny_llama(vocab_size=len(tok) + 8)
    anllm.prepare_model(model, tok, mode="ep")
    dot = tok.convert_tokens_to_ids(".")
    assert dot in anllm.get_anchor_config(model).anchor_token_ids
    ids, am = _batch(tok, prompts)
    out = greedy_generate(model, ids, am, "ansan", max_new_tokens=24, eos_token_ids=[2], pad_token_id=0)
    with torch.no_grad():
        full = torch.cat([ids, out.tokens], 1)
        h = model.model(full, attention_mask=torch.cat([am, torch.ones_like(out.tokens)], 1)).last_hidden_state
        mu = h[:, ids.shape[1] - 1 :].reshape(-1, h.shape[-1]).mean(0)
        w = model.lm_head.weight
        w[dot] = 1.3 * mu / mu.norm() * w.norm(dim=1).mean()
    return model


@pytest.fixture(scope="module")
def sources(shared_data):
    """5 short German segments of different lengths (1-3 sentences; keeps decoding cheap)."""
    src = _corpus(shared_data, 60)[:60]
    picked = [s for s in src if 60 <= len(s) <= 260][:5]
    assert len(picked) == 5
    return picked


@pytest.fixture(scope="module")
def ep_model(tok, sources):
    return _ep_model(tok, [tr.build_prompt(s) for s in sources[:3]])


def _fake_data_dir(tmp_path: Path, srcs: list[str], refs: list[str]) -> Path:
    d = tmp_path / "data" / "wmt23_de_en"
    d.mkdir(parents=True)
    (d / "generaltest2023.de-en.src.de").write_text("\n".join(srcs) + "\n", encoding="utf-8")
    (d / "generaltest2023.de-en.ref.refA.en").write_text("\n".join(refs) + "\n", encoding="utf-8")
    return tmp_path / "data"


# ---- scoring --------------------------------------------------------------------------------------


def test_official_wmt23_bleu_chrf_through_our_scoring(shared_data, tmp_path):
    """Staged WMT23 de-en system outputs: our hypotheses path gives the official BLEU/chrF."""
    d = shared_data / "wmt23_de_en"
    official = {r["system"]: r for r in csv.DictReader(open(d / "official_scores.de-en.tsv"), delimiter="\t")}
    systems = ("GPT4-5shot", "ONLINE-W", "ONLINE-B", "NLLB_Greedy", "AIRC")  # best to worst BLEU range
    files = [d / "system-outputs" / f"generaltest2023.de-en.hyp.{name}.en" for name in systems]
    rows, notes = tr.evaluate_translation(
        None, None, WMT23, data_dir=shared_data, hypotheses=files, generate=False, comet_model=None, out_dir=tmp_path
    )
    assert [r["method"] for r in rows] == list(systems)
    for row in rows:
        ref = official[row["method"]]
        assert row["n"] == 549
        assert round(row["bleu"], 2) == pytest.approx(float(ref["BLEU_refA"]), abs=1e-9), row["method"]
        assert round(row["chrf"], 2) == pytest.approx(float(ref["chrF_refA"]), abs=1e-9), row["method"]
        assert row["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        assert row["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
        assert row["comet"] is None
    gpt4 = next(r for r in rows if r["method"] == "GPT4-5shot")
    assert (round(gpt4["bleu"], 1), round(gpt4["chrf"], 1)) == (47.9, 69.8)
    assert any("COMET disabled" in n for n in notes)


def test_hypotheses_with_limit_and_bad_length(shared_data, tmp_path):
    d = shared_data / "wmt23_de_en"
    f = d / "system-outputs" / "generaltest2023.de-en.hyp.ONLINE-B.en"
    rows, _ = tr.evaluate_translation(None, None, WMT23, data_dir=shared_data, limit=20, hypotheses=[f], generate=False, comet_model=None)
    hyps = f.read_text(encoding="utf-8").splitlines()[:20]
    refs = (d / "generaltest2023.de-en.ref.refA.en").read_text(encoding="utf-8").splitlines()[:20]
    assert rows[0]["n"] == 20 and rows[0]["bleu"] == pytest.approx(sacrebleu_scores(hyps, refs).bleu)
    short = tmp_path / "short.en"
    short.write_text("\n".join(hyps[:10]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="one line per source segment"):
        tr.evaluate_translation(None, None, WMT23, data_dir=shared_data, hypotheses=[short], generate=False, comet_model=None)


def test_comet_in_suite_rows(tiny_comet, shared_data):
    """Every system of a task gets COMET from one run of COMET's environment (the model loaded once)."""
    d = shared_data / "wmt23_de_en" / "system-outputs"
    files = [d / "generaltest2023.de-en.hyp.AIRC.en", d / "generaltest2023.de-en.hyp.GPT4-5shot.en"]
    rows, notes = tr.evaluate_translation(
        None, None, WMT23, data_dir=shared_data, limit=4, hypotheses=files, generate=False, comet_model=str(tiny_comet)
    )
    assert [r["comet_model"] for r in rows] == [str(tiny_comet)] * 2
    assert all(isinstance(r["comet"], float) for r in rows) and rows[0]["comet"] != rows[1]["comet"]
    assert not notes


def test_missing_comet_model_is_reported_and_bleu_still_computed(shared_data, tmp_path, monkeypatch):
    """A model that cannot be loaded (offline, no cache) is a note, not an error: checked before COMET's
    environment starts (any existing Python stands in for it here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("ANLLM_COMET_PYTHON", sys.executable)
    f = shared_data / "wmt23_de_en" / "system-outputs" / "generaltest2023.de-en.hyp.AIRC.en"
    rows, notes = tr.evaluate_translation(
        None, None, WMT23, data_dir=shared_data, limit=5, hypotheses=[f], generate=False, comet_model="Unbabel/wmt22-comet-da"
    )
    assert rows[0]["comet"] is None and rows[0]["bleu"] > 0
    assert any("COMET not computed" in n and "translation.comet_model=PATH" in n for n in notes)
    with pytest.raises(CometUnavailable, match="does not exist"):
        resolve_comet_checkpoint(str(tmp_path / "nope" / "model.ckpt"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(CometUnavailable, match="not a COMET model directory"):
        resolve_comet_checkpoint(str(tmp_path / "notamodel"))


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir .* does not exist"):
        tr.load_test_set(WMT23, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="generaltest2023.de-en.src.de"):
        tr.load_test_set(WMT23, tmp_path / "empty")
    with pytest.raises(ValueError, match="Unknown translation task"):
        tr.load_test_set("wmt99", tmp_path)


# ---- prompts --------------------------------------------------------------------------------------


def test_prompt_plain_and_ac():
    """Same prompt as SFT builds (Alpaca prompt_input); AC: anchors after every sentence of the
    preamble, the instruction and the source; outputs cleaned to one line without anchors."""
    from anllm.data.sft import build_alpaca_prompt

    src = "Der Hund läuft. Die Katze schläft! Ende gut"
    plain = tr.build_prompt(src)
    assert plain == build_alpaca_prompt("Translate the following sentences from German to English.", src)
    assert plain.startswith("Below is an instruction") and plain.endswith("### Response:\n")
    assert "### Instruction:\nTranslate the following sentences from German to English.\n\n### Input:\n" + src in plain
    ac = tr.build_prompt(src, anchor_token="<AC>")
    assert "further context.<AC> Write a response that appropriately completes the request.<AC>\n\n### Instruction:" in ac
    assert "from German to English.<AC>\n\n### Input:" in ac
    assert "Der Hund läuft.<AC> Die Katze schläft!<AC> Ende gut<AC>\n\n### Response:" in ac
    assert ac.count("<AC>") == 2 + 1 + 3
    assert tr.clean_output(" The dog runs.<AC> The cat\nsleeps!<AC>\n\n### Instruction: more", "<AC>") == "The dog runs. The cat sleeps!"


# ---- generation -----------------------------------------------------------------------------------


def test_greedy_loop_equals_generate(ep_model, tok, sources):
    """Our loop = greedy ``generate`` for the full and the anchor cache (no EOS in 12 steps here)."""
    ids, am = _batch(tok, [tr.build_prompt(s) for s in sources[:3]])
    for method, cache in (("full", None), ("anchor", anllm.AnchorCache())):
        out = greedy_generate(ep_model, ids, am, method, max_new_tokens=12, eos_token_ids=[2], pad_token_id=0)
        kwargs = {} if cache is None else {"past_key_values": cache}
        ctx = anllm.anchor_attention(ep_model, enabled=method != "full")
        with ctx, torch.no_grad():
            ref = ep_model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=2, **kwargs)
        assert torch.equal(out.tokens, ref[:, ids.shape[1] :]), method


def test_anchor_cache_is_lossless_and_prunes(ep_model, tok, sources):
    """AnSAN + AnchorCache gives exactly the tokens/text of AnSAN + full cache, with anchors emitted
    (and pruned) during decoding, and a much smaller cache."""
    dot = tok.convert_tokens_to_ids(".")
    ids, am = _batch(tok, [tr.build_prompt(s) for s in sources])
    kw = dict(max_new_tokens=24, eos_token_ids=[2], pad_token_id=0)
    ref = greedy_generate(ep_model, ids, am, "ansan", **kw)
    anc = greedy_generate(ep_model, ids, am, "anchor", **kw)
    assert torch.equal(anc.tokens, ref.tokens)
    # anchors mid-generation, with tokens decoded after their pruning, in most rows
    mid = [bool(((row == dot).nonzero().flatten() < len(row) - 3).any()) for row in anc.tokens]
    assert sum(mid) >= 3, mid
    full = tr.translate(ep_model, tok, sources, "ansan", batch_size=2, max_new_tokens=24, progress=False)
    run = tr.translate(ep_model, tok, sources, "anchor", batch_size=2, max_new_tokens=24, progress=False)
    assert run.raw == full.raw and run.hypotheses == full.hypotheses
    assert run.seen == full.seen and full.kept == full.seen
    assert all(k < s for k, s in zip(run.kept, run.seen))
    assert all(k <= m <= s for k, m, s in zip(run.kept, run.max_kept, run.seen))
    m = run.cache_metrics()
    assert 0.5 < m["c_red"] < 1 and m["max_kv"] < full.cache_metrics()["max_kv"]


def test_rows_finishing_early_do_not_disturb_the_batch(ep_model, tok, sources):
    """A row that hits EOS stops feeding tokens; the others decode as before, and every row's
    counts equal batch-size-1 decoding."""
    ids, am = _batch(tok, [tr.build_prompt(s) for s in sources[:3]])
    base = greedy_generate(ep_model, ids, am, "anchor", max_new_tokens=16, eos_token_ids=[2], pad_token_id=0)
    stop = int(base.tokens[1, 5])  # pretend row 1's 6th token is EOS
    early = greedy_generate(ep_model, ids, am, "anchor", max_new_tokens=16, eos_token_ids=[2, stop], pad_token_id=0)
    assert early.lengths[1] <= 6
    for r in range(3):
        n = early.lengths[r]
        assert torch.equal(early.tokens[r, :n], base.tokens[r, :n])
        assert (early.tokens[r, n:] == 0).all()
        one = greedy_generate(
            ep_model, ids[r : r + 1, ~(am[r] == 0)], am[r : r + 1, ~(am[r] == 0)], "anchor",
            max_new_tokens=16, eos_token_ids=[2, stop], pad_token_id=0,
        )
        assert one.lengths[0] == n and torch.equal(one.tokens[0, :n], early.tokens[r, :n])
        assert (one.seen[0], one.kept[0], one.max_kept[0]) == (early.seen[r], early.kept[r], early.max_kept[r])


def _hand_kept(ids: list[int], anchors: set[int]) -> int:
    """AnSAN keeps every anchor plus the open sentence (tokens after the last anchor)."""
    last = max((i for i, t in enumerate(ids) if t in anchors), default=-1)
    return sum(t in anchors for t in ids) + (len(ids) - 1 - last)


def test_source_kept_variant_keeps_exactly_the_prompt(ep_model, tok, sources):
    anchors = set(anllm.get_anchor_config(ep_model).anchor_token_ids)
    prompts = [tr.build_prompt(s) for s in sources[:3]]
    ids, am = _batch(tok, prompts)
    lens = am.sum(-1).tolist()
    src = greedy_generate(ep_model, ids, am, "anchor+src", max_new_tokens=16, eos_token_ids=[2], pad_token_id=0, record_trace=True)
    anc = greedy_generate(ep_model, ids, am, "anchor", max_new_tokens=16, eos_token_ids=[2], pad_token_id=0, record_trace=True)
    assert src.trace[0] == lens  # after prefill: the whole prompt, nothing else
    for r in range(3):
        prompt_ids = ids[r, am[r].bool()].tolist()
        fed = src.tokens[r, : src.lengths[r] - 1].tolist()  # the last new token is never fed
        assert anc.trace[0][r] == _hand_kept(prompt_ids, anchors)
        assert all(step[r] >= lens[r] for step in src.trace)
        assert src.kept[r] == lens[r] + _hand_kept(fed, anchors)
        assert anc.kept[r] == _hand_kept(prompt_ids + anc.tokens[r, : anc.lengths[r] - 1].tolist(), anchors)


def test_suite_end_to_end_tiny(ep_model, tok, sources, tmp_path):
    from omegaconf import OmegaConf

    from anllm.eval.suites import ModelBundle, load_suite

    refs = ["The dog runs.", "A house.", "The lake is big.", "Nothing.", "Hello there."]
    data = _fake_data_dir(tmp_path, sources, refs)
    suite = load_suite("translation")
    assert suite is tr.SUITE and "wmt23_de_en" in suite.tasks
    bundle = ModelBundle(model=ep_model, tokenizer=tok, checkpoint="tiny", anchor=anllm.get_anchor_config(ep_model).to_dict())
    cfg = OmegaConf.create(
        {"data_dir": str(data), "limit": 4, "batch_size": 2, "modes": ["full", "anchor"],
         "translation": {"max_new_tokens": 10, "comet_model": None}}
    )
    out = tmp_path / "out"
    rows = suite.run_task(bundle, cfg, WMT23, out)
    assert [r["method"] for r in rows] == ["full", "anchor+src", "anchor"]
    by = {r["method"]: r for r in rows}
    assert by["full"]["c_red"] == 0 and by["anchor"]["c_red"] > by["anchor+src"]["c_red"] > 0
    assert all(r["n"] == 4 and r["bleu"] >= 0 and r["tokens_per_s"] > 0 for r in rows)
    segs = [json.loads(x) for x in (out / "anchor.segments.jsonl").read_text().splitlines()]
    assert len(segs) == 4 and by["full"]["max_kv"] == pytest.approx(sum(s["kv_seen"] for s in segs) / 4)
    assert len((out / "anchor_src.hyp.en").read_text().splitlines()) == 4
    assert (out / "cache_over_steps.png").stat().st_size > 0 and (out / "ansan_mask.png").stat().st_size > 0
    assert any("COMET disabled" in n for n in bundle.notes)


def test_plain_model_runs_full_only(tok, sources, tmp_path):
    from anllm.eval.suites import ModelBundle

    model = tiny_llama(vocab_size=len(tok) + 8)
    data = _fake_data_dir(tmp_path, sources[:2], ["a", "b"])
    bundle = ModelBundle(model=model, tokenizer=tok, checkpoint="plain")
    cfg = {"data_dir": str(data), "batch_size": 2, "translation": {"max_new_tokens": 4, "comet_model": None}}
    rows = tr.run_task(bundle, cfg, WMT23, tmp_path / "o")
    assert [r["method"] for r in rows] == ["full"]
    assert any("no anchor settings" in n for n in bundle.notes)
    with pytest.raises(ValueError, match="anchor-aware"):
        tr.translate(model, tok, sources[:1], "anchor", max_new_tokens=2, progress=False)


def test_chat_prompt_format(ep_model, tok, sources):
    """prompt_format=chat: one user turn of the tokenizer's chat template, specials not doubled."""
    import copy

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = (
        "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    )
    prompt = tr.build_chat_prompt("Der Hund läuft. Ende", chat_tok, anchor_token="<AC>")
    assert prompt == "<s>Translate the following sentences from German to English.<AC>\n\nDer Hund läuft.<AC> Ende<AC></s><s>"
    run = tr.translate(ep_model, chat_tok, sources[:2], "anchor", max_new_tokens=3, prompt_format="chat", progress=False)
    assert run.prompts[0].startswith("<s>Translate") and run.prompt_tokens[0] == len(chat_tok(run.prompts[0], add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="chat template"):
        tr.translate(ep_model, tok, sources[:1], "anchor", max_new_tokens=2, prompt_format="chat", progress=False)
    with pytest.raises(ValueError, match="prompt_format"):
        tr.translate(ep_model, tok, sources[:1], "anchor", max_new_tokens=2, prompt_format="vicuna", progress=False)


def test_translation_reports_both_cache_reductions(ep_model, tok, sources):
    """C⇓ at the end of each segment and C⇓ at the peak (largest cache held at any point, prefill
    chunks included): the authors' MaxKV-based definition."""
    run = tr.translate(ep_model, tok, sources[:2], "anchor", max_new_tokens=6, progress=False, prefill_chunk_size=16)
    m = run.cache_metrics()
    assert m["c_red_peak"] == pytest.approx(1 - sum(run.max_kept) / sum(run.seen))
    assert m["c_red"] == pytest.approx(1 - sum(run.kept) / sum(run.seen))
    assert all(p >= k for p, k in zip(run.max_kept, run.kept)) and m["c_red_peak"] <= m["c_red"]
    # the prefill's chunks count toward the peak: read in one chunk, the peak can only be lower or equal
    one = tr.translate(ep_model, tok, sources[:2], "anchor", max_new_tokens=6, progress=False, prefill_chunk_size=4096)
    assert one.hypotheses == run.hypotheses  # chunked prefill is lossless
    assert sum(run.max_kept) >= sum(one.max_kept)


def test_paper_decoding_samples_with_the_authors_settings(ep_model, tok, sources):
    """decoding=paper: temperature 0.1, top-k 40, top-p 0.1 through transformers' warpers, seeded."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    proc = tr.sampling_processor("paper")
    kinds = [type(p) for p in proc]
    assert kinds == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    assert (proc[0].temperature, proc[1].top_k, proc[2].top_p) == (0.1, 40, 0.1)
    assert tr.sampling_processor("greedy") is None
    a = tr.translate(ep_model, tok, sources[:2], "anchor", max_new_tokens=5, progress=False, decoding="paper", seed=3)
    b = tr.translate(ep_model, tok, sources[:2], "anchor", max_new_tokens=5, progress=False, decoding="paper", seed=3)
    assert a.hypotheses == b.hypotheses  # seeded
    # top-p 0.1 keeps only the most likely token unless it has < 10% probability: a flat distribution is sampled
    flat = torch.zeros(1, 50)
    picks = {int(torch.multinomial(torch.softmax(proc(None, flat), -1), 1)) for _ in range(30)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="decoding"):
        tr.sampling_processor("beam")
