# One entry point for setup, tests, the demo and benchmarks. Everything installs from nothing into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint demo bench bench-quick clean

# PYTHONWARNINGS: setuptools prints a boxed notice on every editable install about layouts this project does not use
$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/ci.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Much of the suite is single-threaded work (subprocesses importing torch), so two workers with one torch thread
# each use both cores. Tests marked `serial` measure time or load a server; they run alone afterwards.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(VENV)/bin/infinitevl demo $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV)/bin/infinitevl bench --out docs/benchmarks

# seconds, tiny sizes: checks that the benchmark code runs (its numbers mean nothing). Each run writes into a new
# temporary folder; the last line printed is the report's path.
bench-quick: $(STAMP)
	$(VENV)/bin/infinitevl bench --quick --out "$$(mktemp -d "$${TMPDIR:-/tmp}/infinitevl-bench-quick.XXXXXX")/bench"

clean:
	rm -rf $(VENV) build *.egg-info
