"""Let's Encrypt's DNS-01 loop, run for real with stand-ins for the two parts out of reach here.

The real certbot with its real Route53 plugin (Debian's packages, the ones the nginx role
installs) runs the command line the role renders, against:
- pebble, Let's Encrypt's own ACME test server (Debian package), in place of Let's Encrypt: it
  validates the DNS-01 challenge by asking a DNS server for the TXT record;
- moto's Route53 (PyPI moto[server], on 127.0.0.1) in place of Route53: the plugin finds the
  zone, writes the TXT record and waits for the change through the AWS API;
- a small DNS server in this test that answers from moto's Route53 records, as Route53's name
  servers answer from Route53's.
Then `certbot renew` renews through the same path and runs the role's deploy hook; and the
role's own letsencrypt.yml runs under ansible-playbook on localhost against the same stand-ins.
What stays unproven (Let's Encrypt itself, Route53 and IAM on AWS) is listed in docs/aws.md.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import httpx
import jinja2
import pytest

from tests.support.procs import Proc, free_port
from tests.unit.test_nginx_letsencrypt import ROLE, certbot_argv

CERTBOT = Path("/usr/bin/certbot")
PEBBLE = Path("/usr/bin/pebble")
DOMAIN = "api.example.com"



def _need(path: Path, package: str) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make deps` (Debian package {package})")


# ---- a DNS server answering from Route53's records ------------------------------------------


def _qname(packet: bytes, offset: int) -> tuple[str, int]:
    labels = []
    while packet[offset]:
        n = packet[offset]
        labels.append(packet[offset + 1:offset + 1 + n].decode())
        offset += n + 1
    return ".".join(labels), offset + 1


class Route53Dns:
    """UDP DNS on 127.0.0.1: TXT answers are the record sets moto's Route53 holds."""

    def __init__(self, route53, zone_id: str):
        self.route53, self.zone_id = route53, zone_id
        self.asked: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _txt(self, name: str) -> list[str]:
        sets = self.route53.list_resource_record_sets(HostedZoneId=self.zone_id)
        return [r["Value"].strip('"') for s in sets["ResourceRecordSets"]
                if s["Type"] == "TXT" and s["Name"].rstrip(".").lower() == name.lower()
                for r in s["ResourceRecords"]]

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            ident, _flags, qdcount = struct.unpack(">HHH", packet[:6])
            name, end = _qname(packet, 12)
            qtype, _qclass = struct.unpack(">HH", packet[end:end + 4])
            question = packet[12:end + 4]
            self.asked.append((name, qtype))
            answers = self._txt(name) if qtype == 16 else []
            body = b""
            for value in answers:
                data = value.encode()
                rdata = bytes([len(data)]) + data
                body += b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 0, len(rdata)) + rdata
            flags = 0x8400  # a response, authoritative, NOERROR
            header = struct.pack(">HHHHHH", ident, flags, 1, len(answers), 0, 0)
            self.sock.sendto(header + question + body, peer)

    def close(self) -> None:
        self.sock.close()


# ---- the stand-ins ----------------------------------------------------------------------------


@pytest.fixture
def acme(tmp_path):
    _need(CERTBOT, "certbot, python3-certbot-dns-route53")
    _need(PEBBLE, "pebble")
    procs: list[Proc] = []

    # Route53
    moto_port = free_port()
    moto = Proc("moto", [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                         "-p", str(moto_port)], tmp_path / "moto.log")
    procs.append(moto)
    moto_url = f"http://127.0.0.1:{moto_port}"
    moto.wait_http(moto_url + "/moto-api/", timeout=60)
    route53 = boto3.client("route53", endpoint_url=moto_url, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
    zone_id = route53.create_hosted_zone(Name="example.com.", CallerReference="t")[
        "HostedZone"]["Id"].split("/")[-1]
    dns = Route53Dns(route53, zone_id)

    # pebble with a TLS certificate of its own for its API
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-keyout", "pebble.key",
                    "-out", "pebble.crt", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True)
    acme_port, mgmt_port = free_port(), free_port()
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(tmp_path / "pebble.crt"), "privateKey": str(tmp_path / "pebble.key"),
        "httpPort": free_port(), "tlsPort": free_port(), "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    pebble = Proc("pebble", [str(PEBBLE), "-config", str(tmp_path / "pebble.json"),
                             "-dnsserver", dns.address], tmp_path / "pebble.log",
                  env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                       "PEBBLE_AUTHZREUSE": "0"})
    procs.append(pebble)
    directory = f"https://127.0.0.1:{acme_port}/dir"
    for _ in range(200):
        try:
            httpx.get(directory, verify=False, timeout=1)
            break
        except httpx.HTTPError:
            pebble.popen.poll()
            assert pebble.popen.returncode is None, pebble.log()
            threading.Event().wait(0.05)

    # boto3 in certbot's process talks to moto: Debian's botocore (1.29) predates
    # AWS_ENDPOINT_URL, so a sitecustomize on PYTHONPATH sets the endpoint (test-only seam)
    seam = tmp_path / "seam"
    seam.mkdir()
    (seam / "sitecustomize.py").write_text(
        "import boto3\n_client = boto3.client\n"
        "def client(name, *a, **kw):\n"
        f"    kw.setdefault('endpoint_url', {moto_url!r})\n"
        "    return _client(name, *a, **kw)\n"
        "boto3.client = client\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(seam),
           "REQUESTS_CA_BUNDLE": str(tmp_path / "pebble.crt"),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    dirs = ["--config-dir", str(tmp_path / "le"), "--work-dir", str(tmp_path / "le-work"),
            "--logs-dir", str(tmp_path / "le-logs")]

    class Acme:
        pass

    a = Acme()
    a.directory, a.env, a.dirs, a.route53, a.zone_id, a.dns = (
        directory, env, dirs, route53, zone_id, dns)
    a.mgmt = f"https://127.0.0.1:{mgmt_port}"
    a.tmp, a.pebble = tmp_path, pebble
    yield a
    dns.close()
    for p in reversed(procs):
        p.stop()


def _run(acme, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(CERTBOT), *argv[1:], *acme.dirs], capture_output=True,
                          text=True, timeout=300, env=acme.env)


def test_certbot_gets_a_certificate_by_dns01_in_route53_then_renews_and_reloads_nginx(acme):
    # the role's own command line; only the ACME directory (a role setting) and the wait differ
    argv = certbot_argv(nginx_letsencrypt_server=acme.directory,
                        nginx_letsencrypt_propagation_s=0)
    proc = _run(acme, argv)
    assert proc.returncode == 0, (shlex.join(argv) + "\n" + proc.stdout + proc.stderr
                                  + acme.pebble.log())

    live = acme.tmp / "le" / "live" / DOMAIN
    cert = subprocess.run(["openssl", "x509", "-in", str(live / "fullchain.pem"), "-noout",
                           "-ext", "subjectAltName"], capture_output=True, text=True, check=True)
    assert f"DNS:{DOMAIN}" in cert.stdout
    # the chain leads to the ACME server's root, as Let's Encrypt's leads to ISRG's
    root = httpx.get(acme.mgmt + "/roots/0", verify=False).text
    (acme.tmp / "root.pem").write_text(root)
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(acme.tmp / "root.pem"),
                               "-untrusted", str(live / "chain.pem"), str(live / "cert.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the ACME server asked DNS for the record the plugin wrote through the Route53 API ...
    assert (f"_acme-challenge.{DOMAIN}", 16) in acme.dns.asked
    # ... which the plugin removed afterwards
    sets = acme.route53.list_resource_record_sets(HostedZoneId=acme.zone_id)
    assert not [s for s in sets["ResourceRecordSets"] if s["Type"] == "TXT"]
    # certbot saved the Route53 authenticator for renewals
    renewal = (acme.tmp / "le" / "renewal" / f"{DOMAIN}.conf").read_text()
    assert "authenticator = dns-route53" in renewal

    # renewal, as certbot.timer runs it (less its random start delay), with the role's deploy
    # hook where certbot looks
    hooks = acme.tmp / "le" / "renewal-hooks" / "deploy"
    hooks.mkdir(parents=True, exist_ok=True)
    hook = hooks / "50-llm-nginx-reload"
    hook.write_text(jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE / "templates"))
                    .get_template("letsencrypt-deploy-hook.sh.j2").render())
    hook.chmod(0o755)
    fake_bin = acme.tmp / "bin"
    fake_bin.mkdir()
    calls = acme.tmp / "systemctl-calls"
    (fake_bin / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 0\n')
    (fake_bin / "systemctl").chmod(0o755)
    acme.env["PATH"] = f"{fake_bin}:/usr/bin:/bin"
    before = (live / "cert.pem").read_text()
    proc = _run(acme, ["certbot", "renew", "--force-renewal", "--non-interactive",
                     "--no-random-sleep-on-renew"])
    assert proc.returncode == 0, proc.stdout + proc.stderr + acme.pebble.log()
    assert (live / "cert.pem").read_text() != before
    assert calls.read_text().splitlines() == ["is-active --quiet nginx.service",
                                              "reload nginx.service"]


def test_a_zone_route53_does_not_hold_fails_and_leaves_no_certificate(acme):
    acme.route53.delete_hosted_zone(Id=acme.zone_id)
    argv = certbot_argv(nginx_letsencrypt_server=acme.directory,
                        nginx_letsencrypt_propagation_s=0)
    proc = _run(acme, argv)
    assert proc.returncode != 0
    assert "Unable to find a Route53 hosted zone" in proc.stdout + proc.stderr
    assert not (acme.tmp / "le" / "live" / DOMAIN / "fullchain.pem").exists()


# ---- the role's own tasks, run by ansible-playbook ----------------------------------------------

PLAYBOOK = """\
- name: The nginx role's Let's Encrypt tasks on this machine
  hosts: localhost
  connection: local
  gather_facts: true
  tasks:
    - name: Let's Encrypt by DNS-01 in Route53
      ansible.builtin.include_role:
        name: nginx
        tasks_from: letsencrypt.yml
        public: true
    - name: What the site template would be given
      ansible.builtin.copy:
        content: "{{ {'cert': nginx_cert_file, 'key': nginx_key_file} | to_json }}"
        dest: "{{ result_file }}"
        mode: "0600"
"""

SHOW_UNIT = "LoadState=loaded\nActiveState=active\nSubState=waiting\nUnitFileState=enabled\n"


def _play(acme, **overrides) -> tuple[subprocess.CompletedProcess, dict | None]:
    """ansible-playbook runs the role's letsencrypt.yml on localhost. Its paths are moved into
    the test's directory by variables (certbot's through its per-user cli.ini); systemctl is a
    stand-in (no systemd here) that reports certbot.timer loaded, enabled and active."""
    fake_bin = acme.tmp / "play-bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "systemctl").write_text(
        f"#!/bin/sh\necho \"$*\" >> {acme.tmp / 'play-systemctl'}\n"
        f"case \"$*\" in *show*) printf '{SHOW_UNIT}' ;; esac\nexit 0\n")
    (fake_bin / "systemctl").chmod(0o755)
    xdg = acme.tmp / "xdg"
    (xdg / "letsencrypt").mkdir(parents=True, exist_ok=True)
    (xdg / "letsencrypt" / "cli.ini").write_text(
        "".join(f"{a.lstrip('-')} = {b}\n" for a, b in zip(acme.dirs[::2], acme.dirs[1::2],
                                                          strict=True)))
    result = acme.tmp / "result.json"
    extra = {
        "nginx_letsencrypt_domain": DOMAIN, "nginx_letsencrypt_email": "ops@example.com",
        "nginx_letsencrypt_server": acme.directory, "nginx_letsencrypt_propagation_s": 0,
        "nginx_letsencrypt_live_dir": str(acme.tmp / "le" / "live" / DOMAIN),
        "nginx_letsencrypt_deploy_hook": str(acme.tmp / "le" / "renewal-hooks" / "deploy"
                                             / "50-llm-nginx-reload"),
        # the role hands certbot this environment (nginx_proxy_env, meant for proxies)
        "nginx_proxy_env": {**acme.env, "XDG_CONFIG_HOME": str(xdg)},
        "ansible_python_interpreter": "/usr/bin/python3",  # python3-apt for the apt module
        "result_file": str(result), **overrides,
    }
    (acme.tmp / "extra.json").write_text(json.dumps(extra))
    (acme.tmp / "play.yml").write_text(PLAYBOOK)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
         "-e", f"@{acme.tmp / 'extra.json'}", str(acme.tmp / "play.yml")],
        capture_output=True, text=True, timeout=600,
        env={"PATH": f"{fake_bin}:{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": str(acme.tmp), "ANSIBLE_ROLES_PATH": str(ROLE.parent),
             "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(acme.tmp / "ansible-tmp"),
             "ANSIBLE_REMOTE_TEMP": str(acme.tmp / "ansible-tmp")})
    return proc, (json.loads(result.read_text()) if result.exists() else None)


def _recap(output: str) -> dict[str, int]:
    line = next(x for x in output.splitlines() if x.startswith("localhost") and "ok=" in x)
    return {k: int(v) for k, v in (p.split("=") for p in line.split()[2:])}


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("the role's apt task needs root")


def test_the_role_issues_switches_nginx_and_changes_nothing_the_second_time(acme, root_only):
    proc, seen = _play(acme)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = acme.tmp / "le" / "live" / DOMAIN
    assert (live / "fullchain.pem").exists()
    assert seen == {"cert": str(live / "fullchain.pem"), "key": str(live / "privkey.pem")}
    hook = acme.tmp / "le" / "renewal-hooks" / "deploy" / "50-llm-nginx-reload"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert "did not issue a certificate for" not in proc.stdout
    assert _recap(proc.stdout)["failed"] == 0

    again, seen = _play(acme)
    assert again.returncode == 0, again.stdout + again.stderr
    recap = _recap(again.stdout)
    # the test's own copy task rewrites its file only when what nginx gets changed
    assert recap["changed"] == 0, again.stdout
    assert seen["cert"] == str(live / "fullchain.pem")


def test_a_refused_issue_keeps_the_self_signed_certificate_and_the_play_going(acme, root_only):
    acme.route53.delete_hosted_zone(Id=acme.zone_id)
    proc, seen = _play(acme)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Let's Encrypt did not issue a certificate for api.example.com" in proc.stdout
    assert "Unable to find a Route53 hosted zone" in proc.stdout
    assert seen == {"cert": "/etc/nginx/tls/llm-api.crt", "key": "/etc/nginx/tls/llm-api.key"}
