# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# installs the project (one pip resolve, torch pinned with torchvision) before running.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= demo-run
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# Bytecode is compiled on first import (below), so processes must be allowed to write it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-quick lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# --no-compile: pip would byte-compile all 24,000 modules of the environment (90 s of a 155 s
	# install here); the 6,000 a run imports are compiled on first import instead (14 s, once).
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]"
	# DeepSpeed's CPU shared-memory all-reduce is a C++ extension it compiles on first use (about
	# 30 s); build it here so the first training launch (demo or test) does not pay for it.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unclip demo --workdir $(WORKDIR)

# Two workers, each a module at a time (modules share their runs and services), longest modules
# first (tests/conftest.py): a test's ranks and Ray leave one of the two cores idle half the time.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The formatter decides layout; the linter (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and
# pyright at basic read every package. Configured in pyproject.toml; CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pyright

test-quick: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) $(WORKDIR) .cache
