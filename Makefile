# Builds ./run (CPU, OpenMP).  `make test` runs the whole suite, then again under ASan+UBSan.
CC ?= gcc
PYTHON ?= /usr/bin/python3
CFLAGS ?= -Ofast -march=native
WARN = -std=c11 -Wall -Wextra -Wno-unused-parameter

run: run.c
	$(CC) $(CFLAGS) $(WARN) -fopenmp -o $@ $< -lm

# Same program without OpenMP (one thread).
run-noomp: run.c
	$(CC) $(CFLAGS) $(WARN) -o $@ $< -lm

# Sanitizer build used by `make test`; -O1 keeps it fast enough, no -ffast-math so UBSan sees real floats.
run-asan: run.c
	$(CC) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
		$(WARN) -fopenmp -o $@ $< -lm

test: run run-noomp run-asan
	$(PYTHON) -m pytest -q tests
	RUN_BIN=$(CURDIR)/run-noomp $(PYTHON) -m pytest -q tests/test_core.py
	RUN_BIN=$(CURDIR)/run-asan ASAN_OPTIONS=detect_leaks=1 $(PYTHON) -m pytest -q tests

clean:
	rm -f run run-noomp run-asan

.PHONY: test clean
