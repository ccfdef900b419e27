# fedtransfer: `make run` (default offline experiment) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# the data directory the dataset loaders read (FEMNIST, MNIST, CIFAR-10, AG News, SST-2)
export FEDTRANSFER_DATA ?= $(abspath ../shared/data)

.PHONY: run test test-fast lint bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: an unpinned torch pulls GBs of CUDA packages.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedtransfer run

test: $(STAMP)
	$(PY) -m pytest src tests

# the unit tier (about 2 minutes on 2 cores): no integration tests, whole experiments, Ray or
# worker pools (the `slow` marker, applied in tests/conftest.py); the slowest tests are listed
test-fast: $(STAMP)
	$(PY) -m pytest src tests -m "not slow" --durations=15

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

# the performance suite (about 25 minutes on 2 cores): benchmarks/results/perf.md
bench: $(STAMP)
	$(PY) benchmarks/perf/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
