"""``python -m anllm.lm_eval``: lm-eval's own CLI with the ``anllm`` model and the offline QA tasks.

CPU, ~45 s on a busy machine (the subprocess run of lm-eval's CLI dominates). The CLI on a tiny
anchor-aware checkpoint must give the numbers ``evaluate.py suite=qa`` gives on the same items.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from anllm.eval.runner import register_resolvers, run
from anllm.lm_eval import _pop_data_dir, add_local_tasks

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("lm_eval").setLevel(logging.ERROR)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_ep_checkpoint) -> Path:
    return tiny_ep_checkpoint


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    env.pop("HF_DATASETS_OFFLINE", None)  # the entry point sets it for the offline tasks
    return subprocess.run([sys.executable, "-m", "anllm.lm_eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _evaluate(overrides: list[str]) -> dict:
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return run(compose(config_name="evaluate", overrides=overrides))


def test_cli_gives_the_numbers_of_evaluate_py(shared_data, checkpoint, tmp_path):
    out = tmp_path / "lm_eval_out"
    proc = _cli(["--model", "anllm", "--model_args", f"pretrained={checkpoint},mode=anchor", "--tasks", "arc_easy",
                 "--limit", "4", "--output_path", str(out), "--log_samples"], ANLLM_DATA_DIR=str(shared_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy: offline task definitions" in proc.stderr
    assert "|arc_easy|" in proc.stdout and "acc_norm" in proc.stdout  # lm-eval's own table
    [results_file] = glob.glob(str(out / "*" / "results_*.json"))
    [samples_file] = glob.glob(str(out / "*" / "samples_arc_easy_*.jsonl"))
    metrics = json.loads(Path(results_file).read_text())["results"]["arc_easy"]
    samples = {s["doc_id"]: s for s in map(json.loads, Path(samples_file).read_text().splitlines())}

    ev = tmp_path / "evaluate_out"
    res = _evaluate([f"checkpoint={checkpoint}", "suite=qa", "tasks=[arc_easy]", "limit=4", "modes=[anchor]", "batch_size=1",
                     f"data_dir={shared_data}", f"output_dir={ev}", "qa.baselines=[]", "qa.stock=false"])
    [row] = [r for r in res["rows"] if r["method"] == "anchor"]
    assert row["n"] == len(samples) == 4 and row["source"] == "local" and row["split"] == "test"
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (row["acc"], row["acc_norm"])
    lines = (ev / "tasks" / "qa" / "arc_easy" / "predictions_0shot.jsonl").read_text().splitlines()
    preds = [json.loads(x) for x in lines]
    assert sorted(p["doc_id"] for p in preds) == sorted(samples)
    for p in preds:  # every choice's log-likelihood, bit for bit (both at batch size 1: lm-eval's default)
        assert [float(r[0][0]) for r in samples[p["doc_id"]]["resps"]] == p["anchor"]["logprobs"]


def test_bad_model_args_is_lm_evals_own_error():
    proc = _cli(["--model", "anllm", "--model_args", "notkeyvalue", "--tasks", "arc_easy"])
    assert proc.returncode == 2
    assert "error: argument --model_args" in proc.stderr
    assert "Traceback" not in proc.stderr


def _args(tasks, include_path=None, num_fewshot=None, config=None) -> argparse.Namespace:
    return argparse.Namespace(tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, config=config)


def test_local_tasks_only_for_the_qa_tasks_and_only_without_include_path(shared_data, tmp_path):
    args = _args(["arc_easy", "lambada_openai"])
    assert add_local_tasks(args, shared_data, tmp_path / "a") == ["arc_easy"]
    assert args.include_path == str(tmp_path / "a") and (tmp_path / "a" / "arc_easy_0shot.yaml").is_file()

    for args in (_args(["arc_easy"], include_path="mine"), _args(["lambada_openai"])):
        before = vars(args).copy()
        assert add_local_tasks(args, shared_data, tmp_path / "b") == [] and vars(args) == before
    assert add_local_tasks(_args(["piqa"]), None, tmp_path / "c") == []  # no staged data: lm-eval's hub tasks
    assert add_local_tasks(argparse.Namespace(command="ls"), shared_data, tmp_path / "d") == []

    config = tmp_path / "cfg.yaml"  # tasks and shots from lm-eval's --config file
    config.write_text("tasks: [piqa]\nnum_fewshot: 5\n")
    args = _args(None, config=str(config))
    assert add_local_tasks(args, shared_data, tmp_path / "e") == ["piqa"]
    assert (tmp_path / "e" / "piqa_5shot.yaml").is_file() and (tmp_path / "e" / "piqa_fewshot.jsonl").is_file()

    with pytest.raises(SystemExit) as info:  # only the 5 OLMES demonstrations are staged
        add_local_tasks(_args(["piqa"], num_fewshot=6), shared_data, tmp_path / "f")
    assert info.value.code == 2


def test_data_dir_is_ours_and_removed_before_lm_eval_parses():
    assert _pop_data_dir(["--tasks", "x", "--data_dir", "D", "--limit", "1"]) == (["--tasks", "x", "--limit", "1"], "D")
    assert _pop_data_dir(["--data_dir=D", "--tasks", "x"]) == (["--tasks", "x"], "D")
    assert _pop_data_dir(["--tasks", "x"]) == (["--tasks", "x"], None)
