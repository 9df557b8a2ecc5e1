"""`make install` on other machines: the Makefile variables compose the commands the README documents
(dry run, no network)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_n(target: str, *variables: str) -> subprocess.CompletedProcess:
    """`make -n target`: what make would run, as a fresh shell's make prints it."""
    # make would take PYTHON from the environment; and under `make test` the outer make's MAKEFLAGS/
    # MAKELEVEL reach this inner make and change what -n prints (the suite runs both ways)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return subprocess.run(["make", "-n", target, *variables], cwd=REPO, capture_output=True, text=True, env=env)


def make_dry(*variables: str) -> subprocess.CompletedProcess:
    return make_n("install", "VENV=/tmp/anllm-dry-venv", "VENV_COMET=/tmp/anllm-dry-venv-comet", *variables)


def dry_run(*variables: str) -> str:
    out = make_dry(*variables)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_default_is_the_pinned_torch_from_pips_index_and_jit_deepspeed_ops():
    out = dry_run()
    assert 'pip install -q "torch==2.13.0" 2>&1' in out and "--index-url" not in out
    assert 'DS_BUILD_OPS=0 /tmp/anllm-dry-venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.15"' in out
    assert out.index('"torch==2.13.0"') < out.index("deepspeed") < out.index('-e ".[dev]"') < out.index("pip check")


@pytest.mark.parametrize(
    "variables, expected",
    [
        (["TORCH_INDEX=https://download.pytorch.org/whl/cu126"],
         ['pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu126']),
        (["TORCH_SPEC=torch==2.13.0", "DS_BUILD_OPS=1"], ['pip install -q "torch==2.13.0" 2>&1', "DS_BUILD_OPS=1 "]),
        # only the ops the recipes use, prebuilt (and not taken from pip's cache of a wheel built without them)
        (["DS_BUILD_CPU_ADAM=1", "DS_BUILD_FUSED_ADAM=1"],
         ['DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 /tmp/anllm-dry-venv/bin/python -m pip install -q '
          '--no-build-isolation --no-cache-dir "deepspeed>=0.15"']),
    ],
)
def test_cluster_variables_compose_the_documented_commands(variables, expected):
    out = dry_run(*variables)
    for e in expected:
        assert e in out
    # The README documents exactly this invocation.
    readme = (REPO / "README.md").read_text()
    assert "make install " + " ".join(variables) in readme


@pytest.mark.parametrize("variables", [[], ["TORCH_INDEX=https://download.pytorch.org/whl/cu126"], ["TORCH_SPEC=torch==2.13.0"]])
def test_comet_env_gets_the_same_torch_then_its_requirements(variables):
    """COMET's own environment (unbabel-comet pins numpy<2): the main one's torch build, then
    comet/requirements.txt, checked with pip check; `make clean-venv` and CI remove it too."""
    out = dry_run(*variables)
    main, comet = out.split("-m venv /tmp/anllm-dry-venv-comet\n")
    torch_line = next(line for line in main.splitlines() if '"torch==' in line).replace("/tmp/anllm-dry-venv/", "")
    comet_lines = comet.splitlines()
    assert comet_lines[0].replace("/tmp/anllm-dry-venv-comet/", "") == torch_line
    assert comet_lines[1].startswith("/tmp/anllm-dry-venv-comet/bin/python -m pip install -q -r comet/requirements.txt")
    assert comet_lines[2] == "/tmp/anllm-dry-venv-comet/bin/python -m pip check"
    reqs = (REPO / "comet" / "requirements.txt").read_text()
    assert "unbabel-comet==2.2.7" in reqs.splitlines() and "numpy>=1.20,<2" in reqs.splitlines()
    assert not any(line.startswith("anllm") for line in reqs.splitlines())  # anllm runs the worker by path
    clean = make_n("clean-venv", "VENV=/a", "VENV_COMET=/b")
    assert clean.stdout.strip() == "rm -rf /a /b"
    assert "rm -rf .venv .venv-comet" in (REPO / ".ci" / "run").read_text()
    assert ".venv-comet/" in (REPO / ".gitignore").read_text().splitlines()


def test_readme_gpu_section_names_the_attention_backends():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Install on a GPU cluster"):]
    section = section[: section.index("\n## ")]
    for needle in ("attn_implementation", "flex_attention", "flash_attention_2", "DS_BUILD_OPS", "pip check"):
        assert needle in section
    assert re.search(r"make install TORCH_INDEX=\S+cu\d+", section)


def test_python_knob_makes_the_venv_from_that_interpreter():
    out = dry_run(f"PYTHON={sys.executable}")
    lines = out.splitlines()
    assert lines[1] == f"{sys.executable} -m venv /tmp/anllm-dry-venv"  # after the version check (line 0)
    comet = lines.index(f"{sys.executable} -m venv /tmp/anllm-dry-venv-comet")  # COMET's environment, the same Python
    assert all(line.startswith(("/tmp/anllm-dry-venv/bin/python", "DS_BUILD_OPS")) for line in lines[2:comet]), out
    assert all(line.startswith("/tmp/anllm-dry-venv-comet/bin/python") for line in lines[comet + 1:]), out
    assert dry_run().splitlines()[1] == "python3 -m venv /tmp/anllm-dry-venv"  # the default
    assert "make install PYTHON=python3.11" in (REPO / "README.md").read_text()


def test_an_old_or_missing_python_is_refused_with_the_knob_named(tmp_path):
    old = tmp_path / "python3.9"  # answers like a Python 3.9: --version, and the version check fails
    old.write_text('#!/usr/bin/env bash\nif [[ "$1" == --version ]]; then echo "Python 3.9.18"; exit 0; fi\n'
                   '[[ "$*" == *"version_info < (3, 11)"* ]] && exit 1\nexit 3\n')
    old.chmod(0o755)
    for python, says in [(old, "is Python 3.9.18"), (tmp_path / "no-such-python", "is not found")]:
        out = make_dry(f"PYTHON={python}")
        assert out.returncode != 0
        message = [line for line in out.stderr.splitlines() if line.startswith("make install:")]
        assert len(message) == 1 and "Python >= 3.11" in message[0] and says in message[0]
        assert "make install PYTHON=python3.11" in message[0]
