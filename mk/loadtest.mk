# Load tests with locust against the front door (local stack by default).
USERS ?= 8
SPAWN_RATE ?= 4
DURATION ?= 60s
LOADTEST_HOST ?= https://localhost:8443
LOADTEST_KEY ?= $(shell cat .local/demo-key 2>/dev/null)
LOADTEST_CA ?= $(if $(wildcard .local/tls/ca.crt),.local/tls/ca.crt,)
SLO ?= loadtest/slo.yml
RUN_DIR := reports/loadtest-$(shell date +%Y%m%d-%H%M%S)

.PHONY: loadtest loadtest-ui

loadtest: venv ## headless locust run (USERS, SPAWN_RATE, DURATION, LOADTEST_HOST, SLO), report + SLO gate
	@mkdir -p $(RUN_DIR)
	@echo ">> $(USERS) users against $(LOADTEST_HOST) for $(DURATION); reports in $(RUN_DIR)"
	LLM_API_KEY=$(LOADTEST_KEY) LLM_CA_BUNDLE=$(LOADTEST_CA) LOADTEST_SAMPLES=$(RUN_DIR)/requests.jsonl \
	  $(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(LOADTEST_HOST) \
	  -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --only-summary \
	  --csv $(RUN_DIR)/locust --csv-full-history --html $(RUN_DIR)/locust.html || true
	$(PY) -m loadtest.report --dir $(RUN_DIR) --slo $(SLO)

loadtest-ui: venv ## locust's web UI on http://127.0.0.1:8089
	LLM_API_KEY=$(LOADTEST_KEY) LLM_CA_BUNDLE=$(LOADTEST_CA) \
	  $(VENV)/bin/locust -f loadtest/locustfile.py --host $(LOADTEST_HOST) --web-host 127.0.0.1
