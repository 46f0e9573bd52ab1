# The verbs users type. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Debian packages the tests need (real redis-server for shared limits, wrk for benchmarks);
# mk/*.mk add theirs. Installed with services kept stopped: we start our own, on loopback.
DEB_PACKAGES := redis-server wrk

.PHONY: help deps deps-system venv lint test test-fast test-unit bench-gateway bench-hostile clean

help: ## list the verbs
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

deps: deps-system venv ## install everything the tests need (idempotent)

deps-system:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo ">> installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO sh -c 'test -e /usr/sbin/policy-rc.d || { printf "#!/bin/sh\nexit 101\n" \
	    > /usr/sbin/policy-rc.d.llm && chmod +x /usr/sbin/policy-rc.d.llm \
	    && mv /usr/sbin/policy-rc.d.llm /usr/sbin/policy-rc.d && touch /tmp/.llm-policy-rc; }'; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  rc=$$?; test -e /tmp/.llm-policy-rc && $$SUDO rm -f /usr/sbin/policy-rc.d /tmp/.llm-policy-rc; \
	  exit $$rc; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo ">> creating $(VENV) with the pinned Python dependencies"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: venv ## ruff over the Python code
	$(VENV)/bin/ruff check app stack tests loadtest

test-unit: venv ## unit tests only (seconds)
	$(PY) -m pytest -q tests/unit

test-fast: deps-system venv ## unit + integration: the inner loop
	$(PY) -m pytest -q tests/unit tests/integration

test: deps lint ## everything CI runs
	$(PY) -m pytest tests

plan-gpu: venv ## place the declared models on the GPUs and size their shares (GPU=<instance type>|a10g|l4|...|<GiB>; default: terraform's instance_type)
	@$(PY) -m stack.gpu_planner $(if $(GPU),--gpu $(GPU))

bench-gateway: deps ## what the gateway adds over a direct call: latency and max rate
	$(PY) -m tests.bench.gateway_bench

bench-hostile: deps-system venv ## other clients' latency while one key sends its worst bodies
	$(PY) -m tests.bench.hostile_bench

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

# each capability keeps its verbs in mk/<capability>.mk
include $(wildcard mk/*.mk)
