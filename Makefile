# Two commands on a fresh machine: `make demo` (install + train) and `make test` (install + tests).
PYTHON ?= python3
PIP_ARGS ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[dev,cloud]'
	$(BIN)/python -m driver.api.protogen
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/reclra train --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy workers cluster driver

bench: install
	$(BIN)/python -m bench.accuracy --data fashion_mnist --json bench/results/accuracy_fashion.json
	$(BIN)/python -m bench.accuracy --data digits --json bench/results/accuracy_digits.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
