# The two commands that matter: `make up` (start the native stack) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
OPA_VERSION := v1.22.3
PIPELINE_CACHE ?= $(HOME)/.cache/pipeline
OPA_BIN := $(PIPELINE_CACHE)/opa-$(OPA_VERSION)/opa
KAFKA_JAR := deploy/local/target/spiffe-principal.jar
JAVA_SOURCES := $(shell find deploy/local/src/main -name '*.java')
export PIPELINE_CACHE

.PHONY: help deps system-deps up down clean status test test-unit test-opa test-java test-integration lint

help:
	@echo "make up      start the native stack (Kafka mTLS+OPA, OPA, PostgreSQL) in .stack/"
	@echo "make down    stop it;  make clean  stop it and wipe .stack/"
	@echo "make status  health of each component"
	@echo "make test    lint, unit, Rego, Java and integration tests (own stack on free ports)"

# Everything the stack and the tests need, installed once and reused afterwards.
deps: system-deps $(VENV)/.installed $(KAFKA_JAR) $(OPA_BIN)

system-deps:
	@scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

$(KAFKA_JAR): deploy/local/pom.xml $(JAVA_SOURCES)
	cd deploy/local && mvn -B -q -DskipTests package
	@touch $@

# OPA from its Go module, pinned; `go install` builds it into our cache (a few minutes, once).
$(OPA_BIN):
	GOBIN=$(dir $(OPA_BIN)) GOFLAGS=-mod=mod go install github.com/open-policy-agent/opa@$(OPA_VERSION)

up: deps
	$(PY) -m deploy.local.stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.stack down; fi

clean:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.stack clean; else rm -rf .stack; fi

status: $(VENV)/.installed
	$(PY) -m deploy.local.stack status

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test-unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit -q

test-opa: $(OPA_BIN)
	$(OPA_BIN) test opa

test-java:
	cd deploy/local && mvn -B -q test

test-integration: deps
	$(PY) -m pytest tests/integration -q

test: deps lint test-opa test-java
	$(PY) -m pytest tests -q
