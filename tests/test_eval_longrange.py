"""Long-range suite: items (depth, length, no leaked answer), teacher forcing = greedy generation,
batched methods against one-sequence oracles, accuracy vs predictions.jsonl, config errors, the CLI path.
Runtime: seconds (tiny random model, word-level tokenizer)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers.cache_utils import DynamicCache

import anllm
from anllm.eval import longrange as lr
from anllm.testing import tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
_rng = random.Random(0)
_WORDS = ["nation", "people", "freedom", "country", "government", "history", "congress", "future", "peace",
          "the", "of", "and", "our", "we", "must", "will", "have", "great", "new", "all", "work", "together"]
PROSE = [" ".join(_rng.choices(_WORDS, k=_rng.randint(7, 13))).capitalize() + "." for _ in range(80)]
PROSE = [s for s in PROSE if len(s) >= 40]
DOCS = [("a", " ".join(PROSE[: len(PROSE) // 2])), ("b", " ".join(PROSE[len(PROSE) // 2 :]))]
TEMPLATES = ["The pass key is 0. Remember it. 0 is the pass key.", "What is the pass key?", "The pass key is",
             "What is the special magic number for x? The special magic number for x is 0.",
             "VAR X = VAR Y. VAR X holds the value", "- = . ?"]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers as pt

    return pt.Sequence([pt.WhitespaceSplit(), pt.Split(Regex(r"[.?=\-]"), "isolated"),
                        pt.Digits(individual_digits=True), pt.Split(Regex("[A-Z]"), "isolated")])


@pytest.fixture(scope="module")
def tok():
    pre = _pre_tokenizer()
    texts = PROSE + TEMPLATES + lr.ADJECTIVES + lr.NOUNS + list(lr.LETTERS) + list("0123456789")
    words = sorted({p for t in texts for p, _ in pre.pre_tokenize_str(t)})
    t = word_tokenizer(words)
    t.backend_tokenizer.pre_tokenizer = pre
    return t


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(vocab_size=len(tok))
    anllm.prepare_model(m, tok, mode="ep")
    return m


def _ntok(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def _encode(tok, item, marking=None):
    text = lr.context_text(item, marking)
    ctx = torch.tensor(tok(text)["input_ids"])
    ans = torch.tensor(tok.encode(" " + item.answer, add_special_tokens=False))
    return text, ctx, ans


def test_items_are_deterministic_at_their_depth_and_length(tok):
    longest = max(_ntok(tok, s) for s in PROSE)
    kw = dict(depths=[0.1, 0.5, 0.9], num_items=4, num_keys=3, hops=2, seed=1)
    for task in lr.TASKS:
        items = lr.build_items(task, DOCS, tok, lengths=[160, 320], **kw)
        assert items == lr.build_items(task, DOCS, tok, lengths=[160, 320], **kw)  # deterministic
        # an item depends on (task, seed, N, i) only: other lengths in the list change nothing
        assert [it for it in items if it.length == 320] == lr.build_items(task, DOCS, tok, lengths=[320], **kw)
        assert items != lr.build_items(task, DOCS, tok, lengths=[160, 320], **{**kw, "seed": 2})
        assert len(items) == (2 * 4 * 3 if task == "passkey" else 2 * 4)
        for it in items:
            text = lr.context_text(it, None)
            n = _ntok(tok, text)
            assert it.length - longest - 2 <= n <= it.length  # filled to N with complete sentences
            assert set(it.haystack) <= set(PROSE) and text.endswith(" " + it.cue)
            needles = [it.sentences[k] for k in it.needles]
            # the answer occurs only inside the asked needle
            assert it.answer in needles[0] and it.answer not in " ".join(it.haystack) and it.answer not in it.cue
            assert text.count(it.answer) == needles[0].count(it.answer)
            if task == "passkey":
                assert needles == [f"The pass key is {it.answer}. Remember it. {it.answer} is the pass key."]
                assert len(it.answer) == 5 and it.question == "What is the pass key?"
                # the needle at its depth: the fraction of the prose tokens before it, and (looser: the needle,
                # question and cue come on top of the prose) its token position / the context's length
                counts = [_ntok(tok, " " + s) for s in it.sentences]
                prose = sum(counts) - counts[it.needles[0]]
                assert abs(sum(counts[: it.needles[0]]) / prose - it.depth) <= longest / 2 / prose
                assert abs(lr.needle_depth(it, tok) - it.depth) <= (n - prose + longest / 2 + 1) / n
            elif task == "multikey":
                assert len(needles) == 3 and len({s.split(" is ")[-1] for s in needles}) == 3
                key = needles[0].split(" for ")[1].split(" is ")[0]
                assert it.cue == f"The special magic number for {key} is" and key in it.question
                assert all(key not in s for s in needles[1:])
            else:
                names = [s.split()[1] for s in needles]
                assert needles[0] == f"VAR {names[0]} = {it.answer}." and len(set(names)) == 3
                assert needles[1:] == [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
                assert it.cue == f"VAR {names[-1]} holds the value"
                assert list(it.needles) == sorted(it.needles)  # the chain reads in order
        if task == "passkey":  # the same haystack and key at every depth
            for N in (160, 320):
                for i in range(4):
                    cell = [it for it in items if it.length == N and it.index == i]
                    assert len({it.answer for it in cell}) == 1 and len({it.haystack[0] for it in cell}) == 1
        # AC text: <AC> after every complete sentence (needles and question included), never after the cue
        it = items[0]
        ac = lr.context_text(it, "<AC>")
        assert ac.endswith("> " + it.cue) and ac.count("<AC>") == len(anllm.sentence_spans(" ".join(
            [*it.sentences, *([it.question] if it.question else [])])))
    with pytest.raises(ValueError, match="held-out prose has only"):
        lr.build_items("passkey", DOCS, tok, lengths=[10**6], num_items=1)
    with pytest.raises(ValueError, match="cannot hold"):
        lr.build_items("multikey", DOCS, tok, lengths=[40], num_items=1, num_keys=4)


def test_teacher_forcing_equals_greedy_generation(model, tok):
    """Exact match by one teacher-forced forward = greedy decoding producing the answer: the argmax along
    the greedy continuation (generate with AnchorCache for anchor, a DynamicCache and causal attention
    for full) is that continuation; batched with ragged lengths."""
    items = (lr.build_items("passkey", DOCS, tok, lengths=[150, 200], depths=[0.3], num_items=2)
             + lr.build_items("vartrack", DOCS, tok, lengths=[180], num_items=1))
    enc = [_encode(tok, it) for it in items]
    contexts, answers = [c for _, c, _ in enc], [a for _, _, a in enc]
    assert len({len(c) for c in contexts}) > 1
    for method in ("anchor", "full"):
        greedy = []
        for ctx, ans in zip(contexts, answers):
            kw = dict(max_new_tokens=len(ans), do_sample=False, eos_token_id=None, pad_token_id=0)
            with torch.no_grad():
                if method == "anchor":
                    out = model.generate(ctx[None], past_key_values=anllm.AnchorCache(), **kw)
                else:
                    with anllm.anchor_attention(model, enabled=False):
                        out = model.generate(ctx[None], past_key_values=DynamicCache(), **kw)
            greedy.append(out[0, len(ctx):])
        assert all(len(g) == len(a) for g, a in zip(greedy, answers))
        # scored against its own greedy continuation, every row is exact
        got = lr.teacher_forced(model, contexts, greedy, method, [0] * len(items), tok.pad_token_id)
        assert all(torch.equal(p, g) for p, g in zip(got, greedy))
        # against the true answers: the first prediction is greedy's, exact iff greedy gives the answer
        got = lr.teacher_forced(model, contexts, answers, method, [0] * len(items), tok.pad_token_id)
        for p, g, a in zip(got, greedy, answers):
            assert p[0] == g[0] and torch.equal(p, a) == torch.equal(g, a)
    # C⇓ of the anchor rows: the lossless anchor cache after the context holds the counted keys
    for text, ctx, ans in enc:
        pq = lr.sequence_budgets(model, tok, text, ctx, ans)
        cache = anllm.AnchorCache()
        with torch.no_grad():
            model(input_ids=ctx[None], past_key_values=cache, use_cache=True)
        assert int(cache.stats()["kept_per_row"][0]) == lr.keys_at_answer("anchor", len(ctx), int(pq.max()), pq, None)


def test_batched_methods_equal_one_sequence_oracles(model, tok):
    """Logits at the last n positions of each left-padded row against one unpadded sequence read with
    the loop references of tests/oracles.py (AnSAN, the sentence-only control, StreamingLLM at the
    peak over the whole sequence and per query)."""
    from oracles import method_mask, reference_mask

    items = (lr.build_items("passkey", DOCS, tok, lengths=[100], depths=[0.5], num_items=1)
             + lr.build_items("multikey", DOCS, tok, lengths=[130], num_items=1, num_keys=2)
             + lr.build_items("vartrack", DOCS, tok, lengths=[90], num_items=1, hops=1))
    enc = [_encode(tok, it) for it in items]
    seqs = [torch.cat([c, a]) for _, c, a in enc]
    n = max(len(a) for *_, a in enc) + 1
    anchor_ids = torch.tensor(anllm.get_anchor_config(model).anchor_token_ids)
    rules = [reference_mask(torch.isin(x, anchor_ids).tolist(), [True] * len(x)) for x in seqs]
    per_query = [[sum(row) for row in M] for M in rules]
    peaks = [max(p) for p in per_query]
    assert [lr.sequence_budgets(model, tok, t, c, a).tolist() for t, c, a in enc] == per_query
    for method in ("full", "anchor", "ansan", "sentence", "streamingllm", "streamingllm_q"):
        given = [torch.tensor(p) for p in per_query] if method == "streamingllm_q" else peaks
        got = lr.last_logits(model, seqs, method, given, tok.pad_token_id, n)
        assert got.shape[:2] == (len(seqs), n)
        for j, x in enumerate(seqs):
            L = len(x)
            mask = method_mask(method, torch.isin(x, anchor_ids).tolist(), peaks[j], per_query[j])
            with anllm.anchor_attention(model, enabled=False), torch.no_grad():
                want = model(input_ids=x[None], attention_mask=torch.tensor(mask)[None, None]).logits[0, -n:]
            torch.testing.assert_close(got[j], want, atol=1e-5, rtol=1e-5)


def test_rows_count_exact_matches(model, tok, tmp_path):
    items = (lr.build_items("passkey", DOCS, tok, lengths=[120], depths=[0.2, 0.8], num_items=3)
             + lr.build_items("multikey", DOCS, tok, lengths=[150], num_items=3, num_keys=2))
    # make some answers what the full reading predicts greedily: those rows must count as correct
    forced = []
    for it in items[::2]:
        _, ctx, ans = _encode(tok, it)
        with anllm.anchor_attention(model, enabled=False), torch.no_grad():
            out = model.generate(ctx[None], max_new_tokens=len(ans), do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        g = out[0, len(ctx):]
        text = tok.decode(g.tolist())
        if tok.encode(" " + text, add_special_tokens=False) == g.tolist() and text not in " ".join(it.haystack):
            forced.append((it.task, it.index, it.depth))
            items[items.index(it)] = replace(it, answer=text)
    assert forced, "no greedy continuation round-trips through the tokenizer: change the seed"
    methods = ["full", "anchor", "sentence", "streamingllm", "streamingllm_q", "knorm"]
    rows = lr.longrange_rows(model, tok, {"mode": "ep"}, items, methods, batch_size=2, out_dir=tmp_path,
                             progress=False)
    cells = {("passkey", 120, 0.2), ("passkey", 120, 0.8), ("multikey", 150, None)}
    assert ({(r["task"], r["method"], r["length"], r.get("depth")) for r in rows}
            == {(t, m, n, d) for m in methods for t, n, d in cells})
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(items)
    for r in rows:
        mine = [p for p in preds if p["task"] == r["task"] and (r["task"] != "passkey" or p["depth"] == r["depth"])]
        assert r["n"] == len(mine) == 3 and r["suite"] == "longrange"
        assert r["acc"] == sum(p[f"{r['method']}_ok"] for p in mine) / 3
        assert r["se"] == pytest.approx(math.sqrt(r["acc"] * (1 - r["acc"]) / 3))
        answer = {p["item"]: tok.decode(tok.encode(" " + p["answer"], add_special_tokens=False)) for p in mine}
        assert all(p[f"{r['method']}_ok"] == (p[r["method"]] == answer[p["item"]]) for p in mine)
        assert 0 <= r["c_red"] < 1 and (r["method"] != "full" or r["c_red"] == 0)
        assert r["kv_total"] == sum(p["tokens"] for p in mine) and r["budget"] > 0 and r["mean_kv"] > 0
    by = {(r["task"], r["method"], r.get("depth")): r for r in rows}
    assert by[("passkey", "anchor", 0.2)]["c_red"] > 0
    assert by[("passkey", "anchor", 0.2)]["kv_kept"] == by[("passkey", "streamingllm_q", 0.2)]["kv_kept"]
    exact = {(p["task"], p["item"], p["depth"]) for p in preds if p["full_ok"]}
    assert {(t, i, None if d is None else round(d, 4)) for t, i, d in forced} <= exact  # forced items are exact


def test_a_model_without_anchors_gets_sentence_end_budgets(tok):
    """No anchor settings: the context's sentence ends play the anchors (query_budgets' rule), the answer
    tokens extend the open cue; the anchor methods are skipped by the suite."""
    from anllm.eval.perplexity import query_budgets, runnable_methods

    plain = tiny_llama(vocab_size=len(tok))
    it = lr.build_items("passkey", DOCS, tok, lengths=[120], depths=[0.5], num_items=1)[0]
    text, ctx, ans = _encode(tok, it)
    pq = lr.sequence_budgets(plain, tok, text, ctx, ans)
    C = len(ctx)
    assert pq[: C - 1].tolist() == query_budgets(plain, tok, text, ctx)[: C - 1].tolist()
    # the cue's last token and the answer extend the open sentence (the text's end is no sentence end)
    assert pq[C - 1 :].tolist() == [int(pq[C - 2]) + k + 1 for k in range(len(ans) + 1)]
    assert int(pq[C - 1]) < C / 2  # the earlier sentences are gone, their ends kept
    methods, skipped = runnable_methods(list(lr.DEFAULT_METHODS), False)
    rows = lr.longrange_rows(plain, tok, None, [it], methods, progress=False)
    assert skipped == ["anchor"] and [r["method"] for r in rows] == ["full", "streamingllm", "streamingllm_q"]


def _cfg(**section):
    return OmegaConf.create({"data_dir": "/somewhere", "longrange": section})


@pytest.mark.parametrize("section, match", [
    ({"lengths": [32]}, "longrange.lengths must be"),
    ({"lengths": []}, "longrange.lengths must be"),
    ({"lengths": ["long"]}, "longrange.lengths must be"),
    ({"depths": [1.5]}, r"longrange.depths must be .*\[0, 1\]"),
    ({"depths": ["deep"]}, "longrange.depths must be"),
    ({"num_items": 0}, "longrange.num_items must be"),
    ({"num_keys": 0}, "longrange.num_keys must be"),
    ({"hops": 0}, "longrange.hops must be"),
    ({"batch_size": [2]}, "longrange.batch_size must be"),
    ({"num_sink_tokens": -1}, "longrange.num_sink_tokens must be"),
    ({"methods": ["beam"]}, "longrange.methods"),
    ({"data": "speeches"}, "longrange.data must be"),
])
def test_check_names_the_bad_key(section, match):
    with pytest.raises(ValueError, match=match):
        lr.check(_cfg(**section))


def test_check_needs_prose_and_accepts_the_defaults():
    lr.check(_cfg())
    with pytest.raises(FileNotFoundError, match="data_dir"):
        lr.check(OmegaConf.create({"longrange": {}}))
    from hydra import compose, initialize_config_dir

    from anllm.eval.runner import plan_tasks, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["checkpoint=/x/m", "suite=longrange", "data_dir=/d"])
    s = lr.settings(cfg)
    assert s["lengths"] == [1024, 2048, 4096] and s["depths"] == [0.1, 0.3, 0.5, 0.7, 0.9] and s["num_items"] == 20
    assert s["num_keys"] == 4 and s["hops"] == 2 and s["batch_size"] == 4 and s["methods"] is None
    plan, _ = plan_tasks(cfg)
    assert [t for _, t in plan] == list(lr.TASKS)


def test_evaluate_runs_the_suite(model, tok, tmp_path):
    """The runner path: a saved tiny EP checkpoint, prose from a data config, the report table."""
    from anllm.eval.runner import register_resolvers, run

    ckpt = tmp_path / "tiny-ep"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data = tmp_path / "prose.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in DOCS))
    register_resolvers()
    cfg = OmegaConf.create({
        "checkpoint": str(ckpt), "suite": "longrange", "tasks": ["passkey", "vartrack"],
        "output_dir": str(tmp_path / "out"), "device": "cpu", "dtype": "float32", "progress": False, "resume": True,
        "longrange": {"data": {"kind": "jsonl", "paths": [str(data)], "holdout_paths": [str(data)]},
                      "num_items": 2, "lengths": [100], "depths": [0.5], "hops": 1}})
    out = run(cfg)
    rows = [r for r in out["rows"] if r["suite"] == "longrange"]
    want = {(t, m) for t in ("passkey", "vartrack") for m in lr.DEFAULT_METHODS}
    assert {(r["task"], r["method"]) for r in rows} == want
    assert "| Len | Depth |" in out["markdown"] and "±SE" in out["markdown"]
    assert (tmp_path / "out" / "tasks" / "longrange" / "passkey" / "predictions.jsonl").is_file()


@pytest.mark.parametrize("method", ["tova", "pyramidkv", "knorm_press"])
def test_presses_read_the_answer_against_the_anchor_cache_size(model, tok, tmp_path, method):
    """A kvpress press compresses the context up to the cue's last token to what the anchor cache holds when
    the first answer token is predicted (minus that token), then reads the cue's last token and the answer:
    teacher-forced predictions equal kvpress's own single-sequence use (tests/oracles.py), and the rows keep
    the anchor reading's keys at the answer."""
    from oracles import kvpress_reference

    from anllm.eval import presses
    from anllm.eval import methods as registry

    items = (lr.build_items("passkey", DOCS, tok, lengths=[110], depths=[0.4], num_items=1)
             + lr.build_items("vartrack", DOCS, tok, lengths=[90], num_items=1, hops=1))
    enc = [_encode(tok, it) for it in items]
    contexts, answers = [c for _, c, _ in enc], [a for _, _, a in enc]
    per_query = [lr.sequence_budgets(model, tok, t, c, a) for t, c, a in enc]
    budgets = [int(p[len(c) - 1]) for p, c in zip(per_query, contexts)]
    assert all(b < len(c) for b, c in zip(budgets, contexts))
    got = lr.teacher_forced(model, contexts, answers, method, budgets, tok.pad_token_id)
    for j, (c, a, b) in enumerate(zip(contexts, answers, budgets)):
        press = presses.make_press(method, len(c) - 1, b - 1)
        with anllm.anchor_attention(model, enabled=False):  # the presses read causally
            want, _ = kvpress_reference(model, press, c[:-1], torch.cat([c[-1:], a[:-1]]), registry.METHODS[method].eager)
        assert torch.equal(got[j], want.argmax(-1))
    rows = lr.longrange_rows(model, tok, {"mode": "ep"}, items, ["anchor", method], progress=False, out_dir=tmp_path)
    by = {(r["task"], r["method"]): r for r in rows}
    for task in ("passkey", "vartrack"):
        assert by[(task, method)]["kv_kept"] == by[(task, "anchor")]["kv_kept"]
        assert by[(task, method)]["budget"] < by[(task, method)]["tokens"]
        assert by[(task, method)]["mean_kv"] > by[(task, "anchor")]["mean_kv"]  # the context was read in full
