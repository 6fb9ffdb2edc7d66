# One entry point for setup, tests, the demo and benchmarks. Everything installs from nothing into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser test lint demo bench bench-quick clean

$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/ci.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The page test (tests/test_web_page.py) drives Debian's headless Chromium through Debian's chromedriver. As root (CI)
# they are installed here when missing; otherwise the test is skipped with this same advice.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null; \
	else echo "chromium / chromium-driver are missing: tests/test_web_page.py will be skipped (install them as root: make browser)"; fi

# Much of the suite is single-threaded work (subprocesses importing torch), so two workers with one torch thread
# each use both cores. Tests marked `serial` measure time or load a server; they run alone afterwards.
test: $(STAMP) browser
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

bench-quick: $(STAMP)
	$(VENV)/bin/infinitevl bench --quick --out /tmp/infinitevl-bench-quick

clean:
	rm -rf $(VENV) build *.egg-info
