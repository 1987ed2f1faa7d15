# KeyBinder developer commands. `make run` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA_DIR ?= .keybinder
SOFTHSM_MODULE ?= /usr/lib/softhsm/libsofthsm2.so
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
KB       := $(BIN)/keybinder

.PHONY: help run test setup deps dev-deps softhsm bench lint typecheck proto proto-check demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: setup  ## set everything up and serve on 127.0.0.1:50051
	exec $(KB) serve --data-dir $(DATA_DIR)

test: setup dev-deps lint typecheck proto-check  ## set up, check style/types/generated code, run every test
	$(BIN)/pytest

setup: deps softhsm  ## venv, SoftHSM2, token, issuer, database, demo identity and partner (idempotent)
	$(KB) init --demo-partner --data-dir $(DATA_DIR)
	$(KB) identities import examples/demo-identities.json --data-dir $(DATA_DIR)

deps: $(VENV)/.installed  ## runtime dependencies only (what `make run` needs)

dev-deps: $(VENV)/.installed-dev  ## plus test, lint and codegen tools

# uv installs the ~30 wheels in a few seconds where pip takes over half a minute.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check uv==0.13.9

PIP := VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install --quiet

$(VENV)/.installed: pyproject.toml | $(BIN)/uv
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

softhsm:  ## install SoftHSM2 from apt when it is missing
	@if [ ! -e $(SOFTHSM_MODULE) ]; then \
		echo "installing SoftHSM2 (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq softhsm2 >/dev/null; \
	fi
	@test -e $(SOFTHSM_MODULE) || { echo "SoftHSM2 module $(SOFTHSM_MODULE) missing"; exit 1; }

lint: dev-deps  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev-deps  ## mypy --strict
	$(BIN)/mypy

proto: dev-deps  ## regenerate server/gen from protos/
	$(BIN)/python scripts/genproto.py

proto-check: dev-deps  ## fail when server/gen is not what protos/ generates
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python scripts/genproto.py --out $$tmp/gen && \
	diff -r -x __pycache__ $$tmp/gen server/gen && echo "generated code is fresh" || \
	{ echo "server/gen is stale: run 'make proto'"; exit 1; }

bench: setup  ## throughput/latency of a real server against the raw HSM signing rate
	$(BIN)/python scripts/bench.py

demo: deps  ## run the example client against a running `make run`
	$(KB) demo --data-dir $(DATA_DIR)

clean:  ## remove the virtualenv and the local data directory
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache
