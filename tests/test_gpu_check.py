"""bench/gpu_check.py on the CPU (``--cpu-smoke``): the one script run on a lent GPU must not crash there.

Real subprocesses, started together: the Llama-2-7B shape scaled down (32000-token vocabulary), the
SmolLM2 shape, a tiny anchor-aware checkpoint passed with ``--model`` (its anchor ids must be kept),
and a run whose time budget is spent before it starts (every section skipped, the JSON still written). Every ``--out`` here is outside the repository (pytest's tmp_path), which used to crash the
printing of the written path. Runtime: ~30 s (2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import anllm
from anllm.testing import tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(300)]
CKPT_ANCHORS = [4, 58]  # "." and "w50": one outside and one inside the range random ids are drawn from


def start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, str, Path]]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    tok = word_tokenizer(WORDS)
    model = tiny_llama(vocab_size=len(tok))
    anllm.prepare_model(model, tok, "ep", ep_tokens=[".", "w50"])
    assert model.config.anllm["anchor_token_ids"] == CKPT_ANCHORS
    ckpt = tmp / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    procs = {
        "llama2-7b": (start(tmp / "l7b.json", "--shape", "llama2-7b"), tmp / "l7b.json"),
        "smollm2": (start(tmp / "out" / "smol.json", "--shape", "smollm2"), tmp / "out" / "smol.json"),
        "model": (start(tmp / "ckpt.json", "--model", str(ckpt)), tmp / "ckpt.json"),
        "budget": (start(tmp / "budget.json", "--budget-s", "0"), tmp / "budget.json"),
    }
    done = {}
    try:
        for name, (p, out) in procs.items():
            stdout, _ = p.communicate(timeout=240)
            done[name] = (p, stdout, out)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    return done


def load(runs, name: str) -> dict:
    p, stdout, out = runs[name]
    assert p.returncode == 0, stdout[-3000:]
    assert f"wrote {out}" in stdout  # the path as given, even outside the repository
    return json.loads(out.read_text())


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def check_sections(res: dict, expected: list[str]) -> None:
    assert res["complete"] is True and res["device"] == "cpu"
    assert list(res["sections"]) == expected == res["plan"]
    for key, sec in res["sections"].items():
        assert sec["status"] == "ok", (key, sec)
        assert is_num(sec["seconds"])
    ex = res["sections"]["exactness"]
    assert 0 <= ex["identical_share"] <= 1 and ex["identical_all"] is True  # fp32 on CPU: exact
    for key in expected:
        if key.startswith("train:"):
            rows = res["sections"][key]["rows"]
            assert {(r["rule"], r["attn_implementation"]) for r in rows} >= {
                ("causal", "sdpa"), ("ansan", "sdpa"), ("ansan", "flex_attention")}
            for r in rows:
                if r["status"] == "ok":
                    for k in ("s_per_step", "tokens_per_s", "model_flops_per_step"):
                        assert is_num(r[k]) and r[k] > 0, (k, r)
                    assert r["mfu"] is None and r["peak_mem_gib"] is None  # no GPU: no peak FLOP/s or memory
                else:
                    assert r["status"] in ("skipped", "error") and (r.get("reason") or r.get("error"))
            assert sum(r["status"] == "ok" for r in rows) >= 2
        if key.startswith("decode:"):
            sec = res["sections"][key]
            for r in sec["rows"]:
                for cand in ("plain-dynamic", "plain-static", "anchor"):
                    c = r[cand]
                    assert c["status"] == "ok" and is_num(c["decode_tokens_per_s"]) or c.get("error"), (cand, c)
                assert is_num(r["anchor_over_plain_dynamic"])
            syncs = sec["host_syncs_per_decode_step"]
            assert set(syncs) == {"batch_1", "batch_8"}
            for v in syncs.values():
                assert is_num(v["host_syncs_per_decode_step"]) and v["host_syncs_per_decode_step"] >= 0
    assert res["host_syncs_per_decode_step"]


def test_llama2_7b_shape(runs):
    res = load(runs, "llama2-7b")
    check_sections(res, ["exactness", "train:llama2-7b", "decode:llama2-7b", "vocab:llama2-7b"])
    vocab = res["sections"]["vocab:llama2-7b"]
    assert [r["vocab"] for r in vocab["rows"]] == [32000, 32001, 32064] and all(r["status"] == "ok" for r in vocab["rows"])
    t = {r["vocab"]: r["s_per_step"] for r in vocab["rows"]}
    assert vocab["padded_speedup"] == pytest.approx(t[32001] / t[32064]) and all(x > 0 for x in t.values())
    m = res["models"]["llama2-7b"]
    assert m["vocab_size"] == 32000 and 0 <= m["max_input_id"] < 32000
    assert m["input_id_range"] == [100, 31999] and m["gradient_checkpointing"] is True
    assert m["anchor_ids"] == m["anchor_ids_planted"] == [99] and m["anchor_source"].startswith("made up")


def test_smollm2_shape(runs):
    res = load(runs, "smollm2")
    check_sections(res, ["exactness", "decode:smollm2", "train:smollm2"])
    m = res["models"]["smollm2"]
    assert m["vocab_size"] == 49152 and m["max_input_id"] < 49152 and m["gradient_checkpointing"] is False


def test_checkpoint_keeps_its_anchors(runs):
    res = load(runs, "model")
    check_sections(res, ["exactness", "decode:model", "train:model"])
    m = res["models"]["model"]
    assert m["vocab_size"] == len(WORDS) + 4
    assert m["anchor_source"] == "checkpoint config.anllm"
    assert m["anchor_ids"] == m["anchor_ids_planted"] == CKPT_ANCHORS
    assert m["anchor_config"]["anchor_token_ids"] == CKPT_ANCHORS
    assert m["input_id_range"][0] >= 1 and m["max_input_id"] < m["vocab_size"]


def test_spent_budget_skips_every_section_and_still_writes(runs):
    res = load(runs, "budget")
    assert res["complete"] is True and len(res["plan"]) == 6
    assert [res["sections"][k]["status"] for k in res["plan"]] == ["skipped"] * 6
    assert all("time budget" in res["sections"][k]["reason"] for k in res["plan"])
