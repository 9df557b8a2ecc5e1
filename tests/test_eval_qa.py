"""QA suite: local lm-eval tasks on the real staged files, scoring modes, cache accounting, AC prompts.

CPU, ~1 min on an idle machine: a tiny random Llama with the SmolLM2 tokenizer (real text, real EP anchors).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import anllm
from anllm.anchors import AnchorConfig
from anllm.eval.lm_eval_model import anchor_qa_context
from anllm.eval.qa import cache_metrics, run_task
from anllm.eval.scoring import MultiModeScorer
from anllm.eval.suites import ModelBundle
from anllm.eval.tasks import QA_TASKS, load_task
from anllm.eval.tasks.fewshot import fewshot_docs
from anllm.testing import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("lm_eval").setLevel(logging.ERROR)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _bundle(tokenizer, mode: str) -> ModelBundle:
    import copy

    tok = copy.deepcopy(tokenizer)
    model = tiny_llama(vocab_size=len(tok) + 8)
    model, tok = anllm.prepare_model(model, tok, mode=mode)
    return ModelBundle(model, tok, f"tiny-{mode}", anchor=model.config.anllm, anchor_source="override")


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


# ---- local task definitions read the real files --------------------------------------------------

# (task, first document's context fragment, gold index, gold choice) read off the staged files by hand.
KNOWN = [
    ("arc_easy", "Question: Which statement best explains why photosynthesis", 0, "Sunlight is the source of energy for nearly all ecosystems."),
    ("arc_challenge", "Question: An astronomer observes that a planet rotates faster", 2, "Planetary days will become shorter."),
    ("openbookqa", "A person wants to start saving money", 1, "quit eating lunch out"),
    ("piqa", "Question: How do I ready a guinea pig cage", 0, "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips"),
    ("hellaswag", "Roof shingle removal: A man is sitting on a roof. He", 3, "starts pulling up roofing on a roof."),
    ("sciq", "Question: Who proposed the theory of evolution by natural selection?", 3, "darwin"),
    ("boolq", "Question: does ethanol take more energy make that produces?\nAnswer:", 0, "no"),
]


@pytest.mark.parametrize("name,fragment,gold,choice", KNOWN, ids=[k[0] for k in KNOWN])
def test_local_task_reads_staged_file_with_right_gold(shared_data, tmp_path, name, fragment, gold, choice):
    task = load_task(name, "local", shared_data, 0, tmp_path)
    doc = _docs(task)[0]
    assert fragment in task.doc_to_text(doc)
    assert task.doc_to_target(doc) == gold
    assert task.doc_to_choice(doc)[gold].startswith(choice)


def test_local_winogrande_is_partial_scoring(shared_data, tmp_path):
    task = load_task("winogrande", "local", shared_data, 0, tmp_path)
    doc = _docs(task)[0]
    assert task.doc_to_text(doc) == 1  # answer "2" -> the second context (Maria)
    assert task.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert task.doc_to_target(doc) == "always got the easier cases."


def test_local_splits_and_sizes(shared_data, tmp_path):
    sizes = {"arc_easy": 2376, "sciq": 1000, "winogrande": 1267, "boolq": 3270}
    for name, n in sizes.items():
        assert len(_docs(load_task(name, "local", shared_data, 0, tmp_path))) == n
    assert "validation" in QA_TASKS["sciq"].note  # SciQ test split is absent: said in the report


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "boolq"])
def test_five_shot_renders_the_olmes_demonstrations(shared_data, tmp_path, name):
    """Where OLMES and lm-eval share the prompt format, lm-eval's 5-shot context is exactly the prefix."""
    task = load_task(name, "local", shared_data, 5, tmp_path)
    doc = _docs(task)[0]
    prefix = json.loads((shared_data / "qa" / "olmes_5shot_prefixes.json").read_text())[name]["fewshot_prefix"]
    assert task.fewshot_context(doc, 5) == prefix + task.doc_to_text(doc)


def test_fewshot_docs_parse_every_task(shared_data):
    for name in QA_TASKS:
        docs = fewshot_docs(name, shared_data / "qa" / "olmes_5shot_prefixes.json")
        assert len(docs) == 5
    boolq = fewshot_docs("boolq", shared_data / "qa" / "olmes_5shot_prefixes.json")
    assert [d["answer"] for d in boolq][-1] is True and not boolq[-1]["question"].endswith("?")


def test_unknown_task_and_missing_data_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Unknown QA task 'mmlu'"):
        load_task("mmlu", "local", tmp_path, 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_task("arc_easy", "local", tmp_path / "nowhere", 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="qa/arc_easy/test.jsonl"):
        load_task("arc_easy", "local", tmp_path, 0, tmp_path)


# ---- AC prompts ------------------------------------------------------------------------------------

def test_ac_context_anchors_sentences_and_demos_but_not_the_query():
    ctx = "Question: Is it? Yes.\nAnswer: no\n\nThe sky is blue. Grass is green.\nQuestion: What color is the sky?\nAnswer:"
    out = anchor_qa_context(ctx, "<AC>")
    assert out == (
        "Question: Is it?<AC> Yes.<AC>\nAnswer: no<AC>\n\n"
        "The sky is blue.<AC> Grass is green.<AC>\nQuestion: What color is the sky?\nAnswer:"
    )
    # Without a "Question:" line (HellaSwag, OpenBookQA, WinoGrande) the open last sentence is the query.
    assert anchor_qa_context("Cooking: He cuts onions. Then he", "<AC>") == "Cooking: He cuts onions.<AC> Then he"
    assert anchor_qa_context("Frilled sharks live deep, so they are", "<AC>") == "Frilled sharks live deep, so they are"


# ---- scoring: hand-made example -------------------------------------------------------------------

def _hand_model():
    """Tiny Llama whose only anchor is token 5 (EP settings set by hand)."""
    model = tiny_llama()
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[5]).to_dict()
    anllm.prepare_model(model, None)
    return model


def test_cache_accounting_matches_hand_computed_values():
    model = _hand_model()
    ctx = [10, 11, 5, 12, 13, 14, 5, 20, 21]  # two sentences end in anchors; "20 21" is the open one
    conts = [[30, 31, 32], [40]]
    reqs = [(("c", i), ctx, c) for i, c in enumerate(conts)]
    scorer = MultiModeScorer(model, ["full", "ansan", "anchor", "streamingllm", "knorm"], warmup=False)
    scorer.score(reqs)
    # Full cache when the continuation is scored: 9 context + (len - 1) fed continuation tokens.
    assert [scorer.result("full", k).kv_total for k, _, _ in reqs] == [11, 9]
    assert [scorer.result("full", k).kv_kept for k, _, _ in reqs] == [11, 9]
    # Anchor cache: 2 anchors + the 2 open-sentence tokens = 4 context entries.
    assert [scorer.result("anchor", k).kv_kept for k, _, _ in reqs] == [6, 4]
    for b in ("streamingllm", "knorm"):  # equal budget
        assert [scorer.result(b, k).kv_kept for k, _, _ in reqs] == [6, 4]
    m = cache_metrics([[scorer.result("anchor", k) for k, _, _ in reqs]])
    assert m == {"c_red": pytest.approx(1 - 10 / 20), "max_kv": 6.0, "kv_kept": 10, "kv_total": 20}
    assert cache_metrics([[scorer.result("full", k) for k, _, _ in reqs]])["c_red"] == 0.0


def test_anchor_scores_equal_ansan_and_full_matches_plain_forward():
    model = _hand_model()
    ctx = [1, 10, 11, 5, 12, 13, 14, 5, 20, 21]
    conts = [[30, 31, 5, 32], [40], [41, 42]]
    reqs = [(("c", i), ctx, c) for i, c in enumerate(conts)] + [(("d", 0), [7, 8, 5, 9], [3, 4])]
    scorer = MultiModeScorer(model, ["full", "ansan", "anchor", "stock"], batch_size=2, warmup=False,
                             prefill_chunk_size=3)  # contexts read into the anchor cache 3 tokens at a time
    scorer.score(reqs)
    for key, c, cont in reqs:
        assert scorer.result("anchor", key).logprob == pytest.approx(scorer.result("ansan", key).logprob, abs=1e-4)
        # lm-eval's per-request forward (the paper's speed baseline) gives the full-cache scores
        assert scorer.result("stock", key).logprob == pytest.approx(scorer.result("full", key).logprob, abs=1e-4)
        with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
            ids = torch.tensor([c + cont])
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        ref = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(cont))
        assert scorer.result("full", key).logprob == pytest.approx(ref, abs=1e-4)
    # The AnSAN mask does change scores (otherwise the equality above would prove nothing).
    assert scorer.result("ansan", ("c", 0)).logprob != pytest.approx(scorer.result("full", ("c", 0)).logprob, abs=1e-4)


def test_baselines_need_anchor_mode_and_plain_models_only_full():
    with pytest.raises(ValueError, match="need mode 'anchor'"):
        MultiModeScorer(_hand_model(), ["full", "streamingllm"])
    with pytest.raises(ValueError, match="anchor-aware"):
        MultiModeScorer(tiny_llama(), ["full", "anchor"])


# ---- lm-eval integration ----------------------------------------------------------------------------

def _cfg(data_dir, **kw):
    base = {"data_dir": str(data_dir), "limit": 4, "num_fewshot": 0, "batch_size": 2,
            "modes": ["full", "ansan", "anchor"], "qa": {"baselines": ["streamingllm"]}}
    return OmegaConf.create({**base, **kw})


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode,task,shots", [("ep", "boolq", 0), ("ac", "sciq", 5)])
def test_lm_eval_anchor_and_ansan_give_identical_predictions(shared_data, tokenizer, tmp_path, mode, task, shots):
    bundle = _bundle(tokenizer, mode)
    rows = run_task(bundle, _cfg(shared_data, num_fewshot=shots), task, tmp_path)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "ansan", "anchor", "streamingllm"}
    assert by["anchor"]["agree"] == 1.0 and by["anchor"]["agree_ref"] == "ansan"
    assert by["anchor"]["acc"] == by["ansan"]["acc"] and by["anchor"]["acc_norm"] == by["ansan"]["acc_norm"]
    preds = _predictions(tmp_path / f"predictions_{shots}shot.jsonl")
    assert len(preds) == 4
    for p in preds:
        assert p["anchor"]["pred"] == p["ansan"]["pred"]
        assert p["anchor"]["logprobs"] == pytest.approx(p["ansan"]["logprobs"], abs=1e-3)
        assert all(k < t for k, t in zip(p["anchor"]["kv_kept"], p["anchor"]["kv_total"]))  # context has sentences
        assert p["streamingllm"]["kv_kept"] == p["anchor"]["kv_kept"]
    assert 0 < by["anchor"]["c_red"] < 1 and by["full"]["c_red"] == 0 and by["ansan"]["c_red"] == 0
    assert by["anchor"]["max_kv"] < by["full"]["max_kv"]
    assert by["full"]["t_up"] == 1.0 and by["anchor"]["time_s"] > 0


def test_ac_requests_carry_anchor_tokens(shared_data, tokenizer, tmp_path):
    """The AC model sees <AC> after the support sentences (SciQ), the full model run the same text."""
    from anllm.eval.lm_eval_model import AnchorLM

    bundle = _bundle(tokenizer, "ac")
    lm = AnchorLM(pretrained=bundle.model, tokenizer=bundle.tokenizer, mode="anchor")
    ctx, _ = lm.encode_request("Cells divide. Genes copy.\nQuestion: What copies?\nAnswer:", " genes")
    ac_id = bundle.tokenizer.convert_tokens_to_ids("<AC>")
    assert ctx.count(ac_id) == 2


def test_plain_model_runs_full_only_and_says_so(shared_data, tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(tokenizer) + 8)
    bundle = ModelBundle(model, tokenizer, "plain")
    rows = run_task(bundle, _cfg(shared_data, limit=2), "arc_easy", tmp_path)
    assert [r["method"] for r in rows] == ["full"]
    assert any("only 'full' ran" in n for n in bundle.notes)


def test_full_mode_reproduces_stock_hflm(shared_data, tokenizer, tmp_path):
    """Our lm-eval model in mode 'full' gives lm-eval's own HFLM log-likelihoods, request by request."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from anllm.eval.lm_eval_model import AnchorLM
    from anllm.eval.tasks import task_spec

    model = tiny_llama(vocab_size=len(tokenizer) + 8)
    spec = task_spec("hellaswag", "local", shared_data, 0, tmp_path)
    out = {}
    for name, lm in {
        "hf": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2),
        "anllm": AnchorLM(pretrained=model, tokenizer=tokenizer, mode="full", batch_size=2),
    }.items():
        res = simple_evaluate(model=lm, tasks=[spec], limit=3, task_manager=TaskManager(include_defaults=False),
                              bootstrap_iters=0, verbosity="ERROR")
        out[name] = [[float(r[0]) for r in s["filtered_resps"]] for s in res["samples"]["hellaswag"]]
    assert len(out["hf"]) == 3
    for a, b in zip(out["hf"], out["anllm"]):
        assert a == pytest.approx(b, abs=1e-4)
