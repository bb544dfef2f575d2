# Two entry points (see README): `make quickstart` runs the main job offline on CPU,
# `make test` runs the test suite. Both create the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all lint bench

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

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
