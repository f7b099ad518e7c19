# docvlm: `make train` runs the embedded default (tiny Idefics2, synthetic documents) on this machine.
#   make train RECIPE=docvqa_qlora ACCELERATE_CONFIG=single_gpu ARGS="--learning_rate 2e-4"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= tiny_docvqa
ARGS ?=
# Without a GPU, install the CPU build of torch and launch on the CPU.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
COMMA := ,
EXTRAS := $(if $(HAS_GPU),dev,dev$(COMMA)cpu)
ACCELERATE_CONFIG ?= $(if $(HAS_GPU),single_gpu,cpu)

.PHONY: install train test test-all lint format clean

install: $(VENV)/.installed

# Re-runs when pyproject.toml changes; a first `make train` or `make test` gets here by itself.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

train: install
	$(BIN)/accelerate launch --config_file accelerate_configs/$(ACCELERATE_CONFIG).yaml \
		-m docvlm.train --config recipes/$(RECIPE).yaml $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf outputs .pytest_cache .ruff_cache
