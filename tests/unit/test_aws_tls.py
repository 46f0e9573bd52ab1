"""The endpoint's TLS from Terraform to the smoke test: which certificate the inventory says the
endpoint has, the nginx role's Let's Encrypt variables it passes, and `aws_ops smoke` (what
`make deploy` runs last) against a real HTTPS server on 127.0.0.1 with a self-signed
certificate, and with one signed by a CA this test makes and trusts.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from stack import aws_ops
from tests.support.procs import free_port
from tests.unit.test_aws_ops import TF_OUTPUTS, _terraform_says, one_error_line, paths  # noqa: F401

NGINX_OPTIONS = yaml.safe_load(
    (aws_ops.ROOT / "ansible/roles/nginx/meta/argument_specs.yml").read_text()
)["argument_specs"]["main"]["options"]

HOST = TF_OUTPUTS["hosts"]["value"][0]
LETSENCRYPT = {**TF_OUTPUTS, "api_endpoint": {"value": "https://api.example.com"},
               "api_tls_trusted": {"value": True}, "api_tls": {"value": "letsencrypt"},
               "letsencrypt_domain": {"value": "api.example.com"},
               "letsencrypt_email": {"value": "ops@example.com"}}
BALANCED = {**TF_OUTPUTS, "api_endpoint": {"value": "https://api.example.com"},
            "api_tls_trusted": {"value": True}, "api_tls": {"value": "acm"},
            "letsencrypt_domain": {"value": None}, "letsencrypt_email": {"value": None},
            "hosts": {"value": [HOST, {**HOST, "name": "llm-gpu-1",
                                       "instance_id": "i-0123456789abcdef1"}]}}


def group_vars(paths) -> dict:  # noqa: F811
    return yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]["vars"]


# ---- inventory: the nginx role's variables -----------------------------------------------------


def test_a_lets_encrypt_host_hands_nginx_its_domain_and_email(paths, capsys):  # noqa: F811
    _terraform_says(paths, LETSENCRYPT)
    assert paths.run("inventory") == 0

    gv = group_vars(paths)
    # the nginx role's own variables, so the role requests the certificate for that name
    assert {"nginx_letsencrypt_domain", "nginx_letsencrypt_email"} <= set(NGINX_OPTIONS)
    assert gv["nginx_letsencrypt_domain"] == "api.example.com"
    assert gv["nginx_letsencrypt_email"] == "ops@example.com"
    assert gv["api_tls"] == "letsencrypt"
    dep = aws_ops.read_inventory(paths.out)
    assert (dep.letsencrypt_domain, dep.letsencrypt_email, dep.api_tls) == (
        "api.example.com", "ops@example.com", "letsencrypt")
    capsys.readouterr()
    assert paths.run("endpoint", "--tls") == 0
    assert capsys.readouterr().out.strip() == "trusted"


@pytest.mark.parametrize("outputs", [TF_OUTPUTS, BALANCED], ids=["self-signed", "acm"])
def test_no_lets_encrypt_variables_without_a_lets_encrypt_host(paths, outputs):  # noqa: F811
    _terraform_says(paths, outputs)
    assert paths.run("inventory") == 0
    gv = group_vars(paths)
    # absent, so the role's defaults (no certbot) apply
    assert "nginx_letsencrypt_domain" not in gv and "nginx_letsencrypt_email" not in gv


def test_ansible_sees_the_lets_encrypt_variables_on_the_host(paths):  # noqa: F811
    _terraform_says(paths, LETSENCRYPT)
    assert paths.run("inventory") == 0
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(paths.out),
         "--host", "llm-gpu-0"],
        capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["nginx_letsencrypt_domain"] == "api.example.com"
    assert seen["nginx_letsencrypt_email"] == "ops@example.com"


# ---- endpoint --tls: trusted only with ACM or Let's Encrypt -----------------------------------


def _dep(**kw) -> aws_ops.Deployment:
    hosts = [aws_ops.Host("llm-gpu-0", "i-0", "198.51.100.10")]
    return aws_ops.Deployment(name="llm", region="us-east-1", ssh_user="ubuntu",
                              hosts=kw.pop("hosts", hosts), **kw)


@pytest.mark.parametrize(("dep", "mode"), [
    (_dep(), "self-signed"),
    (_dep(api_tls="letsencrypt", api_tls_trusted=True,
          letsencrypt_domain="api.example.com"), "letsencrypt"),
    (_dep(api_tls="acm", api_tls_trusted=True), "acm"),
    # an inventory written before Terraform had api_tls: a name alone on one host used to say
    # "trusted" while nginx served a self-signed certificate
    (_dep(api_tls_trusted=True), "self-signed"),
    (_dep(api_tls_trusted=True, letsencrypt_domain="api.example.com"), "letsencrypt"),
    (_dep(api_tls_trusted=True, hosts=[aws_ops.Host("a", "i-0", None),
                                       aws_ops.Host("b", "i-1", None)]), "acm"),
], ids=["none", "letsencrypt", "acm", "old-named-host", "old-letsencrypt", "old-balanced"])
def test_tls_is_trusted_only_with_a_load_balancer_or_lets_encrypt(dep, mode):
    assert aws_ops.tls_mode(dep) == mode


def test_endpoint_tls_of_an_old_named_single_host_inventory_is_self_signed(paths, capsys):  # noqa: F811
    named = {**TF_OUTPUTS, "api_endpoint": {"value": "https://api.example.com"},
             "api_tls_trusted": {"value": True}}  # what Terraform said before api_tls
    _terraform_says(paths, named)
    assert paths.run("inventory") == 0
    capsys.readouterr()
    assert paths.run("endpoint", "--tls") == 0
    assert capsys.readouterr().out.strip() == "self-signed"


# ---- smoke: a real HTTPS server on 127.0.0.1 --------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate (what nginx makes), and a CA with a leaf for 127.0.0.1."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-keyout", "self.key", "-out", "self.crt", "-subj", "/CN=llm-gpu-0",
             "-addext", "subjectAltName=DNS:llm-gpu-0,IP:127.0.0.1", cwd=d)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "leaf.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "leaf.crt", "-extfile", "leaf.ext", cwd=d)
    return {"self": d / "self", "leaf": d / "leaf", "ca": d / "ca.crt"}


class Server:
    """HTTPS on 127.0.0.1: GET /ready answers the scripted statuses, then the last one."""

    def __init__(self, cert: Path, statuses: list[int]):
        self.statuses = list(statuses)
        self.seen = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.seen += 1
                status = server.statuses.pop(0) if len(server.statuses) > 1 else \
                    server.statuses[0]
                body = b'{"status":"ok"}' if status == 200 else b'{"error":{}}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(f"{cert}.crt", f"{cert}.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/ready"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    started: list[Server] = []

    def start(cert: Path, statuses: list[int]) -> Server:
        started.append(Server(cert, statuses))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _inventory(paths, outputs: dict, url: str) -> None:  # noqa: F811
    _terraform_says(paths, {**outputs, "api_endpoint": {"value": url.removesuffix("/ready")}})
    assert paths.run("inventory") == 0


FAST = ("--delay", "0", "--timeout", "5")


def test_trusted_mode_fails_at_once_against_a_self_signed_certificate(paths, serve, certs,  # noqa: F811
                                                                      capsys):
    server = serve(certs["self"], [200])
    _inventory(paths, LETSENCRYPT, server.url)
    capsys.readouterr()
    assert paths.run("smoke", *FAST) == 2
    err = one_error_line(capsys.readouterr())
    assert "does not trust" in err and "self-signed" in err
    # what to do: Let's Encrypt has not issued, where to look, what to run
    assert "Let's Encrypt has not issued" in err and "letsencrypt.log" in err
    assert "make deploy" in err
    assert server.seen == 0  # the handshake failed: no request, no retries


def test_insecure_mode_passes_against_a_self_signed_certificate(paths, serve, certs, capsys):  # noqa: F811
    server = serve(certs["self"], [200])
    _inventory(paths, TF_OUTPUTS, server.url)  # api_tls self-signed: insecure by default
    capsys.readouterr()
    assert paths.run("smoke", *FAST) == 0
    out = capsys.readouterr().out
    assert "certificate not checked" in out and f"{server.url} answered 200" in out
    assert server.seen == 1


def test_explicit_trusted_flag_overrides_a_self_signed_inventory(paths, serve, certs, capsys):  # noqa: F811
    server = serve(certs["self"], [200])
    _inventory(paths, TF_OUTPUTS, server.url)
    capsys.readouterr()
    assert paths.run("smoke", "--trusted", *FAST) == 2
    assert "does not trust" in one_error_line(capsys.readouterr())


def test_trusted_mode_passes_with_a_certificate_this_machine_trusts(paths, serve, certs,  # noqa: F811
                                                                    capsys, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))  # OpenSSL's default trust store
    server = serve(certs["leaf"], [200])
    _inventory(paths, LETSENCRYPT, server.url)
    capsys.readouterr()
    assert paths.run("smoke", *FAST) == 0
    out = capsys.readouterr().out
    assert "must be trusted: Let's Encrypt" in out and "answered 200" in out


def test_smoke_waits_while_the_models_load(paths, serve, certs, capsys):  # noqa: F811
    server = serve(certs["self"], [503, 503, 200])
    _inventory(paths, TF_OUTPUTS, server.url)
    capsys.readouterr()
    assert paths.run("smoke", "--attempts", "5", *FAST) == 0
    out = capsys.readouterr().out
    assert out.count("HTTP 503 (models still loading?)") == 2
    assert "answered 200 after 3 attempts" in out and server.seen == 3


def test_smoke_gives_up_with_the_last_answer_and_what_next(paths, serve, certs, capsys):  # noqa: F811
    server = serve(certs["self"], [503])
    _inventory(paths, TF_OUTPUTS, server.url)
    capsys.readouterr()
    assert paths.run("smoke", "--attempts", "3", *FAST) == 2
    err = one_error_line(capsys.readouterr())
    assert "did not answer 200 in 3 attempts" in err and "last: HTTP 503" in err
    assert "make status" in err and server.seen == 3


def test_a_refused_connection_is_retried_then_explained(paths, capsys):  # noqa: F811
    url = f"https://127.0.0.1:{free_port()}/ready"  # nothing listens there
    _inventory(paths, TF_OUTPUTS, url)
    capsys.readouterr()
    assert paths.run("smoke", "--attempts", "2", *FAST) == 2
    captured = capsys.readouterr()
    assert "attempt 2/2" in captured.out
    assert "refused the connection" in one_error_line(captured)


def test_a_client_error_is_not_retried(paths, serve, certs, capsys):  # noqa: F811
    server = serve(certs["self"], [404])
    _inventory(paths, TF_OUTPUTS, server.url)
    capsys.readouterr()
    assert paths.run("smoke", "--attempts", "5", *FAST) == 2
    assert "answered 404" in one_error_line(capsys.readouterr()) and server.seen == 1


def test_smoke_without_an_inventory_says_what_to_run(paths, capsys):  # noqa: F811
    assert paths.run("smoke") == 2
    assert "make inventory" in one_error_line(capsys.readouterr())


def test_make_deploy_ends_with_the_smoke_command():
    mk = (aws_ops.ROOT / "mk" / "aws.mk").read_text()
    step = mk[mk.index("[6/6]"):mk.index("$(AWS_OPS) summary")]
    assert "$(AWS_OPS) smoke" in step and "curl" not in step
