"""Monitoring against real data: a real Prometheus scrapes the local stack (gateway and every
vLLM server), a node exporter and a stand-in dcgm-exporter serving monitoring/dcgm-sample.prom;
traffic goes through the front door; then every dashboard query, every template variable and
every recording rule is evaluated through Prometheus' HTTP API and must return data."""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from monitoring.render import RULES_DIR, render_config
from stack import declaration, local
from tests.support.gateway import create_key
from tests.support.procs import Proc, free_port

pytestmark = pytest.mark.e2e

ROOT = declaration.ROOT
MODELS = declaration.load()
TEXT = [m.name for m in MODELS if m.task == "generate"]
EMBED = [m.name for m in MODELS if m.task == "embed"]
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
DCGM_SAMPLE = ROOT / "monitoring" / "dcgm-sample.prom"
HOST = "local"  # the scrape config's name for this machine
# Grafana's $__rate_interval is at least four scrape intervals; the traffic below is recent,
# so a window of two minutes covers all of it
RATE_INTERVAL = "2m"
DEPRECATED_VLLM = ("vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds")


@dataclass
class Prometheus:
    url: str
    proc: Proc

    def api(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def has_data(result: list[dict]) -> bool:
    """At least one sample with a real number (histogram_quantile of no traffic gives NaN)."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


# ------------------------------------------------------------------ what the test starts


@pytest.fixture(scope="module")
def dcgm_exporter():
    """Stands in for dcgm-exporter on a host without a GPU: serves the recorded sample."""
    body = DCGM_SAMPLE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            if self.path == "/metrics":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prometheus(local_stack, dcgm_exporter, tmp_path_factory):
    """A real Prometheus (1 s scrapes, our rules) and a node exporter, started and stopped by
    PID, on loopback ports of their own."""
    for binary in ("prometheus", "prometheus-node-exporter"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is missing: run `make deps` (Debian packages)")
    tmp = tmp_path_factory.mktemp("monitoring")
    node_port, prom_port = free_port(), free_port()
    node = Proc("node-exporter", [shutil.which("prometheus-node-exporter"),
                                  f"--web.listen-address=127.0.0.1:{node_port}"],
                tmp / "node-exporter.log")
    config = tmp / "prometheus.yml"
    config.write_text(render_config(
        [{"name": HOST, "address": "127.0.0.1", "gpu": True}],
        monitoring_scrape_interval="1s", monitoring_prometheus_listen=f"127.0.0.1:{prom_port}",
        node_exporter_listen=f"127.0.0.1:{node_port}", dcgm_exporter_listen=dcgm_exporter))
    prom = Proc("prometheus", [
        shutil.which("prometheus"), f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
        "--storage.tsdb.retention.time=1h"], tmp / "prometheus.log")
    try:
        node.wait_http(f"http://127.0.0.1:{node_port}/metrics")
        prom.wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=60)
        p = Prometheus(f"http://127.0.0.1:{prom_port}", prom)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all_targets_up(p):
            time.sleep(0.5)
        yield p
    finally:
        prom.stop()
        node.stop()


def all_targets_up(p: Prometheus) -> bool:
    targets = p.api("targets")["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)


@pytest.fixture(scope="module")
def traffic(local_stack, prometheus) -> dict:
    """Chats, streams, completions and embeddings for every model; a rate-limited key's 429; a
    prompt longer than the model's context (vLLM's 400, a backend error); /ready. In two
    rounds some seconds apart, so that the 1 s scrapes see every counter grow."""
    client = local_stack.client()
    msgs = [{"role": "user", "content": "all customers in Paris"}]
    for _ in range(2):
        for model in TEXT:
            for _ in range(2):
                r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8)
                assert r.usage.completion_tokens > 0
            stream = client.chat.completions.create(
                model=model, messages=msgs, max_tokens=16, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            assert list(stream)[-1].usage.completion_tokens == 16
            for chunk in client.completions.create(model=model, prompt="SELECT", max_tokens=12,
                                                   stream=True):
                assert chunk.choices is not None
        for model in EMBED:
            r = client.embeddings.create(model=model, input=["orders by customer", "invoices"])
            assert len(r.data) == 2
        time.sleep(2.5)

    limited = f"monitoring-e2e-{time.time_ns()}"
    key = create_key(local.RUN / "gateway" / "keys.json", limited, "--rpm", "1")
    time.sleep(1.2)  # the gateway re-reads the keys file within a second
    with local_stack.http() as c:
        auth = {"authorization": f"Bearer {key}"}
        body = {"model": TEXT[0], "prompt": "SELECT", "max_tokens": 2}
        assert c.post("/v1/completions", headers=auth, json=body).status_code == 200
        assert c.post("/v1/completions", headers=auth, json=body).status_code == 429
        # longer than any declared max_model_len: vLLM answers 400, the gateway counts a
        # backend error of kind status_4xx and passes the 400 on
        demo = {"authorization": f"Bearer {local_stack.key}"}
        for model in TEXT:
            r = c.post("/v1/completions", headers=demo, json={
                "model": model, "prompt": "SELECT name FROM customers; " * 2000,
                "max_tokens": 1})
            assert r.status_code == 400, r.text
        assert c.get("/ready").status_code == 200  # sets gateway_backend_up

    # wait until Prometheus scraped the last of it and the rules ran on it
    deadline = time.monotonic() + 30
    seen = f'gateway_rate_limited_total{{key="{limited}"}}'
    while time.monotonic() < deadline and not prometheus.query(seen):
        time.sleep(0.5)
    time.sleep(3)
    return {"keys": ["demo", limited]}


# ------------------------------------------------------------------ the dashboards' queries


def substitute(expr: str, model: str, keys: list[str]) -> str:
    """What Grafana sends for one model, host and GPU, and a multi-value key selection."""
    values = {"__rate_interval": RATE_INTERVAL, "host": HOST, "gpu": "0", "model": model,
              "key": "|".join(keys)}
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            out += [(path.stem, panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return out


def test_every_target_is_scraped(prometheus):
    targets = prometheus.api("targets")["activeTargets"]
    down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in targets
            if t["health"] != "up"]
    assert down == []
    jobs = sorted(t["labels"]["job"] for t in targets)
    assert jobs == sorted(["prometheus", "gateway", "node", "dcgm"] + ["vllm"] * len(MODELS))


def test_vllm_servers_export_every_vllm_metric_the_monitoring_uses(prometheus, traffic):
    exported = {s["metric"]["__name__"] for s in prometheus.query(
        'count by (__name__) ({job="vllm", __name__=~"vllm:.+"})')}
    used = set()
    for f in RULES_DIR.glob("*.rules.yml"):
        used |= set(re.findall(r"vllm:[a-z0-9_]+", f.read_text()))
    for _, _, expr in dashboard_queries():
        used |= set(re.findall(r"vllm:[a-z0-9_]+", expr))
    assert used - exported == set()
    assert exported.isdisjoint(DEPRECATED_VLLM)
    assert {"vllm:kv_cache_usage_perc", "vllm:inter_token_latency_seconds_bucket"} <= exported


@pytest.mark.parametrize("model", TEXT)
def test_every_dashboard_query_returns_data(prometheus, traffic, model):
    empty = []
    for dashboard, title, expr in dashboard_queries():
        query = substitute(expr, model, traffic["keys"])
        if not has_data(prometheus.query(query)):
            empty.append(f"{dashboard} / {title}: {query}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def test_every_dashboard_variable_lists_values(prometheus, traffic):
    declared = {m.name for m in MODELS}
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            expr, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"]).groups()
            expr = substitute(expr, TEXT[0], traffic["keys"])
            values = {s["metric"].get(label) for s in prometheus.query(
                f"count by ({label}) ({expr})")} - {None}
            assert values, f"{path.stem}: ${var['name']} lists nothing"
            if var["name"] == "model":
                # the model list is the declaration's (through the scrape config's labels)
                assert declared <= values, (path.stem, values)
            if path.stem == "vllm" and var["name"] == "model":
                assert values == declared


# ------------------------------------------------------------------ the rules


def recording_rules() -> list[dict]:
    return [r for f in sorted(RULES_DIR.glob("*.rules.yml"))
            for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "record" in r]


def test_every_recording_rule_returns_data(prometheus, traffic):
    empty = [r["record"] for r in recording_rules()
             if not has_data(prometheus.query(r["expr"]))]
    assert empty == [], f"recording rules without data: {empty}"
    # and Prometheus itself records them
    missing = [r["record"] for r in recording_rules() if not prometheus.query(r["record"])]
    assert missing == []


def test_every_rule_evaluates_without_error(prometheus, traffic):
    groups = prometheus.api("rules")["groups"]
    assert {g["file"] for g in groups} == {str(f) for f in RULES_DIR.glob("*.rules.yml")}
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
              if r["health"] != "ok"]
    assert broken == []
    # nothing is wrong with this machine's stack: no alert beyond pending may be firing
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]
              if a["state"] == "firing"]
    assert firing == []


def test_the_gpu_series_carry_the_exporters_labels_and_ours(prometheus):
    [series] = prometheus.query("DCGM_FI_DEV_GPU_TEMP")
    labels = series["metric"]
    assert labels["host"] == HOST and labels["job"] == "dcgm"
    assert {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"} <= set(labels)
    assert labels["modelName"] == "NVIDIA A10G"
