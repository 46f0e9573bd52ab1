"""The shared nginx site template, served by a real nginx in front of a real gateway:
TLS, streams passed on event by event, the edge's own errors in OpenAI form."""

import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from stack import local
from stack.render import render, resolve, role_defaults, write
from tests.support.procs import Proc, free_port


def start_edge(tmp, upstream_port: int | str, **overrides):
    """A real nginx serving the shared site template in front of `upstream_port`."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing: run `make deps` (Debian package nginx)")
    local.ensure_tls(tmp / "tls")
    port = free_port()
    v = resolve({**role_defaults("nginx"), "nginx_upstream_port": upstream_port,
                 "nginx_https_port": port, "nginx_listen_ipv6": False,
                 "nginx_server_name": "localhost", "nginx_cert_file": str(tmp / "tls/server.crt"),
                 "nginx_key_file": str(tmp / "tls/server.key"),
                 "nginx_access_log": str(tmp / "access.log"),
                 "nginx_error_log": str(tmp / "error.log"), "nginx_rate_per_ip": "5r/s",
                 "nginx_burst": 5, "nginx_client_max_body_size": "1m",
                 "nginx_metrics_allow": [], **overrides})
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
    ctx = ssl.create_default_context(cafile=str(tmp / "tls/ca.crt"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    return proc, port, ctx


@pytest.fixture(scope="module")
def edge(gateway, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge")
    proc, port, ctx = start_edge(tmp, gateway.url.rsplit(":", 1)[1])
    yield f"https://localhost:{port}", ctx, tmp
    proc.stop()


def assert_openai_error(r: httpx.Response, status: int, code: str | None, type_: str) -> dict:
    """nginx's own error, in the exact shape the gateway and OpenAI use."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None
    assert body["error"]["code"] == code and body["error"]["type"] == type_
    assert body["error"]["message"]
    return body["error"]


def raw_tls_exchange(port: int, ctx: ssl.SSLContext, request: bytes) -> httpx.Response:
    """Send bytes no HTTP client would send; parse nginx's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(request)
        return parse_response(tls)


def parse_response(sock) -> httpx.Response:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
    return httpx.Response(status, headers=headers, content=body)


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
        assert_openai_error(c.get("/metrics"), 404, None, "not_found_error")
        big = c.post("/v1/completions", content=b"x" * (2 * 1024 * 1024),
                     headers=gateway.auth())
        err = assert_openai_error(big, 413, "request_too_large", "invalid_request_error")
        assert "1m" in err["message"]  # names the limit the client ran into
        long_uri = c.get("/v1/models?" + "q" * 9000, headers=gateway.auth())
        assert_openai_error(long_uri, 414, "uri_too_long", "invalid_request_error")
        huge_header = c.get("/v1/models", headers={**gateway.auth(), "x-big": "h" * 9000})
        assert_openai_error(huge_header, 400, "bad_request", "invalid_request_error")
        codes = [c.get("/v1/models", headers=gateway.auth()).status_code for _ in range(30)]
        assert 429 in codes  # 5 r/s with a burst of 5 at the edge
        limited = next(x for x in (c.get("/v1/models", headers=gateway.auth())
                                   for _ in range(10)) if x.status_code == 429)
        assert_openai_error(limited, 429, "edge_rate_limited", "rate_limit_error")
        assert limited.headers["retry-after"] == "1"
        assert limited.headers["strict-transport-security"].startswith("max-age=")


def test_edge_answers_malformed_requests_in_openai_form(edge):
    url, ctx, _ = edge
    port = int(url.rsplit(":", 1)[1])
    garbage = raw_tls_exchange(port, ctx, b"NOT A REQUEST\r\n\r\n")
    assert_openai_error(garbage, 400, "bad_request", "invalid_request_error")
    # plain HTTP sent to the HTTPS port (nginx's 497)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        plain = parse_response(sock)
    assert_openai_error(plain, 400, "bad_request", "invalid_request_error")


def test_edge_answers_502_in_openai_form_when_the_gateway_is_down(tmp_path):
    nothing_listens = free_port()
    proc, port, ctx = start_edge(tmp_path, nothing_listens)
    try:
        r = httpx.get(f"https://localhost:{port}/v1/models", verify=ctx, timeout=10)
        assert_openai_error(r, 502, "gateway_unavailable", "service_unavailable")
        assert r.headers["retry-after"] == "5"
        ready = httpx.get(f"https://localhost:{port}/ready", verify=ctx, timeout=10)
        assert_openai_error(ready, 502, "gateway_unavailable", "service_unavailable")
    finally:
        proc.stop()


def test_edge_answers_504_in_openai_form_when_the_gateway_hangs(tmp_path):
    # a gateway that takes connections (the kernel completes them) and never answers
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)
        proc, port, ctx = start_edge(tmp_path, stalled.getsockname()[1],
                                     nginx_read_timeout_s=1)
        try:
            r = httpx.get(f"https://localhost:{port}/v1/models", verify=ctx, timeout=10)
            assert_openai_error(r, 504, "gateway_timeout", "timeout_error")
        finally:
            proc.stop()


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


def _requests_from(url: str, ctx, client: str, count: int) -> list[int]:
    """`count` requests that a load balancer relays for `client`: it appends the address it
    saw to whatever X-Forwarded-For the client wrote (here a forged one, to the left)."""
    with httpx.Client(verify=ctx, timeout=10) as c:
        return [c.get(url + "/v1/models",
                      headers={"x-forwarded-for": f"10.0.0.1, {client}"}).status_code
                for _ in range(count)]


@pytest.mark.parametrize("behind", [True, False])
def test_behind_the_load_balancer_limits_and_logs_see_each_client(tmp_path, behind):
    import json

    # loopback plays the VPC the load balancer connects from; nothing listens upstream, so a
    # request the edge lets through is a 502, one it limits a 429. 1 r/min with a burst of 2:
    # the fourth request of one address within the minute is limited, however slow the machine
    lb = {"nginx_behind_load_balancer": True, "nginx_load_balancer_cidrs": ["127.0.0.0/8"]}
    proc, port, ctx = start_edge(tmp_path, free_port(), nginx_rate_per_ip="1r/m",
                                 nginx_burst=2, **(lb if behind else {}))
    url = f"https://localhost:{port}"
    try:
        first = _requests_from(url, ctx, "198.51.100.7", 4)
        second = _requests_from(url, ctx, "203.0.113.9", 1)
    finally:
        proc.stop()
    assert first == [502, 502, 502, 429]
    log = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    if behind:
        assert second == [502], "another client has a budget of its own"
        assert [e["remote"] for e in log] == ["198.51.100.7"] * 4 + ["203.0.113.9"]
    else:
        # straight from the internet, the connection's address is the client: a forwarded
        # header is anyone's to write and is ignored
        assert second == [429]
        assert {e["remote"] for e in log} == {"127.0.0.1"}
