# quantloop: `make run` and `make test` each set up everything they need on a
# fresh machine (virtual environment, llama.cpp build, model and text), reusing
# whatever is already there, so a second run starts in seconds.
VENV ?= .venv
PY := $(VENV)/bin/python
QL := $(VENV)/bin/quantloop
PYTEST_ARGS ?=

.PHONY: setup prepare run test test-fast bench help

help:
	@echo "make run        set up, prepare the default model and text, run the agent loop (quantloop run)"
	@echo "make test       set up, prepare, run every test (fast and slow)"
	@echo "make test-fast  the fast tests only"
	@echo "make bench      print the measurement benchmark (bench/)"

setup:
	@scripts/setup.sh

prepare: setup
	@$(QL) prepare

run: prepare
	$(QL) run

test: prepare
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

test-fast: prepare
	$(PY) -m pytest $(PYTEST_ARGS)

bench: prepare
	$(PY) bench/bench_measurement.py
