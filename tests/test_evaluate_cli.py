"""evaluate.py: config, per-task save/resume, error isolation, clear errors, the real CLI.

CPU, ~1 min on an idle machine (the subprocess run of evaluate.py dominates). Data: a few lines of the staged QA files
written to a temporary data_dir, so tasks can be made to fail and then fixed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from anllm.cli import InputError
from anllm.eval.runner import register_resolvers, run

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("lm_eval").setLevel(logging.ERROR)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_ep_checkpoint) -> Path:
    return tiny_ep_checkpoint


def _stage(shared_data: Path, data_dir: Path, task: str, split: str, n: int = 3) -> None:
    """The first ``n`` lines of a staged QA file (a small data_dir for fast runs)."""
    src = shared_data / "qa" / task / f"{split}.jsonl"
    dst = data_dir / "qa" / task / f"{split}.jsonl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))


def _cfg(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_config_defaults():
    cfg = _cfg(["checkpoint=/x/my-model"])
    assert cfg.suite == "qa" and list(cfg.modes) == ["full", "ansan", "anchor"]
    assert cfg.output_dir == "outputs/eval/my-model"  # stable per checkpoint: re-runs resume
    assert cfg.qa.source == "auto"


def test_failed_task_keeps_the_others_and_rerun_resumes(shared_data, checkpoint, tmp_path):
    data = tmp_path / "data"
    _stage(shared_data, data, "arc_easy", "test")  # boolq is missing: that task fails
    out = tmp_path / "out"
    args = [f"checkpoint={checkpoint}", f"data_dir={data}", f"output_dir={out}", "tasks=[arc_easy,boolq]",
            "modes=[full,anchor]", "qa.baselines=[]", "limit=2"]
    first = run(_cfg(args))
    assert first["failed"] == ["qa/boolq"]
    # stock = lm-eval's per-request forward, timed beside the others for T⇑ stock (qa.stock, on by default)
    assert {r["method"] for r in first["rows"] if r["task"] == "arc_easy"} == {"full", "anchor", "stock"}
    err = next(r for r in first["rows"] if r["task"] == "boolq")
    assert err["method"] == "error" and "qa/boolq/validation.jsonl" in err["error"]
    saved = json.loads((out / "tasks" / "qa" / "arc_easy.json").read_text())
    assert saved["status"] == "ok"
    assert json.loads((out / "tasks" / "qa" / "boolq.json").read_text())["status"] == "error"
    assert (out / "results.json").is_file() and (out / "results_qa_0shot.csv").is_file()
    assert "boolq" in (out / "results.md").read_text()

    _stage(shared_data, data, "boolq", "validation")  # fix the data, run again: only boolq is computed
    mtime = (out / "tasks" / "qa" / "arc_easy.json").stat().st_mtime_ns
    second = run(_cfg(args))
    assert second["resumed"] == ["qa/arc_easy"] and second["failed"] == []
    assert (out / "tasks" / "qa" / "arc_easy.json").stat().st_mtime_ns == mtime
    arc = [r for r in second["rows"] if r["task"] == "arc_easy"]
    assert arc == saved["rows"]
    assert {r["method"] for r in second["rows"] if r["task"] == "boolq"} == {"full", "anchor", "stock"}
    table = second["markdown"]
    assert "| Method | ARC-e | BoolQ | Avg | C⇓ % | T⇑ | T⇑ stock |" in table

    third = run(_cfg(args[:-1] + ["limit=1", "tasks=[arc_easy]"]))  # other settings: no stale reuse
    assert third["resumed"] == [] and all(r["n"] == 1 for r in third["rows"])


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["data_dir=/nonexistent/data"], InputError, r"data_dir='/nonexistent/data' does not exist.*\.\./shared/data"),
        (["tasks=[arc_easy,mmlu]"], InputError, r"Unknown task 'mmlu'"),
        (["suite=speech"], InputError, r"Unknown suite 'speech'"),
        (["modes=[full,fast]"], InputError, r"Unknown mode\(s\) \['fast'\]"),
        (["qa.baselines=[quest]"], InputError, r"Unknown baseline"),  # h2o is observed_attention (kvpress)
    ],
)
def test_clear_errors_before_loading_the_model(checkpoint, shared_data, tmp_path, overrides, error, match):
    cfg = _cfg([f"checkpoint={checkpoint}", f"output_dir={tmp_path}", f"data_dir={shared_data}", "limit=1",
                "tasks=[arc_easy]"] + overrides)
    with pytest.raises(error, match=match):
        run(cfg)


def test_offline_without_data_dir_is_clear(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass data_dir=../shared/data"):
        run(_cfg([f"checkpoint={checkpoint}", f"output_dir={tmp_path}"]))


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(InputError, match="is not a directory") as info:
        run(_cfg([f"checkpoint={tmp_path}/nope", f"output_dir={tmp_path}"]))
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the underlying cause stays inspectable


def test_cli_prints_the_table(checkpoint, shared_data, tmp_path):
    data = tmp_path / "data"
    _stage(shared_data, data, "piqa", "validation")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "evaluate.py", f"checkpoint={checkpoint}", f"data_dir={data}", "tasks=[piqa]", "limit=2",
           f"output_dir={tmp_path / 'out'}", "qa.baselines=[knorm]", "num_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Method | PIQA | Avg | C⇓ % | T⇑ |" in proc.stdout
    for method in ("| full |", "| ansan |", "| anchor |", "| knorm |"):
        assert method in proc.stdout
    assert (tmp_path / "out" / "results.md").read_text().strip() in proc.stdout
