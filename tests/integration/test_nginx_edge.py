"""The shared nginx site template, served by a real nginx in front of a real gateway:
TLS, streams passed on event by event, the edge's own errors in OpenAI form."""

import shutil
import ssl
import subprocess
import time

import httpx
import pytest

from stack import local
from stack.render import render, resolve, role_defaults, write
from tests.support.procs import Proc, free_port


@pytest.fixture(scope="module")
def edge(gateway, tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing: run `make deps` (Debian package nginx)")
    tmp = tmp_path_factory.mktemp("edge")
    local.ensure_tls(tmp / "tls")
    port = free_port()
    v = resolve({**role_defaults("nginx"), "nginx_upstream_port": gateway.url.rsplit(":", 1)[1],
                 "nginx_https_port": port, "nginx_listen_ipv6": False,
                 "nginx_server_name": "localhost", "nginx_cert_file": str(tmp / "tls/server.crt"),
                 "nginx_key_file": str(tmp / "tls/server.key"),
                 "nginx_access_log": str(tmp / "access.log"),
                 "nginx_error_log": str(tmp / "error.log"), "nginx_rate_per_ip": "5r/s",
                 "nginx_burst": 5, "nginx_client_max_body_size": "1m"})
    site = tmp / "llm-api.conf"
    write(site, render("ansible/roles/nginx/templates/llm-api.conf.j2", v))
    main = tmp / "nginx.conf"
    write(main, local.nginx_main_conf(site, tmp, tmp / "error.log"))
    local.prepare_nginx_dirs(tmp)
    check = subprocess.run(["nginx", "-t", "-c", str(main), "-p", str(tmp), "-e",
                            str(tmp / "error.log")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = Proc("nginx", ["nginx", "-c", str(main), "-p", str(tmp), "-e", str(tmp / "error.log"),
                          "-g", "daemon off;"], tmp / "nginx.out")
    url = f"https://localhost:{port}"
    ctx = ssl.create_default_context(cafile=str(tmp / "tls/ca.crt"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", verify=ctx)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, ctx, tmp
    proc.stop()


def test_streams_pass_through_nginx_event_by_event(edge, gateway):
    url, ctx, _ = edge
    arrivals = []
    body = {"model": "text2sql", "prompt": "x [[delay=0.3]]", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=gateway.auth(),
                      verify=ctx, timeout=20) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # a buffering proxy would hand over all five together at the end
    assert arrivals[-1] - arrivals[0] > 0.8


def test_edge_answers_its_own_errors_in_openai_form(edge, gateway):
    url, ctx, _ = edge
    with httpx.Client(base_url=url, verify=ctx) as c:
        r = c.get("/metrics")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        big = c.post("/v1/completions", content=b"x" * (2 * 1024 * 1024),
                     headers=gateway.auth())
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        codes = [c.get("/v1/models", headers=gateway.auth()).status_code for _ in range(30)]
        assert 429 in codes  # 5 r/s with a burst of 5 at the edge
        limited = next(x for x in (c.get("/v1/models", headers=gateway.auth())
                                   for _ in range(10)) if x.status_code == 429)
        assert limited.json()["error"]["code"] == "edge_rate_limited"


def test_request_id_passes_through_and_the_access_log_is_json(edge, gateway):
    import json

    url, ctx, tmp = edge
    time.sleep(1.1)  # let the edge's rate window from the previous test pass
    r = httpx.get(url + "/v1/models", headers={**gateway.auth(), "x-request-id": "edge-42"},
                  verify=ctx)
    assert r.headers["x-request-id"] == "edge-42"
    assert r.headers["strict-transport-security"].startswith("max-age=")
    time.sleep(0.2)
    lines = [json.loads(x) for x in (tmp / "access.log").read_text().splitlines()]
    assert any(e["request_id"] == "edge-42" and e["status"] == 200 for e in lines)
