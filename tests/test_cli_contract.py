"""The command-line contract (anllm.cli): bad input exits with code 2 and one line that names the
fix, before anything is written; nothing already in the output directory is touched.
Real subprocesses of train.py and evaluate.py. Runtime: ~1 min."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(proc: subprocess.CompletedProcess, program: str, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{program}:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_cli_bad_input(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "model.safetensors").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = [
        (["model=gpt5", "+exp=anllm_ac", f"output_dir={out}"], ["model=gpt5 is not a model option", "tiny"]),
        ([f"output_dir={out}"], ["No experiment chosen", "+exp=anllm_ac"]),
        (["+exp=anllm_ac", "model=tiny", "block_size=100000", f"output_dir={out}"], ["block_size=100000", "context_length"]),
        (["+exp=anllm_ac", "model=tiny", "output_dir=/proc/anllm/x"], ["output_dir=/proc/anllm/x cannot be created"]),
        (["+exp=anllm_ac", "model=tiny", "data=jsonl", "data.paths=[/nonexistent/*.jsonl]", f"output_dir={out}"],
         ["/nonexistent"]),
    ]
    for args, needles in cases:
        one_line_error(cli("train.py", *args), "train.py", *needles)
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing already there lost or changed
    assert not (out / "anllm_run.json").exists()  # and no run was started (Hydra may log its config)


def test_evaluate_cli_bad_input(tmp_path, shared_data):
    bad_ckpt = tmp_path / "corrupt"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text("{not json")
    out = tmp_path / "eval"
    (out / "tasks" / "ppl").mkdir(parents=True)
    (out / "tasks" / "ppl" / "speeches.json").write_text('{"status": "ok"}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = [
        (["suite=ppl", f"output_dir={out}"], ["checkpoint=DIR is required"]),
        (["checkpoint=/nonexistent/model", f"output_dir={out}"], ["checkpoint='/nonexistent/model' is not a directory"]),
        ([f"checkpoint={bad_ckpt}", "suite=ppl", f"data_dir={shared_data}", f"output_dir={out}"],
         ["cannot be loaded as a Hugging Face model", "config.json"]),
        ([f"checkpoint={bad_ckpt}", "suite=ppl", "data_dir=/nonexistent/data", f"output_dir={out}"],
         ["data_dir='/nonexistent/data' does not exist", "../shared/data"]),
        ([f"checkpoint={bad_ckpt}", "suite=ppl", f"data_dir={shared_data}", "output_dir=/proc/anllm/x"], ["cannot be created"]),
        ([f"checkpoint={bad_ckpt}", "suite=bogus", f"output_dir={out}"], ["Unknown suite 'bogus'"]),
        ([f"checkpoint={bad_ckpt}", "protocol=papers", f"output_dir={out}"], ["protocol=papers is not a protocol option"]),
    ]
    for args, needles in cases:
        one_line_error(cli("evaluate.py", *args), "evaluate.py", *needles)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_exits_zero(script):
    proc = cli(script, "--help")
    assert proc.returncode == 0 and "Powered by Hydra" in proc.stdout
