# Two commands on a fresh machine (see README.md):
#   make demo   run maplookup on a private PostgreSQL with example data
#   make test   lint, type-check and run the whole test suite
# Both create the virtualenv .venv on first use.  `make bench` runs the benchmark suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/maplookup serve --demo

lint: $(BIN)/.installed
	$(BIN)/ruff check maplookup tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(BIN)/.installed-bench
	$(BIN)/python -m bench.suite

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
