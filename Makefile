# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv when missing. torch is installed first from its pinned
# CPU wheel so that no looser requirement pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test lint typecheck bench conformance venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/randes demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check randes storage flows migrations tests benchmarks
	$(BIN)/mypy

conformance: $(STAMP)
	RANDES_CONFORMANCE_DOC=docs/conformance.md $(BIN)/python -m pytest -q tests/conformance

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.quality
	$(BIN)/python -m benchmarks.quality --tasks 13
	$(BIN)/python -m benchmarks.quality_storage --suite all
	$(BIN)/python benchmarks/cost.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
