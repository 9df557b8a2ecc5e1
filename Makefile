# anllm: the two commands of the README are `make install` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install test test-fast bench model train-demo clean-venv

# From nothing: a fresh venv, the CPU torch taken from local disk, then the package with dev extras.
# DeepSpeed's setup.py imports torch, so it builds against the torch already installed
# (without build isolation, which would otherwise fetch a multi-GB CUDA torch).
install:
	python3 -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "setuptools<81" wheel
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -q -e ".[dev]"
	$(PIP) check
	$(PY) -c "import anllm, torch, transformers; print('anllm', anllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

test:
	$(PY) -m pytest tests

bench:
	$(PY) bench/run_all.py

model:
	$(PY) -m anllm.models.smollm2
