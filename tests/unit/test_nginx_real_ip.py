"""nginx behind the load balancer: the shared site template rendered both ways from the role's
defaults (as Ansible's template module renders it), each rendering accepted by the real
`nginx -t`, and the role's preflight that refuses a trusted range that would let clients
choose their own address. tests/integration/test_nginx_edge.py runs it against requests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stack import local
from stack.render import render, resolve, role_defaults, write
from tests.support import ansible_eval

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "nginx"
TEMPLATE = "ansible/roles/nginx/templates/llm-api.conf.j2"
VPC = "10.42.0.0/16"
BEHIND = {"nginx_behind_load_balancer": True, "nginx_load_balancer_cidrs": [VPC]}
REAL_IP = ("set_real_ip_from", "real_ip_header", "real_ip_recursive")


def site(tmp: Path, **overrides) -> str:
    """The site as the role renders it, with this machine's paths for the files it names."""
    local.ensure_tls(tmp / "tls")
    return render(TEMPLATE, resolve({
        **role_defaults("nginx"), "nginx_https_port": 8443, "nginx_listen_ipv6": False,
        "nginx_cert_file": str(tmp / "tls/server.crt"),
        "nginx_key_file": str(tmp / "tls/server.key"),
        "nginx_access_log": str(tmp / "access.log"), "nginx_error_log": str(tmp / "error.log"),
        # one host: no metrics listener (its allow list needs an inventory to derive)
        "nginx_metrics_allow": [], **overrides}))


def server_directives(text: str) -> list[str]:
    """The server block's own directives (not those of its locations), comments dropped."""
    body = text[text.index("server {"):]
    out, depth = [], 0
    for line in body.splitlines()[1:]:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0 and not line.startswith("}") and line.endswith(";"):
            out.append(line)
        depth += line.count("{") - line.count("}")
        if depth < 0:
            break
    return out


def nginx_check(tmp: Path, text: str) -> None:
    """`nginx -t` on the rendered site inside a main config of our own, prefix in tmp."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing: run `make deps` (Debian package nginx)")
    conf = tmp / "llm-api.conf"
    write(conf, text)
    main = tmp / "nginx.conf"
    write(main, local.nginx_main_conf(conf, tmp, tmp / "error.log"))
    local.prepare_nginx_dirs(tmp)
    proc = subprocess.run(["nginx", "-t", "-c", str(main), "-p", str(tmp), "-e",
                           str(tmp / "error.log")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_host_on_the_internet_trusts_no_forwarded_header(tmp_path):
    text = site(tmp_path)
    assert not [d for d in server_directives(text) if d.startswith(REAL_IP)]
    assert not re.search(r"^\s*(set_real_ip_from|real_ip_)", text, re.M)
    nginx_check(tmp_path, text)


def test_behind_the_load_balancer_the_client_comes_from_x_forwarded_for(tmp_path):
    text = site(tmp_path, **BEHIND)
    directives = server_directives(text)
    assert [d for d in directives if d.startswith(REAL_IP)] == [
        f"set_real_ip_from {VPC};", "real_ip_header X-Forwarded-For;", "real_ip_recursive on;"]
    # the per-IP limit and the log key on the address the realip module sets
    assert "limit_req_zone $binary_remote_addr zone=llm_api_per_ip" in text
    assert '"remote":"$remote_addr"' in text
    nginx_check(tmp_path, text)


def test_every_range_the_load_balancer_connects_from_is_trusted(tmp_path):
    text = site(tmp_path, nginx_behind_load_balancer=True,
                nginx_load_balancer_cidrs=["10.42.0.0/24", "10.42.1.0/24"])
    assert [d for d in server_directives(text) if d.startswith("set_real_ip_from")] == [
        "set_real_ip_from 10.42.0.0/24;", "set_real_ip_from 10.42.1.0/24;"]
    nginx_check(tmp_path, text)


@pytest.mark.parametrize("behind, cidrs, ok", [
    (False, [], True),
    (True, [VPC], True),
    (True, [], False),                      # the setting would do nothing
    (True, ["0.0.0.0/0"], False),           # every client could choose its address
    (True, [VPC, "::/0"], False),
    (False, ["0.0.0.0/0"], False),
])
def test_the_role_refuses_a_load_balancer_without_a_safe_range(behind, cidrs, ok):
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    check = next(t for t in tasks if t["name"].startswith("Behind a load balancer"))
    assert tasks.index(check) == 0, "refused before anything is installed"
    host = {"nginx_behind_load_balancer": behind, "nginx_load_balancer_cidrs": cidrs}
    passed = all(ansible_eval.role_value("nginx", "{{ (" + cond + ") | bool }}", **host)
                 for cond in check["ansible.builtin.assert"]["that"])
    assert passed is ok


def test_local_mode_is_not_behind_a_load_balancer():
    from stack import declaration

    v = local.variables(declaration.load())
    assert v["nginx_behind_load_balancer"] is False
    assert "set_real_ip_from" not in render(TEMPLATE, v)
