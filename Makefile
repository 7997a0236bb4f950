# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv when missing. torch is installed first from its pinned
# CPU wheel so that no looser requirement pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test lint typecheck bench bench-quick bench-report conformance venv clean

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

BENCH = $(BIN)/python -m benchmarks
QUICK_SUITES = first_run cost cost_maps runtime quality quality_storage quality_maps minilm_models minilm_conformance

# The measurements behind docs/benchmarks.md (hours on 2 cores): result files under
# benchmarks/results/, pages under docs/benchmarks/generated/.
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BENCH) run quality
	$(BENCH) run quality --tasks 13
	$(BENCH) run quality_storage --suite all
	$(BENCH) run quality_maps
	$(BENCH) run cost
	$(BENCH) run cost_maps
	$(BENCH) run runtime
	$(BENCH) run first_run
	$(BENCH) run minilm_models
	$(BENCH) run minilm_conformance
	$(BENCH) report

# Every suite on tiny sizes (minutes): checks that each runs and its page renders.
bench-quick: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	for s in $(QUICK_SUITES); do $(BENCH) run $$s --quick || exit 1; done
	$(BENCH) report --results benchmarks/results/quick --out benchmarks/results/quick/pages

bench-report: $(STAMP)
	$(BENCH) report

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
