# selfalign: the three commands a newcomer needs are `make setup`, `make repro`, `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch first and pinned: the CPU wheel 2.13.0. A resolver free to pick a newer torch downloads a
# multi-GB CUDA build. Off this machine, add e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# stage commands (`selfalign ...` in dvc.yaml) resolve through the project venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# the local benchmark mirror, when it sits beside the checkout (else the pinned HF Hub copies are used)
SELFALIGN_BENCHMARKS_DIR ?= $(wildcard $(abspath $(CURDIR)/../shared/benchmarks))
export SELFALIGN_BENCHMARKS_DIR
# absolute on purpose: queued DVC experiments run in a temporary copy of the repo
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

PYTEST_ARGS ?=

.PHONY: setup test test-fast repro bench clean-venv

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)" -c constraints.txt
	$(PY) -c "import torch, selfalign; print('selfalign', selfalign.__version__, 'torch', torch.__version__)"

# the full suite, slow end-to-end tests included (CI runs exactly this). Exit code 5 (no tests
# collected) is a failure: a suite that proves nothing must not pass.
test:
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# unit tests only (seconds); for the edit-test loop
test-fast:
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

repro:
	$(VENV)/bin/dvc repro

bench:
	$(VENV)/bin/selfalign bench generation --out bench/results/generation.json
	$(VENV)/bin/selfalign bench dedup --out bench/results/dedup.json
	$(VENV)/bin/selfalign bench train --out bench/results/train.json
	$(VENV)/bin/selfalign bench eval --out bench/results/eval.json
