"""nginx's metrics listener served by a real nginx, in front of stand-in gateway and vLLM
servers on loopback: the monitoring host's address gets the metrics, any other address is
refused, and no path but the metrics reaches a backend; and a real Prometheus with the scrape
config the monitoring role renders scrapes a peer's gateway and vLLM through it. Loopback
stands for the VPC: the whole of 127.0.0.0/8 reaches this machine, so a client bound to
127.0.0.3 is "the monitoring host" and one bound to 127.0.0.4 a stranger."""

from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from monitoring.render import render_config
from tests.integration.test_nginx_edge import start_edge
from tests.support.procs import Proc, free_port, wait_until

PROMETHEUS = shutil.which("prometheus")

MONITORING = "127.0.0.3"
STRANGER = "127.0.0.4"


class Stub(ThreadingHTTPServer):
    """A backend that answers every GET with one Prometheus sample naming it and the path it
    was asked for, and records the paths."""

    def __init__(self, name: str):
        self.name, self.paths = name, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                stub.paths.append(self.path)
                body = f'stub_info{{backend="{stub.name}",path="{self.path}"}} 1\n'.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    gateway, vllm = Stub("gateway"), Stub("vllm")
    port = free_port()
    proc, _, _ = start_edge(
        tmp_path_factory.mktemp("listener"), gateway.port,
        llm_models=[{"name": "text2sql", "port": vllm.port}],
        nginx_metrics_allow=[MONITORING], nginx_metrics_listen_address="127.0.0.1",
        nginx_metrics_port=port)
    yield f"http://127.0.0.1:{port}", gateway, vllm
    proc.stop()
    gateway.shutdown()
    vllm.shutdown()


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5)


def test_the_monitoring_host_gets_the_gateway_and_each_models_metrics(listener):
    url, gateway, vllm = listener
    with client(MONITORING) as c:
        r = c.get(url + "/gateway/metrics")
        assert r.status_code == 200 and r.text == 'stub_info{backend="gateway",path="/metrics"} 1\n'
        r = c.get(url + "/vllm/text2sql/metrics")
        assert r.status_code == 200 and r.text == 'stub_info{backend="vllm",path="/metrics"} 1\n'


def test_no_other_path_reaches_a_backend(listener):
    url, gateway, vllm = listener
    before = (list(gateway.paths), list(vllm.paths))
    with client(MONITORING) as c:
        for path in ("/v1/models", "/v1/completions", "/metrics", "/health", "/ready",
                     "/gateway/metrics/../../v1/models", "/vllm/text2sql/v1/models",
                     "/vllm/other/metrics", "/gateway/metricsx"):
            assert c.get(url + path).status_code == 404, path
        assert c.post(url + "/v1/completions", json={}).status_code == 404
    assert (gateway.paths, vllm.paths) == before


def test_any_other_address_is_refused(listener):
    url, gateway, vllm = listener
    before = (list(gateway.paths), list(vllm.paths))
    for source in (STRANGER, "127.0.0.1"):
        with client(source) as c:
            assert c.get(url + "/gateway/metrics").status_code == 403, source
            assert c.get(url + "/vllm/text2sql/metrics").status_code == 403, source
    assert (gateway.paths, vllm.paths) == before


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: `make deps` (Debian package)")
def test_prometheus_scrapes_a_peers_gateway_and_vllm_through_its_listener(tmp_path):
    """The peer gpu2 at 127.0.0.2 (its "private address"), Prometheus connecting from
    127.0.0.1: the scrape config as the role renders it for a peer (__metrics_path__)."""
    gateway, vllm = Stub("gateway"), Stub("vllm")
    listener_port, prom_port = free_port(), free_port()
    models = [{"name": "text2sql", "port": vllm.port}]
    edge, _, _ = start_edge(
        tmp_path / "edge", gateway.port, llm_models=models, nginx_metrics_allow=["127.0.0.1"],
        nginx_metrics_listen_address="127.0.0.2", nginx_metrics_port=listener_port)
    rules = tmp_path / "rules"
    rules.mkdir()
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(
        [{"name": "gpu2", "address": "127.0.0.2", "gpu": False, "local": False}],
        llm_models=models, monitoring_metrics_listener_port=listener_port,
        monitoring_scrape_interval="1s", monitoring_rules_dir=str(rules),
        monitoring_prometheus_listen=f"127.0.0.1:{prom_port}"))
    prom = Proc("prometheus", [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'prom'}",
        f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log")
    try:
        prom.wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=60)

        def scraped() -> dict | None:
            r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                          params={"query": 'stub_info or up{job=~"gateway|vllm"}'}).json()
            series = {(m["metric"]["__name__"], m["metric"]["job"]): m
                      for m in r["data"]["result"]}
            up = [k for k, m in series.items() if k[0] == "up" and m["value"][1] == "1"]
            return series if len(up) == 2 and len(series) == 4 else None

        series = wait_until(scraped, timeout=30, what="both peer targets up in Prometheus")
    finally:
        prom.stop()
        edge.stop()
        gateway.shutdown()
        vllm.shutdown()
    gw, vl = series[("stub_info", "gateway")]["metric"], series[("stub_info", "vllm")]["metric"]
    # the same labels as on one host, each sample from its own backend's /metrics
    assert (gw["host"], gw["backend"], gw["path"]) == ("gpu2", "gateway", "/metrics")
    assert (vl["host"], vl["model"], vl["task"], vl["backend"], vl["path"]) == (
        "gpu2", "text2sql", "generate", "vllm", "/metrics")
    assert gw["instance"] == vl["instance"] == f"127.0.0.2:{listener_port}"
    assert "__metrics_path__" not in gw
