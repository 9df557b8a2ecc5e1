"""A non-editable install carries the configs: ``pip install .`` into a fresh target composes train.yaml.

The Hydra configs live inside the package (``src/anllm/conf``; the repository's ``conf`` is a link to
them) and ship as package data, so ``anllm.schema.compose`` works from site-packages, not only from a
checkout. Builds a wheel from a copy of the sources (offline, with this environment's setuptools) and
imports from the install in a clean process (about 20 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PROBE = """
import anllm.schema as schema
from pathlib import Path
target = Path(__import__("sys").argv[1]).resolve()
assert Path(schema.__file__).resolve().is_relative_to(target), schema.__file__
assert schema.CONF_DIR.resolve().is_relative_to(target), schema.CONF_DIR
cfg = schema.compose("train", ["+exp=anllm_ac", "model=tiny"])
assert cfg.exp_name == "anllm_ac" and cfg.model.source == "tiny", cfg
assert "smollm2_135m" in schema.available_options("model")
print("ok")
"""


def test_a_non_editable_install_composes_train_yaml(tmp_path):
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = tmp_path / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shipped = {p.relative_to(target / "anllm" / "conf") for p in (target / "anllm" / "conf").rglob("*.yaml")}
    expected = {p.relative_to(REPO / "src" / "anllm" / "conf") for p in (REPO / "src" / "anllm" / "conf").rglob("*.yaml")}
    assert shipped == expected, f"configs missing from the install: {sorted(map(str, expected - shipped))[:5]}"
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", PROBE, str(target)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert probe.returncode == 0 and probe.stdout.strip().endswith("ok"), probe.stdout + probe.stderr


def test_the_top_level_conf_is_the_packaged_one():
    """``conf/`` in a checkout (docs, scripts, muscle memory) is the package's directory, not a copy."""
    from anllm.schema import CONF_DIR

    assert CONF_DIR == REPO / "src" / "anllm" / "conf"
    assert (REPO / "conf").resolve() == CONF_DIR.resolve()
