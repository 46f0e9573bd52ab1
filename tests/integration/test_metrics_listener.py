"""nginx's metrics listener served by a real nginx, in front of stand-in gateway and vLLM
servers on loopback: the monitoring host's address gets the metrics, any other address is
refused, and no path but the metrics reaches a backend. Loopback stands for the VPC: the whole
of 127.0.0.0/8 reaches this machine, so a client bound to 127.0.0.3 is "the monitoring host"
and one bound to 127.0.0.4 a stranger."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.integration.test_nginx_edge import start_edge
from tests.support.procs import free_port

MONITORING = "127.0.0.3"
STRANGER = "127.0.0.4"


class Stub(ThreadingHTTPServer):
    """A backend that answers every GET with its name and the path, and records the paths."""

    def __init__(self, name: str):
        self.name, self.paths = name, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                stub.paths.append(self.path)
                body = f"{stub.name} {self.path}\n".encode()
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
        assert r.status_code == 200 and r.text == "gateway /metrics\n"
        r = c.get(url + "/vllm/text2sql/metrics")
        assert r.status_code == 200 and r.text == "vllm /metrics\n"


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
