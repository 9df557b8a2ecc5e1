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


# ---- baselines: which keys they keep (compress once) and what they attend (streaming) -----------------

def _options_model(**cfg):
    """Tiny Llama whose only anchor is token 5, with extra AnSAN options."""
    model = tiny_llama()
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[5], **cfg).to_dict()
    anllm.prepare_model(model, None)
    return model


# Groups of different lengths (left padding inside a batch), sentences of various sizes ending in 5;
# one continuation holds an anchor itself.
_CTX = {
    "a": [1, 10, 11, 12, 13, 5, 14, 15, 5, 16, 17, 18, 19, 20, 21, 5, 22, 23, 24],
    "b": [1, 60, 61, 62, 63, 64, 65, 66, 5, 67, 68],
    "c": [1, 80, 81, 5, 82, 83, 84, 85, 86, 87, 88, 89, 90, 5, 91, 92, 93, 94, 95, 96, 97, 98, 5, 99],
    "d": [1, 50],
}
_CONTS = {"a": [[30, 31, 32], [40], [41, 5, 42, 43]], "b": [[70, 71], [72]], "c": [[100, 101], [102, 103, 104]],
          "d": [[51, 52]]}
STREAM_REQS = [((g, i), _CTX[g], c) for g, conts in _CONTS.items() for i, c in enumerate(conts)]


def _oracle_rows(model, seq):
    """Keys each token of ``seq`` attends under the model's AnSAN rule, from the loop oracle."""
    from oracles import reference_mask

    o = model._anllm_attention.options
    M = reference_mask([t == 5 for t in seq], [True] * len(seq), None, num_sink_tokens=o.num_sink_tokens,
                       anchors_see_anchors=o.anchors_see_anchors, window=o.window)
    return [sum(r) for r in M]


def _masked_logprob(model, seq, cont, mask=None):
    """log P(cont | context) of one plain forward (anchor rule off) over ``seq = context + cont[:-1]``
    with a hand-given ``[L, L]`` mask (default: causal)."""
    L = len(seq)
    mask = torch.ones((L, L), dtype=torch.bool).tril() if mask is None else torch.tensor(mask)
    with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
        logits = model(input_ids=torch.tensor([seq]), attention_mask=mask[None, None]).logits.float()
    logp = torch.log_softmax(logits, -1)[0]
    start = L - len(cont)  # cont[j] is predicted at position len(context) - 1 + j
    return sum(float(logp[start + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("cfg", [{}, {"num_sink_tokens": 1, "window": 2}], ids=["plain-rule", "sinks+window"])
def test_streaming_baseline_matches_oracle_mask_and_budget(cfg):
    """streamingllm_stream(_q): left-padded batched scores equal a plain forward of each context +
    continuation with the loop oracle's StreamingLLM mask, at the oracle AnSAN peak (or per-token) budget."""
    from oracles import streaming_reference

    model = _options_model(**cfg)
    modes = ["full", "anchor", "streamingllm", "streamingllm_stream", "streamingllm_stream_q"]
    scorer = MultiModeScorer(model, modes, batch_size=3, warmup=False, num_sink_tokens=2)
    scorer.score(STREAM_REQS)
    differs, truncated = 0, 0
    for key, ctx, cont in STREAM_REQS:
        seq = ctx + cont[:-1]  # what is fed: the last continuation token is predicted, never fed
        L = len(seq)
        per_query = _oracle_rows(model, seq)
        budget = max(per_query)  # the anchor reading's peak for this context + continuation
        truncated += budget < L
        s = scorer.result("streamingllm_stream", key)
        ref = _masked_logprob(model, seq, cont, streaming_reference(L, [budget] * L, 2))
        assert s.logprob == pytest.approx(ref, abs=1e-4), key
        assert (s.kv_total, s.kv_kept, s.peak_kv) == (L, min(budget, L), budget), key
        q = scorer.result("streamingllm_stream_q", key)
        ref_q = _masked_logprob(model, seq, cont, streaming_reference(L, per_query, 2))
        assert q.logprob == pytest.approx(ref_q, abs=1e-4), key
        assert (q.kv_total, q.kv_kept, q.peak_kv) == (L, per_query[-1], budget), key
        # Peaks: full = everything; anchor >= what its tokens attend; compress-once = the full context first.
        full, anc, comp = (scorer.result(m, key) for m in ("full", "anchor", "streamingllm"))
        assert full.peak_kv == full.kv_total == L
        assert anc.peak_kv >= budget and anc.peak_kv >= anc.kv_kept
        if len(ctx) >= 2:
            assert comp.peak_kv == max(len(ctx) - 1, comp.kv_kept)
        differs += abs(s.logprob - comp.logprob) > 1e-3
    assert truncated >= 4  # the budget bites (otherwise streaming would be the full forward)
    assert differs >= 1  # streaming and compress-once are different methods


def test_anchor_peak_is_the_ansan_peak_when_continuations_have_no_anchor():
    """Token by token, the anchor cache holds what its tokens attend: the streaming budget is the anchor's peak."""
    model = _options_model()
    scorer = MultiModeScorer(model, ["anchor", "streamingllm_stream"], batch_size=3, warmup=False)
    scorer.score(STREAM_REQS)
    for key, ctx, cont in STREAM_REQS:
        if 5 not in cont:
            assert scorer.result("anchor", key).peak_kv == scorer.result("streamingllm_stream", key).peak_kv, key


def _kept_attention(model, masks):
    """Context manager: each layer attends with ``masks[layer]`` (``[1, H_kv, L, L]`` bool, per KV head)
    instead of the mask it is given."""
    import contextlib

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, **kw):
        m = masks[module.layer_idx].repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        return sdpa_attention_forward(module, query, key, value, m, **kw)

    @contextlib.contextmanager
    def ctx():
        AttentionInterface.register("anllm_test_kept", forward)
        before = model.config._attn_implementation
        model.set_attn_implementation("anllm_test_kept")
        try:
            yield
        finally:
            model.set_attn_implementation(before)

    return ctx()


def _kept_positions(model, method, ctx, keep, sinks):
    """Per layer, ``[H_kv, keep]`` context positions (of ``ctx[:-1]``) a compress-once cache keeps, by hand."""
    from oracles import streaming_reference

    n = len(ctx) - 1
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    if method == "streamingllm":  # what the last prefilled token's rolling window would hold
        row = streaming_reference(n, [keep] * n, sinks)[n - 1]
        pos = torch.tensor([k for k in range(n) if row[k]])
        return [pos[None].expand(n_kv, -1) for _ in range(cfg.num_hidden_layers)]
    # knorm: the keep lowest-norm keys per layer and KV head, from a plain forward's cache of ctx[:-1]
    with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
        cache = model(input_ids=torch.tensor([ctx[:-1]]), use_cache=True).past_key_values
    return [layer.keys[0].float().norm(dim=-1).topk(keep, largest=False).indices.sort(-1).values
            for layer in cache.layers]


@pytest.mark.parametrize("method", ["streamingllm", "knorm"])
def test_compress_once_baselines_keep_the_right_keys(method):
    """Compress-once scores equal a plain forward of context + continuation in which the fed tokens (the
    last context token and the continuation) attend only the hand-picked kept context keys and each other,
    and the context itself is read causally (its keys are computed over the whole context, as in the prefill)."""
    model = _hand_model()
    reqs = [r for r in STREAM_REQS if len(r[1]) >= 2]
    scorer = MultiModeScorer(model, ["anchor", method], batch_size=3, warmup=False, num_sink_tokens=2)
    scorer.score(reqs)
    cfg = model.config
    bites = 0
    for key, ctx, cont in reqs:
        n = len(ctx) - 1  # the prefilled and compressed part: the context minus its last token
        kept_ctx = scorer.result("anchor", key).kv_kept - (len(cont) - 1)  # the anchor cache's budget
        keep = min(kept_ctx - 1, n)
        bites += keep < n
        assert scorer.result(method, key).kv_kept == keep + len(cont)
        seq = ctx + cont[:-1]
        L = len(seq)
        masks = []
        for pos in _kept_positions(model, method, ctx, keep, sinks=2):
            m = torch.ones((L, L), dtype=torch.bool).tril()[None].repeat(cfg.num_key_value_heads, 1, 1)
            m[:, n:, :n] = False
            for h in range(cfg.num_key_value_heads):
                m[h, n:, pos[h]] = True
            masks.append(m[None])
        with _kept_attention(model, masks):
            ref = _masked_logprob(model, seq, cont)
        assert scorer.result(method, key).logprob == pytest.approx(ref, abs=1e-4), key
    assert bites >= 4  # compression drops keys in most groups


def test_compress_once_streamingllm_equals_a_forward_over_the_kept_tokens_at_their_positions():
    """One layer (keys are then a function of token and position only): compress-once StreamingLLM equals
    the plain model run on [kept context tokens + last context token + continuation] with the ORIGINAL
    position ids (the kept keys keep their RoPE rotation). With more layers this shortcut is not exact: a
    kept key was computed over the whole context."""
    from oracles import streaming_reference

    model = tiny_llama(num_layers=1)
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[5]).to_dict()
    anllm.prepare_model(model, None)
    reqs = [r for r in STREAM_REQS if len(r[1]) >= 2]
    scorer = MultiModeScorer(model, ["anchor", "streamingllm"], batch_size=3, warmup=False, num_sink_tokens=2)
    scorer.score(reqs)
    for key, ctx, cont in reqs:
        n = len(ctx) - 1
        keep = min(scorer.result("anchor", key).kv_kept - len(cont), n)
        row = streaming_reference(n, [keep] * n, 2)[n - 1]
        kept = [k for k in range(n) if row[k]]
        tokens = [ctx[k] for k in kept] + ctx[n:] + cont[:-1]
        pos = kept + list(range(n, n + len(cont)))
        with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
            logits = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([pos])).logits.float()
        logp = torch.log_softmax(logits, -1)[0, len(kept):]
        ref = sum(float(logp[j, t]) for j, t in enumerate(cont))
        assert scorer.result("streamingllm", key).logprob == pytest.approx(ref, abs=1e-4), key


def test_streaming_baselines_need_an_anchor_model_and_are_valid_qa_baselines(shared_data):
    from anllm.eval.qa import check_config

    with pytest.raises(ValueError, match="anchor-aware"):
        MultiModeScorer(tiny_llama(), ["full", "streamingllm_stream"])
    MultiModeScorer(_hand_model(), ["full", "streamingllm_stream_q"])  # no anchor mode needed
    check_config(_cfg(shared_data, qa={"baselines": ["streamingllm_stream", "streamingllm_stream_q", "knorm"]}))
    with pytest.raises(ValueError, match="Unknown baseline"):
        check_config(_cfg(shared_data, qa={"baselines": ["streaming"]}))


def test_lm_eval_rows_report_peak_kv_for_every_mode(shared_data, tokenizer, tmp_path):
    from anllm.eval.report import build_tables

    bundle = _bundle(tokenizer, "ep")
    cfg = _cfg(shared_data, limit=2, qa={"baselines": ["streamingllm", "streamingllm_stream", "streamingllm_stream_q"]})
    rows = run_task(bundle, cfg, "arc_easy", tmp_path)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "ansan", "anchor", "streamingllm", "streamingllm_stream", "streamingllm_stream_q"}
    assert all(r["peak_kv"] is not None for r in rows)
    # compress-once prefills the whole context; the streaming baselines never hold more than anchor's peak
    assert by["full"]["peak_kv"] >= by["streamingllm"]["peak_kv"] > by["anchor"]["peak_kv"]
    assert by["streamingllm_stream"]["peak_kv"] <= by["anchor"]["peak_kv"]
    assert by["streamingllm_stream_q"]["peak_kv"] == by["streamingllm_stream"]["peak_kv"]
    assert by["streamingllm"]["max_kv"] == by["anchor"]["max_kv"]  # equal kept budget, unequal peak
    preds = _predictions(tmp_path / "predictions_0shot.jsonl")
    for p in preds:
        assert p["streamingllm_stream"]["peak_kv"] == p["streamingllm_stream_q"]["peak_kv"]
        assert all(k <= pk for k, pk in zip(p["streamingllm_stream"]["kv_kept"], p["streamingllm_stream"]["peak_kv"]))
    detail = next(t for t in build_tables(rows, ["qa"]) if t.name == "qa_details")
    assert "PeakKV" in detail.headers


def test_lm_eval_rows_for_kvpress_baselines(shared_data, tokenizer, tmp_path):
    """qa.baselines takes the press names (and aliases): one row each, at the anchor cache's kept size
    (same C⇓ and MaxKV as anchor), with accuracy and time, in the report's tables."""
    from anllm.eval.report import build_tables

    bundle = _bundle(tokenizer, "ep")
    presses = ["snapkv", "h2o", "pyramidkv"]  # every press in the scorer: tests/test_eval_presses.py
    cfg = _cfg(shared_data, limit=2, modes=["full", "anchor"], qa={"baselines": presses})
    rows = run_task(bundle, cfg, "arc_easy", tmp_path)
    by = {r["method"]: r for r in rows}
    names = [("observed_attention" if p == "h2o" else p) for p in presses]
    assert set(by) == {"full", "anchor", *names}
    for m in names:
        assert by[m]["c_red"] == by["anchor"]["c_red"] > 0 and by[m]["max_kv"] == by["anchor"]["max_kv"], m
        assert by[m]["acc"] is not None and by[m]["time_s"] > 0 and by[m]["peak_kv"] > by["anchor"]["peak_kv"]
    preds = _predictions(tmp_path / "predictions_0shot.jsonl")
    assert all(p[m]["kv_kept"] == p["anchor"]["kv_kept"] for p in preds for m in names)
    detail = next(t for t in build_tables(rows, ["qa"]) if t.name == "qa_details")
    from anllm.eval.methods import REGISTRY

    order = [m.name for m in REGISTRY if m.name in names]
    assert [r[2] for r in detail.rows] == ["full", "anchor", *order]  # anchor, then the presses in registry order
