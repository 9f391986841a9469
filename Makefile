# Two commands set everything up on a fresh machine with Python 3.11+ and make:
#   make demo   creates .venv, installs, runs the example nightly pipeline
#   make test   creates .venv, installs, runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: venv
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/nightshift run examples/nightly.yaml
	$(BIN)/nightshift status examples/nightly.yaml
	$(BIN)/nightshift export examples/nightly.yaml --to out/nightly.jsonl
	head -n 3 out/nightly.jsonl

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/bench_overhead.py

clean:
	rm -rf .nightshift out
