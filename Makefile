# One entry point for setup, tests, the demo and benchmarks. Everything installs from nothing into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser compiler test lint demo bench bench-quick peer clean

# PYTHONWARNINGS: setuptools prints a boxed notice on every editable install about layouts this project does not use
$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/ci.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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

# The fused decode kernels (infinitevl/ops/fused.py) are compiled on first use with the system C++ compiler; without
# one, decoding takes the plain PyTorch ops and their tests are skipped (under CI=true they fail). As root (CI) g++
# is installed when missing.
compiler:
	@if command -v "$${CXX:-g++}" >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null; \
	else echo "no C++ compiler: the fused decode kernels and their tests are skipped (install g++, or: make compiler as root)"; fi

# Much of the suite is single-threaded work (subprocesses importing torch), so two workers with one torch thread
# each use both cores. Tests marked `serial` measure time or load a server; they run alone afterwards.
test: $(STAMP) browser compiler
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

# about a minute, tiny sizes: checks that the benchmark code runs (its numbers mean nothing). Each run writes into a new
# temporary folder; the last line printed is the report's path.
bench-quick: $(STAMP)
	$(VENV)/bin/infinitevl bench --quick --out "$$(mktemp -d "$${TMPDIR:-/tmp}/infinitevl-bench-quick.XXXXXX")/bench"

# The optional llama.cpp peer of `infinitevl bench --only precision` (infinitevl/bench/llamacpp.py), compiled from
# source: llama-cpp-python's default build (-march=native) takes ggml's AMX tile path on CPUs that report AMX, and
# `tileloadd` traps (SIGILL) in VMs that do not grant the tile state. So: no -march=native, AMX off, AVX2 / AVX-512
# (with VBMI, VNNI, BF16) on. About 5 minutes on 2 cores; never needed by the tests.
PEER_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
peer: $(STAMP)
	$(PY) -m pip uninstall --quiet --yes llama-cpp-python  # a build with other flags would otherwise be kept
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet --no-cache-dir \
		--no-binary llama-cpp-python llama-cpp-python==0.3.36 gguf==0.19.0
	$(PY) -c "import llama_cpp as L; print(L.llama_print_system_info().decode())"

clean:
	rm -rf $(VENV) build *.egg-info
