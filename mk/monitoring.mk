# Monitoring: monitoring/ holds the scrape config template, alert and recording rules with their
# promtool tests, the Alertmanager config, and the Grafana dashboards. docs/monitoring.md is the
# runbook. prometheus-alertmanager brings amtool and the Alertmanager the routing tests run.
DEB_PACKAGES += prometheus prometheus-node-exporter prometheus-alertmanager
PROMTOOL ?= promtool
AMTOOL ?= amtool
PROMETHEUS ?= prometheus
NODE_EXPORTER ?= prometheus-node-exporter
MON_RUN := .local/run/monitoring
MON_LISTEN ?= 127.0.0.1:9090
MON_NODE_LISTEN ?= 127.0.0.1:9100
MON_SCRAPE_INTERVAL ?= 5s

.PHONY: local-monitoring local-monitoring-down monitoring-check monitoring-dashboards

# Our own Prometheus and node exporter, on loopback, with their own config and data under
# $(MON_RUN), started in their own sessions and stopped by the PIDs recorded there. The
# distribution's prometheus services are never started (Debian starts them on install unless
# deps-system's policy-rc.d says no).
local-monitoring: deps-system venv ## Prometheus on 127.0.0.1:9090 scraping `make local`, plus a node exporter
	@mkdir -p $(MON_RUN)/data
	@$(PY) -m monitoring.render --out $(MON_RUN)/prometheus.yml \
	  --scrape-interval $(MON_SCRAPE_INTERVAL) --prometheus-listen $(MON_LISTEN) \
	  --node-exporter $(MON_NODE_LISTEN)
	@$(PROMTOOL) check config $(MON_RUN)/prometheus.yml >/dev/null
	@running() { pid=$$(cat $(MON_RUN)/$$1.pid 2>/dev/null) && \
	  tr '\0' ' ' < /proc/$$pid/cmdline 2>/dev/null | grep -q -- "$$2"; }; \
	start() { name=$$1; shift; setsid "$$@" >> $(MON_RUN)/$$name.log 2>&1 < /dev/null & \
	  echo $$! > $(MON_RUN)/$$name.pid; echo ">> $$name started (pid $$!, log $(MON_RUN)/$$name.log)"; }; \
	if running node-exporter $(NODE_EXPORTER); then echo ">> node exporter: already up"; \
	elif curl -fs -o /dev/null --max-time 2 http://$(MON_NODE_LISTEN)/metrics; then \
	  echo ">> node exporter: one already answers on $(MON_NODE_LISTEN), scraping it"; \
	else start node-exporter $(NODE_EXPORTER) --web.listen-address=$(MON_NODE_LISTEN); fi; \
	if running prometheus $(PROMETHEUS); then \
	  kill -HUP $$(cat $(MON_RUN)/prometheus.pid); echo ">> prometheus: already up, config reloaded"; \
	else start prometheus $(PROMETHEUS) --config.file=$(MON_RUN)/prometheus.yml \
	  --storage.tsdb.path=$(MON_RUN)/data --storage.tsdb.retention.time=2d \
	  --web.listen-address=$(MON_LISTEN); fi; \
	for _ in $$(seq 60); do curl -fs -o /dev/null --max-time 1 http://$(MON_LISTEN)/-/ready \
	  && break; sleep 0.5; done; \
	curl -fsS -o /dev/null --max-time 2 http://$(MON_LISTEN)/-/ready || \
	  { echo "prometheus did not become ready; see $(MON_RUN)/prometheus.log"; exit 1; }; \
	echo ">> Prometheus: http://$(MON_LISTEN) (targets: http://$(MON_LISTEN)/targets, alerts: /alerts)"

local-monitoring-down: ## stop what `make local-monitoring` started (by PID)
	@for name in prometheus node-exporter; do pidf=$(MON_RUN)/$$name.pid; \
	  pid=$$(cat $$pidf 2>/dev/null) || continue; \
	  if [ -d /proc/$$pid ]; then kill -TERM $$pid && echo ">> stopped $$name (pid $$pid)"; fi; \
	  rm -f $$pidf; done

monitoring-check: deps-system venv ## promtool and amtool: rendered configs, rules, rule unit tests; dashboards up to date
	@mkdir -p $(MON_RUN)
	@$(PY) -m monitoring.render --out $(MON_RUN)/check-prometheus.yml
	$(PROMTOOL) check config $(MON_RUN)/check-prometheus.yml
	@$(PY) -m monitoring.render --alertmanager-examples $(MON_RUN)/check-alertmanager >/dev/null
	$(AMTOOL) check-config $(MON_RUN)/check-alertmanager/alertmanager-*.yml
	$(PROMTOOL) check rules monitoring/rules/*.rules.yml
	$(PROMTOOL) test rules monitoring/tests/*.test.yml
	$(PY) -m monitoring.dashboards --check

monitoring-dashboards: venv ## rebuild monitoring/grafana/dashboards/*.json from monitoring/dashboards.py
	$(PY) -m monitoring.dashboards
