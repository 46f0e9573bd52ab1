"""Time sync on the hosts (common role): the servers timesyncd is given must be reachable
through the security group, which lets only TCP 80/443 out."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "ansible" / "roles" / "common"
# Amazon Time Sync Service: link-local, answered by the hypervisor, outside security groups
AMAZON_TIME_SYNC = {"169.254.169.123", "fd00:ec2::123"}


def defaults() -> dict:
    return yaml.safe_load((COMMON / "defaults" / "main.yml").read_text())


def rendered(**overrides) -> configparser.ConfigParser:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(COMMON / "templates"),
                             undefined=jinja2.StrictUndefined, trim_blocks=True)
    text = env.get_template("timesyncd.conf.j2").render({**defaults(), **overrides})
    # read as systemd reads a drop-in: [Section], Key=Value, '#' comments
    cfg = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"))
    cfg.optionxform = str
    cfg.read_string(text)
    return cfg


def host_egress() -> list[tuple[str, int, int]]:
    """(protocol, from, to) of the GPU hosts' egress rules in the security module."""
    tf = (ROOT / "terraform" / "modules" / "security" / "main.tf").read_text()
    rules = []
    for block in re.findall(r'resource "aws_vpc_security_group_egress_rule" "[^"]+" \{(.*?)\n\}',
                            tf, re.S):
        if "aws_security_group.host.id" not in block.split("security_group_id", 1)[1][:60]:
            continue
        proto = re.search(r'ip_protocol\s*=\s*"([^"]+)"', block).group(1)
        if "for_each" in block:  # { http = 80, https = 443 } with each.value as the port
            ports = [int(p) for p in re.findall(r"=\s*(\d+)", block.split("\n\n")[0])]
            rules += [(proto, p, p) for p in ports]
        else:
            lo = int(re.search(r"from_port\s*=\s*(\d+)", block).group(1))
            hi = int(re.search(r"to_port\s*=\s*(\d+)", block).group(1))
            rules.append((proto, lo, hi))
    return rules


def test_timesyncd_asks_the_amazon_time_sync_service_only():
    time = rendered()["Time"]
    assert time["NTP"].split() == ["169.254.169.123"]
    assert time["FallbackNTP"] == ""  # no public pool: it would be blocked anyway


def test_every_ntp_server_is_reachable_through_the_security_group():
    egress = host_egress()
    assert ("tcp", 443, 443) in egress  # the parser found the module's rules
    ntp_open = any(p in ("udp", "-1") and lo <= 123 <= hi for p, lo, hi in egress)
    time = rendered()["Time"]
    for server in time["NTP"].split() + time["FallbackNTP"].split():
        # security groups do not filter link-local traffic to the Time Sync Service
        assert ntp_open or server in AMAZON_TIME_SYNC, (
            f"{server} needs UDP 123 out, which the hosts' security group does not allow")


def test_other_servers_can_be_set():
    time = rendered(common_ntp_servers=["10.0.0.2", "10.0.0.3"],
                    common_ntp_fallback_servers=["ntp.ubuntu.com"])["Time"]
    assert time["NTP"] == "10.0.0.2 10.0.0.3" and time["FallbackNTP"] == "ntp.ubuntu.com"


def test_the_role_installs_the_drop_in_where_timesyncd_reads_it_and_restarts_it():
    main = yaml.safe_load((COMMON / "tasks" / "main.yml").read_text())
    assert {"name": "Time servers", "ansible.builtin.include_tasks": "time.yml"} in main
    tasks = yaml.safe_load((COMMON / "tasks" / "time.yml").read_text())
    drop_in = next(t for t in tasks if "ansible.builtin.template" in t)
    dest = Path(drop_in["ansible.builtin.template"]["dest"])
    # timesyncd reads /etc/systemd/timesyncd.conf.d/*.conf, nothing else there
    assert dest.parent == Path("/etc/systemd/timesyncd.conf.d") and dest.suffix == ".conf"
    assert (COMMON / "templates" / drop_in["ansible.builtin.template"]["src"]).exists()
    handlers = yaml.safe_load((COMMON / "handlers" / "main.yml").read_text())
    restart = next(h for h in handlers if h["name"] == drop_in["notify"])
    assert restart["ansible.builtin.systemd_service"] == {
        "name": "systemd-timesyncd.service", "state": "restarted"}


def test_timesyncd_is_started_on_ec2_but_not_inside_containers():
    tasks = yaml.safe_load((COMMON / "tasks" / "time.yml").read_text())
    start = next(t for t in tasks if "ansible.builtin.systemd_service" in t)
    assert start["ansible.builtin.systemd_service"]["state"] == "started"
    condition = jinja2.Environment().compile_expression(start["when"])
    types = defaults()["common_time_container_types"]
    # Nitro instances report kvm, Xen ones xen; the test hosts run under systemd-nspawn
    for virt, expected in (("kvm", True), ("xen", True), ("systemd-nspawn", False),
                           ("lxc", False), ("docker", False)):
        got = condition(ansible_facts={"virtualization_type": virt},
                        common_time_container_types=types)
        assert got is expected, virt


def test_new_defaults_are_declared_in_the_argument_specs():
    specs = yaml.safe_load((COMMON / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    for name in ("common_ntp_servers", "common_ntp_fallback_servers",
                 "common_time_container_types"):
        assert name in options and name in defaults()
    assert options["common_ntp_servers"]["default"] == defaults()["common_ntp_servers"]
