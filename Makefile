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
# Elasticsearch's integ-test-zip from Maven Central, unpacked by deploy/local/elasticsearch/pom.xml
# (keep the version in step with it and with deploy/local/search_server.py).
ES_VERSION := 8.19.21
ES_UNPACKED := deploy/local/elasticsearch/target/elasticsearch-$(ES_VERSION)/.unpacked
# S3Proxy and its runtime classpath (deploy/local/s3/pom.xml), kept apart from Kafka's jars.
S3_LIB := deploy/local/s3/target/lib/.complete
# SPIRE (the stack's identities: deploy/local/spire_stack.py) from the wrapper module deploy/local/spire,
# whose go.mod pins spire-server and spire-agent as tools (`go install module@version` is
# refused for SPIRE here). `make spire` builds both into the cache.
SPIRE_VERSION := v1.13.3
SPIRE_BIN := $(PIPELINE_CACHE)/spire-$(SPIRE_VERSION)/bin
# Prometheus, promtool and the PostgreSQL exporter: Debian's packages unpacked into the cache
# (not installed: no system service), deploy/local/monitoring.py.
PROMETHEUS_DIR := $(PIPELINE_CACHE)/prometheus
# Jaeger v2, the trace backend (deploy/local/trace_backend.py): `cmd/jaeger` of the Go module
# github.com/jaegertracing/jaeger, pinned as a tool by the wrapper module deploy/local/jaeger.
JAEGER_VERSION := v1.76.0
JAEGER_BIN := $(PIPELINE_CACHE)/jaeger-$(JAEGER_VERSION)/bin
# The lag view's charting library (uPlot, pinned in deploy/local/console/package-lock.json):
# Prometheus serves deploy/local/console/, node_modules/ included, at /user/.
CONSOLE_MODULES := deploy/local/console/node_modules/.package-lock.json
# Validators generated from Strimzi's CRD schemas (deploy/k8s/strimzi/validate.mjs).
STRIMZI_MODELS := deploy/k8s/strimzi/node_modules/.package-lock.json
# Kubernetes (deploy/k8s/): Kustomize renders it, kubeconform validates what it renders
# (tests/unit/test_k8s.py), both from their Go modules into the cache. kustomize v5.8.3 needs
# Go 1.27; v5.8.1 builds with the Go here. Measured 2026-12-02: ~15 s and ~10 s.
KUSTOMIZE_VERSION := v5.8.1
KUSTOMIZE_BIN := $(PIPELINE_CACHE)/kustomize-$(KUSTOMIZE_VERSION)/kustomize
KUBECONFORM_VERSION := v0.8.0
KUBECONFORM_BIN := $(PIPELINE_CACHE)/kubeconform-$(KUBECONFORM_VERSION)/kubeconform
# compose-go, the library `docker compose` is built on, behind our compose-config program.
COMPOSE_GO_VERSION := v2.16.2
COMPOSE_CONFIG_BIN := $(PIPELINE_CACHE)/compose-config-$(COMPOSE_GO_VERSION)/compose-config
export PIPELINE_CACHE

.PHONY: help deps system-deps up down clean status test test-unit test-opa test-java test-integration lint bench spire jaeger k8s-tools compose-tools

help:
	@echo "make up      start the native stack (Kafka mTLS+OPA, OPA, PostgreSQL) in .stack/"
	@echo "make down    stop it;  make clean  stop it and wipe .stack/"
	@echo "make status  health of each component"
	@echo "make test    lint, unit, Rego, Java and integration tests (own stack on free ports)"
	@echo "make bench   end-to-end benchmark on its own stack; BENCH_ARGS=\"--events 50000\" (see scripts/bench.py)"

# Everything the stack and the tests need, installed once and reused afterwards.
deps: system-deps $(VENV)/.installed $(KAFKA_JAR) $(OPA_BIN) $(ES_UNPACKED) $(S3_LIB) $(SPIRE_BIN)/spire-server \
	$(PROMETHEUS_DIR)/.unpacked $(JAEGER_BIN)/jaeger $(CONSOLE_MODULES) k8s-tools compose-tools

system-deps:
	@scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# The bench extra (matplotlib for the plot, aiokafka for scripts/bench_clients.py), only for benchmarks.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev,bench]'
	@touch $@

$(KAFKA_JAR): deploy/local/pom.xml $(JAVA_SOURCES)
	cd deploy/local && mvn -B -q -DskipTests package
	@touch $@

# The zip (~100 MiB) is fetched once into ~/.m2 and unpacked; afterwards this is a no-op.
$(ES_UNPACKED): deploy/local/elasticsearch/pom.xml
	cd deploy/local/elasticsearch && mvn -B -q package
	@test -x $(dir $@)bin/elasticsearch
	@touch $@

# Fetched once into ~/.m2; lib/ is rebuilt from scratch so a version change leaves no stale jar.
$(S3_LIB): deploy/local/s3/pom.xml
	rm -rf deploy/local/s3/target/lib
	cd deploy/local/s3 && mvn -B -q package
	@ls deploy/local/s3/target/lib/s3proxy-*.jar >/dev/null
	@touch $@

# OPA from its Go module, pinned; `go install` builds it into our cache (a few minutes, once).
$(OPA_BIN):
	GOBIN=$(dir $(OPA_BIN)) GOFLAGS=-mod=mod go install github.com/open-policy-agent/opa@$(OPA_VERSION)

# Measured 2026-12-02: about 20 minutes on the 2-core machine the first time (module
# downloads included); minutes afterwards, from Go's build cache.
$(SPIRE_BIN)/spire-server: deploy/local/spire/go.mod deploy/local/spire/go.sum
	@echo "building SPIRE $(SPIRE_VERSION) (spire-server, spire-agent) into $(SPIRE_BIN): ~20 min the first time"
	cd deploy/local/spire && GOBIN=$(SPIRE_BIN) GOFLAGS=-mod=mod go install \
		github.com/spiffe/spire/cmd/spire-agent github.com/spiffe/spire/cmd/spire-server
	@touch $@

spire: $(SPIRE_BIN)/spire-server

$(PROMETHEUS_DIR)/.unpacked: scripts/unpack-debian-packages.sh
	@scripts/unpack-debian-packages.sh $(PROMETHEUS_DIR) prometheus prometheus-postgres-exporter

# Measured 2026-12-02 on the 2-core machine: 3.5 minutes (24 s of module downloads, 3 min 8 s
# of build) with Go's caches already warm from SPIRE's build; more on a machine without them.
# A `go install` build has no UI assets (Jaeger's releases build them with npm): the query
# API is all there, the UI page is a placeholder.
$(JAEGER_BIN)/jaeger: deploy/local/jaeger/go.mod deploy/local/jaeger/go.sum
	@echo "building Jaeger $(JAEGER_VERSION) (Jaeger v2) into $(JAEGER_BIN): minutes the first time"
	cd deploy/local/jaeger && GOBIN=$(JAEGER_BIN) GOFLAGS=-mod=mod go install github.com/jaegertracing/jaeger/cmd/jaeger
	@touch $@

jaeger: $(JAEGER_BIN)/jaeger

$(KUSTOMIZE_BIN):
	GOBIN=$(dir $@) GOFLAGS=-mod=mod go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

$(KUBECONFORM_BIN):
	GOBIN=$(dir $@) GOFLAGS=-mod=mod go install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)

k8s-tools: $(KUSTOMIZE_BIN) $(KUBECONFORM_BIN) $(STRIMZI_MODELS)

$(STRIMZI_MODELS): deploy/k8s/strimzi/package-lock.json
	cd deploy/k8s/strimzi && npm ci --no-audit --no-fund
	@touch $@

$(COMPOSE_CONFIG_BIN): deploy/compose/loader/go.mod deploy/compose/loader/go.sum deploy/compose/loader/main.go
	cd deploy/compose/loader && GOFLAGS=-mod=mod go build -o $@ .

compose-tools: $(COMPOSE_CONFIG_BIN)

# Again when the lock file changes: npm ci writes node_modules/.package-lock.json at each
# install (touched all the same, like the other stamps here).
$(CONSOLE_MODULES): deploy/local/console/package-lock.json
	cd deploy/local/console && npm ci --no-audit --no-fund
	@touch $@

up: deps
	$(PY) -m deploy.local.stack up
	$(PY) -m deploy.local.demo

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.stack down; fi

clean:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.stack clean; else rm -rf .stack; fi

status: $(VENV)/.installed
	$(PY) -m deploy.local.stack status

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-unit: $(VENV)/.installed k8s-tools compose-tools
	$(PY) -m pytest tests/unit -q

test-opa: $(OPA_BIN)
	$(OPA_BIN) test opa

# Against the native stack's Kafka (3.9.2), then Strimzi's (-Pkafka4, deploy/local/pom.xml).
test-java:
	cd deploy/local && mvn -B -q test && mvn -B -q -Pkafka4 test

test-integration: deps
	$(PY) -m pytest tests/integration -q

test: deps lint test-opa test-java
	$(PY) -m pytest tests -q

# A benchmark, not a test: its own stack on free ports, ~5 minutes on 2 cores by default;
# results in bench/results/<UTC timestamp>.{json,png}. Options: make bench BENCH_ARGS="--help".
BENCH_ARGS ?=
bench: deps $(VENV)/.bench-installed
	$(PY) -m scripts.bench $(BENCH_ARGS)
