# docvlm: `make train` runs the embedded default (tiny Idefics2, synthetic documents) on this machine.
# `docvlm launch` is `accelerate launch` that exits with the job's status instead of a launcher traceback.
#   make train RECIPE=docvqa_qlora ACCELERATE_CONFIG=single_gpu ARGS="--learning_rate 2e-4"
#   make train RECIPE=docvqa_qlora ACCELERATE_CONFIG=multi_gpu NUM_GPUS=4
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= tiny_docvqa
# a recipe's name (tiny_docvqa) or its path (recipes/tiny_docvqa.yaml, my/recipe.yaml)
RECIPE_FILE = $(if $(filter %.yaml %.yml,$(RECIPE)),$(RECIPE),recipes/$(RECIPE).yaml)
# train with ACCELERATE_CONFIG=multi_gpu: how many GPUs (processes) to use (default: the config's)
NUM_GPUS ?=
# eval: the adapter folder to evaluate (default: the recipe's output_dir)
ADAPTER ?=
ARGS ?=
# Without a GPU, install the CPU build of torch and launch on the CPU.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
COMMA := ,
EXTRAS := $(if $(HAS_GPU),dev,dev$(COMMA)cpu)
ACCELERATE_CONFIG ?= $(if $(HAS_GPU),single_gpu,cpu)
# On the CPU, glibc hands every large tensor back to the OS (mmap/munmap) and the page faults cost ~30% of a
# training step; keeping them in the heap makes the tiny recipe 1.4x faster. Ignored where glibc is not used.
ifndef HAS_GPU
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824
endif

.PHONY: install check-recipe train eval plan bench bench-multi bench-cpu test test-quick test-slow lint format clean

install: $(VENV)/.installed

# Re-runs when pyproject.toml changes; a first `make train` or `make test` gets here by itself.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Before anything installs or imports: a mistyped RECIPE fails at once, naming the closest recipe.
check-recipe:
	@test -f "$(RECIPE_FILE)" || { $(PYTHON) -c 'import difflib, pathlib, sys; \
		names = sorted(p.stem for p in pathlib.Path("recipes").glob("*.yaml")); \
		close = difflib.get_close_matches(pathlib.Path(sys.argv[1]).stem, names, n=1); \
		hint = f" Did you mean RECIPE={close[0]}?" if close else ""; listed = ", ".join(names); \
		print(f"make: recipe {sys.argv[1]} not found.{hint} Recipes: {listed}.", file=sys.stderr)' \
		"$(RECIPE_FILE)"; exit 2; }

train: check-recipe install
	$(BIN)/docvlm launch --config_file accelerate_configs/$(ACCELERATE_CONFIG).yaml \
		$(if $(NUM_GPUS),--num_processes $(NUM_GPUS)) -m docvlm.train --config $(RECIPE_FILE) $(ARGS)

# Before/after ANLS on the recipe's held-out split (train runs it at the end unless eval_after_training: false).
eval: check-recipe install
	$(BIN)/docvlm eval --config $(RECIPE_FILE) $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

# No GPU: check the recipe and a sample of its data; predict peak memory and step time on GPU (default h100-80gb).
GPU ?=
plan: check-recipe install
	$(BIN)/docvlm plan --config $(RECIPE_FILE) $(if $(GPU),--gpu $(GPU)) $(ARGS)

# GPU: the notebook's setup against our recipes on Idefics2-8B's architecture (docs/benchmarks.md); FAMILIES=1:
# every other family's recipe on its real architecture instead, a few steps each (benchmarks/families.py); EVAL=1:
# questions/s of the notebook's generate loop against docvlm eval (benchmarks/evaluation.py).
FAMILIES ?=
EVAL ?=
bench: install
	$(BIN)/python -m benchmarks.$(if $(FAMILIES),families,$(if $(EVAL),evaluation,bench)) $(ARGS)

# GPUs: docvqa_qlora on one GPU, then on NUM_GPUS (default 2) under DDP, DeepSpeed ZeRO-2 and ZeRO-3, with the same
# per-device batch; ZeRO-3's saved adapter is reloaded on one GPU and compared (docs/distributed.md).
# 400 pages: no epoch ends (and no dataloader restarts) inside the timed steps of 2 x 16 pages each.
bench-multi: install
	$(BIN)/python -m benchmarks.bench --pages 400 --check-reload --setups docvqa_qlora \
		$(foreach config,multi_gpu deepspeed_zero2 deepspeed_zero3,"$(config)x$(or $(NUM_GPUS),2):docvqa_qlora") $(ARGS)

# CPU: the embedded default alone and beside one busy process, under each OpenMP wait policy (docs/cpu_threads.md).
bench-cpu: install
	$(BIN)/python -m benchmarks.bench_cpu $(ARGS)

# The CPU test suite but its end-to-end runs (under 8 minutes on 2 cores); test-quick: the unit tests alone, for the
# loop between edits (under 2 minutes); test-slow: the end-to-end runs (the README's commands, two-process launches,
# killed and resumed runs). CI runs test and test-slow.
test: install
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-quick: install
	$(BIN)/python -m pytest -m "not slow and not integration" $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf outputs .pytest_cache .ruff_cache
