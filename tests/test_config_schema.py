"""Typed configuration (anllm.schema, issue #19): every bad value is caught when the config is composed,
before any model or data is loaded, as one line naming the key; every shipped config validates.

* A table of bad values across the groups (wrong type, unknown key, out of range, unknown choice) of
  train.py, evaluate.py and study.py, run through each CLI's own check (``check(argv)`` of train.py /
  evaluate.py, ``anllm.study.runner.check``) and its ``fail`` in ONE subprocess (the table would cost
  ~10 s of imports per case as separate processes): exit code 2, one line, the full key named, no
  output directory created. Three real CLI subprocesses prove the same end to end.
* Every file of conf/ and every ``+exp=`` (x scale), every evaluate suite and protocol, every
  ``study=`` (with the training config of each of its arms) composes and validates (torchtune's
  test_configs.py does the same).

Runtime: ~1 min on 2 busy cores (most of it the four subprocesses' imports)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anllm.schema import CONF_DIR, available_options, compose

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["+exp=anllm_ac", "model=tiny"]

# (program, overrides, the key the line must name); OUT is replaced by a fresh path per case.
BAD = [
    # train.py: the trainer pass-through (TrainingArguments)
    ("train", [*TRAIN, "trainer.learning_rate=abc"], "trainer.learning_rate"),  # the example
    ("train", [*TRAIN, "trainer.lr_scheduler_type=cosin"], "trainer.lr_scheduler_type"),
    ("train", [*TRAIN, "trainer.warmup_ratio=1.5"], "trainer.warmup_ratio"),  # TrainingArguments' own check
    ("train", [*TRAIN, "+trainer.lerning_rate=1e-4"], "trainer.lerning_rate"),
    ("train", [*TRAIN, "trainer.max_steps=ten"], "trainer.max_steps"),
    # anchor, top level, preprocessing, heldout, metrics, protocol (typed at compose time)
    ("train", [*TRAIN, "anchor.num_sink_tokens=abc"], "anchor.num_sink_tokens"),
    ("train", [*TRAIN, "anchor.mode=xc"], "anchor.mode"),
    ("train", [*TRAIN, "anchor.window=-3"], "anchor.window"),
    ("train", [*TRAIN, "anchor.windw=4"], "anchor.windw"),
    ("train", [*TRAIN, "block_size=abc"], "block_size"),
    ("train", [*TRAIN, "+blok_size=64"], "blok_size"),
    ("train", [*TRAIN, "preprocessing.num_proc=many"], "preprocessing.num_proc"),
    ("train", [*TRAIN, "heldout.num_documents=0"], "heldout.num_documents"),
    ("train", [*TRAIN, "heldout.enabled=maybe"], "heldout.enabled"),
    ("train", [*TRAIN, "metrics.peak_tflops=-1"], "metrics.peak_tflops"),
    ("train", [*TRAIN, "protocol.decoding=beam"], "protocol.decoding"),
    # model and data (a schema per option / per kind)
    ("train", [*TRAIN, "model.context_length=abc"], "model.context_length"),
    ("train", [*TRAIN, "model.dtype=fp8"], "model.dtype"),
    ("train", [*TRAIN, "+model.contxt=3"], "model.contxt"),
    ("train", [*TRAIN, "model.tiny.num_heads=0"], "model.tiny.num_heads"),
    ("train", [*TRAIN, "data.splitter=spacy"], "data.splitter"),
    ("train", [*TRAIN, "data.holdout_fraction=1.5"], "data.holdout_fraction"),
    ("train", [*TRAIN, "+data.shufle=true"], "data.shufle"),
    # deepspeed (structural)
    ("train", [*TRAIN, "deepspeed=zero2", "deepspeed.zero_optimization.stage=4"], "deepspeed.zero_optimization.stage"),
    ("train", [*TRAIN, "deepspeed=zero2", "+deepspeed.zero_optimisation={}"], "deepspeed.zero_optimisation"),
    # evaluate.py: the root and every suite's section
    ("evaluate", ["CKPT", "qa.source=web"], "qa.source"),
    ("evaluate", ["CKPT", "+qa.shots=5"], "qa.shots"),
    ("evaluate", ["CKPT", "suite=ppl", "ppl.select=middle"], "ppl.select"),
    ("evaluate", ["CKPT", "suite=ppl", "ppl.offset_bins=[0,2]"], "ppl.offset_bins"),
    ("evaluate", ["CKPT", "suite=ppl", "ppl.offset_bins=[1,5,3]"], "ppl.offset_bins"),
    ("evaluate", ["CKPT", "suite=recall", "recall.num_choices=1"], "recall.num_choices"),
    ("evaluate", ["CKPT", "suite=longrange", "longrange.num_keys=abc"], "longrange.num_keys"),
    ("evaluate", ["CKPT", "suite=translation", "translation.decoding=beam"], "translation.decoding"),
    ("evaluate", ["CKPT", "dtype=fp8"], "dtype"),
    ("evaluate", ["CKPT", "anchors=xy"], "anchors"),
    ("evaluate", ["CKPT", "batch_size=0"], "batch_size"),
    ("evaluate", ["CKPT", "suite=ppl", "tasks=[holdout]", "ppl.data={kind:jsonl,paths:[a.jsonl],holdout_fractin:0.1}"],
     "ppl.data.holdout_fractin"),
    # study.py: the root, the study option, and the training configs its arms name
    ("study", ["study=cpu", "num_threads=0"], "num_threads"),
    ("study", ["study=cpu", "stages=[arms,train]"], "stages"),
    ("study", ["study=tiny", "study.data.paths=[x.jsonl]", "study.block_size=abc"], "study.block_size"),
    ("study", ["study=cpu", "study.ppl.select=middle"], "study.ppl.select"),
    ("study", ["study=cpu", "study.recall.num_items=0"], "study.recall.num_items"),
    ("study", ["study=cpu", "study.recall.arms=[bets]"], "study.recall.arms"),
    ("study", ["study=cpu", "+study.reacll={num_items:3}"], "study.reacll"),
    ("study", ["study=cpu", "study.arm_specs.ac.overrides=['anchor.window=abc']"], "anchor.window"),
]

DRIVER = r"""
import contextlib, importlib.util, io, json, sys
from pathlib import Path

from anllm.cli import InputError, fail
from anllm.study.runner import check as study_check

def load(name):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", Path.cwd() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main() and check(); __name__ != "__main__": nothing runs
    return module

checks = {"train": load("train").check, "evaluate": load("evaluate").check, "study": study_check}
kinds = {"train": "config error", "evaluate": "error", "study": "config error"}
results = []
for program, argv, out in json.loads(sys.stdin.read()):
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err):
        try:
            checks[program](argv)
        except InputError as e:
            try:
                fail(f"{program}.py", str(e), kind=kinds[program])  # the CLI's own output and exit
            except SystemExit as stop:
                code = stop.code
    results.append({"code": code, "stderr": err.getvalue(), "out_exists": Path(out).exists()})
print(json.dumps(results))
"""


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1")


def _argv(program: str, overrides: list[str], out: Path, ckpt: Path) -> list[str]:
    argv = [str(ckpt) if o == "CKPT" else o for o in overrides]
    argv = [f"checkpoint={ckpt}" if o == str(ckpt) else o for o in argv]
    if program == "study":
        return [*argv, f"work_dir={out}", f"report_dir={out}-report"]
    return [*argv, f"output_dir={out}"]


def _assert_one_line(stderr: str, program: str, key: str, code: int | None) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(f"{program}.py: "), stderr
    assert key in lines[0], lines[0]


def test_the_table_has_every_kind_of_bad_value():
    assert len(BAD) >= 20
    assert {p for p, _, _ in BAD} == {"train", "evaluate", "study"}


def test_bad_values_exit_2_with_one_line_naming_the_key(tmp_path):
    ckpt = tmp_path / "ckpt"  # a directory: checkpoint paths are checked after the config
    ckpt.mkdir()
    cases = [(program, _argv(program, overrides, tmp_path / f"out{i}", ckpt), str(tmp_path / f"out{i}"))
             for i, (program, overrides, _) in enumerate(BAD)]
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (program, overrides, key), r in zip(BAD, results):
        where = f"{program}.py {' '.join(overrides)}"
        assert r["code"] == 2, f"{where}: no error (stderr: {r['stderr']!r})"
        _assert_one_line(r["stderr"], program, key, r["code"])
        assert not r["out_exists"], f"{where}: the output directory was created"


@pytest.mark.parametrize("program, overrides, key", [
    ("train", ["+exp=anllm_ac", "model=tiny", "trainer.learning_rate=abc"], "trainer.learning_rate"),
    ("evaluate", ["checkpoint=CKPT", "suite=ppl", "ppl.chunk_size=abc"], "ppl.chunk_size"),
    ("study", ["study=cpu", "study.sweep.tokens=-5"], "study.sweep.tokens"),
])
def test_real_cli_subprocess(tmp_path, program, overrides, key):
    """The end-to-end contract: exit code 2, exactly one line on stderr, nothing written."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "out"
    argv = _argv(program, [o.replace("CKPT", str(ckpt)) for o in overrides], out, ckpt)
    proc = subprocess.run([sys.executable, f"{program}.py", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    _assert_one_line(proc.stderr, program, key, proc.returncode)
    assert "Traceback" not in proc.stderr and not out.exists() and not (tmp_path / "out-report").exists()


# ---- every shipped config composes and validates ----------------------------------------------------


def _validate_train(*overrides: str) -> None:
    from anllm.train import validate

    cfg = compose("train", ["trainer.max_steps=10", "output_dir=/tmp/anllm-never-written", *overrides])
    validate(cfg, check_files=False)


@pytest.mark.parametrize("exp", available_options("exp"))
def test_every_exp_at_every_scale_validates(exp):
    for scale in available_options("scale"):
        _validate_train(f"+exp={exp}", f"scale={scale}")


@pytest.mark.parametrize("group", ["model", "data", "deepspeed", "protocol", "launcher"])
def test_every_option_of_every_train_group_validates(group):
    for option in available_options(group):
        _validate_train("+exp=anllm_ac", f"{group}={option}")


def test_every_evaluate_suite_and_protocol_validates(tmp_path):
    from anllm.eval.runner import preflight, register_resolvers
    from anllm.schema import check_evaluate

    register_resolvers()
    for suite in ["qa", "translation", "ppl", "recall", "longrange", "all"]:
        for protocol in available_options("protocol"):
            check_evaluate(compose("evaluate", [f"checkpoint={tmp_path}", f"suite={suite}", f"protocol={protocol}"]))
    with pytest.raises(ValueError):  # and the whole preflight still catches what only it can (no data_dir)
        preflight(compose("evaluate", [f"checkpoint={tmp_path}", "suite=ppl", "data_dir=null"]))


@pytest.mark.parametrize("study", available_options("study"))
def test_every_study_and_its_arms_validate(study, tmp_path):
    from anllm.study.runner import check

    extra = ["study.data.paths=[x.jsonl]"] if "paths: ???" in _yaml_text("study", study, follow=True) else []
    check([f"study={study}", f"work_dir={tmp_path}", *extra])
    assert not any(tmp_path.iterdir())  # validating writes nothing


def _yaml_text(group: str, option: str, follow: bool = False) -> str:
    text = (CONF_DIR / group / f"{option}.yaml").read_text()
    if follow:
        for parent in (yaml.safe_load(text) or {}).get("defaults", []):
            if isinstance(parent, str) and parent != "_self_":
                text += _yaml_text(group, parent, follow=True)
    return text


# ---- the schema adds no key, and its constants are the code's --------------------------------------


def _keys(path: Path) -> set[str]:
    data = yaml.safe_load(path.read_text()) or {}
    return set(data) - {"defaults", "hydra"}


def test_compose_time_schemas_have_exactly_the_yaml_keys():
    """Typing a section must not add keys to composed configs: the data cache key, a run's resume
    identity and evaluate.py's per-task fingerprints are made from these sections."""
    import typing

    from anllm.schema import EvaluateSchema, StudyRootSchema, TrainSchema
    from anllm.schema.train import ProtocolSchema

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    train = yaml.safe_load((CONF_DIR / "train.yaml").read_text())
    assert names(TrainSchema) == _keys(CONF_DIR / "train.yaml") | {"model", "data", "deepspeed", "protocol"}
    for section in ("anchor", "preprocessing", "heldout", "metrics", "wandb"):
        assert names(typing.get_type_hints(TrainSchema)[section]) == set(train[section]), section
    suites = ("qa", "translation", "ppl", "recall", "longrange")
    assert names(EvaluateSchema) == _keys(CONF_DIR / "evaluate.yaml") | {*suites, "protocol"}
    for suite in suites:
        assert names(typing.get_type_hints(EvaluateSchema)[suite]) == _keys(CONF_DIR / "eval" / suite / "default.yaml")
    for option in available_options("protocol"):
        assert names(ProtocolSchema) == _keys(CONF_DIR / "protocol" / f"{option}.yaml"), option
    assert names(StudyRootSchema) == _keys(CONF_DIR / "study.yaml") | {"study"}


def test_schema_constants_are_the_codes():
    import anllm.anchors
    import anllm.data.build
    import anllm.data.sft
    import anllm.study.runner
    from anllm.schema import study, train

    assert train.SPLITTERS == tuple(anllm.anchors.SPLITTERS)
    assert train.SFT_TEMPLATES == tuple(anllm.data.sft.TEMPLATES)
    assert train.DATA_KINDS == tuple(anllm.data.build.KINDS)
    assert study.STAGES == tuple(anllm.study.runner.STAGES)


def test_training_arguments_check_has_no_side_effects(tmp_path, monkeypatch):
    """Building TrainingArguments for the check creates no directory, leaves the environment and the
    device/process-group state alone."""
    import torch

    from anllm.schema.trainer import build_training_arguments

    from accelerate.state import PartialState

    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    state = dict(PartialState._shared_state)  # empty unless an earlier test in this process trained
    args = build_training_arguments({"learning_rate": 1e-4, "bf16": "auto", "torch_compile": True,
                                     "report_to": ["wandb"], "logging_steps": 1})
    assert dict(os.environ) == before
    assert not Path(args.output_dir).exists() and not any(tmp_path.iterdir())
    assert not torch.cuda.is_initialized()
    assert PartialState._shared_state == state  # no device / process group set up (or changed)


def test_compose_errors_are_one_line_naming_the_key():
    from anllm.schema import ConfigError

    with pytest.raises(ConfigError, match=r"^anchor\.num_sink_tokens=abc is not an integer >= 0"):
        compose("train", ["+exp=anllm_ac", "anchor.num_sink_tokens=abc"])
    with pytest.raises(ConfigError, match=r"^trainer\.lerning_rate is not a transformers\.TrainingArguments field\. "
                                          r"Did you mean 'learning_rate'\?"):
        compose("train", ["+exp=anllm_ac", "trainer.lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"add it with a plus, \+data\.holdout_paths=\[a\]"):
        compose("train", ["+exp=anllm_ac", "data=jsonl", "data.holdout_paths=[a]"])
    with pytest.raises(ConfigError, match=r"^Unknown key qa\.shots=5: qa takes source, "):
        compose("evaluate", ["qa.shots=5"])
    with pytest.raises(ConfigError, match=r"cannot parse the override"):
        compose("study", ["study.arm_specs.ac.overrides=[anchor.window=3]"])


def test_a_broken_shipped_config_file_is_named(tmp_path):
    import shutil

    from anllm.schema import ConfigError

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    exp = conf / "exp" / "anllm_ac.yaml"
    text = exp.read_text()
    exp.write_text(text.replace("  mode: ac\n", "  mode: ac\n  window: abc\n"))
    with pytest.raises(ConfigError, match=r"^anchor\.window=abc \(in conf/exp/anllm_ac\.yaml\) is not an integer"):
        compose("train", ["+exp=anllm_ac"], conf_dir=conf)
    exp.write_text(text.replace("  mode: ac\n", "  mode: ac\n  windw: 3\n"))
    with pytest.raises(ConfigError, match=r"^Unknown key anchor\.windw \(in conf/exp/anllm_ac\.yaml\).*'window'"):
        compose("train", ["+exp=anllm_ac"], conf_dir=conf)
