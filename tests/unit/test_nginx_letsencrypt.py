"""The nginx role's Let's Encrypt path, proven up to the line only a real account crosses.

The certbot command line is rendered by Ansible's own templating from the role's defaults and
vars, then parsed by the real certbot and its Route53 plugin (Debian's packages, the ones the
role installs) exactly as certbot would parse it on the host: which authenticator it picks,
which name, which account. The renewal hook is rendered and run against a stand-in systemctl.
What cannot run here: Let's Encrypt's servers and Route53 (docs/aws.md, First real deploy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from tests.support import ansible_eval

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "nginx"
CERTBOT = Path("/usr/bin/certbot")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3, where its certbot packages live

LE = {"nginx_letsencrypt_domain": "api.example.com", "nginx_letsencrypt_email": "ops@example.com"}


def role_value(expr: str, **host: Any) -> Any:
    """`expr` as a task of the nginx role sees it, on a host with these variables."""
    return ansible_eval.role_value("nginx", expr, **host)


def tasks(name: str) -> list[dict]:
    return yaml.safe_load((ROLE / "tasks" / name).read_text())


def task(name: str, file: str = "letsencrypt.yml") -> dict:
    found = [t for t in tasks(file) if t["name"] == name]
    assert len(found) == 1, f"no single task {name!r} in {file}"
    return found[0]


def certbot_argv(**host: Any) -> list[str]:
    argv = role_value("{{ nginx_letsencrypt_certbot_argv }}", **{**LE, **host})
    return [str(a) for a in argv]


def require_certbot() -> None:
    if not CERTBOT.exists():
        pytest.fail("certbot and python3-certbot-dns-route53 are missing: run `make deps` "
                    "(Debian packages, the ones the role installs on the hosts)")


# ---- the command line -------------------------------------------------------------------------


def test_the_role_runs_certbot_with_the_rendered_argument_vector():
    issue = task("Certificate issued (first run; renewals are certbot.timer's)")
    assert issue["ansible.builtin.command"]["argv"] == "{{ nginx_letsencrypt_certbot_argv }}"
    # only while there is no certificate: renewals are certbot.timer's, never the play's
    assert issue["when"] == "not nginx_letsencrypt_live.stat.exists"


def test_certbot_answers_dns_01_through_route53_for_the_domain():
    argv = certbot_argv()
    assert argv[:2] == ["certbot", "certonly"]
    assert "--dns-route53" in argv
    assert argv[argv.index("--domain") + 1] == "api.example.com"
    assert argv[argv.index("--cert-name") + 1] == "api.example.com"
    assert argv[argv.index("--email") + 1] == "ops@example.com"
    assert argv[argv.index("--dns-route53-propagation-seconds") + 1] == "30"
    assert {"--non-interactive", "--agree-tos"} <= set(argv)
    # nothing that needs port 80 or a stopped nginx
    for flag in ("--standalone", "--webroot", "--nginx", "--manual", "--apache",
                 "--preferred-challenges", "--http-01-port", "--pre-hook", "--post-hook"):
        assert flag not in argv, flag


def test_no_task_of_the_role_opens_port_80_or_uses_an_http_challenge():
    text = "\n".join(p.read_text() for p in (ROLE / "tasks").glob("*.yml"))
    text += (ROLE / "vars" / "main.yml").read_text()
    for word in ("--standalone", "--webroot", "http-01", "systemctl stop nginx"):
        assert word not in text, word


def _parse_with_certbot(argv: list[str]) -> subprocess.CompletedProcess:
    """certbot's own argument parser, with the plugins installed on this machine."""
    script = (
        "import json, sys\n"
        "from certbot._internal import cli\n"
        "from certbot._internal.plugins import disco, selection\n"
        "plugins = disco.PluginsRegistry.find_all()\n"
        "ns = cli.prepare_and_parse_args(plugins, sys.argv[1:])\n"
        "auth, inst = selection.cli_plugin_requests(ns)\n"
        "print(json.dumps({'verb': ns.verb, 'authenticator': auth, 'installer': inst,\n"
        "  'domains': ns.domains, 'email': ns.email, 'server': ns.server,\n"
        "  'key_type': ns.key_type, 'noninteractive': ns.noninteractive_mode,\n"
        "  'tos': ns.tos, 'eff_email': ns.eff_email,\n"
        "  'propagation': ns.dns_route53_propagation_seconds}))\n"
    )
    return subprocess.run([SYSTEM_PYTHON, "-c", script, *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": "/usr/bin:/bin"})


def test_the_real_certbot_reads_the_rendered_command_as_dns_route53():
    require_certbot()
    argv = certbot_argv()
    proc = _parse_with_certbot(argv[1:])
    assert proc.returncode == 0, proc.stderr
    parsed = json.loads(proc.stdout)
    assert parsed == {
        "verb": "certonly", "authenticator": "dns-route53", "installer": None,
        "domains": ["api.example.com"], "email": "ops@example.com",
        "server": "https://acme-v02.api.letsencrypt.org/directory", "key_type": "ecdsa",
        "noninteractive": True, "tos": True, "eff_email": False, "propagation": 30,
    }


def test_the_real_certbot_refuses_a_flag_it_does_not_know():
    """The check above can fail: certbot's parser rejects what it does not know."""
    require_certbot()
    proc = _parse_with_certbot([*certbot_argv()[1:], "--dns-route53-credentials", "/x"])
    assert proc.returncode != 0 and "unrecognized arguments" in proc.stderr


# ---- packages --------------------------------------------------------------------------------


def test_packages_come_from_the_distribution_pinned_where_known():
    bookworm = role_value("{{ nginx_letsencrypt_apt_names }}",
                          ansible_facts={"distribution_release": "bookworm"})
    assert bookworm == ["certbot=2.1.0-*", "python3-certbot-dns-route53=2.1.0-*"]
    other = role_value("{{ nginx_letsencrypt_apt_names }}",
                       ansible_facts={"distribution_release": "noble"})
    assert other == ["certbot", "python3-certbot-dns-route53"]


def test_the_bookworm_pin_matches_what_debian_ships():
    release = Path("/etc/os-release").read_text()
    if "VERSION_CODENAME=bookworm" not in release or shutil.which("apt-cache") is None:
        pytest.skip("needs a Debian 12 machine with apt-cache")
    pin = role_value("{{ nginx_letsencrypt_versions['bookworm'] }}")
    for package in ("certbot", "python3-certbot-dns-route53"):
        proc = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True)
        versions = [line.split("|")[1].strip() for line in proc.stdout.splitlines()]
        assert any(v.startswith(pin.rstrip("*")) for v in versions), (package, versions)


# ---- renewal and fallback ----------------------------------------------------------------------


def _hook(tmp_path: Path, active: bool) -> list[str]:
    text = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE / "templates"),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              keep_trailing_newline=True).get_template(
        "letsencrypt-deploy-hook.sh.j2").render()
    hook = tmp_path / "hook.sh"
    hook.write_text(text)
    hook.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                    f'case "$1" in is-active) exit {0 if active else 3} ;; esac\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run([str(hook)], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                               "RENEWED_LINEAGE": "/etc/letsencrypt/live/api.example.com"})
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_a_renewal_reloads_a_running_nginx(tmp_path):
    assert _hook(tmp_path, active=True) == ["is-active --quiet nginx.service",
                                            "reload nginx.service"]


def test_a_renewal_leaves_a_stopped_nginx_stopped(tmp_path):
    assert _hook(tmp_path, active=False) == ["is-active --quiet nginx.service"]


def test_the_hook_sits_where_certbot_runs_deploy_hooks_and_is_executable():
    hook = task("Renewal reloads nginx (deploy hook)")
    dest = role_value(hook["ansible.builtin.template"]["dest"])
    assert dest.startswith("/etc/letsencrypt/renewal-hooks/deploy/")
    assert hook["ansible.builtin.template"]["mode"] == "0755"
    # the package does not ship renewal-hooks/ (certbot makes it on its first run, later)
    names = [t["name"] for t in tasks("letsencrypt.yml")]
    directory = task("Certbot's deploy-hook directory")["ansible.builtin.file"]
    assert role_value(directory["path"]) == str(Path(dest).parent)
    assert directory["state"] == "directory"
    assert names.index("Certbot's deploy-hook directory") < names.index(
        "Renewal reloads nginx (deploy hook)")
    timer = task("Renewal timer (the certbot package's) enabled and running")
    assert timer["ansible.builtin.systemd_service"] == {
        "name": "certbot.timer", "state": "started", "enabled": True}


SWITCH = "Nginx serves the Let's Encrypt certificate once issued"


@pytest.mark.parametrize(("live", "issue", "switched"), [
    (False, {"rc": 1, "changed": False, "failed": False}, False),  # refused: keep self-signed
    (False, {"rc": 0, "changed": True}, True),                     # first issue
    (True, {"skipped": True, "changed": False}, True),             # issued on an earlier run
])
def test_nginx_keeps_the_self_signed_certificate_until_the_first_issue(live, issue, switched):
    when = task(SWITCH)["when"]
    assert role_value("{{ (" + " ".join(when.split()) + ") | bool }}",
                      nginx_letsencrypt_live={"stat": {"exists": live}},
                      nginx_letsencrypt_issue=issue) is switched
    paths = task(SWITCH)["ansible.builtin.set_fact"]
    assert role_value(paths["nginx_cert_file"], **LE) == (
        "/etc/letsencrypt/live/api.example.com/fullchain.pem")
    assert role_value(paths["nginx_key_file"], **LE) == (
        "/etc/letsencrypt/live/api.example.com/privkey.pem")


def test_the_self_signed_fallback_is_always_made_and_the_issue_never_fails_the_play():
    main = tasks("main.yml")
    names = [t["name"] for t in main]
    selfsigned = main[names.index("Self-signed certificate")]
    assert "when" not in selfsigned
    assert role_value("{{ nginx_cert_file }}") == "/etc/nginx/tls/llm-api.crt"
    # the certificate the site template names is decided before the template is rendered
    assert names.index("Let's Encrypt by DNS-01 in Route53") < names.index(
        "The API site (shared with local mode)")
    issue = task("Certificate issued (first run; renewals are certbot.timer's)")
    assert issue["failed_when"] is False


def test_lets_encrypt_without_an_email_stops_with_what_to_set():
    check = task("Let's Encrypt needs an account e-mail")["ansible.builtin.assert"]
    for email, ok in (("", False), ("ops at example.com", False), ("ops@example.com", True)):
        assert all(role_value("{{ (" + cond + ") | bool }}", nginx_letsencrypt_email=email)
                   for cond in check["that"]) is ok, email
    message = " ".join(role_value(check["fail_msg"], nginx_letsencrypt_domain="api.example.com",
                                  nginx_letsencrypt_email="").split())
    assert "letsencrypt_email in terraform/terraform.tfvars" in message


def test_every_default_is_declared_in_the_argument_specs():
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert set(defaults) == set(options)
    internals = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert not set(internals) & set(options), "role internals are not settings"


# ---- the Route53 calls certbot's plugin makes, against the host role's policy --------------------

# The real plugin (Debian's python3-certbot-dns-route53) with a botocore client whose requests
# are recorded and answered on the spot (botocore's own events: parameters as the plugin passes
# them, no network): one challenge written, waited for, removed.
R53_PROBE = r'''
import json, sys
from unittest import mock
import boto3
from certbot_dns_route53._internal.dns_route53 import Authenticator

ZONE, DOMAIN = sys.argv[1], sys.argv[2]
calls = []
real_client = boto3.client

class Http:
    status_code = 200
    headers = {}

ANSWERS = {
    "ListHostedZones": {"HostedZones": [
        {"Id": f"/hostedzone/{ZONE}", "Name": DOMAIN.split(".", 1)[1] + ".", "CallerReference": "a",
         "Config": {"PrivateZone": False}},
        {"Id": "/hostedzone/ZPRIVATE0000000000000", "Name": DOMAIN + ".", "CallerReference": "b",
         "Config": {"PrivateZone": True}}],
        "IsTruncated": False, "MaxItems": "100", "Marker": ""},
    "ChangeResourceRecordSets": {"ChangeInfo": {"Id": "/change/C1", "Status": "PENDING",
                                                "SubmittedAt": "2026-01-01T00:00:00Z"}},
    "GetChange": {"ChangeInfo": {"Id": "/change/C1", "Status": "INSYNC",
                                 "SubmittedAt": "2026-01-01T00:00:00Z"}},
}

def client(name, *a, **kw):
    c = real_client(name, region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE",
                    aws_secret_access_key="secret")
    def record(params, model, **_):
        calls.append({"op": model.name, "params": params})
    def answer(model, **_):
        return Http(), {**ANSWERS[model.name], "ResponseMetadata": {}}
    c.meta.events.register("before-parameter-build.route53", record)
    c.meta.events.register("before-call.route53", answer)
    return c

with mock.patch("boto3.client", client):
    config = mock.MagicMock()
    auth = Authenticator(config, "dns-route53")
    name = f"_acme-challenge.{DOMAIN}"
    change = auth._change_txt_record("UPSERT", name, "token-value")
    auth._wait_for_change(change)
    auth._cleanup(DOMAIN, name, "token-value")
print(json.dumps(calls, default=str))
'''

GPU_HOST_TF = ROOT / "terraform" / "modules" / "gpu_host" / "main.tf"


def _policy_block() -> str:
    text = GPU_HOST_TF.read_text()
    start = text.index('resource "aws_iam_role_policy" "letsencrypt_dns"')
    return text[start:text.index("\n}\n", start)]


def test_the_route53_plugin_calls_only_what_the_host_role_allows(tmp_path):
    require_certbot()
    probe = tmp_path / "probe.py"
    probe.write_text(R53_PROBE)
    proc = subprocess.run([SYSTEM_PYTHON, str(probe), "Z0123456789ABCDEFGHIJ", "api.example.com"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    calls = json.loads(proc.stdout)

    block = _policy_block()
    allowed = set(re.findall(r'Action\s*=\s*"(route53:\w+)"', block))
    assert allowed == {"route53:ListHostedZones", "route53:GetChange",
                       "route53:ChangeResourceRecordSets"}
    # every call the plugin makes is one the policy allows, and the policy allows no other
    assert {f"route53:{c['op']}" for c in calls} == allowed
    record_actions = set(re.findall(r'"(UPSERT|DELETE|CREATE)"', block))
    for call in calls:
        if call["op"] != "ChangeResourceRecordSets":
            continue
        # the zone the plugin finds is the one Terraform scopes the write to
        assert call["params"]["HostedZoneId"] == "Z0123456789ABCDEFGHIJ"
        assert 'hostedzone/${coalesce(var.letsencrypt_zone_id, "-")}' in block
        for change in call["params"]["ChangeBatch"]["Changes"]:
            record = change["ResourceRecordSet"]
            assert change["Action"] in record_actions
            assert record["Type"] == "TXT" and '["TXT"]' in block
            # the normalized name the condition key compares with
            assert record["Name"].rstrip(".").lower() == "_acme-challenge.api.example.com"
            assert '["_acme-challenge.${coalesce(var.letsencrypt_domain, "-")}"]' in block
    assert [c["params"]["ChangeBatch"]["Changes"][0]["Action"] for c in calls
            if c["op"] == "ChangeResourceRecordSets"] == ["UPSERT", "DELETE"]
