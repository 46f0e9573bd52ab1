"""nginx's metrics listener, through which a Prometheus on another host scrapes a host's
gateway and vLLM servers (they listen on 127.0.0.1 only): the shared site template rendered for
each host of a two-host inventory with the role's own defaults evaluated by Ansible, each
rendering accepted by the real `nginx -t`; the role's refusal of names and wildcards; the one
port the firewall, the monitoring role and Terraform open. tests/integration/
test_metrics_listener.py serves it with a real nginx."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stack import declaration, local
from stack.render import render
from tests.support import ansible_eval
from tests.support.procs import free_port
from tests.unit.test_nginx_real_ip import nginx_check, site

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
TEMPLATE = "ansible/roles/nginx/templates/llm-api.conf.j2"
MODELS = [m.model_dump() for m in declaration.load()]

# two GPU hosts as `make inventory` writes them: public ansible_host, private aws_private_ip,
# Prometheus (the monitoring group) on the first
TWO_HOSTS = {
    "gpu1": {"ansible_host": "203.0.113.10", "aws_private_ip": "10.0.1.10"},
    "gpu2": {"ansible_host": "203.0.113.11", "aws_private_ip": "10.0.1.11"},
}
LISTENER_VARS = ("nginx_metrics_allow", "nginx_metrics_listen_address")


def listener_vars(host: str, hostvars: dict, monitoring: list[str]) -> dict:
    """The listener's variables as the nginx role's defaults give them on `host`."""
    view = {"groups": {"gpu_hosts": list(hostvars), "monitoring": monitoring},
            "hostvars": hostvars, "inventory_hostname": host, **hostvars[host]}
    return {k: ansible_eval.role_value("nginx", "{{ " + k + " }}", **view)
            for k in LISTENER_VARS}


def host_site(tmp: Path, host: str, hostvars: dict = TWO_HOSTS,
              monitoring: tuple[str, ...] = ("gpu1",), **overrides) -> str:
    return site(tmp, llm_models=MODELS,
                **{**listener_vars(host, hostvars, list(monitoring)), **overrides})


def server_blocks(text: str) -> list[str]:
    """Each top-level `server { ... }` block of the site, comments dropped."""
    lines = [ln.split("#", 1)[0].rstrip() for ln in text.splitlines()]
    blocks, current, depth = [], None, 0
    for line in lines:
        if current is None and line.strip() == "server {":
            current, depth = [], 0
        if current is not None:
            current.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0:
                blocks.append("\n".join(current))
                current = None
    return blocks


def locations(block: str) -> list[str]:
    return re.findall(r"^\s*location (.+?) \{", block, re.M)


def test_a_peer_admits_only_the_monitoring_host_on_its_private_address(tmp_path):
    text = host_site(tmp_path, "gpu2")
    public, listener = server_blocks(text)
    assert re.findall(r"^\s*(listen|allow|deny) (.+);", listener, re.M) == [
        ("listen", "10.0.1.11:9180"), ("allow", "10.0.1.10"), ("deny", "all")]
    assert "ssl" not in listener
    # the metrics and nothing else: each to its own loopback server
    assert locations(listener) == [
        "= /gateway/metrics", *[f"= /vllm/{m['name']}/metrics" for m in MODELS], "/"]
    assert re.findall(r"proxy_pass (\S+);", listener) == [
        "http://127.0.0.1:8080/metrics", *[f"http://127.0.0.1:{m['port']}/metrics"
                                           for m in MODELS]]
    assert re.search(r"location / \{\s*return 404 ", listener)
    # never a public address
    assert "203.0.113" not in text
    # `nginx -t` binds every listen address: the same site on one this machine has
    nginx_check(tmp_path, host_site(tmp_path, "gpu2", nginx_metrics_listen_address="127.0.0.1",
                                    nginx_metrics_port=free_port()))


def test_the_public_https_server_still_refuses_metrics(tmp_path):
    public = server_blocks(host_site(tmp_path, "gpu2"))[0]
    assert "listen 443 ssl" in public or re.search(r"listen \d+ ssl", public)
    # only the API, health and readiness reach the gateway; /metrics falls to the 404
    assert [loc for loc in locations(public) if "_edge_error" not in loc] == [
        "/v1/", "= /health", "= /ready", "/"]
    assert "metrics" not in public


@pytest.mark.parametrize("host, hostvars, monitoring", [
    ("gpu1", TWO_HOSTS, ("gpu1",)),                     # Prometheus' own host: loopback
    ("gpu1", {"gpu1": TWO_HOSTS["gpu1"]}, ("gpu1",)),   # a single host
], ids=["the-prometheus-host", "a-single-host"])
def test_a_host_no_other_prometheus_scrapes_opens_no_listener(tmp_path, host, hostvars,
                                                             monitoring):
    assert listener_vars(host, hostvars, list(monitoring))["nginx_metrics_allow"] == []
    text = host_site(tmp_path, host, hostvars, monitoring)
    assert len(server_blocks(text)) == 1
    assert "9180" not in text and "/gateway/metrics" not in text
    nginx_check(tmp_path, text)


def test_a_separate_monitoring_host_is_admitted_by_every_gpu_host(tmp_path):
    hostvars = {**TWO_HOSTS, "mon1": {"ansible_host": "198.51.100.5",
                                      "aws_private_ip": "10.0.2.5"}}
    for host, address in (("gpu1", "10.0.1.10"), ("gpu2", "10.0.1.11")):
        v = listener_vars(host, hostvars, ["mon1"])
        assert v == {"nginx_metrics_allow": ["10.0.2.5"],
                     "nginx_metrics_listen_address": address}


def test_without_a_private_address_the_inventory_address_is_used(tmp_path):
    # test hosts and static inventories: ansible_host is the address peers reach
    hostvars = {"a": {"ansible_host": "10.9.0.2"}, "b": {"ansible_host": "10.9.0.3",
                                                         "aws_private_ip": ""}}
    assert listener_vars("b", hostvars, ["a"]) == {"nginx_metrics_allow": ["10.9.0.2"],
                                                   "nginx_metrics_listen_address": "10.9.0.3"}


def test_local_mode_opens_no_listener():
    v = local.variables(declaration.load())
    assert v["nginx_metrics_allow"] == []
    assert "/gateway/metrics" not in render(TEMPLATE, v)


@pytest.mark.parametrize("allow, listen, ok", [
    ([], "", True),                                  # no listener: nothing to check
    (["10.0.1.10"], "10.0.1.11", True),
    (["10.0.2.0/24", "fd00::5"], "10.0.1.11", True),
    (["mon1.internal"], "10.0.1.11", False),         # a name: resolved once at start, or not
    (["0.0.0.0/0"], "10.0.1.11", False),             # everyone
    (["10.0.1.10"], "0.0.0.0", False),               # every interface, the public one too
    (["10.0.1.10"], "gpu2", False),
])
def test_the_role_refuses_a_listener_on_names_or_wildcards(allow, listen, ok):
    tasks = yaml.safe_load((ROLES / "nginx" / "tasks" / "main.yml").read_text())
    check = next(t for t in tasks if t["name"].startswith("The metrics listener binds"))
    assert tasks.index(check) < next(i for i, t in enumerate(tasks) if t["name"] == "Packages")
    host = {"nginx_metrics_allow": allow, "nginx_metrics_listen_address": listen}
    passed = all(ansible_eval.role_value("nginx", "{{ (" + cond + ") | bool }}", **host)
                 for cond in check["ansible.builtin.assert"]["that"])
    assert passed is ok


def _terraform_default_metrics_ports(path: Path) -> dict[str, int]:
    text = path.read_text()
    block = text[text.index('variable "metrics_ports"'):]
    default = re.search(r"default = \{(.*?)\}", block, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", default)}


def test_one_port_for_the_listener_the_firewall_the_scrapes_and_the_security_group():
    nginx = yaml.safe_load((ROLES / "nginx" / "defaults" / "main.yml").read_text())
    group_vars = yaml.safe_load((ROOT / "ansible/group_vars/all/main.yml").read_text())
    common = yaml.safe_load((ROLES / "common" / "defaults" / "main.yml").read_text())
    port = nginx["nginx_metrics_port"]
    assert port == group_vars["nginx_metrics_port"] == 9180
    # the firewall follows the site-wide setting; the role's own default names the same port
    assert group_vars["common_metrics_ports"][-1] == "{{ nginx_metrics_port }}"
    assert port in common["common_metrics_ports"]
    for tf in (ROOT / "terraform/variables.tf", ROOT / "terraform/modules/security/variables.tf"):
        assert _terraform_default_metrics_ports(tf).get("metrics_listener") == port, tf
