# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv train test lint bench clean fmnist

venv: $(STAMP)

# (Re)install when the venv is missing or the packaging files changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py prune=influence $(ARGS)

SOURCES := lightning_ifprune tests benchmarks examples train.py
# Test processes (pytest-xdist): the zoo sweep alone is minutes of single-threaded work per core.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check --fix $(SOURCES)
	$(PY) -m ruff format $(SOURCES)

bench: $(STAMP)
	$(PY) benchmarks/estimator_cost.py
	$(PY) benchmarks/fidelity.py

# Fashion-MNIST idx files into /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist).
fmnist:
	@if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	set -e; $$SUDO apt-get update; $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
