"""model.pad_vocab_multiple: embedding rows padded for the GPU output matmul, real logits untouched."""

from __future__ import annotations

import torch

from anllm.schema import compose, plain_dict
from anllm.train.model import build_model_and_tokenizer, pad_vocab


def _build(*extra: str):
    return build_model_and_tokenizer(plain_dict(compose("train", ["+exp=anllm_ac", "model=tiny", *extra])))


def test_padded_rows_are_zero_and_real_logits_unchanged():
    plain, tok = _build()
    padded, tok_p = _build("model.pad_vocab_multiple=64")
    n = len(tok)
    assert len(tok_p) == n and n % 64 != 0  # the case that needs padding (<AC> added to 1,024)
    rows = padded.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and n <= rows < n + 64
    assert padded.get_output_embeddings().weight.shape[0] == rows == padded.config.vocab_size
    assert torch.count_nonzero(padded.get_input_embeddings().weight[n:]) == 0
    assert torch.count_nonzero(padded.get_output_embeddings().weight[n:]) == 0
    # The real rows (incl. <AC>, initialised from ".") are the unpadded model's rows.
    torch.testing.assert_close(padded.get_input_embeddings().weight[:n], plain.get_input_embeddings().weight[:n])
    ids = tok("Anchors keep the cache small. Windows keep it recent.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = plain(ids).logits, padded(ids).logits
    torch.testing.assert_close(b[..., :n], a, rtol=0, atol=1e-6)
    assert torch.all(b[..., n:] == 0)


def test_pad_vocab_is_idempotent_and_a_no_op_on_a_multiple():
    model, tok = _build("model.pad_vocab_multiple=64")
    rows = model.get_input_embeddings().weight.shape[0]
    before = model.get_input_embeddings().weight.clone()
    assert pad_vocab(model, tok, 64) == rows
    torch.testing.assert_close(model.get_input_embeddings().weight, before, rtol=0, atol=0)


def test_llama2_recipes_pad_and_the_paper_protocol_does_not():
    assert compose("train", ["+exp=anllm_ac", "model=llama2_7b"]).model.pad_vocab_multiple == 64
    assert compose("train", ["+exp=anllm_ac", "model=llama2_13b"]).model.pad_vocab_multiple == 64
    assert compose("train", ["+exp=anllm_ac", "model=llama2_7b", "protocol=paper"]).model.pad_vocab_multiple is None
    assert compose("train", ["+exp=anllm_ac", "model=smollm2_135m"]).model.get("pad_vocab_multiple") is None


def test_resume_ignores_a_new_null_option_but_refuses_a_different_run(tmp_path):
    """An output_dir trained before an option existed resumes when the option is at its null default
    (e.g. model.pad_vocab_multiple); a real difference (the window) still refuses to mix two runs."""
    import json
    from types import SimpleNamespace

    import pytest

    from anllm.train.errors import ConfigError
    from anllm.train.runner import RUN_FILE, _claim_output_dir

    c = plain_dict(compose("train", ["+exp=anllm_ac", "model=tiny"]))
    args = SimpleNamespace(process_index=0)
    old = json.loads(json.dumps({k: c[k] for k in ("exp_name", "block_size", "anchor", "model", "data")}))
    del old["model"]["pad_vocab_multiple"]
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    _claim_output_dir(c, tmp_path, tmp_path / "checkpoint-4", args)  # resumes
    c2 = plain_dict(compose("train", ["+exp=anllm_ac", "model=tiny", "anchor.window=8"]))
    with pytest.raises(ConfigError, match="different anchor"):
        _claim_output_dir(c2, tmp_path, tmp_path / "checkpoint-4", args)
