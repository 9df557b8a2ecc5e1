"""Real crashes: ``train.py`` and ``evaluate.py`` started as subprocesses and SIGKILLed — mid-step and
mid-save — then relaunched with the same command. The resumed run ends with the weights of an
uninterrupted one, a half-written checkpoint is never loaded, and the output-dir lock dies with the
process. Runtime: ~1.5 min."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anllm.train.checkpoints import MARKER, QUARANTINE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def start(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.005) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError("the run ended before the moment to kill it:\n" + proc.stdout.read()[-3000:])
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["+exp=anllm_ac", "model=tiny", "data=demo", "block_size=128", "trainer.max_steps=6", "trainer.save_steps=2",
            "trainer.report_to=none", "trainer.disable_tqdm=true", "heldout.enabled=false",
            "trainer.lr_scheduler_type=constant_with_warmup", f"output_dir={out}", f"cache_dir={cache}", *extra]


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst <= 1e-6, worst  # same ops on the same data from the same RNG state: float-exact in practice


# a wider tiny model (~100 MB with its optimizer): steps and saves take long enough to be hit
SIZE = ["model.tiny.hidden_size=512", "model.tiny.num_layers=4"]

# train.py's own code path (compose + anllm.train.run) plus a callback that marks when step 3 has
# begun and when it has ended, so the test can kill provably *inside* a step.
MARKED = """
import sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback
from anllm.train import run
from anllm.schema import CONF_DIR

marks = Path(sys.argv[1])

class Mark(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        (marks / f"begun-{state.global_step + 1}").touch()
    def on_step_end(self, args, state, control, **kw):
        (marks / f"ended-{state.global_step}").touch()

with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[2:])
run(cfg, callbacks=[Mark()])
"""


def steps_logged(log: str) -> int:
    """Optimizer steps a run took (logging_steps=1: one loss line per step)."""
    return sum(1 for line in log.splitlines() if line.startswith("{'loss'"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run (its output dir) and the shared data cache."""
    tmp = tmp_path_factory.mktemp("kill")
    finish(start("train.py", *train_args(tmp / "ref", tmp / "cache", *SIZE)))
    return tmp / "ref", tmp / "cache"


@pytest.mark.parametrize("moment", ["mid-step", "mid-save"])
def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path, reference, moment):
    ref, cache = reference
    size = SIZE
    out = tmp_path / "run"
    if moment == "mid-step":
        marks = tmp_path / "marks"
        marks.mkdir()
        driver = tmp_path / "marked_train.py"
        driver.write_text(MARKED)
        proc = start(str(driver), str(marks), *train_args(out, cache, *size))
        wait_for(lambda: (marks / "begun-3").is_file(), proc)  # checkpoint-2 is saved; step 3 is running
    else:
        proc = start("train.py", *train_args(out, cache, *size))
        wait_for(lambda: (out / "checkpoint-4").is_dir(), proc)  # the Trainer has started writing it
    kill(proc)
    if moment == "mid-step":
        assert not (marks / "ended-3").exists(), "the kill came after step 3 finished"
        assert (out / "checkpoint-2" / MARKER).is_file()
    assert (out / ".anllm_train.lock").is_file()  # the dead run's lock file is still there...
    if moment == "mid-save":
        assert not (out / "checkpoint-4" / MARKER).exists(), "the kill came after the save finished"
    log = finish(start("train.py", *train_args(out, cache, *size)))  # ...but flock died with it: no refusal
    same_weights(ref, out)
    summary = json.loads((out / "anllm_train_summary.json").read_text())
    assert summary["global_step"] == 6
    assert str(summary["resumed_from"]).endswith("checkpoint-2")  # the newest *complete* checkpoint
    # it continued from step 2 (4 steps), not a retrain from scratch with the same seed (6 steps)
    assert steps_logged(log) == 4, log[-3000:]
    if moment == "mid-save":  # the half-written checkpoint was set aside, never loaded
        assert any(p.name.startswith("checkpoint-4.") for p in (out / QUARANTINE).iterdir())
        assert "was not complete" in log


def test_sigkilled_evaluation_resumes_without_losing_a_finished_task(tmp_path, shared_data):
    ckpt = tmp_path / "model"
    finish(start("train.py", *train_args(ckpt, tmp_path / "cache", "trainer.max_steps=1")))
    out = tmp_path / "eval"
    args = [f"checkpoint={ckpt}", "suite=ppl", "tasks=[lee_news,speeches]", f"data_dir={shared_data}", "limit=2",
            "ppl.max_tokens=512", "ppl.min_chars=500", f"output_dir={out}", "modes=[full,anchor]"]
    proc = start("evaluate.py", *args)
    first = out / "tasks" / "ppl" / "lee_news.json"
    wait_for(first.is_file, proc)
    saved = first.read_bytes()
    kill(proc)
    assert not (out / "tasks" / "ppl" / "speeches.json").exists()
    log = finish(start("evaluate.py", *args))
    assert first.read_bytes() == saved  # the finished task was read back, not recomputed or damaged
    assert "resuming 1 saved task(s): ppl/lee_news" in log
    rec = json.loads((out / "results.json").read_text())
    assert {r["task"] for r in rec["rows"]} == {"lee_news", "speeches"} and not rec["failed"]
