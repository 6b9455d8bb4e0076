# make install [DEVICE=cuda|cpu]: create .venv with torch for DEVICE (default: the one already installed, else auto:
# cuda where nvidia-smi lists a GPU, cpu elsewhere; on a cluster's login node without GPUs pass DEVICE=cuda).
# make demo: the whole job on the repo's licensed Korean sample (idle 2-core CPU: about 6.5 minutes, training at about
# 3,900 tokens/s; longer on a loaded machine; README Quickstart, BENCHMARKS.md).
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
# The stamp records the torch build installed (cpu or cuda); an explicit DEVICE that differs reinstalls torch.
DEVICE ?= auto
INSTALLED_DEVICE := $(strip $(shell cat $(STAMP) 2>/dev/null))
ifeq ($(DEVICE),auto)
TORCH_DEVICE := $(or $(INSTALLED_DEVICE),$(if $(HAS_GPU),cuda,cpu))
else ifneq ($(filter $(DEVICE),cuda cpu),)
TORCH_DEVICE := $(DEVICE)
ifneq ($(INSTALLED_DEVICE),$(DEVICE))
.PHONY: $(STAMP)
endif
else
$(error DEVICE=$(DEVICE): use DEVICE=cuda or DEVICE=cpu, or leave it unset to auto-detect)
endif
DEMO ?= runs/ko_tiny
NPROC ?= 2

.PHONY: install demo test test-fast lint lint-imports clean-demo

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
ifeq ($(TORCH_DEVICE),cuda)
	# pip counts an installed 2.x+cpu as satisfying torch==2.x, so a CPU build is removed first.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null || $(PIP) uninstall -q -y torch
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null || $(PIP) uninstall -q -y torch
	# CPU build: a plain `torch` would pull a multi-GB CUDA build onto a machine without a GPU.
	$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX)
endif
	# deepspeed's setup imports torch, so it builds against the torch installed above.
	$(PIP) install -q --no-build-isolation -e ".[hf,dev,eval,slurm]"
	echo $(TORCH_DEVICE) > $(STAMP)

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
