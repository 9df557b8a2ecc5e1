"""`make install` on other machines: the Makefile variables compose the commands the README documents
(dry run, no network)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(*variables: str) -> str:
    out = subprocess.run(["make", "-n", "install", "VENV=/tmp/anllm-dry-venv", *variables], cwd=REPO,
                         capture_output=True, text=True, check=True)
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
    ],
)
def test_cluster_variables_compose_the_documented_commands(variables, expected):
    out = dry_run(*variables)
    for e in expected:
        assert e in out
    # The README documents exactly this invocation.
    readme = (REPO / "README.md").read_text()
    assert "make install " + " ".join(variables) in readme


def test_readme_gpu_section_names_the_attention_backends():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Install on a GPU cluster"):]
    section = section[: section.index("\n## ")]
    for needle in ("attn_implementation", "flex_attention", "flash_attention_2", "DS_BUILD_OPS", "pip check"):
        assert needle in section
    assert re.search(r"make install TORCH_INDEX=\S+cu\d+", section)
