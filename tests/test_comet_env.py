"""COMET in its own environment (``.venv-comet``, made by ``make install``).

The subprocess path (``anllm/eval/comet_worker.py`` run by path with that environment's Python) gives
the scores that the in-process path gave before the switch (``tests/data/comet_tiny_fixture.json``,
with its provenance) to <= 1e-4; a missing or broken environment is a one-line error naming
``make install`` (``evaluate.py`` exits 2) after BLEU/chrF are saved; the device (``cuda:N`` is GPU N)
and the other options reach the worker.

Runtime: ~40 s on 2 CPU cores (building the tiny model and a few starts of COMET's environment).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anllm.eval import metrics
from anllm.eval import translation as tr
from anllm.eval.metrics import CometEnvError, comet_device, comet_score_systems, score_translations

REPO = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "data" / "comet_tiny_fixture.json").read_text(encoding="utf-8"))
WMT23 = "wmt23_de_en"


def _columns(segments: list[dict[str, str]]) -> tuple[list[str], list[str], list[str]]:
    return [s["src"] for s in segments], [s["mt"] for s in segments], [s["ref"] for s in segments]


def _worker_module():
    spec = importlib.util.spec_from_file_location("comet_worker", metrics.WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _fake_model_dir(tmp_path: Path) -> Path:
    """Passes the parent's path check (the worker would fail to load it; these tests never get there)."""
    d = tmp_path / "fake-comet"
    (d / "checkpoints").mkdir(parents=True)
    (d / "hparams.yaml").write_text("class_identifier: regression_metric\n")
    (d / "checkpoints" / "model.ckpt").write_bytes(b"")
    return d


# ---- the same numbers as in-process ------------------------------------------------------------


def test_fixture_has_its_provenance():
    prov = FIXTURE["provenance"]
    assert prov["versions"]["unbabel-comet"] == "2.2.7" and prov["versions"]["numpy"].startswith("1.")
    assert "record_comet_fixture.py" in prov["command"] and prov["date"] and prov["git_commit"]
    # recorded in the pre-switch environment, where anllm itself still scored COMET in-process
    assert FIXTURE["via_anllm_in_process"]["segments"] == FIXTURE["segments"]


def test_subprocess_equals_the_in_process_fixture(tiny_comet):
    segs, bs = FIXTURE["segments_in"], FIXTURE["batch_size"]
    # two systems in one run of the environment: split back in order
    out = comet_score_systems({"a": _columns(segs[:3]), "b": _columns(segs[3:])}, str(tiny_comet), batch_size=bs, device="cpu")
    got = out["a"].segments + out["b"].segments
    assert got == pytest.approx(FIXTURE["segments"], abs=1e-4)
    assert out["a"].system == pytest.approx(100 * sum(FIXTURE["segments"][:3]) / 3, abs=1e-4)
    assert len({round(x, 6) for x in got}) > 1  # a real model, not a constant
    res = score_translations(*_columns(segs), comet_model=str(tiny_comet), comet_batch_size=bs, device="cpu")
    assert res["comet_note"] is None and res["bleu"] > 0
    assert res["comet_segments"] == pytest.approx(FIXTURE["segments"], abs=1e-4)
    assert res["comet"] == pytest.approx(FIXTURE["system"], abs=1e-4)


def test_worker_by_path_with_a_json_list(tiny_comet, comet_python, tmp_path):
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text(json.dumps(FIXTURE["segments_in"]), encoding="utf-8")
    cmd = [str(comet_python), "-I", str(metrics.WORKER), "--model", str(tiny_comet), "--input", str(inp),
           "--output", str(out), "--batch-size", str(FIXTURE["batch_size"]), "--local-files-only", "--num-threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["systems"][""]["scores"] == pytest.approx(FIXTURE["segments"], abs=1e-4)
    assert res["systems"][""]["system_score"] == pytest.approx(FIXTURE["system"] / 100, abs=1e-6)
    assert res["versions"]["unbabel-comet"] == "2.2.7" and res["device"] == "cpu"
    inp.write_text('{"src": "a", "mt": 3}\n', encoding="utf-8")  # bad input: checked before comet loads
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5 and json.loads(out.read_text())["kind"] == "input"


def test_worker_imports_only_comet_and_the_standard_library():
    """anllm is not installed in COMET's environment: the worker must not need it (nor numpy 2 etc.)."""
    tree = ast.parse(metrics.WORKER.read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | {"comet", "torch", "__future__"}  # torch comes with comet
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.split(".")[0] in allowed, name


# ---- a missing or broken environment -----------------------------------------------------------


def _one_line_naming_make_install(message: str) -> None:
    assert "\n" not in message and "make install" in message, message


def test_missing_env_raises_after_bleu_is_computed(shared_data, tmp_path):
    f = shared_data / "wmt23_de_en" / "system-outputs" / "generaltest2023.de-en.hyp.AIRC.en"
    with pytest.raises(CometEnvError) as err:
        tr.evaluate_translation(None, None, WMT23, data_dir=shared_data, limit=5, hypotheses=[f], generate=False,
                                comet_model="Unbabel/wmt22-comet-da", comet_python=str(tmp_path / "nope" / "python"))
    _one_line_naming_make_install(str(err.value))
    assert "not found" in str(err.value) and str(tmp_path / "nope" / "python") in str(err.value)
    rows = err.value.rows
    assert len(rows) == 1 and rows[0]["bleu"] > 0 and rows[0]["chrf"] > 0 and rows[0]["comet"] is None


def test_env_lookup_order(tmp_path, monkeypatch):
    """translation.comet_python, then $ANLLM_COMET_PYTHON, then <repo>/.venv-comet/bin/python."""
    monkeypatch.setenv("ANLLM_COMET_PYTHON", sys.executable)
    assert metrics.find_comet_python() == Path(sys.executable).absolute()
    with pytest.raises(CometEnvError, match="translation.comet_python"):
        metrics.find_comet_python(tmp_path / "python")
    monkeypatch.delenv("ANLLM_COMET_PYTHON")
    assert metrics.DEFAULT_COMET_PYTHON == REPO / ".venv-comet" / "bin" / "python"
    monkeypatch.setattr(metrics, "DEFAULT_COMET_PYTHON", tmp_path / ".venv-comet" / "bin" / "python")
    with pytest.raises(CometEnvError, match="the default") as err:
        metrics.find_comet_python()
    _one_line_naming_make_install(str(err.value))


def test_broken_env_without_comet(shared_data, tmp_path):
    """An environment whose Python runs but has no comet: the worker says so, the error names make install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "broken")], check=True, timeout=120)
    f = shared_data / "wmt23_de_en" / "system-outputs" / "generaltest2023.de-en.hyp.AIRC.en"
    with pytest.raises(CometEnvError) as err:
        tr.evaluate_translation(None, None, WMT23, data_dir=shared_data, limit=3, hypotheses=[f], generate=False,
                                comet_model=str(_fake_model_dir(tmp_path)), device="cpu",
                                comet_python=str(tmp_path / "broken" / "bin" / "python"))
    _one_line_naming_make_install(str(err.value))
    assert "cannot import comet" in str(err.value)
    assert err.value.rows[0]["bleu"] > 0 and err.value.rows[0]["comet"] is None


def test_cli_exits_2_with_one_line_after_saving_bleu(shared_data, tmp_path):
    hyp = shared_data / "wmt23_de_en" / "system-outputs" / "generaltest2023.de-en.hyp.GPT4-5shot.en"
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("ANLLM_COMET_PYTHON", None)
    cmd = [sys.executable, "evaluate.py", "suite=translation", f"data_dir={shared_data}", f"output_dir={out}",
           f"translation.hypotheses=[{hyp}]", f"translation.comet_python={tmp_path / 'no-env' / 'bin' / 'python'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evaluate.py:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("evaluate.py: error: translation/wmt23_de_en: COMET environment not found")
    assert "make install" in lines[0] and "results.md" in lines[0]
    saved = json.loads((out / "tasks" / "translation" / "wmt23_de_en.json").read_text())
    assert saved["status"] == "incomplete"  # a re-run retries it
    row = saved["rows"][0]
    assert round(row["bleu"], 1) == 47.9 and round(row["chrf"], 1) == 69.8 and row["comet"] is None  # official WMT23
    assert "47.9" in (out / "results.md").read_text()


# ---- device and options --------------------------------------------------------------------------


def test_device_batch_and_cache_reach_the_worker(tmp_path, monkeypatch):
    seen: dict[str, list[str]] = {}

    def fake_run(cmd, **kwargs):  # answers as the worker would
        seen["cmd"] = cmd
        rows = [json.loads(x) for x in Path(cmd[cmd.index("--input") + 1]).read_text().splitlines()]
        scores = {"": {"scores": [0.25 + 0.5 * i for i in range(len(rows))]}}
        Path(cmd[cmd.index("--output") + 1]).write_text(json.dumps({"systems": scores}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(metrics.subprocess, "run", fake_run)
    res = score_translations(["a", "b"], ["x", "y"], ["x", "z"], comet_model=str(_fake_model_dir(tmp_path)),
                             comet_python=sys.executable, device="cuda:1", cache_dir=str(tmp_path / "hub"), comet_batch_size=3)
    cmd = seen["cmd"]
    assert cmd[:3] == [str(Path(sys.executable).absolute()), "-I", str(metrics.WORKER)]
    assert cmd[cmd.index("--device") + 1] == "cuda:1"  # not always cuda:0 (issue #16)
    assert cmd[cmd.index("--batch-size") + 1] == "3" and cmd[cmd.index("--cache-dir") + 1] == str(tmp_path / "hub")
    assert "--local-files-only" in cmd  # a local model: its encoder must be local too
    assert res["comet"] == pytest.approx(50.0) and res["comet_segments"] == [0.25, 0.75]


def test_device_auto_is_the_gpu_when_this_process_has_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert comet_device("auto") == "cuda" and comet_device(None) == "cuda" and comet_device("cuda:3") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert comet_device("auto") == "cpu" and comet_device("cpu") == "cpu"


def test_worker_runs_cuda_n_on_gpu_n(monkeypatch):
    import torch

    worker = _worker_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker.predict_args("cuda:2") == {"gpus": 1, "devices": [2], "accelerator": "gpu"}
    assert worker.predict_args("cuda") == {"gpus": 1, "devices": [0], "accelerator": "gpu"}
    assert worker.predict_args("cpu") == {"gpus": 0}
    with pytest.raises(worker.WorkerError, match="only 4 CUDA"):
        worker.predict_args("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(worker.WorkerError) as err:  # a CPU-only torch in COMET's environment: remake it
        worker.predict_args("cuda:0")
    assert err.value.code == worker.EXIT_ENV
