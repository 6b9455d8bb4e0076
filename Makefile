# make demo: the whole job on the repo's licensed Korean sample (CPU: about 5 minutes on 2 cores).
# make test: the package layering (.importlinter), then the whole test suite; make test-fast: without the
# multi-process (slow) tests. All create or reuse .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hangang-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
DEMO ?= runs/ko_tiny
NPROC ?= 2

.PHONY: install demo test test-fast lint lint-imports clean-demo

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	# CPU build: a plain `torch` would pull a multi-GB CUDA build onto a machine without a GPU.
	$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX)
endif
	# deepspeed's setup imports torch, so it builds against the torch installed above.
	$(PIP) install -q --no-build-isolation -e ".[hf,dev,eval,slurm]"
	touch $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh $(DEMO) $(NPROC)

test: lint-imports
	$(PY) -m pytest tests -q

# The layers data_pipeline < tokenizer < model < train < launch, and model without deepspeed or torch.distributed.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

test-fast: lint-imports
	$(PY) -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(DEMO)
